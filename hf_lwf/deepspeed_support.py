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

Under ZeRO-3 each rank holds a flat slice of every parameter (``p.ds_tensor``: elements ``[r * P, (r + 1) * P)`` of
the flattened parameter, zero-padded at the end), and LWF keeps F and theta_ref the same way: per parameter, the
elements of this rank's slice (:func:`partition_range`), so no rank holds a whole copy. As under FSDP every rank
runs every forward (they are collective): self-generation is lockstep, and scoring runs every D_self batch on
every rank, each forming the per-sample gradient terms of its own slice only (:class:`PartitionTerms`), whose
partial sums one all-reduce adds. The ascent runs the whole D_U batch on every rank and updates each rank's slice
of the weights and of the fp32 master copy. Checkpoints gather each tensor whole (:func:`gather_partitions`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .distributed import all_reduce_, all_reduce_sum_, rank_and_world
from .method.unlearn import forget_batch_losses
from .method.common import sequence_losses
from .method.fisher import (
    _BATCHABLE_KEYS,
    ScoringTerms,
    TopKMask,
    _checked_rates,
    _pad_examples,
    trainable_parameters,
)
from .method.persample import DEFAULT_CHUNK_ELEMENTS, Consumer, per_sample_pass


SUPPORTED_STAGES = (2, 3)


def deepspeed_stage(args) -> int | None:
    """The ZeRO stage of a DeepSpeed run (``args.deepspeed``/``deepspeed_plugin`` or accelerate's launcher), else None."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        plugin = state.get("deepspeed_plugin") if state else None
        if plugin is None:
            return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
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
    if stage == 3 and config.lwf_schedule != "periodic":
        raise ValueError(
            "Under DeepSpeed ZeRO-3 LWF supports the periodic schedule only (got lwf_schedule="
            f"{config.lwf_schedule!r}): the `early` ablation's intended update over ZeRO-3 partitions is not written "
            "yet. Use ZeRO-2 for it."
        )
    if stage == 3 and config.lwf_state_device == "cpu":
        raise ValueError("`lwf_state_device='cpu'` is not supported under ZeRO-3: LWF's state is partitioned like the "
                         "parameters (use DeepSpeed's offloading for both).")
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


def is_zero3(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitioned."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def partition_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """``(start, count)``: the elements of the flattened parameter this rank holds under ZeRO-3 (padding excluded)."""
    rank, _ = rank_and_world()
    size = param.ds_tensor.numel()
    start = rank * size
    return start, max(0, min(size, param.ds_numel - start))


def local_partition(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's elements of a ZeRO-3 parameter (a view of ``ds_tensor``, padding excluded)."""
    return param.ds_tensor.detach().narrow(0, 0, partition_range(param)[1])


def snapshot_partitions(params: dict[str, torch.nn.Parameter], out: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """theta_ref under ZeRO-3: a copy of each parameter's local slice in its own dtype (exact; D is formed in fp32 by
    :class:`PartitionTerms`), into ``out`` in place when given."""
    if out:
        with torch.no_grad():
            for name, p in params.items():
                out[name].copy_(local_partition(p))
        return out
    return {name: local_partition(p).clone() for name, p in params.items()}


def local_gradients(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each parameter's reduced, unclipped fp32 gradient, this rank's slice only (ZeRO-3, inside ``engine.step``).

    Returns ``{}`` when any rank has a non-finite gradient (one all-reduce of the flag), so that every rank skips
    the same Fisher update."""
    from deepspeed.utils import safe_get_local_grad

    grads = {}
    for name, p in params.items():
        grads[name] = safe_get_local_grad(p).detach().float().narrow(0, 0, partition_range(p)[1])
    finite = torch.tensor(float(all(bool(torch.isfinite(g).all()) for g in grads.values())))
    all_reduce_(finite, op=torch.distributed.ReduceOp.MIN)
    return grads if bool(finite) else {}


def partition_rows(param: torch.nn.Parameter) -> slice:
    """The rows (dim 0) of the whole parameter that cover this rank's ZeRO-3 slice: all a resuming rank reads."""
    start, count = partition_range(param)
    row = math.prod(param.ds_shape[1:]) if len(param.ds_shape) > 1 else 1
    if count == 0:
        return slice(0, 0)
    return slice(start // row, -(-(start + count) // row))


def rows_to_partition(rows_tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's slice from the rows :func:`partition_rows` read."""
    start, count = partition_range(param)
    row = math.prod(param.ds_shape[1:]) if len(param.ds_shape) > 1 else 1
    first = partition_rows(param).start * row
    return rows_tensor.reshape(-1)[start - first : start - first + count].to(param.ds_tensor.device, copy=True)


def gather_partitions(tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], keep: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Whole CPU tensors from every rank's slices, one all-gather per tensor in name order (collective)."""
    _, world = rank_and_world()
    out = {}
    for name in sorted(tensors):
        p, local = params[name], tensors[name].detach()
        size = p.ds_tensor.numel()
        padded = torch.zeros(size, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        if keep:
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu().contiguous()
    return out


class PartitionTerms(ScoringTerms):
    """``w = M * F * D`` and ``F_M = M * F`` under ZeRO-3: nonzero on this rank's slice of each parameter only.

    Every rank scores every sample; the per-sample sums over a rank's slice are partial sums that the scoring pass
    adds across ranks. The mask keeps exactly ``round(mask_ratio * N)`` entries over all ranks' slices, ties broken
    by position (:class:`~hf_lwf.method.fisher.TopKMask`; each slice starts at its flat index in the parameter).
    """

    @classmethod
    def from_state(cls, fisher, *, model=None, reference=None, delta=None, scale: float = 1.0,
                   mask_ratio: float = 1.0, rates: dict[str, float] | None = None) -> PartitionTerms:
        if delta is not None or model is None or reference is None:
            raise ValueError("PartitionTerms needs `model` and `reference` (D = theta_now - theta_ref).")
        terms = cls()
        terms._fisher, terms._reference, terms._scale = fisher, reference, scale
        terms.rates = _checked_rates(rates, set(fisher))
        terms._params = trainable_parameters(model)
        if mask_ratio < 1.0:
            total = sum(terms._params[n].ds_numel for n in fisher)
            starts = {n: partition_range(terms._params[n])[0] for n in fisher}
            # one row per slice: the slice is always scored whole, so no per-element tie counts are kept
            terms._mask = TopKMask(lambda n: terms._fisher_delta(n, None)[1].abs().reshape(1, -1), fisher,
                                   max(1, round(mask_ratio * total)), starts=starts, across_ranks=True)
            terms.threshold = terms._mask.threshold
        return terms

    def _fisher_delta(self, name: str, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        live = local_partition(self._params[name]).float()
        f = self._fisher[name].to(device=live.device, dtype=torch.float32)
        if self._scale != 1.0:
            f = f * self._scale
        return f, f * (live - self._reference[name].to(device=live.device, dtype=torch.float32))

    def mask(self, name: str, rows: slice | None = None) -> torch.Tensor | None:
        """M of this rank's slice (flat, bool), or None without a mask (``rows`` is ignored)."""
        return None if self._mask is None else self._mask.keep(name, self._fisher_delta(name, None)[1].abs())

    def chunk(self, name: str, rows: slice | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        f, fd = self._fisher_delta(name, None)
        if self._mask is not None:
            keep = self._mask.keep(name, fd.abs())
            f, fd = f * keep, fd * keep
        fd, f = self._rated(name, fd, f)
        return self._embed(name, fd, rows), self._embed(name, f, rows)

    def _embed(self, name: str, local: torch.Tensor, rows: slice | None) -> torch.Tensor:
        p = self._params[name]
        start, count = partition_range(p)
        whole = torch.zeros(p.ds_numel, dtype=local.dtype, device=local.device)
        whole[start : start + count] = local
        whole = whole.view(p.ds_shape)
        return whole if rows is None else whole[rows]


class PartitionFisherConsumer(Consumer):
    """Sums ``g_x**2`` over the samples of each batch, on this rank's ZeRO-3 slice of each parameter (fp32)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.squares = {n: torch.zeros(partition_range(p)[1], dtype=torch.float32, device=p.ds_tensor.device)
                        for n, p in params.items()}

    def dense(self, name: str, rows: slice | None, grads: torch.Tensor, sample: int | None = None) -> None:
        p = self.params[name]
        start, count = partition_range(p)
        row = math.prod(p.ds_shape[1:]) if len(p.ds_shape) > 1 else 1
        first = 0 if rows is None else rows.start * row  # flat index of the block's first element
        squares = grads.square().sum(0).reshape(-1)
        low, high = max(start, first), min(start + count, first + squares.numel())
        if low < high:
            self.squares[name][low - start : high - start] += squares[low - first : high - first]


def empirical_fisher_partitions(model: torch.nn.Module, examples: list[dict[str, torch.Tensor]],
                                batch_size: int = 16, chunk_elements: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`hf_lwf.method.fisher.empirical_fisher` under ZeRO-3: every rank runs every example (the forwards are
    collective) and keeps the mean squared per-sample gradient of its own slice of each parameter; no collective.

    ``batch_size`` (``lwf_fisher_batch_size``): examples per forward, which bounds the largest activation (the
    fp32 logits of ``batch_size`` sequences)."""

    if not examples:
        raise ValueError("The empirical Fisher needs at least one learning example (`lwf_fisher_samples`).")
    if batch_size < 1:
        raise ValueError(f"`lwf_fisher_batch_size` must be at least 1 (got {batch_size}).")
    if any(set(e) - _BATCHABLE_KEYS or "labels" not in e or e["input_ids"].shape[0] != 1 for e in examples):
        raise NotImplementedError(
            "Under ZeRO-3 the empirical Fisher needs causal-LM learning batches with only `input_ids`, "
            "`attention_mask` and `labels`; use lwf_fisher='online' otherwise."
        )
    params = trainable_parameters(model)
    consumer = PartitionFisherConsumer(params)

    def losses(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sequence_losses(logits, batch["labels"])

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = _pad_examples(examples[start : start + batch_size])
            per_sample_pass(model, batch, consumer, losses, params, chunk_elements or DEFAULT_CHUNK_ELEMENTS)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: f.div_(len(examples)) for n, f in consumer.squares.items()}


def full_gradient(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """The reduced, unclipped fp32 gradient of one parameter, whole on every rank (ZeRO-2; collective: every rank
    calls it for the same parameters in the same order, one all-reduce each). Valid inside the ``engine.step``
    wrapper only. The online Fisher folds each one in before fetching the next: one whole gradient at a time."""
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(param)
    if g is None:
        raise RuntimeError(f"DeepSpeed returned no gradient for {name}: LWF cannot read the step's gradients.")
    return g.detach().float()


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
    """One bounded SGD ascent step on ``batch`` under ZeRO-2: :func:`hf_lwf.method.unlearn.ascent_step` with its SGD
    optimizer, computed without ``backward()`` and written to DeepSpeed's fp32 master copy too.

    As under DDP each rank computes its share of the samples and the gradients are summed with one all-reduce,
    clipped to ``max_grad_norm``, and the step is skipped when the loss or the gradient is not finite.
    """
    plist = list(params.values())
    zero3 = hasattr(plist[0], "ds_id")  # ZeRO-3: forwards are collective, no rank sits out
    result, kept_losses = forget_batch_losses(model, batch, loss_cap, collective=zero3)
    kept = result["kept"]
    if result["skipped"] or kept == 0:
        return result
    grads = None
    if kept_losses is not None and kept_losses.numel():
        # autograd.grad, not backward(): ZeRO's hooks on the gradient accumulators must not see the ascent.
        grads = torch.autograd.grad(-coef * kept_losses.sum() / kept, plist, allow_unused=True)
    shapes = [p.ds_shape if zero3 else p.shape for p in plist]
    grads = [torch.zeros(shape, dtype=torch.float32, device=p.device) if grads is None or grads[i] is None
             else grads[i].float() for i, (p, shape) in enumerate(zip(plist, shapes))]
    if not zero3:  # ZeRO-3: every rank ran the whole batch, the gradients are already the same everywhere
        all_reduce_sum_(grads)
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm):
        result["skipped"] = 1
        return result
    if max_grad_norm > 0:  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))
    (apply_sgd_partitioned_ if zero3 else apply_sgd_)(plist, grads, lr)
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


@torch.no_grad()
def apply_sgd_partitioned_(params: list[torch.nn.Parameter], grads: list[torch.Tensor], lr: float) -> None:
    """``theta <- theta - lr * g`` on this rank's ZeRO-3 slice of the fp32 master copy and of the weights."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    # Release every gathered copy first: a module whose input needs no gradient (the embedding) keeps its weights
    # gathered after an autograd pass, and its next forward would use them instead of the updated slices.
    params[0]._z3_optimizer.empty_partition_cache()
    for p, g in zip(params, grads):
        start, count = partition_range(p)
        master = safe_get_local_fp32_param(p).clone()
        master.narrow(0, 0, count).add_(g.reshape(-1)[start : start + count].to(master.device), alpha=-lr)
        safe_set_local_fp32_param(p, master)
        p.ds_tensor.copy_(master.to(p.ds_tensor.dtype))
