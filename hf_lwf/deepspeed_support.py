"""LWF under DeepSpeed ZeRO (through ``LWFTrainer`` / ``LWFTrainerMixin``).

DeepSpeed takes the optimizer step inside ``accelerator.backward`` (``engine.step``), before any callback or Trainer
hook runs, and keeps the gradients in its own partitioned buffers (``p.grad`` is ``None`` by then). LWF therefore
reads the gradients from a wrapper around ``engine.step``, where they are averaged across ranks but not yet clipped
(:func:`install_fisher_hook`), through DeepSpeed's documented accessors (``deepspeed.utils.safe_get_full_grad``).

Under ZeRO-2 every rank holds the whole parameters (only the optimizer state and the gradients are partitioned), so
LWF works on whole parameters as under DDP: D_self, scoring and the empirical Fisher split their work across ranks
and all-reduce. The ascent (:func:`ascent_step`) computes its gradients with ``torch.autograd.grad`` -- a
``backward()`` would fire ZeRO's gradient-reduction hooks and leave the ascent gradient in the engine's buffers --
and applies its SGD step both to the model's weights and to the optimizer's fp32 master partition
(``safe_set_full_fp32_param``), which is what the engine's next step starts from.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .confidence import batch_losses
from .distributed import all_reduce_sum_, shard_indices


SUPPORTED_STAGES = (2,)


def deepspeed_stage(args) -> int | None:
    """The ZeRO stage of a DeepSpeed run (``args.deepspeed``/``deepspeed_plugin`` or accelerate's launcher), else None."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        plugin = state.get("deepspeed_plugin") if state else None
        if plugin is None:
            return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    if plugin is not None:
        return int(plugin.zero_stage)
    config = getattr(args, "deepspeed", None)
    if not config:
        return None
    if isinstance(config, str):
        import json

        with open(config, encoding="utf-8") as handle:
            config = json.load(handle)
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_supported(config, args, stage: int | None, via_trainer: bool) -> None:
    """Construction-time checks for a DeepSpeed run: each refusal names the argument and what works."""
    if not via_trainer:
        raise ValueError(
            "Under DeepSpeed, LWF must run through `LWFTrainer` (or a Trainer subclass with `LWFTrainerMixin` first "
            "in its bases), not a plain LWFCallback: DeepSpeed steps the optimizer inside backward, and only the "
            "Trainer subclass can read the gradients before that step (the online Fisher) and wire the engine."
        )
    if stage not in SUPPORTED_STAGES:
        raise ValueError(
            f"hf_lwf supports DeepSpeed ZeRO stage {' and '.join(map(str, SUPPORTED_STAGES))}; this run asks for "
            f"stage {stage} (`zero_optimization.stage` in the DeepSpeed config). Use DDP or FSDP2 otherwise."
        )
    if config.lwf_unlearn_optimizer != "sgd":
        raise ValueError(
            f"Under DeepSpeed, `lwf_unlearn_optimizer` must be 'sgd' (got {config.lwf_unlearn_optimizer!r}): the "
            "engine owns the Trainer's optimizer and steps it only inside its own backward, so LWF's ascent takes "
            "its own SGD step on the weights and DeepSpeed's fp32 master copy. Set lwf_unlearn_optimizer='sgd' and "
            "lwf_unlearn_lr."
        )
    if getattr(args, "fp16", False):
        raise ValueError("`fp16=True` is not supported with LWF under DeepSpeed (its dynamic loss scale lives in the "
                         "engine); use bf16 or fp32.")


def install_fisher_hook(engine, update) -> None:
    """Wrap ``engine.step`` so that ``update()`` runs first at every gradient-accumulation boundary.

    There the gradients of the step are reduced across ranks and not yet clipped: the online Fisher reads them
    (METHOD.md, step 2). Installed once per engine; every rank calls ``engine.step``, so collectives in
    ``update`` are safe.
    """
    if getattr(engine, "_lwf_fisher_hook", False):
        return
    step = engine.step

    def step_with_fisher(*args: Any, **kwargs: Any):
        if engine.is_gradient_accumulation_boundary():
            update()
        return step(*args, **kwargs)

    engine.step = step_with_fisher
    engine._lwf_fisher_hook = True


def full_gradients(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The reduced, unclipped fp32 gradient of every parameter, whole on every rank (collective: every rank calls
    it, one all-reduce per parameter, in the same order). Valid inside the ``engine.step`` wrapper only."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, p in params.items():
        g = safe_get_full_grad(p)
        if g is None:
            raise RuntimeError(f"DeepSpeed returned no gradient for {name}: LWF cannot read the step's gradients.")
        grads[name] = g.detach().float()
    return grads


def ascent_step(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    *,
    lr: float,
    coef: float,
    loss_cap: float,
    max_grad_norm: float,
) -> dict[str, float]:
    """One bounded SGD ascent step on ``batch`` under ZeRO-2: :func:`hf_lwf.unlearn.ascent_step` with its SGD
    optimizer, computed without ``backward()`` and written to DeepSpeed's fp32 master copy too.

    As under DDP each rank computes its share of the samples and the gradients are summed with one all-reduce,
    clipped to ``max_grad_norm``, and the step is skipped when the loss or the gradient is not finite.
    """
    names = list(params)
    plist = [params[n] for n in names]
    size = batch["input_ids"].shape[0]
    mine = shard_indices(size)
    stats = torch.zeros(3, device=plist[0].device)  # loss sum, kept count, non-finite flag
    kept_losses = None
    if mine:
        losses = batch_losses(model, {k: v[mine] for k, v in batch.items()})
        finite = torch.isfinite(losses)
        stats[0] = losses.detach()[finite].sum()
        stats[2] = float(not bool(finite.all()))
        keep = finite & (losses.detach() < loss_cap)
        stats[1] = keep.sum()
        kept_losses = losses[keep]
    all_reduce_sum_([stats])
    loss_sum, kept, non_finite = stats.tolist()
    result = {"forget_loss": loss_sum / max(size, 1), "kept": int(kept), "skipped": 0, "applied": 0}
    if non_finite or kept == 0:
        result["skipped"] = int(bool(non_finite))
        return result
    grads = None
    if kept_losses is not None and kept_losses.numel():
        # autograd.grad, not backward(): ZeRO's hooks on the gradient accumulators must not see the ascent.
        grads = torch.autograd.grad(-coef * kept_losses.sum() / kept, plist, allow_unused=True)
    grads = [torch.zeros_like(p, dtype=torch.float32) if grads is None or grads[i] is None else grads[i].float()
             for i, p in enumerate(plist)]
    all_reduce_sum_(grads)
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm):
        result["skipped"] = 1
        return result
    if max_grad_norm > 0:  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))
    apply_sgd_(plist, grads, lr)
    result["grad_norm"], result["applied"] = float(norm), 1
    return result


@torch.no_grad()
def apply_sgd_(params: list[torch.nn.Parameter], grads: list[torch.Tensor], lr: float) -> None:
    """``theta <- theta - lr * g`` on DeepSpeed's fp32 master copy and on the model's (whole, ZeRO-2) weights.

    Each rank updates its own fragment of the master copy, then the weights are set from the whole master copy
    (one all-reduce per parameter), exactly as the engine's own step leaves them.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for p, g in zip(params, grads):
        master = safe_get_full_fp32_param(p)
        if master is None:
            raise RuntimeError("A trainable parameter has no DeepSpeed fp32 master copy: is it in the optimizer?")
        master.add_(g.to(master.device), alpha=-lr)
        safe_set_full_fp32_param(p, master)
        p.data.copy_(master.view_as(p))
