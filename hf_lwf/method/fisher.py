"""Step 2: diagonal Fisher of the learning task, the intended update D and the update mask M.

Every function takes and returns ``{parameter name: tensor}`` dicts over the trainable parameters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import torch

from ..distributed import (
    all_reduce_,
    all_reduce_sum_,
    collective_device,
    is_sharded,
    local_rows,
    local_view,
    rank_and_world,
    reshard,
    shard_indices,
)
from .common import TensorDict
from .persample import DEFAULT_CHUNK_ELEMENTS, FisherConsumer, per_sample_pass



def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters LWF scores and unlearns: all weights, or only the adapters under PEFT.

    Under FSDP2 these are the sharded ``DTensor``s: FSDP keeps the root module's gathered weights registered after
    a forward without backward (generation, scoring), so the model is resharded first.
    """
    reshard(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


FACTOR_FLOOR = 2.0**-20  # below it the online Fisher's factor is folded into its tensors


def online_fisher_update_(
    fisher: TensorDict,
    grads: dict[str, torch.Tensor | None],
    decay: float,
    dtype: torch.dtype = torch.float32,
    device=None,
    grad_scale: float | torch.Tensor = 1.0,
    seed: int = 0,
    factor: float | None = None,
) -> float | None:
    """``F <- decay * F + (1 - decay) * (g / grad_scale)**2`` in place, for every entry of ``F`` and of ``grads``.

    ``factor`` (fp32 ``F`` only): ``F`` is held as ``G = F / factor``, so the decay is a change of ``factor``, not a
    pass over ``F``: one fused pass ``G += (1 - decay) / factor' * g**2`` with ``factor' = factor * decay``, about half
    the memory traffic of decaying ``F`` and then adding. When ``factor'`` falls below ``2**-20`` it is folded into
    ``G`` (one more pass, every few hundred steps), so ``G`` stays within a factor of 1e6 of ``F``. Returns the new
    factor (``None`` when none was given): the true ``F`` is ``factor * G``.

    An entry of ``F`` whose parameter has no gradient this step (``None`` or absent: a conditional layer, an expert
    no token was routed to) still decays, with ``g = 0``: every parameter's ``F`` averages over the same steps,
    which is what the bias correction ``1 / (1 - decay**t)`` assumes. An expert never routed keeps ``F = 0``: no
    curvature, so it adds nothing to ``w`` or ``n(x)`` and the update mask never keeps it. A new entry starts at
    zero, in ``dtype`` on ``device`` (default: fp32 next to the gradient; see docs/benchmarks.md for the memory).

    ``grad_scale``: what the gradients are still multiplied by (a Python number, or a 0-dim tensor on the device,
    e.g. the clipping coefficient, so no host sync is needed to read it).

    fp32 ``F``: one fused pass per device, ``_foreach_mul_`` and ``_foreach_addcmul_`` straight from the 16-bit
    gradients (upcast inside the kernel: no gradient copy, no per-parameter Python loop, no host sync). Non-finite
    gradients are not filtered here: the caller skips steps the optimizer skips (fp16 overflow), and a non-finite
    ``F`` is caught at the next unlearning point (:func:`check_finite`). bf16 ``F``: each parameter is updated in
    fp32 and rounded stochastically to bf16 (random bits from ``seed``: pass a new one each step), so the decrement
    of a decay close to 1 is not rounded away; this path loops over parameters, one fp32 temporary at a time. The
    random bits of an entry come from ``(seed, its parameter name)`` (:func:`rounding_seed`), never from its
    position in ``F``: the order of ``F``'s entries (changed by a reload) and folding in one parameter per call
    give the same bits.

    ``F`` on another device than the gradients (``lwf_state_device='cpu'``): the gradients are copied into pinned
    host buffers (non-blocking, one wait per step) and the update runs there. Under FSDP2 the gradients and ``F``
    are ``DTensor`` shards laid out alike and each rank updates its own shard; nothing is communicated.
    """
    live = {n: g for n, g in grads.items() if g is not None}
    sharded = is_sharded(live.values()) or is_sharded(fisher.values())
    if sharded and device is not None:
        raise ValueError("Under FSDP the Fisher is sharded like the parameters: `lwf_state_device='cpu'` is not "
                         "supported there (the shards already divide its memory by the number of ranks).")
    for name, g in live.items():
        if name not in fisher:
            fisher[name] = torch.zeros_like(g, dtype=dtype, device=None if sharded else (device or g.device),
                                            requires_grad=False)
    names = list(fisher)
    fs = {n: local_view(fisher[n]) for n in names}
    gs = {n: local_view(live[n].detach()) for n in names if n in live}
    gs = _staged(gs, fs)
    wide = [n for n in names if fs[n].dtype == torch.float32]
    new_factor = None if factor is None else factor * decay
    for group in _by_device(wide, fs).values():
        f_list = [fs[n] for n in group]
        pairs = [n for n in group if n in gs]
        device_ = f_list[0].device
        scale = grad_scale.to(device_, torch.float32, non_blocking=device_.type != "cpu") \
            if torch.is_tensor(grad_scale) else grad_scale
        if new_factor is not None:  # G <- G + (1 - decay) / factor' * (g / scale)**2: no pass for the decay
            if torch.is_tensor(scale):  # G <- (G / w + g**2) * w with the weight w a device tensor
                weight = (1 - decay) / new_factor / scale.square()
                torch._foreach_mul_(f_list, 1 / weight)
                if pairs:
                    torch._foreach_addcmul_([fs[n] for n in pairs], [gs[n] for n in pairs], [gs[n] for n in pairs])
                torch._foreach_mul_(f_list, weight)
            elif pairs:
                torch._foreach_addcmul_([fs[n] for n in pairs], [gs[n] for n in pairs], [gs[n] for n in pairs],
                                        value=(1 - decay) / new_factor / scale**2)
            if new_factor < FACTOR_FLOOR:
                torch._foreach_mul_(f_list, new_factor)
            continue
        if torch.is_tensor(scale):  # F <- ((F * decay / w) + g**2) * w with the weight w a device tensor
            weight = (1 - decay) / scale.square()
            torch._foreach_mul_(f_list, decay / weight)
            if pairs:
                torch._foreach_addcmul_([fs[n] for n in pairs], [gs[n] for n in pairs], [gs[n] for n in pairs])
            torch._foreach_mul_(f_list, weight)
            continue
        torch._foreach_mul_(f_list, decay)
        if pairs:
            torch._foreach_addcmul_([fs[n] for n in pairs], [gs[n] for n in pairs], [gs[n] for n in pairs],
                                    value=(1 - decay) / scale**2)
    for n in names:
        if fs[n].dtype == torch.float32:
            continue
        f = fs[n].float().mul_(decay)
        if n in gs:
            g = gs[n].float()
            scale = grad_scale.to(f.device, torch.float32) if torch.is_tensor(grad_scale) else grad_scale
            f.addcmul_(g, g * ((1 - decay) / scale**2))
        generator = torch.Generator(device=f.device).manual_seed(rounding_seed(seed, n))
        fs[n].copy_(stochastic_round(f, fs[n].dtype, generator))
    if new_factor is not None and new_factor < FACTOR_FLOOR:
        return 1.0
    return new_factor


def rounding_seed(seed: int, name: str) -> int:
    """The generator seed of the stochastic rounding of parameter ``name``'s ``F`` at step seed ``seed``.

    A hash of both (BLAKE2b, 63 bits), the same in every process: Python's ``hash()`` of a string is salted per
    process, and an entry's position in ``F`` changes when the state is reloaded."""
    digest = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def zeros_like_parameters(
    params: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, device=None
) -> TensorDict:
    """A zero tensor per parameter, laid out like it (FSDP shards stay shards), in ``dtype`` on ``device``
    (default: the parameter's). On the host in a CUDA run it is pinned, so scoring copies it to the GPU without a
    staging copy."""
    out = {}
    for name, p in params.items():
        if device is not None and str(device) == "cpu" and p.device.type == "cuda":
            out[name] = torch.zeros(p.shape, dtype=dtype, pin_memory=True)
        else:
            out[name] = torch.zeros_like(p, dtype=dtype, device=device, requires_grad=False)
    return out


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 up or down at random, in proportion to the distance: unbiased, ``E[out] = x``.

    Round-to-nearest would turn ``F * 0.998`` back into ``F`` (the decrement is below half a bf16 step), so a bf16
    Fisher would stop decaying; stochastic rounding keeps the running mean right on average."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.contiguous().view(torch.int32)
    finite = torch.isfinite(x)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(finite, rounded, x).to(dtype)


def check_finite(fisher: TensorDict) -> None:
    """Raise if ``F`` holds a non-finite entry (a non-finite learning gradient that the optimizer applied too).

    One fused norm per device and one host sync: called once per unlearning point, never per step."""
    bad = []
    names = list(fisher)
    views = {n: local_view(fisher[n]) for n in names}
    for group in _by_device(names, views).values():
        norms = torch._foreach_norm([views[n] for n in group], dtype=torch.float32)
        bad += [n for n, ok in zip(group, torch.isfinite(torch.stack(norms)).tolist()) if not ok]
    if is_sharded(fisher.values()):  # every rank checks its own shards; all must agree to stop
        flag = torch.tensor([float(len(bad))], device=collective_device("cpu"))
        all_reduce_(flag, op=torch.distributed.ReduceOp.MAX)
        bad = bad or (["(a shard on another rank)"] if flag.item() > 0 else [])
    if bad:
        raise FloatingPointError(
            f"The online Fisher of {len(bad)} parameters (first: {bad[0]}) is not finite: a learning step had "
            "non-finite gradients that were applied to the weights (no fp16 loss scaler skipped it). Lower the "
            "learning rate, or check the data for empty or corrupt examples."
        )


def _by_device(names: list[str], tensors: TensorDict) -> dict[torch.device, list[str]]:
    """``names`` grouped by the device of their tensor (a model split over several devices gets one group each)."""
    groups: dict[torch.device, list[str]] = {}
    for n in names:
        groups.setdefault(tensors[n].device, []).append(n)
    return groups


_PINNED: dict[tuple, torch.Tensor] = {}


def _staged(grads: TensorDict, fisher: TensorDict) -> TensorDict:
    """The gradients on their ``F``'s device; copies to the host go through pinned buffers (kept per parameter name
    and shape, reused every step), non-blocking, followed by one wait for all of them."""
    moved, waits = {}, False
    for n, g in grads.items():
        target = fisher[n].device
        if g.device == target:
            moved[n] = g
            continue
        if target.type == "cpu" and g.device.type == "cuda":
            key = (n, tuple(g.shape), g.dtype)
            buffer = _PINNED.get(key)
            if buffer is None:
                buffer = _PINNED[key] = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
            moved[n] = buffer.copy_(g, non_blocking=True)
            waits = True
        else:
            moved[n] = g.to(target)
    if waits:
        torch.cuda.synchronize()  # the host reads the buffers next: the copies must have landed
    return moved


def bias_correction(num_updates: int, decay: float) -> float:
    """``1 / (1 - decay**t)``: the factor that un-shrinks an online Fisher after ``t`` updates."""
    if num_updates < 1:
        raise ValueError("The online Fisher has no update yet: unlearning needs at least one learning step.")
    return 1.0 / (1.0 - decay**num_updates)


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


BATCHABLE_KEYS = {"input_ids", "attention_mask", "labels"}


def empirical_fisher(
    model: torch.nn.Module,
    examples: list[dict[str, torch.Tensor]],
    loss_fn: Callable | None = None,
    batch_size: int = 8,
    chunk_elements: int | None = None,
    with_mean: bool = True,
    loss_scale: float = 1.0,
    consumer: Callable[[], FisherConsumer] | None = None,
) -> tuple[TensorDict, TensorDict | None]:
    """Mean of squared per-sample gradients, and the mean gradient, over ``examples`` (split across ranks).

    Each example is a model-ready batch of size one. Returns ``(F, mean_gradient)`` (``mean_gradient`` is None
    when ``with_mean`` is False, which saves a parameter-sized buffer). Causal-LM examples
    (``input_ids``, ``attention_mask``, ``labels`` only, no custom ``loss_fn``) are right-padded into batches of
    ``batch_size`` (``lwf_fisher_batch_size``: it bounds the activations and logits held at once) and their
    per-sample gradients come from one forward+backward per batch (:mod:`hf_lwf.method.persample`); anything else
    takes one backward per example (:func:`empirical_fisher_reference`).

    ``loss_scale`` S (fp16): the backward runs on S times the loss and F is divided by S**2 (the mean by S); if the
    result is not finite (an overflow) the pass is repeated at S/16, down to S = 1.

    ``consumer``: makes the consumer that keeps the squared gradients (default: whole parameters). A consumer that
    keeps only this rank's part of each parameter (ZeRO-3 slices) makes every rank run every example, with nothing
    summed across ranks afterwards.
    """
    if not examples:
        raise ValueError("The empirical Fisher needs at least one learning example (`lwf_fisher_samples`).")
    if loss_fn is not None or any(set(e) - BATCHABLE_KEYS or "labels" not in e or e["input_ids"].shape[0] != 1
                                  for e in examples):
        fisher, mean = empirical_fisher_reference(model, examples, loss_fn)
        return fisher, (mean if with_mean else None)
    params = trainable_parameters(model)
    # FSDP: every rank runs every example (the forwards are collective) and fills only its own rows.
    sharded = is_sharded(params.values()) or consumer is not None
    mine = examples if sharded else [examples[i] for i in shard_indices(len(examples))]

    scale = float(loss_scale)
    while True:
        sink = consumer() if consumer is not None else FisherConsumer(params, with_mean=with_mean)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(mine), batch_size):
                batch = pad_examples(mine[start : start + batch_size])
                per_sample_pass(model, batch, sink, None, params, chunk_elements or DEFAULT_CHUNK_ELEMENTS,
                                loss_scale=scale)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        names = sorted(params)
        sums = getattr(sink, "sums", None) or {}
        if not sharded:  # in place, one parameter at a time: no concatenated fp32 copy of the model
            for tensor in [sink.squares[n] for n in names] + [sums[n] for n in names if n in sums]:
                all_reduce_(tensor)
        if scale <= 1.0 or _all_finite(sink.squares):
            break
        del sink
        scale = max(1.0, scale / 16)
    count = len(examples)
    fisher = {n: f.div_(count * scale**2) for n, f in sink.squares.items()}
    return fisher, ({n: m.div_(count * scale) for n, m in sums.items()} if with_mean else None)


