"""What the pass records of one module call, and the small helpers every layer of the package shares."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten


if TYPE_CHECKING:
    from .rules.base import Rule


class _Use:
    """One call of a module during the recorded forward; ``rule``: its family's closed-form rule, or None (the
    module-level fallback of :mod:`~hf_lwf.method.persample.exact`)."""

    __slots__ = ("module", "rule", "args", "kwargs", "grad", "cache", "scale", "autocast", "node", "reached", "open")

    def __init__(self, module, rule: Rule | None, args, kwargs, scale=1.0, autocast=None):
        self.module, self.rule, self.args, self.kwargs = module, rule, args, kwargs
        self.grad: torch.Tensor | None = None
        self.node = None  # the autograd node of the hooked output
        self.reached = False  # whether the backward delivered its output gradient
        self.cache: dict[str, torch.Tensor] | None = None
        self.scale = scale
        self.autocast = autocast
        self.open = 1  # parameters of this call whose per-sample gradients are not formed yet

    def done(self) -> None:
        """One of this call's parameters is finished; after the last, drop its recorded input and output gradient
        (the backward goes on without them: the pass does not hold every layer's tensors until its end)."""
        self.open -= 1
        if self.open <= 0:
            self.args = self.kwargs = self.grad = self.cache = None

    def release(self) -> None:
        """Drop the recorded tensors and the autograd node.

        The node holds this use through the output's tensor hook, so ``use -> node -> hook -> use`` is a cycle
        through C++ that the garbage collector cannot see: left in place, it keeps the recorded activations of
        every pass alive."""
        self.args = self.kwargs = self.grad = self.cache = self.node = None

    def taking(self, rule: Rule | None) -> _Use:
        """A copy of this use (its recorded tensors and output gradient) that takes the path of ``rule``."""
        copy = _Use(self.module, rule, self.args, self.kwargs, self.scale, self.autocast)
        copy.grad = self.grad
        return copy


def _per_sample_tensor(t, batch: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch


class _Split:
    """A module call with every per-sample tensor argument (first dimension = batch) split out, the rest shared."""

    def __init__(self, args, kwargs, batch: int):
        self.leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.split = [i for i, t in enumerate(self.leaves) if _per_sample_tensor(t, batch)]

    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i].detach() for i in self.split]

    def call(self, module, params, per_sample: list[torch.Tensor]):
        leaves = list(self.leaves)
        for i, t in zip(self.split, per_sample):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        return functional_call(module, params, args, kwargs)


def _autocast_off(device: torch.device):
    """The per-sample math runs in fp32 even under an enclosing ``torch.autocast``."""
    return torch.autocast(device_type=device.type, enabled=False)


def _autocast_state(device: torch.device):
    try:
        return (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    except (RuntimeError, TypeError):  # pragma: no cover - a device type autocast does not know
        return None


def _autocast_as(use: _Use):
    """The autocast state the module ran under in the forward (recomputations see the same dtypes)."""
    device = use.grad.device
    if use.autocast is None:
        return contextlib.nullcontext()
    enabled, dtype = use.autocast
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _zero3(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3 (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")
