"""Run by tests/test_distributed.py: LWF in 2-process DDP on CPU (under torchrun), or the same run in ONE process
(``single``: the same global batch of 4). Each process writes its weights' checksum and LWF's outcome; under DDP it
also records every all-reduce inside the ascent steps (each must be a parameter's own gradient, in place)."""

import json
import os
import sys

import torch
import torch.distributed as dist


# the repository's own hf_lwf first (a script's sys.path starts at its folder, not the working directory, so an
# installed hf_lwf elsewhere would be tested instead), then tests/ for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, run_rank, tiny_llama  # noqa: E402

import hf_lwf.backends.base as callback_module  # noqa: E402
from hf_lwf import LWFTrainer  # noqa: E402


def watch_ascent_collectives(record: list) -> None:
    """Record (numel, is a parameter's own .grad) for every all-reduce made inside an ascent step."""
    ascent, all_reduce = callback_module.ascent_step, dist.all_reduce
    inside = []

    def watched_reduce(tensor, *args, **kwargs):
        if inside:
            grads = {p.grad.data_ptr() for p in inside[0].parameters() if p.grad is not None}
            record.append((tensor.numel(), tensor.data_ptr() in grads))
        return all_reduce(tensor, *args, **kwargs)

    def watched_ascent(model, *args, **kwargs):
        inside.append(model)
        try:
            return ascent(model, *args, **kwargs)
        finally:
            inside.pop()

    dist.all_reduce = watched_reduce
    callback_module.ascent_step = watched_ascent


def main(output_dir: str, mode: str = "ddp") -> None:
    tokenizer = build_tokenizer()
    collectives = []
    if mode == "ddp":
        watch_ascent_collectives(collectives)
    args = lwf_args(output_dir, max_steps=4, per_device_train_batch_size=2 if mode == "ddp" else 4,
                    lwf_forget_ratio=0.5, lwf_unlearn_batch_size=3, ddp_find_unused_parameters=False,
                    lwf_fisher="empirical", lwf_fisher_samples=4)
    model = tiny_llama(len(tokenizer))
    trainer = LWFTrainer(model=model, args=args, train_dataset=learning_dataset(tokenizer),
                         processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    result = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "checksum": float(sum(p.double().sum() for p in trainer.model.parameters())),
        "weights": {n: p.detach().reshape(-1).tolist() for n, p in trainer.model.named_parameters()},
        "scores": state.scores,
        "forget_indices": state.forget_indices,
        "unlearn_steps": state.unlearn_steps,
        "ascent_collectives": collectives,
        "largest_parameter": max(p.numel() for p in model.parameters()),
    }
    name = f"rank{dist.get_rank()}.json" if mode == "ddp" else "single.json"
    with open(os.path.join(output_dir, name), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    run_rank(main, *sys.argv[1:])
