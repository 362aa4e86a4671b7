"""Run by tests/test_preemption.py under torchrun (2 CPU ranks, gloo): ``LWFTrainer`` under DDP, FSDP2 or DeepSpeed
ZeRO-2, killed at a moment of a checkpoint write and restarted with ``resume_from_checkpoint=True``.

``preempt_train.py ROOT ENGINE PHASES``: ENGINE is ``ddp``, ``fsdp`` (accelerate's FSDP2 with sharded checkpoints,
kept on CPU by the patch tests/scripts/fsdp_trainer.py applies on import) or ``zero2``; PHASES is a comma-separated
list of ``run`` (train ``ROOT/run``, resuming when it has a checkpoint) and ``reference`` (the uninterrupted run in
``ROOT/reference``). The moment comes from the environment: ``HF_LWF_KILL`` (see kill_points.py) on the rank
``HF_LWF_KILL_RANK``, events logged to ``HF_LWF_KILL_LOG``. Rank 0 writes ``ROOT/<phase>.safetensors`` (the whole
weights) and ``ROOT/<phase>.json`` (the LWF state's summary).
"""

import json
import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file
from transformers.trainer_utils import get_last_checkpoint


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fsdp_trainer  # noqa: E402,F401 - keeps accelerate's FSDP plugin on CPU (a no-op for the other engines)
import kill_points  # noqa: E402
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, run_rank, tiny_llama  # noqa: E402
from deepspeed_trainer import deepspeed_config  # noqa: E402

from hf_lwf import LWFTrainer  # noqa: E402
from hf_lwf.distributed import full_tensor  # noqa: E402


ENGINES = {
    "ddp": {},
    "fsdp": {"fsdp": "full_shard auto_wrap",
             "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                             "state_dict_type": "SHARDED_STATE_DICT"}},
    "zero2": {"deepspeed": deepspeed_config(2)},
}


def run(root: str, engine: str, phase: str) -> None:
    out = os.path.join(root, phase)
    tokenizer = build_tokenizer()
    args = lwf_args(out, max_steps=6, per_device_train_batch_size=2, lwf_unlearn_every=2, lwf_forget_ratio=0.5,
                    lwf_unlearn_batch_size=2, lwf_mask_ratio=0.5, save_strategy="steps", save_steps=2,
                    save_total_limit=1, ddp_find_unused_parameters=False, lwf_unlearn_optimizer="sgd",
                    lwf_unlearn_lr=0.05, **ENGINES[engine])
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    started = os.path.isdir(out) and get_last_checkpoint(out) is not None
    trainer.train(resume_from_checkpoint=True if started else None)
    weights = {name: full_tensor(p.detach()).contiguous() for name, p in sorted(trainer.model.named_parameters())}
    if dist.get_rank() == 0:
        save_file(weights, os.path.join(root, f"{phase}.safetensors"))
        state = trainer.lwf_callback.lwf_state
        summary = {**state.run_summary(), "forget_indices": state.forget_indices,
                   "history": [{k: v for k, v in h.items() if "seconds" not in k} for h in state.history]}
        with open(os.path.join(root, f"{phase}.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle)


def main(root: str, engine: str, phases: str) -> None:
    if os.environ.get("HF_LWF_KILL_RANK", "0") == os.environ.get("RANK", "0"):
        kill_points.install(os.environ.get("HF_LWF_KILL"), os.environ.get("HF_LWF_KILL_LOG"))
    for phase in phases.split(","):
        run(root, engine, phase)


if __name__ == "__main__":
    run_rank(main, *sys.argv[1:4])
