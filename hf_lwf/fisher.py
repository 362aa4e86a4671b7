"""Step 2: diagonal Fisher of the learning task, the intended update D and the update mask M.

Every function takes and returns ``{parameter name: tensor}`` dicts over the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .distributed import all_reduce_sum_, shard_indices


TensorDict = dict[str, torch.Tensor]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters LWF scores and unlearns: all weights, or only the adapters under PEFT."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def online_fisher_update_(fisher: TensorDict, grads: TensorDict, decay: float) -> None:
    """``F <- decay * F + (1 - decay) * g**2`` in place (missing entries start at zero)."""
    for name, grad in grads.items():
        squared = grad.detach().float().pow(2)
        if name not in fisher:
            fisher[name] = torch.zeros_like(squared)
        fisher[name].mul_(decay).add_(squared, alpha=1 - decay)


def bias_corrected(fisher: TensorDict, num_updates: int, decay: float) -> TensorDict:
    """The online Fisher divided by ``1 - decay**t``, so that early estimates are not shrunk towards zero."""
    if num_updates < 1:
        raise ValueError("The online Fisher has no update yet: unlearning needs at least one learning step.")
    correction = 1.0 - decay**num_updates
    return {name: f / correction for name, f in fisher.items()}


def per_sample_gradients(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], loss_fn: Callable | None = None
) -> Iterable[TensorDict]:
    """Yield the gradient of each single-example batch (one backward per example: the plain reference)."""
    params = trainable_parameters(model)
    for batch in batches:
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        yield {
            name: (g.detach().float() if g is not None else torch.zeros_like(p, dtype=torch.float32))
            for (name, p), g in zip(params.items(), grads)
        }


def empirical_fisher(
    model: torch.nn.Module, examples: list[dict[str, torch.Tensor]], loss_fn: Callable | None = None
) -> tuple[TensorDict, TensorDict]:
    """Mean of squared per-sample gradients, and the mean gradient, over ``examples`` (split across ranks).

    Each example is a model-ready batch of size one. Returns ``(F, mean_gradient)``.
    """
    if not examples:
        raise ValueError("The empirical Fisher needs at least one learning example (`lwf_fisher_samples`).")
    params = trainable_parameters(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    mean = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    mine = [examples[i] for i in shard_indices(len(examples))]
    was_training = model.training
    model.eval()
    try:
        for grads in per_sample_gradients(model, mine, loss_fn):
            for name, g in grads.items():
                fisher[name].add_(g.pow(2))
                mean[name].add_(g)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    names = sorted(fisher)
    all_reduce_sum_([fisher[n] for n in names] + [mean[n] for n in names])
    count = len(examples)
    return {n: f / count for n, f in fisher.items()}, {n: m / count for n, m in mean.items()}


def intended_update(current: TensorDict, reference: TensorDict) -> TensorDict:
    """``D = theta_now - theta_ref``: what the learning optimizer did over the last period."""
    return {name: current[name].detach().float() - reference[name] for name in reference}


def update_mask(fisher: TensorDict, delta: TensorDict, ratio: float) -> TensorDict | None:
    """1 on the top-``ratio`` fraction (over all entries) of ``|F * D|``, else 0; ``None`` when ``ratio`` is 1."""
    if ratio >= 1.0:
        return None
    names = sorted(fisher)
    flat = torch.cat([(fisher[n] * delta[n]).abs().reshape(-1) for n in names])
    keep = max(1, int(round(ratio * flat.numel())))
    flat_mask = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    flat_mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
    sizes = [fisher[n].numel() for n in names]
    return {n: m.view_as(fisher[n]) for n, m in zip(names, torch.split(flat_mask, sizes))}


def weighted_direction(fisher: TensorDict, delta: TensorDict, mask: TensorDict | None) -> TensorDict:
    """``w = M * F * D``, the direction that confidence scoring projects per-sample gradients on."""
    return {n: fisher[n] * delta[n] * (mask[n] if mask is not None else 1.0) for n in fisher}


def masked_fisher(fisher: TensorDict, mask: TensorDict | None) -> TensorDict:
    """``M * F``, the curvature of the quadratic term of the confidence."""
    return fisher if mask is None else {n: fisher[n] * mask[n] for n in fisher}


def snapshot(model: torch.nn.Module) -> TensorDict:
    """A detached fp32 copy of the trainable parameters (the reference theta_ref)."""
    return {name: p.detach().float().clone() for name, p in trainable_parameters(model).items()}
