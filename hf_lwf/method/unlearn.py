"""Steps 4 and 5: choosing the forget set D_U and unlearning it by bounded gradient ascent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..distributed import all_reduce_sum_, collective_device, full_tensor, input_device, is_sharded, shard_indices
from .common import batch_losses
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


def ascent_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
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
    after. Returns ``forget_loss`` (batch mean before the step), ``kept``, ``skipped`` (non-finite) and
    ``applied`` (1 when the weights moved).

    Under FSDP every rank runs the whole batch (its forward and backward are collective, so no rank may sit out)
    and FSDP's reduce-scatter averages the identical gradients into each rank's shard: no collective of our own.
    """
    params = list(trainable_parameters(model).values())
    size = batch["input_ids"].shape[0]
    sharded = is_sharded(params)
    mine = list(range(size)) if sharded else shard_indices(size)
    model.zero_grad(set_to_none=True)
    stats = torch.zeros(3, device=collective_device(input_device(model)))  # loss sum, kept count, non-finite flag
    kept_losses = None
    if mine:
        losses = batch_losses(model, {k: v[mine] for k, v in batch.items()})
        finite = torch.isfinite(losses)
        stats[0] = losses.detach()[finite].sum()
        stats[2] = float(not bool(finite.all()))
        keep = finite & (losses.detach() < loss_cap)
        stats[1] = keep.sum()
        kept_losses = losses[keep]
    if not sharded:
        all_reduce_sum_([stats])
    loss_sum, kept, non_finite = stats.tolist()
    result = {"forget_loss": loss_sum / max(size, 1), "kept": int(kept), "skipped": 0, "applied": 0}
    if non_finite or kept == 0:
        result["skipped"] = int(bool(non_finite))
        model.zero_grad(set_to_none=True)
        return result
    if kept_losses is not None and kept_losses.numel():
        (-coef * loss_scale * kept_losses.sum() / kept).backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif loss_scale != 1.0:
            p.grad.div_(loss_scale)
    if not sharded:
        all_reduce_sum_([p.grad for p in params])
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    if not torch.isfinite(norm):
        result["skipped"] = 1
        model.zero_grad(set_to_none=True)
        return result
    optimizer.step()
    model.zero_grad(set_to_none=True)
    result["grad_norm"], result["applied"] = float(norm), 1
    return result
