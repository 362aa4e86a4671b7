"""Steps 4 and 5: choosing the forget set D_U and unlearning it by bounded gradient ascent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..distributed import (
    all_reduce_,
    all_reduce_grads_,
    all_reduce_sum_,
    collective_device,
    full_tensor,
    input_device,
    is_sharded,
    local_view,
    shard_indices,
)
from .common import batch_losses  # noqa: F401 - the plain loss, imported from here by experiment scripts
from .head import response_losses
from .fisher import trainable_parameters


def forget_size(num_items: int, amount: tuple[str, float]) -> int:
    """``ceil(r * n)`` for ``("ratio", r)``, ``min(k, n)`` for ``("top_k", k)``."""
    kind, value = amount
    # Round first: 0.07 * 100 == 7.000000000000001 in floating point, whose ceiling would be 8.
    return min(num_items, math.ceil(round(value * num_items, 9)) if kind == "ratio" else int(value))


def select_forget_set(
    scores: torch.Tensor,
    tasks: Sequence[str],
    amount: tuple[str, float],
    *,
    threshold: float = 0.0,
    selection: str = "top",
    per_task: bool = False,
    seed: int = 0,
) -> list[int]:
    """Indices of D_U within D_self, sorted.

    ``top`` keeps the samples with ``c(x) > threshold`` and of those the highest-scoring ``forget_size``.
    The ablations take the same number of samples: ``bottom`` the lowest-scoring, ``random`` uniformly
    (seeded); ``all`` takes every sample. With ``per_task`` the size and the choice apply within each task.
    A sample with a non-finite score is never selected.
    """
    if len(scores) != len(tasks):
        raise ValueError(f"{len(scores)} scores but {len(tasks)} task names.")
    groups = {}
    finite = torch.isfinite(scores).tolist()
    for index, task in enumerate(tasks):
        groups.setdefault(task if per_task else "", [])
        if finite[index]:
            groups[task if per_task else ""].append(index)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for members in groups.values():
        member_scores = scores[members].double()
        if selection == "all":
            chosen.extend(members)
            continue
        size = min(forget_size(len(members), amount), int((member_scores > threshold).sum()))
        if size == 0:
            continue
        if selection == "top":
            order = torch.argsort(member_scores, descending=True, stable=True)
        elif selection == "bottom":
            order = torch.argsort(member_scores, stable=True)
        elif selection == "random":
            order = torch.randperm(len(members), generator=generator)
        else:
            raise ValueError(f"`lwf_selection` must be top, bottom, random or all (got {selection!r}).")
        chosen.extend(members[i] for i in order[:size].tolist())
    return sorted(chosen)


class ForgetSampler:
    """Mini-batches drawn cyclically from a seeded shuffle of D_U; its position is part of the LWF state."""

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0):
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position

    def _order(self) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_batch(self, batch_size: int) -> list[int]:
        """Positions (into D_U) of the next ``min(batch_size, |D_U|)`` samples."""
        batch, order = [], self._order()
        while len(batch) < min(batch_size, self.size):
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            batch.append(order[self.position])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}


class PreconditionedAscent:
    """The ascent step ``Δθ = +λ·η·ĝ_U / (√v̂ + ε)`` with the learning optimizer's preconditioner, read-only.

    ``ĝ_U`` is the clipped gradient of the mean forget loss, ``η`` the learning rate of the step just taken (per
    parameter group), ``λ`` = ``lwf_unlearn_coef`` (applied after clipping, so it scales the step even when the
    gradient is clipped). For the Adam family (``torch.optim.Adam``/``AdamW``, fused or not; accelerate's wrapper
    is unwrapped) ``v̂ = exp_avg_sq / (1 - β₂^step)`` (``max_exp_avg_sq`` under amsgrad) and ``ε`` come from the
    optimizer's state and param group; its moments and step count are read, never written, and no weight decay is
    applied. The denominator is ``max(√v̂, |ĝ_U|) + ε``: a coordinate the learning task barely moves (tiny ``v̂``)
    would otherwise take a step thousands of times ``λ·η`` (measured on a tiny Llama after one AdamW step: 3000×),
    while Adam's own steps stay within about ``η`` per coordinate; with the bound no coordinate moves more than
    ``λ·η``, and where ``|ĝ_U| ≤ √v̂`` the step is exactly ``λ·η·ĝ_U/(√v̂+ε)``. A parameter the optimizer has no
    state for yet (the ``early`` schedule, before any step) has ``v̂ = 0``: the sign-like step of size ``λ·η`` that
    Adam's first update takes. ``clamped`` counts the coordinates where the bound acted in the last step. For
    ``torch.optim.SGD`` the preconditioner is the identity (``Δθ = λ·η·ĝ_U``). Other optimizers are refused at
    construction (:func:`check_preconditioner`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], *, coef: float,
                 lrs: Sequence[float]):
        self.optimizer = check_preconditioner(optimizer)
        self.coef = coef
        self.clamped: torch.Tensor | None = None
        wanted = {id(p) for p in params}
        self.groups = []  # (params, lr, beta2, eps, kind) per param group
        for group, lr in zip(self.optimizer.param_groups, lrs):
            mine = [p for p in group["params"] if id(p) in wanted]
            if mine:
                kind = "sgd" if isinstance(self.optimizer, torch.optim.SGD) else "adam"
                betas = group.get("betas", (0.9, 0.999))
                self.groups.append((mine, float(lr), float(betas[1]), float(group.get("eps", 1e-8)), kind,
                                    bool(group.get("amsgrad", False))))

    @torch.no_grad()
    def step(self) -> float:
        """Apply the step to every parameter with a gradient; returns the norm of the change the weights took
        (0 when every update rounded away, so the step is not counted as applied)."""
        total, self.clamped = None, None
        for params, lr, beta2, eps, kind, amsgrad in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                second, step = None, 0.0
                if kind != "sgd":
                    state = self.optimizer.state.get(p, {})
                    second = state.get("max_exp_avg_sq" if amsgrad else "exp_avg_sq")
                    step = float(state["step"]) if second is not None and "step" in state else 0.0
                # this rank's elements a block at a time: the fp32 temporaries stay small next to the weights
                weight, grad = local_view(p.detach()).view(-1), local_view(p.grad).reshape(-1)
                second = local_view(second).reshape(-1) if second is not None and step > 0 else None
                for start in range(0, weight.numel(), self.block):
                    rows = slice(start, start + self.block)
                    if kind == "sgd":
                        update = grad[rows].mul(lr * self.coef)
                    else:
                        update, clamped = preconditioned_update(grad[rows], None if second is None else second[rows],
                                                                step, beta2=beta2, eps=eps, lr=lr, coef=self.coef)
                        self.clamped = clamped if self.clamped is None else self.clamped + clamped
                    norm = apply_update_(weight[rows], update).pow_(2).sum()
                    total = norm if total is None else total + norm
        if total is None:
            return 0.0
        if is_sharded(self.groups[0][0]):
            total = all_reduce_(total)
        return float(total.sqrt())

    block = 1 << 22
    """Elements updated at once (4 Mi: 16 MiB per fp32 temporary)."""


