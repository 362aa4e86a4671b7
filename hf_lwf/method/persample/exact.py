"""The exact paths, where no closed-form rule applies.

* the module-level fallback: ``torch.func.vmap`` of the gradient of ``<module(a_x), b_x>`` with respect to the
  module's own parameters (every argument whose first dimension is the batch split per sample), or, if that
  transform fails, a per-sample backward through that module only;
* the exact path: one plain ``torch.autograd.grad`` of each sample's loss, for parameters no module-level path
  covers.
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from .record import _autocast_as, _autocast_off, _Split, _Use


def _module_per_sample_grads(module, locals_, use: _Use, batch: int, capture=None) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``module``'s own parameters ``locals_`` from one recorded call and its output gradient.

    Every argument whose first dimension is the batch is split per sample, the rest shared. ``torch.func.vmap``
    first; if that transform fails, a plain per-sample backward through this module only. ``capture``: the pass's
    capture, whose watch is paused meanwhile (the recomputation is no use of the parameters)."""
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in locals_}
    split = _Split(use.args, use.kwargs, batch)
    per_sample = split.tensors()
    grad_output = use.grad.float()
    was_active = capture.active if capture is not None else False
    if capture is not None:
        capture.active = False
    try:
        with _autocast_as(use):
            try:
                def inner(p, xs, g):
                    out = split.call(module, p, [x.unsqueeze(0) for x in xs])
                    return (out.float() * g.unsqueeze(0)).sum()

                grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, per_sample, grad_output)
                return {n: g.float() for n, g in grads.items()}
            except Exception:  # noqa: BLE001 - any transform failure: the plain per-sample backward below
                pass
            return _per_sample_loop(module, locals_, use, batch)
    finally:
        if capture is not None:
            capture.active = was_active


def _per_sample_loop(module, locals_, use: _Use, batch: int, project: dict[str, torch.Tensor] | None = None):
    """Plain autograd, one sample at a time, through this module only: ``d <module(x_i), b_i> / d theta``.

    With ``project``, returns ``sum_p <g_{i,p}, project_p>`` per sample ``[batch]`` (fp64) instead of the gradients."""
    split = _Split(use.args, use.kwargs, batch)
    per_sample = split.tensors()
    live = {n: p.detach().requires_grad_() for n, p in module.named_parameters(recurse=False) if n in locals_}
    out = {n: [] for n in live}
    values = torch.zeros(batch, dtype=torch.float64, device=use.grad.device)
    with torch.enable_grad(), _autocast_as(use):
        for i in range(batch):
            y = split.call(module, live, [x[i : i + 1] for x in per_sample])
            gs = torch.autograd.grad((y.float() * use.grad[i : i + 1].float()).sum(), list(live.values()),
                                     allow_unused=True)
            for (n, p), g in zip(live.items(), gs):
                g = torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                if project is None:
                    out[n].append(g)
                else:
                    values[i] += _dot64(g, project[n])
    if project is not None:
        return values
    return {n: torch.stack(v) for n, v in out.items()}


def _dot64(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 20) -> float:
    """``sum(a * b)`` accumulated in fp64, a block at a time (no fp64 copy of a whole embedding-sized tensor)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(sum(torch.dot(a[s : s + block].double(), b[s : s + block].double()) for s in range(0, a.numel(), block)))


def _exact_pass(capture, losses: torch.Tensor, names: list[str], batch: int, loss_scale: float = 1.0) -> None:
    """Per-sample gradients of ``names`` by plain autograd: one backward of each sample's loss (times
    ``loss_scale``, as in the batched pass), fed to the capture's consumer."""
    if not names:
        return
    consumer = capture.consumer
    params = [capture.params[n] for n in names]
    values = {n: torch.zeros(batch, dtype=torch.float32, device=losses.device) for n in names}
    directions = {n: consumer.direction(n, None) for n in names} if consumer.linear else {}

    def feed(grads, samples: slice) -> None:
        for name, g in zip(names, grads):
            if g is None:  # not on the graph of these samples' losses: an exact zero
                continue
            with _autocast_off(g.device):
                g = g.detach().float()
                if consumer.linear:
                    v = directions[name]
                    if v is not None:
                        values[name][samples] += (g.reshape(g.shape[0], -1) @ v.reshape(-1).float()).to(values[name].device)
                elif samples.stop - samples.start == batch:
                    consumer.dense(name, None, g)
                else:
                    consumer.dense(name, None, g, sample=samples.start)

    if losses.requires_grad:  # (a vmapped backward, is_grads_batched, measured slower than this loop on CPU)
        for i in range(batch):
            grads = torch.autograd.grad(losses[i] * loss_scale, params, retain_graph=i + 1 < batch, allow_unused=True)
            feed([None if g is None else g.unsqueeze(0) for g in grads], slice(i, i + 1))
    for name in names:
        if consumer.linear:
            consumer.add_linear(name, values[name])
        capture.handled.add(name)
