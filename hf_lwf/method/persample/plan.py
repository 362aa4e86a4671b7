"""What the passes over one model learn once: each module class's verdict, checked against exact autograd, and the
parameters that need the exact path."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable

import torch

from .exact import _module_per_sample_grads, _per_sample_loop
from .record import _autocast_off, _autocast_state, _Use
from .rules import Rule


logger = logging.getLogger(__package__)  # one logger for the engine


class _Plan:
    """What the passes over one model learned, kept for the model's lifetime (one check per class, not per batch).

    * ``verdict``: per module class, ``"rule"`` (its closed-form rule matched the exact per-sample gradient on the
      first call checked), ``"generic"`` (no rule, or the rule did not match: per-module vmap / per-sample
      autograd of that module alone) or ``"exact"`` (not even that works: the exact path below).
    * ``exact``: parameters no module-level path can cover (used outside a call of their module, as PEFT's
      ``ParameterDict`` adapters are; owned by a module that is not called on batch-first tensors, as fused MoE
      experts and routers are; or never seen in the forward). They keep
      ``requires_grad`` during the pass and get their per-sample gradients from one plain ``torch.autograd.grad``
      per sample of that sample's loss (exact, at about one backward per sample).
    * ``flat``: per module class called on flattened tokens, whether its rows were found grouped by sample.
    * ``seen``: the parameter names whose use was watched once (the first pass that wanted them).
    """

    def __init__(self):
        self.verdict: dict[type, str] = {}
        self.exact: dict[str, str] = {}
        self.seen: set[str] = set()
        self.logged: set = set()
        self.flat: dict[type, bool] = {}  # per class: rows of its flattened-token calls are batch-major (checked)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: torch.nn.Module) -> _Plan:
    plan = _PLANS.get(model)
    if plan is None:
        plan = _PLANS[model] = _Plan()
    return plan


def _log_once(plan: _Plan, key, level: int, message: str) -> None:
    if key not in plan.logged:
        plan.logged.add(key)
        logger.log(level, message)


class _Restart(Exception):
    """The forward found parameters that need the exact path: run the batch again with them differentiable."""


Grad = Callable[[_Use, str, "slice | None"], torch.Tensor]
"""The pass's per-sample gradient of one parameter from one use (the rule's, or the module-level fallback's)."""


def check_class(plan: _Plan, module: torch.nn.Module, rule: Rule | None, args, kwargs, output: torch.Tensor,
                scale: float, locals_: list[str], batch: int, chunk_elements: int, grad: Grad) -> str:
    """Check a class's rule once: its per-sample gradients against plain per-sample autograd of the module.

    Both are projected on a random direction ``r`` (per parameter) with a random output gradient ``b``:
    ``<g_x, r>`` for every sample x. Returns the verdict (and logs it once when it is not ``"rule"``).
    """
    cls = type(module).__name__
    gen = torch.Generator().manual_seed(0)
    probe = _Use(module, rule, args, kwargs, scale, _autocast_state(output.device))
    probe.grad = torch.randn(output.shape, generator=gen).to(device=output.device, dtype=output.dtype)
    params = dict(module.named_parameters(recurse=False))
    direction = {n: torch.randn(params[n].shape, generator=gen).to(params[n].device) for n in locals_}
    with _autocast_off(output.device), torch.no_grad():
        try:
            exact = _per_sample_loop(module, locals_, probe, batch, project=direction)
        except Exception as error:  # noqa: BLE001 - any failure: this module takes the exact path
            _log_once(plan, ("exact", type(module)), logging.WARNING,
                      f"Per-sample gradients: {cls} cannot be differentiated on its own ({error!r}); its "
                      "parameters take the exact per-sample autograd path (about one backward per sample).")
            return "exact"
        if rule is not None:
            ruled = _projection(probe, locals_, direction, batch, chunk_elements, grad)
            if _agree(ruled, exact, output.dtype):
                return "rule"
            _log_once(plan, ("generic", type(module)), logging.WARNING,
                      f"Per-sample gradients: the '{rule.name}' rule does not match the exact per-sample gradient "
                      f"of {cls}; it takes the per-module vmap path instead.")
        generic = _projection(probe.taking(None), locals_, direction, batch, chunk_elements, grad)
        if _agree(generic, exact, output.dtype):
            if rule is None:
                _log_once(plan, ("generic", type(module)), logging.INFO,
                          f"Per-sample gradients: {cls} has no closed-form rule; it takes the per-module vmap "
                          "path.")
            return "generic"
        _log_once(plan, ("exact", type(module)), logging.WARNING,
                  f"Per-sample gradients: the vmap path of {cls} does not match plain per-sample autograd; its "
                  "parameters take the exact per-sample autograd path (about one backward per sample).")
        return "exact"


def _projection(use: _Use, locals_: list[str], direction: dict[str, torch.Tensor], batch: int, chunk_elements: int,
                grad: Grad) -> torch.Tensor:
    """``sum_p <g_{x,p}, r_p>`` over the module's parameters from this use's path, in row chunks."""
    total = torch.zeros(batch, dtype=torch.float64, device=use.grad.device)
    for local in locals_:
        r = direction[local].float()
        if use.rule is not None and local in use.rule.rows and r.dim() >= 2:
            step = max(1, chunk_elements // max(1, batch * math.prod(r.shape[1:])))
            for start in range(0, r.shape[0], step):
                rows = slice(start, min(start + step, r.shape[0]))
                g = grad(use, local, rows)
                total += (g.reshape(batch, -1) @ r[rows].reshape(-1)).double()
        else:
            g = grad(use, local, None) if use.rule is not None else _module_per_sample_grads(
                use.module, [local], use, batch)[local]
            total += (g.reshape(batch, -1) @ r.reshape(-1)).double()
    use.cache = None
    return total


def _agree(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Per-sample projections agree to 1e-3 of the largest (fp32), 3e-2 for 16-bit modules."""
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    scale = float(expected.abs().max())
    return bool(torch.isfinite(actual).all()) and float((actual - expected).abs().max()) <= tolerance * max(scale, 1e-30)
