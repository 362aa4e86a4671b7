"""Run by tests/test_distributed.py: one "node" of a 2-node DDP run on CPU (one process per node).

Each node has its own output folder (no shared file system). Phases: ``full`` trains 6 steps; ``crash`` stops
at step 5 (checkpoint-4 exists on the main node); ``resume`` continues from the node's own copy of the last
checkpoint. Each writes its final checksum and LWF state to ``result.json`` in its folder.
"""

import json
import os
import sys

import torch
from transformers import TrainerCallback


# the repository's own hf_lwf first (a script's sys.path starts at its folder, not the working directory, so an
# installed hf_lwf elsewhere would be tested instead), then tests/ for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, run_rank, tiny_llama  # noqa: E402

from hf_lwf import LWFTrainer  # noqa: E402


class Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise SystemExit(0)


def main(base: str, phase: str) -> None:
    output_dir = os.path.join(base, f"node{os.environ['GROUP_RANK']}")
    tokenizer = build_tokenizer()
    args = lwf_args(output_dir, max_steps=6, per_device_train_batch_size=2, lwf_unlearn_every=3,
                    lwf_unlearn_batch_size=2, lwf_forget_ratio=0.5, ddp_find_unused_parameters=False,
                    save_strategy="steps", save_steps=2)
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer),
                         callbacks=[Crash()] if phase == "crash" else None)
    trainer.train(resume_from_checkpoint=True if phase == "resume" else None)
    state = trainer.lwf_callback.lwf_state
    result = {
        "world_size": torch.distributed.get_world_size(),
        "checksum": float(sum(p.double().sum() for p in trainer.model.parameters())),
        "forget_indices": state.forget_indices,
        "unlearn_steps": state.unlearn_steps,
        "history": [{k: v for k, v in h.items() if "seconds" not in k} for h in state.history],
    }
    with open(os.path.join(output_dir, "result.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    run_rank(main, sys.argv[1], sys.argv[2])
