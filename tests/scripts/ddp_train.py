"""Run by tests/test_distributed.py under torchrun: LWF in 2-process DDP on CPU; each rank writes a checksum."""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, tiny_llama  # noqa: E402

from hf_lwf import LWFTrainer  # noqa: E402


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer()
    args = lwf_args(output_dir, max_steps=4, per_device_train_batch_size=2, lwf_forget_ratio=0.5,
                    lwf_unlearn_batch_size=3, ddp_find_unused_parameters=False, lwf_fisher="empirical",
                    lwf_fisher_samples=4)
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    trainer.train()
    rank = torch.distributed.get_rank()
    state = trainer.lwf_callback.lwf_state
    result = {
        "world_size": torch.distributed.get_world_size(),
        "checksum": float(sum(p.double().sum() for p in trainer.model.parameters())),
        "scores": state.scores,
        "forget_indices": state.forget_indices,
        "unlearn_steps": state.unlearn_steps,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
