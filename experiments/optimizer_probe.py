"""Measure what one unlearning (ascent) step does with each ``lwf_unlearn_optimizer`` choice.

From the same mid-training state (a model fine-tuned for ``--learn_steps`` AdamW steps on the learning task, so
AdamW's moments carry the learning direction), take one bounded ascent step on a D_U batch with

* ``shared``: the learning AdamW itself (what ``lwf_unlearn_optimizer='shared'`` does; it writes AdamW's moments),
* ``preconditioned``: ``+λ·η·ĝ/(√v̂+ε)`` with AdamW's second moment read-only, at the coefficients ``--coefs``, and
* ``sgd``: a separate plain SGD at several learning rates,

and record per option: the change of the forget loss on the ascent batch and on held-out self-generated samples,
the change of the learning loss on held-out learning examples (right after the ascent, and after one more learning
step compared with that step taken without an ascent before it), the size of the weight change, and its cosine with a
"momentum-only" AdamW step (zero gradient) and with the ascent direction (the gradient of the forget loss).

    python -m experiments.optimizer_probe --seeds 0 1 --sgd_lrs 0.1 --out experiments/results/optimizer_probe.json

The preconditioned option also records whether AdamW's state (moments, step) stayed bitwise unchanged.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time

import torch

from experiments import run as runner


def _params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.float() * y.float()).sum() for x, y in zip(a, b)))


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    na, nb = _dot(a, a) ** 0.5, _dot(b, b) ** 0.5
    return None if na == 0 or nb == 0 else _dot(a, b) / (na * nb)


@torch.no_grad()
def _mean_loss(model, batch) -> float:
    from hf_lwf.method.unlearn import batch_losses

    model.eval()
    losses = batch_losses(model, batch)
    model.train()
    return float(losses.mean())


def _same_state(optimizer, saved) -> bool:
    """Whether ``optimizer``'s state equals the ``state_dict`` ``saved`` bitwise."""
    now = optimizer.state_dict()["state"]
    for key, values in saved["state"].items():
        for name, value in values.items():
            other = now[key][name]
            if not (torch.equal(value, other) if torch.is_tensor(value) else value == other):
                return False
    return True


