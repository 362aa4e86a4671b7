"""One pass: the forward and backward of the batch's summed loss with the capture's hooks in place, restarted once
the forward has found parameters that need the exact path."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from ..common import batch_losses, without_input_require_grads
from ..head import linear_head
from .capture import _Capture, _DirectUses
from .consumers import Consumer
from .exact import _exact_pass
from .plan import _log_once, _Plan, _plan, _Restart
from .record import _zero3


DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Default bound on the per-sample gradient numbers formed at once (32 Mi fp32 numbers, 128 MiB)."""
CPU_CHUNK_ELEMENTS = 1 << 22
"""The bound on the CPU, whatever is asked (4 Mi numbers, 16 MiB): a row block then stays in the cache between the
matmul that forms it and the reductions that read it (one SmolLM2 MLP layer's pass measured 27 ms against 40 ms
for the whole 28 MB block); on a GPU larger blocks mean fewer kernel launches."""


@contextlib.contextmanager
def _frozen(params):
    """Parameters stop requiring grad, so the recorded backward computes input gradients only."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def per_sample_pass(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    consumer: Consumer,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None,
    params: dict[str, torch.nn.Parameter],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One forward+backward of ``sum_x loss_fn(model, batch)[x]`` feeding the per-sample gradients of ``params``
    to ``consumer``. Returns the per-sample losses. The caller chooses train/eval mode.

    ``loss_fn=None``: the response loss of ``batch["labels"]`` (:func:`~hf_lwf.method.head.response_losses`), whose
    output-layer part runs over token chunks and gives the output layer's per-sample gradients in row blocks
    without the ``[batch, tokens, vocab]`` logits or their gradient (:mod:`~hf_lwf.method.persample.rules.output`).

    The first pass over a model checks each module class's rule against exact per-sample autograd and watches how
    every wanted parameter is used (:class:`~hf_lwf.method.persample.plan._Plan`); parameters no module-level path
    covers take the exact path.
    Raises ``RuntimeError`` naming the parameter and its module if any wanted parameter received no per-sample
    contribution.

    ``loss_scale``: the sum is multiplied by it before the backward (fp16: small gradients do not underflow), so
    every per-sample gradient the consumer sees is ``loss_scale`` times the true one; the caller divides."""
    wanted = {n: p for n, p in params.items() if consumer.wants(n)}
    plan = _plan(model)
    for _ in range(3):
        try:
            return _pass(model, batch, consumer, loss_fn, params, wanted, plan, chunk_elements, loss_scale)
        except _Restart:
            continue
    raise RuntimeError("Per-sample gradients: the set of parameters that need the exact path did not settle.")


def _pass(model, batch, consumer, loss_fn, params, wanted, plan: _Plan, chunk_elements: int,
          loss_scale: float = 1.0) -> torch.Tensor:
    batch_size = batch["input_ids"].shape[0]
    if batch["input_ids"].device.type == "cpu":
        chunk_elements = min(chunk_elements, CPU_CHUNK_ELEMENTS)
    # Under ZeRO-3 DeepSpeed's own hooks gather and release every parameter around its module's call, so the
    # first-pass watch cannot tell a direct use from theirs: the rules are trusted there, as under FSDP.
    watch = not set(wanted) <= plan.seen and not any(_zero3(p) for p in wanted.values())
    exact = [n for n in wanted if n in plan.exact]
    capture = _Capture(model, wanted, consumer, batch_size, chunk_elements, plan, watch)
    if exact and capture.sharded:
        raise NotImplementedError(
            "Per-sample gradients: under FSDP every trainable parameter needs a per-module rule, but "
            + ", ".join(f"{capture.describe(n)}: {plan.exact[n]}" for n in exact[:3])
            + ". The exact per-sample path is not available on sharded parameters: train this model with DDP or on "
            "one device, or freeze these parameters.")
    frozen = [p for n, p in params.items() if n not in exact]
    mode = _DirectUses(capture) if watch else contextlib.nullcontext()
    head = linear_head(model, batch) if loss_fn is None else None
    with without_input_require_grads(model), _frozen(frozen), torch.enable_grad(), capture:
        with mode:
            if head is not None:
                losses = capture.head_losses(model, batch, head, loss_scale)
            else:
                losses = (loss_fn or batch_losses)(model, batch)
        if watch:
            for name in wanted:
                if name in plan.exact:
                    continue
                if name in capture.direct:
                    capture.new_exact.setdefault(name, f"is used by {getattr(capture.direct[name], '__name__', 'a torch function')} outside a call of its module")
                elif name not in capture.called:
                    capture.new_exact.setdefault(name, "took no part in the first forward through a call of its module")
        if capture.new_exact:
            groups: dict[tuple, list[str]] = {}
            for name, why in capture.new_exact.items():
                plan.exact[name] = why
                owner = capture.owners[name][0] if capture.owners[name] else None
                groups.setdefault((type(owner), why), []).append(name)
            for key, names in groups.items():  # once per owning class and reason
                more = f" (and {len(names) - 1} more parameters of that class)" if len(names) > 1 else ""
                _log_once(plan, key, logging.INFO,
                          f"Per-sample gradients: {capture.describe(names[0])}{more} {key[1]}; they take the exact "
                          "per-sample autograd path (about one backward per sample).")
            raise _Restart
        if capture.flat_uses:
            capture.check_layout(losses, batch["labels"])
        if watch:
            plan.seen.update(wanted)
        # The backward must reach every hooked output: from the roots (outputs that did not require grad, input
        # leaves) and from the exact-path parameters, upstream of which every other hooked output lies.
        inputs = capture.roots + [params[n] for n in exact]
        if inputs and losses.requires_grad:
            torch.autograd.grad(losses.sum() * loss_scale, inputs, allow_unused=True, retain_graph=bool(exact))
        capture.flush(losses)
        capture.active = False
        _exact_pass(capture, losses, exact, batch_size, loss_scale)
        for name in wanted:  # called in an earlier batch, not in this one (an idle expert): its gradient is zero
            if name not in capture.called and name not in plan.exact and name in plan.seen and not watch:
                capture.handled.add(name)
        missing = [n for n in wanted if n not in capture.handled]
        if missing:
            raise RuntimeError(
                "Per-sample gradients: no per-sample contribution was computed for "
                + ", ".join(capture.describe(n) for n in missing[:5])
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + ". This is a bug in hf_lwf's per-sample pass; please report it with the model's class.")
    return losses.detach()
