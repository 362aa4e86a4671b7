"""Peak RSS of repeated scoring passes over one batch on SmolLM2-135M (CPU, one thread).

A bounded scoring pass holds the same peak every time. Usage::

    python benchmarks/scoring_memory.py [--passes 3] [--tree DIR]

``--tree`` scores with the ``hf_lwf`` of another checkout (for example an older commit extracted with
``git archive``), to compare two versions in the same way.
"""

import argparse
import resource
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--tree", default=None, help="Folder holding the hf_lwf package to measure.")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    torch.set_num_threads(1)
    try:
        from hf_lwf.app.models import load_smollm2
        from hf_lwf.method.confidence import batch_confidence
        from hf_lwf.method.fisher import ScoringTerms
    except ImportError:  # the flat layout before hf_lwf/method and hf_lwf/app
        from hf_lwf.confidence import batch_confidence
        from hf_lwf.fisher import ScoringTerms
        from hf_lwf.models import load_smollm2

    model, _ = load_smollm2()
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in params.items()}
    curvature = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    ids = torch.randint(10, 40000, (8, 160), generator=g)
    labels = ids.clone()
    labels[:, :100] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for i in range(args.passes):
        start = time.perf_counter()
        batch_confidence(model, batch, ScoringTerms.explicit(direction, curvature))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"pass {i}: {time.perf_counter() - start:.1f} s, peak RSS {peak:.2f} GB (before scoring {before:.2f} GB)",
              flush=True)


if __name__ == "__main__":
    main()