def _all_finite(tensors: TensorDict) -> bool:
    """One host sync: whether every tensor is finite (the same answer on every rank)."""
    names = list(tensors)
    views = {n: local_view(tensors[n]) for n in names}
    bad = torch.zeros(1, device=collective_device("cpu"))
    for group in _by_device(names, views).values():
        norms = torch._foreach_norm([views[n] for n in group], dtype=torch.float32)
        bad += (~torch.isfinite(torch.stack(norms))).sum().float().to(bad.device)
    if is_sharded(tensors.values()):
        all_reduce_(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def pad_examples(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad single-example causal-LM batches into one (padding carries attention 0 and label -100)."""
    length = max(e["input_ids"].shape[1] for e in examples)
    device = examples[0]["input_ids"].device
    out = {
        "input_ids": torch.zeros(len(examples), length, dtype=torch.long, device=device),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long, device=device),
        "labels": torch.full((len(examples), length), -100, dtype=torch.long, device=device),
    }
    for i, e in enumerate(examples):
        n = e["input_ids"].shape[1]
        out["input_ids"][i, :n] = e["input_ids"][0]
        out["attention_mask"][i, :n] = e["attention_mask"][0] if "attention_mask" in e else 1
        out["labels"][i, :n] = e["labels"][0]
    return out


def empirical_fisher_reference(
    model: torch.nn.Module, examples: list[dict[str, torch.Tensor]], loss_fn: Callable | None = None
) -> tuple[TensorDict, TensorDict]:
    """The plain empirical Fisher: one backward per example (the reference, and the path for custom losses)."""
    if not examples:
        raise ValueError("The empirical Fisher needs at least one learning example (`lwf_fisher_samples`).")
    params = trainable_parameters(model)
    if is_sharded(params.values()):
        raise NotImplementedError(
            "Under FSDP the empirical Fisher needs causal-LM learning batches with only `input_ids`, "
            "`attention_mask` and `labels` (and no custom loss); use lwf_fisher='online' otherwise."
        )
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
    """1 on the top-``ratio`` fraction (over all entries) of ``|F * D|``, else 0; ``None`` when ``ratio`` is 1.

    Exactly ``k = max(1, round(ratio * N))`` entries: ties are broken by position (parameters in name order, then
    the flat index within a parameter), as :class:`TopKMask` does without concatenating anything."""
    if ratio >= 1.0:
        return None
    names = sorted(fisher)
    flat = torch.cat([(fisher[n] * delta[n]).abs().reshape(-1) for n in names])
    keep = max(1, int(round(ratio * flat.numel())))
    flat_mask = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    flat_mask[torch.sort(flat, descending=True, stable=True).indices[:keep]] = 1.0
    sizes = [fisher[n].numel() for n in names]
    return {n: m.view_as(fisher[n]) for n, m in zip(names, torch.split(flat_mask, sizes))}


def weighted_direction(fisher: TensorDict, delta: TensorDict, mask: TensorDict | None) -> TensorDict:
    """``w = M * F * D``, the direction that confidence scoring projects per-sample gradients on."""
    return {n: fisher[n] * delta[n] * (mask[n] if mask is not None else 1.0) for n in fisher}


def masked_fisher(fisher: TensorDict, mask: TensorDict | None) -> TensorDict:
    """``M * F``, the curvature of the quadratic term of the confidence."""
    return fisher if mask is None else {n: fisher[n] * mask[n] for n in fisher}


def snapshot(
    model: torch.nn.Module, out: TensorDict | None = None, dtype: torch.dtype | None = None, device=None
) -> TensorDict:
    """A detached copy of the trainable parameters (the reference theta_ref), in each parameter's own dtype.

    A copy in the parameter's dtype is exact (bf16 weights give a bf16 theta_ref: half the memory of fp32, and
    ``D = theta_now - theta_ref`` is formed in fp32 from both). With ``out``, the copy is written into its tensors in
    place (no second whole-model copy exists at any time); ``dtype``/``device`` choose how a new copy is stored. On
    the host (``device='cpu'`` in a CUDA run) the copy is pinned and written without blocking.
    Under FSDP each rank copies its own shard (a ``DTensor`` laid out like the parameter).
    """
    params = trainable_parameters(model)
    if out:
        with torch.no_grad():
            for name, p in params.items():
                target = local_view(out[name])
                target.copy_(local_view(p.detach()), non_blocking=target.is_pinned())
        return out
    if device is not None and is_sharded(params.values()):
        raise ValueError("Under FSDP theta_ref is sharded like the parameters: `lwf_state_device='cpu'` is not "
                         "supported there.")
    copies = {}
    for name, p in params.items():
        target = torch.device(device) if device is not None else p.device
        if target.type == "cpu" and p.device.type == "cuda":
            copy = torch.empty(p.shape, dtype=dtype or p.dtype, pin_memory=True)
            copies[name] = copy.copy_(p.detach(), non_blocking=True)
        else:
            copies[name] = p.detach().to(device=target, dtype=dtype or p.dtype, copy=True)
    return copies


def kth_largest(values: Callable[[str], torch.Tensor], names: Iterable[str], k: int, across_ranks: bool = False
                ) -> float:
    """The ``k``-th largest of the non-negative fp32 numbers ``values(name)`` over all ``names``, exactly.

    A radix select over the float bit patterns, 8 bits per pass: four passes over the parameters, each holding
    one parameter's values at a time, so no concatenated copy of all of them is ever made. With ``across_ranks``
    each rank holds a disjoint part of the numbers (FSDP shards): the 256 counts of each pass are summed across ranks.
    """
    names = list(names)
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        counts = None
        for name in names:
            bits = values(name).float().reshape(-1).view(torch.int32)
            if shift < 24:
                bits = bits[(bits >> (shift + 8)) == prefix]
            digits = torch.bincount(((bits >> shift) & 255).long(), minlength=256)
            counts = digits if counts is None else counts + digits.to(counts.device)  # a model over several devices
        if across_ranks:
            counts = counts.to(collective_device(counts.device))
            all_reduce_(counts)
        above = 0
        counts = counts.tolist()
        for digit in range(255, -1, -1):
            if above + counts[digit] >= remaining:
                break
            above += counts[digit]
        remaining -= above
        prefix = (prefix << 8) | digit
    return float(torch.tensor([prefix], dtype=torch.int32).view(torch.float32))


class TopKMask:
    """Exactly ``k`` of the non-negative fp32 numbers ``values(name)`` over all ``names``: the largest ones, ties at
    the ``k``-th largest broken by position, so that a mask of ``|F * D|`` keeps ``k = round(rho * N)`` entries even
    when most of them are equal (exact zeros: bf16 weights whose small steps round away).

    Position is the global order: ``names`` sorted, then the row-major flat index within the whole parameter. Each
    rank may hold a part of every parameter (``across_ranks``): a block of rows (FSDP2) or a flat slice (ZeRO-3),
    starting at flat index ``starts[name]`` of the parameter, and ``values(name)`` gives that part. The counts of
    entries above and at the threshold per parameter are added across ranks with one all-reduce, so every rank
    keeps the same entries as one process holding everything would. :meth:`keep` then tells for any block of rows
    (dim 0 of ``values(name)``) which entries are kept; one parameter per rank at most straddles the cut, and only
    for it a count of ties per row is kept. No concatenated copy of the values is ever made.
    """

    def __init__(self, values: Callable[[str], torch.Tensor], names: Iterable[str], k: int,
                 starts: dict[str, int] | None = None, across_ranks: bool = False):
        names = sorted(names)
        self.k = int(k)
        self.threshold = kth_largest(values, names, self.k, across_ranks=across_ranks)
        t = self.threshold
        above, ties = 0, []
        for name in names:
            v = values(name)
            over, equal = torch.stack([(v > t).sum(), (v == t).sum()]).tolist()
            above += over
            ties.append(equal)
        rank, world = rank_and_world() if across_ranks else (0, 1)
        table = torch.zeros(world, 2 * len(names) + 1, dtype=torch.int64)
        table[rank, 0 : 2 * len(names) : 2] = torch.tensor(ties, dtype=torch.int64)
        table[rank, 1 : 2 * len(names) : 2] = torch.tensor([(starts or {}).get(n, 0) for n in names],
                                                           dtype=torch.int64)
        table[rank, -1] = above
        if across_ranks:
            table = all_reduce_(table.to(collective_device("cpu"))).cpu()
        counts, first = table[:, 0 : 2 * len(names) : 2], table[:, 1 : 2 * len(names) : 2]
        self.needed = self.k - int(table[:, -1].sum())  # how many entries equal to the threshold are kept
        if not 1 <= self.needed <= int(counts.sum()):
            raise RuntimeError(f"The update mask's count of entries at its threshold ({int(counts.sum())}) does "
                               f"not cover the {self.needed} it needs: the ranks disagree on |F * D|.")
        totals = counts.sum(0)
        earlier = ((first < first[rank]) * counts).sum(0)  # ties of this parameter on ranks holding earlier parts
        bases = (totals.cumsum(0) - totals + earlier).tolist()
        self._ties: dict[str, tuple[int, int]] = {n: (b, c) for n, b, c in zip(names, bases, ties)}
        self._row_ties: dict[str, list[int]] = {}
        for name, (base, count) in self._ties.items():
            if base < self.needed < base + count:  # the cut falls inside this rank's part of this parameter
                v = values(name)
                per_row = (v == t).reshape(v.shape[0] if v.dim() else 1, -1).sum(1)
                self._row_ties[name] = (per_row.cumsum(0) - per_row).tolist()

    def keep(self, name: str, block: torch.Tensor, row: int = 0) -> torch.Tensor:
        """Which entries of ``block`` are kept: the values ``values(name)[row : row + len(block)]`` (the rows in the
        local numbering of ``values(name)``; a whole 0-dim or flat part is one block at row 0)."""
        base, count = self._ties[name]
        if base + count <= self.needed:
            return block >= self.threshold
        if base >= self.needed:
            return block > self.threshold
        tie = block == self.threshold
        ordinal = base + self._row_ties[name][row] + tie.reshape(-1).cumsum(0).view(tie.shape)
        return (block > self.threshold) | (tie & (ordinal <= self.needed))


def stage_like(tensors: TensorDict, params: dict[str, torch.Tensor]) -> TensorDict:
    """``tensors`` on their parameters' devices: the ones kept elsewhere (``lwf_state_device='cpu'``, pinned) are
    copied without blocking, once per scoring round, instead of once per scoring batch. The copies live for the
    round only, so a round holds F and theta_ref on the GPU as ``lwf_state_device='auto'`` does; the learning steps
    in between do not."""
    out = {}
    for name, t in tensors.items():
        p = params.get(name)
        if p is None or is_sharded(t) or t.device == p.device:
            out[name] = t
        else:
            out[name] = t.to(p.device, non_blocking=t.is_pinned())
    return out


class ScoringTerms:
    """``w = M * F * D`` and ``F_M = M * F`` for one parameter (or a block of its rows) at a time.

    Built :meth:`from_state` (F, theta_ref and the live weights: D, the bias correction and the mask are applied
    per block inside the scoring pass, so none of them exists as a whole-model copy) or :meth:`explicit` from
    ready ``direction``/``curvature`` dicts. F and theta_ref may be kept in any dtype or on another device
    (bf16, CPU): each block is moved to the parameter's device in fp32 when it is used.

    ``rates``: the learning rate eta of each parameter (that of its optimizer param group, :func:`parameter_rates`).
    With them the terms are ``eta * w`` and ``eta**2 * F_M``, so ``a(x) + n(x) / 2`` is the confidence
    ``sum_g eta_g a_g(x) + eta_g**2 / 2 n_g(x)`` of a per-group step; score them with ``lr=1``. Without them
    the terms are unscaled and one ``lr`` applies to all.
    """

    def __init__(self):
        self._direction: TensorDict | None = None
        self._curvature: TensorDict | None = None
        self._fisher: TensorDict | None = None
        self._delta: TensorDict | None = None
        self._reference: TensorDict | None = None
        self._params: dict[str, torch.Tensor] | None = None
        self._scale = 1.0
        self._mask: TopKMask | None = None
        self.rates: dict[str, float] | None = None
        self.threshold: float | None = None

    @classmethod
    def explicit(cls, direction: TensorDict, curvature: TensorDict | None = None,
                 rates: dict[str, float] | None = None) -> ScoringTerms:
        terms = cls()
        terms._direction, terms._curvature = direction, curvature or {}
        terms.rates = checked_rates(rates, set(direction) | set(terms._curvature))
        return terms

    @classmethod
    def from_state(
        cls,
        fisher: TensorDict,
        *,
        model: torch.nn.Module | None = None,
        reference: TensorDict | None = None,
        delta: TensorDict | None = None,
        scale: float = 1.0,
        mask_ratio: float = 1.0,
        rates: dict[str, float] | None = None,
    ) -> ScoringTerms:
        """``D = delta`` if given, else ``theta_now - reference`` from ``model``'s live weights; F is ``scale * fisher``.

        ``mask_ratio`` < 1: M keeps exactly ``max(1, round(mask_ratio * N))`` entries of ``|F * D|`` over the
        ``N`` entries of all parameters (:class:`TopKMask`; ties by position)."""
        if delta is None and (model is None or reference is None):
            raise ValueError("ScoringTerms.from_state needs `delta`, or `model` and `reference`.")
        terms = cls()
        terms._fisher, terms._delta, terms._reference, terms._scale = fisher, delta, reference, scale
        terms.rates = checked_rates(rates, set(fisher))
        terms._params = trainable_parameters(model) if model is not None else None
        if terms._params is not None:  # F and theta_ref kept on the host: copied to the GPU once for this round
            terms._fisher = stage_like(fisher, terms._params)
            terms._reference = stage_like(reference, terms._params) if reference is not None else None
        if mask_ratio < 1.0:
            total = sum(f.numel() for f in fisher.values())
            starts = {}
            for name, f in fisher.items():
                own = local_rows(f)
                starts[name] = 0 if own is None else own.start * math.prod(f.shape[1:])
            terms._mask = TopKMask(lambda n: terms._fisher_delta(n, None)[1].abs(), fisher,
                                   max(1, int(round(mask_ratio * total))), starts=starts,
                                   across_ranks=is_sharded(fisher.values()))
            terms.threshold = terms._mask.threshold
        return terms

    def has(self, name: str) -> bool:
        if self._fisher is not None:
            return name in self._fisher
        return name in self._direction or name in self._curvature

    def _fisher_delta(self, name: str, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        # rows are numbered as in the full parameter; under FSDP they lie in this rank's shard (None: the shard)
        fisher = local_view(self._fisher[name], rows)
        param = local_view(self._params[name].detach(), rows) if self._params is not None else None
        device = param.device if param is not None else fisher.device
        f = fisher.to(device=device, dtype=torch.float32)
        if self._scale != 1.0:
            f = f * self._scale
        if self._delta is not None:
            d = local_view(self._delta[name], rows).to(device=device, dtype=torch.float32)
            return f, f * d
        # in place on one fp32 copy of the weights: D = theta - theta_ref, then F * D (fewer kernels and buffers)
        d = param.to(dtype=torch.float32, copy=True)
        return f, d.sub_(local_view(self._reference[name], rows).to(device=device)).mul_(f)

    def mask(self, name: str, rows: slice | None = None) -> torch.Tensor | None:
        """M of ``param[rows]`` (bool; this rank's shard when ``rows`` is None), or None without a mask."""
        if self._mask is None:
            return None
        return self._mask.keep(name, self._fisher_delta(name, rows)[1].abs(), self._local_row(name, rows))

    def _local_row(self, name: str, rows: slice | None) -> int:
        """The first row of ``rows`` in the numbering of this rank's shard."""
        own = local_rows(self._fisher[name])
        return 0 if rows is None else rows.start - (own.start if own is not None else 0)

    def chunk(self, name: str, rows: slice | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(w, F_M)`` of ``param[rows]`` in fp32 (``None`` where a term does not cover this parameter), times
        ``(eta, eta**2)`` with ``rates``."""
        if self._fisher is None:
            pick = (lambda t: local_view(t)) if rows is None else (lambda t: local_view(t, rows))
            w, fm = self._direction.get(name), self._curvature.get(name)
            return self._rated(name, pick(w).float() if w is not None else None,
                               pick(fm).float() if fm is not None else None)
        f, fd = self._fisher_delta(name, rows)
        if self._mask is not None:
            keep = self._mask.keep(name, fd.abs(), self._local_row(name, rows))
            f, fd = f * keep, fd * keep
        return self._rated(name, fd, f)

    def _rated(self, name: str, w: torch.Tensor | None, fm: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.rates is None:
            return w, fm
        eta = self.rates[name]
        return (w * eta if w is not None else None), (fm * eta**2 if fm is not None else None)


def checked_rates(rates: dict[str, float] | None, names: set[str]) -> dict[str, float] | None:
    """``rates`` if it gives a finite, non-negative rate for every name in ``names``; a ValueError naming the gap."""
    if rates is None:
        return None
    missing = sorted(names - set(rates))
    if missing:
        raise ValueError(f"`rates` has no learning rate for {len(missing)} scored parameters (first: {missing[0]}).")
    bad = sorted(n for n in names if not (math.isfinite(rates[n]) and rates[n] >= 0))
    if bad:
        raise ValueError(f"`rates` gives {bad[0]} the learning rate {rates[bad[0]]!r}: it must be finite and >= 0.")
    return {n: float(rates[n]) for n in names}
