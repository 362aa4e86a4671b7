"""Run by tests/test_gpu.py under torchrun on 2 GPUs (NCCL): LWFTrainer in bf16 under DDP, FSDP2, or FSDP2 with CPU
offloading (which LWF refuses at construction). Usage: ``gpu_multi.py {ddp,fsdp,fsdp_offload} OUTPUT_DIR``; each
rank writes ``rank<r>.json``."""

import json
import os
import sys

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import build_tokenizer, learning_dataset, lm_collator, lwf_args, tiny_llama  # noqa: E402

from hf_lwf import LWFTrainer  # noqa: E402


def main(mode: str, output_dir: str) -> None:
    tokenizer = build_tokenizer()
    extra = {}
    if mode.startswith("fsdp"):
        extra = dict(fsdp="full_shard auto_wrap" + (" offload" if mode == "fsdp_offload" else ""),
                     fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = lwf_args(output_dir, use_cpu=False, bf16=True, max_steps=4, per_device_train_batch_size=2,
                    lwf_forget_ratio=0.5, lwf_unlearn_batch_size=3, ddp_find_unused_parameters=False, **extra)
    result = {}
    try:
        trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                             processing_class=tokenizer, data_collator=lm_collator(tokenizer))
        trainer.train()
        state = trainer.lwf_callback.lwf_state
        result = {"scores": state.scores, "forget_indices": state.forget_indices,
                  "unlearn_steps": state.unlearn_steps}
    except ValueError as err:
        if mode != "fsdp_offload":
            raise
        result = {"refused": str(err)}
    rank = int(os.environ.get("RANK", 0))
    if dist.is_initialized():
        result.update(backend=dist.get_backend(), world_size=dist.get_world_size())
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    main(sys.argv[1], sys.argv[2])