def preconditioned_update(grad: torch.Tensor, second: torch.Tensor | None, step: float, *, beta2: float, eps: float,
                          lr: float, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(update, clamped)``: ``lambda*eta*g / (max(sqrt(v_hat), |g|) + eps)`` in fp32, ``v_hat`` the bias-corrected
    second moment ``second / (1 - beta2**step)`` (``None``, before any step: 0, a sign-like step of size
    ``lambda*eta``), and how many coordinates the ``|g|`` bound acted on. The weights move by ``-update``."""
    magnitude = grad.float().abs()
    if second is None or step <= 0:
        root = torch.zeros_like(magnitude)
    else:
        root = (second.float() / (1 - beta2**step)).sqrt_()
    clamped = (magnitude > root).sum()
    # max(sqrt(v_hat), |g|): |step| <= lambda * eta per coordinate, as Adam's own step
    denom = torch.maximum(root, magnitude).add_(eps)
    return grad.float().div(denom).mul_(lr * coef), clamped


@torch.no_grad()
def apply_update_(weights: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``weights <- weights - update`` rounded to the weights' dtype, in place; returns the change they took in fp32
    (a tiny bf16 step can round away). The ascent loss is ``-coef * mean``: the gradient already points down the
    forget loss, so the update is subtracted."""
    moved = weights.sub(update.to(weights.dtype))
    change = moved.float() - weights.float()
    weights.copy_(moved)
    return change


def check_preconditioner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The raw torch optimizer whose preconditioner ``lwf_unlearn_optimizer='preconditioned'`` can read.

    Adam, AdamW (the Trainer's default, fused or not) and SGD are accepted; anything else raises a ``ValueError``
    naming the field and the alternatives."""
    raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if isinstance(raw, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return raw
    raise ValueError(
        f"lwf_unlearn_optimizer='preconditioned' reads the learning optimizer's second moment, which hf_lwf knows for "
        f"torch.optim.Adam/AdamW (the Trainer's default, optim='adamw_torch'/'adamw_torch_fused') and SGD; this run's "
        f"optimizer is {type(raw).__module__}.{type(raw).__name__}. Use lwf_unlearn_optimizer='sgd' with "
        "lwf_unlearn_lr, or 'shared'."
    )


def forget_batch_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_cap: float, collective: bool = False
) -> tuple[dict[str, float], torch.Tensor | None]:
    """The losses of a D_U mini-batch that still count, and the batch's statistics summed across ranks.

    Each rank takes its share of the samples, or all of them when ``collective`` (FSDP, ZeRO-3: every forward
    involves every rank, and each runs the whole batch). Samples at or above ``loss_cap`` are forgotten already and
    dropped. Returns the step's result so far (``forget_loss``: the batch mean before the step, ``kept``,
    ``kept_rows``: the batch positions of the kept samples, ``skipped``: 1 when a loss is not finite, ``applied``: 0)
    and this rank's kept losses (None when it has none).
    """
    size = batch["input_ids"].shape[0]
    mine = list(range(size)) if collective else shard_indices(size)
    # loss sum, kept count, non-finite flag, then one kept flag per row (so every rank knows which rows counted)
    stats = torch.zeros(3 + size, device=collective_device(input_device(model)))
    kept_losses = None
    if mine:
        losses = response_losses(model, {k: v[mine] for k, v in batch.items()})
        finite = torch.isfinite(losses)
        stats[0] = losses.detach()[finite].sum()
        stats[2] = float(not bool(finite.all()))
        keep = finite & (losses.detach() < loss_cap)
        stats[1] = keep.sum()
        stats[3 + torch.tensor(mine, device=stats.device)] = keep.to(stats.device, stats.dtype)
        kept_losses = losses[keep]
    if not collective:
        all_reduce_sum_([stats])
    values = stats.tolist()
    loss_sum, kept, non_finite = values[:3]
    result = {"forget_loss": loss_sum / max(size, 1), "kept": int(kept), "skipped": int(bool(non_finite)), "applied": 0,
              "kept_rows": [row for row, flag in enumerate(values[3:]) if flag > 0]}
    return result, kept_losses


def ascent_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | PreconditionedAscent,
    *,
    coef: float,
    loss_cap: float,
    max_grad_norm: float,
    loss_scale: float = 1.0,
) -> dict[str, float]:
    """One bounded gradient-ascent step on ``batch`` (a collated D_U mini-batch, the same on every rank).

    Each rank computes its share of the samples; the loss is ``-coef`` times the mean loss of the samples
    still under ``loss_cap`` (the others are forgotten already and are dropped). Gradients are summed across
    ranks, clipped to ``max_grad_norm``, and the step is skipped, weights untouched, when the loss or the
    gradient is not finite. ``loss_scale`` follows the learning step's fp16 handling: the loss is multiplied by
    it before backward (small gradients do not underflow in half precision) and the gradients divided by it
    after. ``optimizer`` is a torch optimizer (``sgd``, ``shared``: it is stepped on the gradient of
    ``-coef`` times the mean loss) or a :class:`PreconditionedAscent` (the gradient of minus the mean loss is clipped,
    then ``coef`` scales the step). Returns ``forget_loss`` (batch mean before the step), ``kept``, ``skipped``
    (non-finite) and ``applied`` (1 when the weights moved).

    Under DDP each rank's share of the gradient is summed across ranks in place, one all-reduce per parameter: no
    flat copy of the gradients.

    Under FSDP every rank runs the whole batch (its forward and backward are collective, so no rank may sit out)
    and FSDP's reduce-scatter averages the identical gradients into each rank's shard: no collective of our own.
    """
    params = list(trainable_parameters(model).values())
    sharded = is_sharded(params)
    model.zero_grad(set_to_none=True)
    result, kept_losses = forget_batch_losses(model, batch, loss_cap, collective=sharded)
    kept = result["kept"]
    if result["skipped"] or kept == 0:
        model.zero_grad(set_to_none=True)
        return result
    preconditioned = isinstance(optimizer, PreconditionedAscent)
    if kept_losses is not None and kept_losses.numel():
        ((-1.0 if preconditioned else -coef) * loss_scale * kept_losses.sum() / kept).backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif loss_scale != 1.0:
            p.grad.div_(loss_scale)
    if not sharded:
        all_reduce_grads_([p.grad for p in params])
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    if not torch.isfinite(norm):
        result["skipped"] = 1
        model.zero_grad(set_to_none=True)
        return result
    moved = optimizer.step()
    model.zero_grad(set_to_none=True)
    result["grad_norm"] = float(norm)
    result["applied"] = int(moved is None or moved > 0)  # a preconditioned step reports the norm of its change
    return result