def probe(seed: int, args, loaded) -> dict:
    """One seed: learn, self-generate, then one ascent step per optimizer option from the same state."""
    from hf_lwf.app.learning_data import LearningCollator
    from hf_lwf.method.selfgen import collate_self_data, generate_self_data
    from hf_lwf.method.unlearn import PreconditionedAscent, ascent_step, batch_losses

    base, tok, _ = loaded
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.train()
    params = _params(model)
    collate = LearningCollator(tok.pad_token_id)
    data = runner.learning_dataset(args.learn, tok, args.data_dir, args.batch_size * (args.learn_steps + 1), seed, 256)
    rows = [data[i] for i in range(len(data))]
    held_learn = collate(rows[-args.batch_size:])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    for step in range(args.learn_steps):
        model(**collate(rows[step * args.batch_size:(step + 1) * args.batch_size])).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    prompts = runner.forget_prompts(args.forget, args.data_dir, args.n_prompts)
    self_data = generate_self_data(model, tok, prompts, samples_per_prompt=1, max_new_tokens=48, temperature=1.0,
                                   top_p=0.95, batch_size=12, seed=seed, show_progress=False)
    self_rows = [self_data[i] for i in range(len(self_data))]
    if len(self_rows) < 2:
        raise ValueError(f"Only {len(self_rows)} self-generated samples; raise --n_prompts.")
    cut = min(4, len(self_rows) // 2)  # an ascent batch of up to 4, the rest held out
    forget_batch = collate_self_data(self_rows[:cut], tok.pad_token_id)
    held_forget = collate_self_data(self_rows[cut:], tok.pad_token_id)

    weights = [p.detach().clone() for p in params]
    opt_state = copy.deepcopy(optimizer.state_dict())

    def restore():
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        optimizer.load_state_dict(opt_state)  # load_state_dict copies the tensors

    before = {"forget_batch": _mean_loss(model, forget_batch), "forget_heldout": _mean_loss(model, held_forget),
              "learn_heldout": _mean_loss(model, held_learn)}
    for p in params:  # the momentum-only step: AdamW with a zero gradient
        p.grad = torch.zeros_like(p)
    optimizer.step()
    momentum_step = [(p.detach() - w).to(torch.bfloat16) for p, w in zip(params, weights)]
    restore()
    model.zero_grad(set_to_none=True)
    batch_losses(model, forget_batch).mean().backward()  # the ascent direction: +gradient of the forget loss
    ascent_dir = [p.grad.detach().to(torch.bfloat16) for p in params]
    model.zero_grad(set_to_none=True)

    next_batch = collate(rows[:args.batch_size])  # one more learning step after the ascent (AdamW, as in training)

    def learning_step() -> float:
        model(**next_batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _mean_loss(model, held_learn)

    restore()
    baseline_next = learning_step()  # the learning step with no ascent before it

    results = []
    options = [("shared", None, 1.0)] + [("preconditioned", None, c) for c in args.coefs]
    options += [("sgd", lr, 1.0) for lr in args.sgd_lrs]
    for name, lr, coef in options:
        restore()
        if name == "shared":
            opt = optimizer
        elif name == "preconditioned":
            opt = PreconditionedAscent(optimizer, params, coef=coef, lrs=[args.lr])
        else:
            opt = torch.optim.SGD(params, lr=lr)
        out = {"optimizer": name, "lr": args.lr if lr is None else lr, "coef": coef, "steps": []}
        for _ in range(args.ascent_steps):
            prev = [p.detach().clone() for p in params]
            result = ascent_step(model, forget_batch, opt, coef=coef, loss_cap=args.cap, max_grad_norm=1.0)
            change = [p.detach() - q for p, q in zip(params, prev)]
            del prev
            out["steps"].append({
                "forget_batch": _mean_loss(model, forget_batch), "forget_heldout": _mean_loss(model, held_forget),
                "learn_heldout": _mean_loss(model, held_learn), "update_norm": _dot(change, change) ** 0.5,
                "cos_momentum_only": _cos(change, momentum_step), "cos_ascent_direction": _cos(change, ascent_dir),
                "skipped": result["skipped"],
                "clamped_fraction": (float(opt.clamped) / sum(p.numel() for p in params)
                                     if name == "preconditioned" and opt.clamped is not None else None)})
            del change
        if name == "preconditioned":  # read-only: every moment and step count bitwise unchanged
            out["optimizer_state_unchanged"] = _same_state(optimizer, opt_state)
        # what the ascent leaves in the next learning step (the shared option wrote AdamW's moments)
        out["delta_learn_heldout_after_next_learning_step"] = learning_step() - baseline_next
        for key in ("forget_batch", "forget_heldout", "learn_heldout"):
            out[f"delta_{key}_step1"] = out["steps"][0][key] - before[key]
            out[f"delta_{key}_total"] = out["steps"][-1][key] - before[key]
        results.append(out)
        print(f"seed {seed} {name:14s} lr {out['lr']:<8g} coef {coef:<5g} d_forget {out['delta_forget_batch_step1']:+.4f} "
              f"d_forget_heldout {out['delta_forget_heldout_step1']:+.4f} d_learn {out['delta_learn_heldout_step1']:+.4f} "
              f"|step| {out['steps'][0]['update_norm']:.3g} cos(momentum) {out['steps'][0]['cos_momentum_only']} "
              f"cos(ascent) {out['steps'][0]['cos_ascent_direction']} "
              f"d_learn_after_next_step {out['delta_learn_heldout_after_next_learning_step']:+.4f}", flush=True)
    del model, optimizer, weights, opt_state
    gc.collect()
    return {"seed": seed, "before": before, "learn_heldout_after_next_step_without_ascent": baseline_next,
            "options": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data_dir", default=str(runner.REPO.parent / "shared" / "data"))
    parser.add_argument("--learn", default="sst5")
    parser.add_argument("--forget", default="dental")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--learn_steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ascent_steps", type=int, default=2)
    parser.add_argument("--n_prompts", type=int, default=8)
    parser.add_argument("--cap", type=float, default=5.0)
    parser.add_argument("--coefs", type=float, nargs="+", default=[1.0, 0.1],
                        help="lambda of the preconditioned option (the step is lambda * lr per coordinate at most)")
    parser.add_argument("--sgd_lrs", type=float, nargs="+", default=[1e-4, 1e-2, 1e-1, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(runner.REPO / "experiments" / "results" / "optimizer_probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = runner.load_model(args.model)
    started = time.time()
    report = {"args": vars(args), "seeds": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for seed in args.seeds:  # the file is rewritten after every seed, so a cut-short probe keeps what it measured
        report["seeds"].append(probe(seed, args, loaded))
        report["seconds"] = time.time() - started
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
