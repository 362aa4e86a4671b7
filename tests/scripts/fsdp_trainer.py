"""Run by tests/test_fsdp.py under torchrun (2 CPU ranks, gloo): ``LWFTrainer`` through accelerate's FSDP2 path.

accelerate builds FSDP only for GPU distributed types; on CPU it silently uses DDP. This script lets the
``AcceleratorState`` keep the FSDP plugin on CPU (a test-only patch of one decision, below), so the Trainer prepares
the model with accelerate's own ``fully_shard`` code, registers ``generate``, saves sharded checkpoints with
torch.distributed.checkpoint, and resumes them: the real Trainer + accelerate + LWF path, on gloo.

Phases: ``ddp`` (the same run under DDP, the reference), ``fsdp`` (6 steps), ``crash`` (stops at step 5, after
checkpoint-4), ``resume`` (continues from the last checkpoint). Each rank writes ``<phase>-rank<r>.json``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from transformers import TrainerCallback


# the repository's own hf_lwf first (a script's sys.path starts at its folder, not the working directory, so an
# installed hf_lwf elsewhere would be tested instead), then tests/ for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, run_rank, tiny_llama  # noqa: E402

from hf_lwf import LWFTrainer  # noqa: E402
from hf_lwf.distributed import full_tensor, is_sharded  # noqa: E402


_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """The one test-only change: keep the FSDP plugin where accelerate would fall back to DDP on CPU."""
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _fsdp_on_cpu


class Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise SystemExit(0)


def main(output_dir: str, phase: str) -> None:
    tokenizer = build_tokenizer()
    fsdp = {} if phase == "ddp" else {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                        "state_dict_type": "SHARDED_STATE_DICT"},
    }
    args = lwf_args(os.path.join(output_dir, "ddp" if phase == "ddp" else "fsdp" if phase == "fsdp" else "split"),
                    max_steps=6, per_device_train_batch_size=2, lwf_unlearn_every=2, lwf_forget_ratio=0.5,
                    lwf_unlearn_batch_size=2, lwf_mask_ratio=0.5, lwf_forget_loss_cap=50.0, save_strategy="steps",
                    save_steps=2, ddp_find_unused_parameters=False, **fsdp)
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer),
                         callbacks=[Crash()] if phase == "crash" else None)
    trainer.train(resume_from_checkpoint=True if phase == "resume" else None)
    state = trainer.lwf_callback.lwf_state
    params = [p.detach() for _, p in sorted(trainer.model.named_parameters())]
    result = {
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "state_sharded": all(is_sharded(t) for t in list(state.fisher.values()) + list(state.reference.values())),
        "params_sharded": is_sharded(trainer.model),
        "checksum": float(sum(full_tensor(p).double().sum() for p in params)),
        "weights": [float(full_tensor(p).double().abs().sum()) for p in params],
        "scores": state.scores,
        "forget_indices": state.forget_indices,
        "unlearn_steps": state.unlearn_steps,
        "fisher_updates": state.fisher_updates,
        "history": [{k: v for k, v in h.items() if "seconds" not in k} for h in state.history],
        "checkpoints": sorted(d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")),
    }
    with open(os.path.join(output_dir, f"{phase}-rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    run_rank(main, sys.argv[1], sys.argv[2])
