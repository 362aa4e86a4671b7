"""Run by tests/method/test_fisher.py under torchrun (2 CPU ranks, gloo): the update mask on sharded layouts.

The bf16 state of ``conftest.tied_bf16_state`` (|F * D| full of exact ties) is scored as FSDP2 row shards
(``fully_shard``: ``ScoringTerms``) and as ZeRO-3 flat slices (``PartitionTerms`` on parameters given the
``ds_*`` attributes DeepSpeed sets, each rank a contiguous slice of each flattened parameter; DeepSpeed itself is
not needed). Rank ``r`` writes the entries its part of the mask keeps, as (name, flat index in the parameter), to
``rank{r}.json``; the test compares their union with a float64 sort.
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import run_rank, tied_bf16_state  # noqa: E402

from hf_lwf.backends.zero import PartitionTerms  # noqa: E402
from hf_lwf.distributed import like_shard, local_rows, local_view  # noqa: E402
from hf_lwf.method.fisher import ScoringTerms, trainable_parameters  # noqa: E402

RATIOS = (0.05, 0.2, 0.3, 0.35, 0.6, 0.7)  # 0.3 and 0.7: the cut falls inside a shard, after ties in its earlier rows
SCALE = 2.0
RATE = 3.0


def fsdp(ratio: float) -> dict:
    model, reference, fisher = tied_bf16_state(seed=5)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model)
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, p in params.items():
            local_view(p).copy_(live[name][local_rows(p)])
    fisher = {n: like_shard(f, params[n]) for n, f in fisher.items()}
    reference = {n: like_shard(r, params[n]) for n, r in reference.items()}
    terms = ScoringTerms.from_state(fisher, model=model, reference=reference, scale=SCALE, mask_ratio=ratio)
    rated = ScoringTerms.from_state(fisher, model=model, reference=reference, scale=SCALE, mask_ratio=ratio,
                                    rates={n: RATE for n in fisher})
    kept, agree, scaled = [], True, True
    for name, f in fisher.items():
        own = local_rows(f)
        width = math.prod(f.shape[1:])
        mask = terms.mask(name)
        kept += [[name, own.start * width + i] for i in mask.reshape(-1).nonzero().flatten().tolist()]
        whole_w, whole_fm = terms.chunk(name, own)
        blocks = [slice(r, r + 1) for r in range(own.start, own.stop)]  # one row at a time
        if blocks:
            agree &= torch.equal(torch.cat([terms.mask(name, b) for b in blocks]), mask)
            agree &= torch.equal(torch.cat([terms.chunk(name, b)[0] for b in blocks]), whole_w)
        w, fm = rated.chunk(name, own)
        scaled &= torch.equal(w, whole_w * RATE) and torch.equal(fm, whole_fm * RATE**2)
    return {"kept": kept, "threshold": terms.threshold, "blocks_agree": bool(agree), "rated": bool(scaled)}


def zero3(ratio: float) -> dict:
    model, reference, fisher = tied_bf16_state(seed=5)
    rank, world = dist.get_rank(), dist.get_world_size()
    slices = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        size = -(-p.numel() // world)  # DeepSpeed pads every slice to the same size
        padded = torch.zeros(size * world, dtype=p.dtype)
        padded[: p.numel()] = p.detach().reshape(-1)
        start = rank * size
        count = max(0, min(size, p.numel() - start))
        p.ds_tensor, p.ds_numel, p.ds_shape, p.ds_id = padded[start : start + size].clone(), p.numel(), p.shape, i
        slices[name] = slice(start, start + count)
    fisher = {n: f.reshape(-1)[slices[n]].clone() for n, f in fisher.items()}
    reference = {n: r.reshape(-1)[slices[n]].clone() for n, r in reference.items()}
    terms = PartitionTerms.from_state(fisher, model=model, reference=reference, scale=SCALE, mask_ratio=ratio)
    rated = PartitionTerms.from_state(fisher, model=model, reference=reference, scale=SCALE, mask_ratio=ratio,
                                      rates={n: RATE for n in fisher})
    kept, scaled = [], True
    for name in fisher:
        kept += [[name, slices[name].start + i] for i in terms.mask(name).nonzero().flatten().tolist()]
        (w, fm), (w3, fm3) = terms.chunk(name), rated.chunk(name)
        scaled &= torch.equal(w3, w * RATE) and torch.equal(fm3, fm * RATE**2)
    return {"kept": kept, "threshold": terms.threshold, "rated": bool(scaled)}


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out = {"ratios": {str(r): {"fsdp": fsdp(r), "zero3": zero3(r)} for r in RATIOS}}
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(out, handle)


if __name__ == "__main__":
    run_rank(main, sys.argv[1])
