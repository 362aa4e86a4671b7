"""Cost of the per-sample pass's exact path (one autograd backward per sample) against the per-module rules.

    python benchmarks/persample_fallback.py

Times ``batch_confidence`` (the ``deviation`` scoring pass) on a small random Llama built from a config, interleaved
medians in one process, one torch thread:

* ``rules``: every parameter through its checked per-module rule (the fast path);
* ``exact``: the same model with every parameter forced onto the exact path (what a model with no usable rule
  costs at worst);
* ``first``: the first pass over a fresh model (the once-per-model class checks and the watched forward);
* ``ia3`` / ``lora``: PEFT IA3 (its ``ParameterDict`` scales always take the exact path) against LoRA (rules) on
  the same base;
* ``forward_backward``: a plain batched forward+backward of the same batch, the floor.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4000, max_position_embeddings=512, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _batch(batch=8, length=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 4000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):  # different lengths, right padding
        mask[i, length - 7 * i :] = 0
    ids = ids * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :40] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _terms(model):
    from hf_lwf.method.fisher import ScoringTerms, trainable_parameters

    g = torch.Generator().manual_seed(2)
    params = trainable_parameters(model)
    return ScoringTerms.explicit({n: torch.randn(p.shape, generator=g) for n, p in params.items()},
                                 {n: torch.rand(p.shape, generator=g) for n, p in params.items()})


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(repeats: int = 5) -> dict:
    from hf_lwf.method.confidence import batch_confidence
    from hf_lwf.method.common import sequence_losses
    from hf_lwf.method.persample.plan import _plan

    torch.set_num_threads(1)
    batch = _batch()
    rules, exact = _model(), _model()
    terms = _terms(rules)
    batch_confidence(rules, batch, terms)  # the first pass checks the classes once
    plan = _plan(exact)
    plan.exact.update({n: "forced by the benchmark" for n, p in exact.named_parameters() if p.requires_grad})
    batch_confidence(exact, batch, terms)
    a_rules, n_rules = batch_confidence(rules, batch, terms)
    a_exact, n_exact = batch_confidence(exact, batch, terms)
    agreement = float(((a_rules - a_exact).abs().max() / a_exact.abs().max()).item())

    def forward_backward():
        losses = sequence_losses(rules(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"])
        losses.sum().backward()
        rules.zero_grad(set_to_none=True)

    import peft

    ia3 = peft.get_peft_model(_model(), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"])).eval()
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=8, target_modules=["k_proj", "v_proj", "down_proj"])).eval()
    ia3_terms, lora_terms = _terms(ia3), _terms(lora)
    batch_confidence(ia3, batch, ia3_terms)
    batch_confidence(lora, batch, lora_terms)
    fns = {
        "forward_backward": forward_backward,
        "rules": lambda: batch_confidence(rules, batch, terms),
        "exact": lambda: batch_confidence(exact, batch, terms),
        "first": lambda: batch_confidence(_model(), batch, terms),
        "ia3": lambda: batch_confidence(ia3, batch, ia3_terms),
        "lora": lambda: batch_confidence(lora, batch, lora_terms),
    }
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
        print(f"repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    seconds["first_model_build"] = statistics.median(_timed(_model) for _ in range(3))
    return {
        "workload": "Llama hidden 256, 4 layers, vocab 4000 (5.0M parameters), batch 8 of 51-100 tokens, fp32 CPU",
        "seconds": seconds,
        "exact_over_rules": seconds["exact"] / seconds["rules"],
        "rules_over_forward_backward": seconds["rules"] / seconds["forward_backward"],
        "first_pass_over_rules": (seconds["first"] - seconds["first_model_build"]) / seconds["rules"],
        "ia3_over_lora": seconds["ia3"] / seconds["lora"],
        "exact_vs_rules_max_relative_difference_of_a": agreement,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
