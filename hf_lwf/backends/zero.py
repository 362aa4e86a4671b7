"""DeepSpeed ZeRO-2 and ZeRO-3 (through ``LWFTrainer`` / ``LWFTrainerMixin``).

DeepSpeed takes the optimizer step inside ``accelerator.backward`` (``engine.step``), before any callback or Trainer
hook runs, and keeps the gradients in its own partitioned buffers (``p.grad`` is ``None`` by then). LWF therefore
reads the gradients from a wrapper around ``engine.step``, where they are averaged across ranks but not yet clipped
(:func:`install_fisher_hook`), through DeepSpeed's documented accessors (``deepspeed.utils.safe_get_full_grad``).

Under ZeRO-2 every rank holds the whole parameters (only the optimizer state and the gradients are partitioned), so
LWF works on whole parameters as under DDP: D_self, scoring and the empirical Fisher split their work across ranks
and all-reduce. The ascent (:class:`ZeroAscent`) computes its gradients with ``torch.autograd.grad`` -- a
``backward()`` would fire ZeRO's gradient-reduction hooks and leave the ascent gradient in the engine's buffers --
and applies its update both to the model's weights and to the optimizer's fp32 master copy
(``safe_set_full_fp32_param``), which is what the engine's next step starts from. The default ``preconditioned``
update reads the second moment from DeepSpeed's partitioned optimizer state through its documented accessors
(``safe_get_full_optimizer_state`` under ZeRO-2, ``safe_get_local_optimizer_state`` under ZeRO-3), read-only.

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

from ..distributed import all_reduce_, all_reduce_sum_, rank_and_world
from ..method import fisher as fisher_lib
from ..method.fisher import ScoringTerms, TopKMask, checked_rates, trainable_parameters
from ..method.persample import Consumer
from ..method.unlearn import apply_update_, check_preconditioner, forget_batch_losses, preconditioned_update
from ..state import LWFState
from .base import Ascent, Backend, raw_optimizer


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


class ZeroBackend(Backend):
    """DeepSpeed ZeRO-2 (whole parameters, partitioned optimizer state and gradients) or ZeRO-3 (flat slices)."""

    owns_optimizer_step = True

    def __init__(self, stage: int | None, fp16: bool = False):
        self.stage, self.fp16 = stage, fp16
        self.name = f"zero{stage}"
        self.partitioned = stage == 3

    @classmethod
    def from_args(cls, args) -> ZeroBackend:
        return cls(deepspeed_stage(args), fp16=bool(getattr(args, "fp16", False)))

    def check(self, config, *, via_trainer: bool, model: torch.nn.Module | None = None) -> None:
        if not via_trainer:
            raise ValueError(
                "Under DeepSpeed, LWF must run through `LWFTrainer` (or a Trainer subclass with `LWFTrainerMixin` "
                "first in its bases), not a plain LWFCallback: DeepSpeed steps the optimizer inside backward, and only "
                "the Trainer subclass can read the gradients before that step (the online Fisher) and wire the engine."
            )
        if self.stage not in SUPPORTED_STAGES:
            raise ValueError(
                f"hf_lwf supports DeepSpeed ZeRO stage {' and '.join(map(str, SUPPORTED_STAGES))}; this run asks for "
                f"stage {self.stage} (`zero_optimization.stage` in the DeepSpeed config). Use DDP or FSDP2 otherwise."
            )
        if config.lwf_unlearn_optimizer == "shared":
            raise ValueError(
                "Under DeepSpeed, `lwf_unlearn_optimizer='shared'` is not supported: the engine owns the Trainer's "
                "optimizer and steps it only inside its own backward, so an extra step of it cannot be taken. Use the "
                "default 'preconditioned' (it reads DeepSpeed's second moment, read-only) or 'sgd' with lwf_unlearn_lr."
            )
        if self.stage == 3 and config.lwf_schedule != "periodic":
            raise ValueError(
                "Under DeepSpeed ZeRO-3 LWF supports the periodic schedule only (got lwf_schedule="
                f"{config.lwf_schedule!r}): the `early` ablation's intended update over ZeRO-3 partitions is not "
                "written yet. Use ZeRO-2 for it."
            )
        if self.stage == 3 and config.lwf_state_device == "cpu":
            raise ValueError("`lwf_state_device='cpu'` is not supported under ZeRO-3: LWF's state is partitioned like "
                             "the parameters (use DeepSpeed's offloading for both).")
        if self.fp16:
            raise ValueError("`fp16=True` is not supported with LWF under DeepSpeed (its dynamic loss scale lives in "
                             "the engine); use bf16 or fp32.")

    # ------------------------------------------------------------------------------------------ the state
    def snapshot(self, model, out=None, device=None):
        if self.stage == 3:
            return snapshot_partitions(trainable_parameters(model), out=out)
        return super().snapshot(model, out=out, device=device)

    def fisher_layout(self, params, grads):
        return grads if self.stage == 3 else params  # ZeRO-3: F is laid out like this rank's gradient slices

    def load_state(self, directory, params):
        if self.stage != 3:
            return super().load_state(directory, params)
        state = LWFState.load(directory, rows={n: partition_rows(p) for n, p in params.items()})
        for group in (state.fisher, state.reference):  # the rows that cover this rank's slice, then the slice
            for name in list(group):
                group[name] = rows_to_partition(group[name], params[name])
        return state

    def place(self, state, params, device):
        if self.stage != 3:  # ZeRO-3: load_state read this rank's slices already
            super().place(state, params, device)

    def whole_weights(self, model):
        if self.stage != 3:
            yield from super().whole_weights(model)
            return
        params = trainable_parameters(model)
        for name in sorted(params):
            yield name, gather_partitions({name: local_partition(params[name])}, {name: params[name]})[name]

    def tensors_for_saving(self, state, params, keep):
        if self.stage != 3:
            return None
        return {f"{group}/{name}": tensor for group in ("fisher", "reference") for name, tensor in
                gather_partitions(getattr(state, group), params, keep=keep).items()}

    # ------------------------------------------------------------------------------------------- scoring
    def scoring_terms(self, fisher, *, model, reference, scale, mask_ratio, rates=None):
        if self.stage != 3:
            return super().scoring_terms(fisher, model=model, reference=reference, scale=scale, mask_ratio=mask_ratio,
                                         rates=rates)
        return PartitionTerms.from_state(fisher, model=model, reference=reference, scale=scale, mask_ratio=mask_ratio,
                                         **({"rates": rates} if rates else {}))

    def empirical_fisher(self, model, examples, *, batch_size, chunk_elements, loss_scale):
        if self.stage != 3:
            return super().empirical_fisher(model, examples, batch_size=batch_size, chunk_elements=chunk_elements,
                                            loss_scale=loss_scale)
        params = trainable_parameters(model)
        if any(set(e) - fisher_lib.BATCHABLE_KEYS or "labels" not in e or e["input_ids"].shape[0] != 1
               for e in examples):
            raise NotImplementedError(
                "Under ZeRO-3 the empirical Fisher needs causal-LM learning batches with only `input_ids`, "
                "`attention_mask` and `labels`; use lwf_fisher='online' otherwise."
            )
        fisher, _ = fisher_lib.empirical_fisher(model, examples, batch_size=batch_size, chunk_elements=chunk_elements,
                                                with_mean=False, consumer=lambda: PartitionFisherConsumer(params))
        return fisher

    def collective_forwards(self, model):
        return self.stage == 3

    # ---------------------------------------------------------------------------------- the learning step
    def learning_optimizer(self, optimizer):
        """The client torch optimizer inside DeepSpeed's ZeRO optimizer: its param groups and state keys."""
        return raw_optimizer(raw_optimizer(optimizer))

    def parameter_groups(self, optimizer):
        zero = raw_optimizer(optimizer)  # its param groups hold flat fp32 partitions; these lists hold the model's
        return [list(members) for members in getattr(zero, "fp16_groups" if self.stage == 3 else "bit16_groups")]

    def install_step_hook(self, engine, update) -> None:
        install_fisher_hook(engine, update)

    def fisher_gradients(self, params):
        """``(grads, fetch)`` for the online Fisher inside ``engine.step``: ZeRO-2 fetches each whole gradient on
        demand (collective, one at a time); ZeRO-3 returns this rank's slices, or ``({}, None)`` when a rank has a
        non-finite gradient (then no rank updates F)."""
        if self.stage != 3:
            return None, full_gradient
        return local_gradients(params), None

    # ------------------------------------------------------------------------------------------- the ascent
    def ascent(self, rule, *, optimizer, params, rates, coef, sgd_lr, loss_scale):
        zero = raw_optimizer(optimizer)
        groups = self.parameter_groups(optimizer)
        group_of = {id(p): g for g, members in enumerate(groups) for p in members}
        client = zero.optimizer
        if rule == "preconditioned":
            check_preconditioner(client)
            if self.stage != 3 and client.state:
                from deepspeed.utils import lazy_init_hp_params_optimizer_state

                # map each parameter's fragment onto the optimizer state as it is now (views, nothing written), so
                # DeepSpeed's accessors find every moment
                for members, flat in zip(groups, zero.single_partition_of_fp32_groups):
                    lazy_init_hp_params_optimizer_state(members, flat, client.state)
        return ZeroAscent(rule, params, client, group_of, rates, coef=coef, sgd_lr=sgd_lr, stage=self.stage)


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
        terms.rates = checked_rates(rates, set(fisher))
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


def full_gradient(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """The reduced, unclipped fp32 gradient of one parameter, whole on every rank (ZeRO-2; collective: every rank
    calls it for the same parameters in the same order, one all-reduce each). Valid inside the ``engine.step``
    wrapper only. The online Fisher folds each one in before fetching the next: one whole gradient at a time."""
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(param)
    if g is None:
        raise RuntimeError(f"DeepSpeed returned no gradient for {name}: LWF cannot read the step's gradients.")
    return g.detach().float()


class ZeroAscent(Ascent):
    """One bounded ascent step under ZeRO: the gradient of the kept forget losses through ``torch.autograd.grad``
    (a ``backward()`` would fire ZeRO's reduction hooks), summed across ranks under ZeRO-2 (under ZeRO-3 every rank
    ran the whole batch), clipped to ``max_grad_norm``, then the update of ``rule`` on each rank's part of the fp32
    master copy and of the weights.

    ``preconditioned``: :func:`~hf_lwf.method.unlearn.preconditioned_update` with the second moment of DeepSpeed's
    optimizer state (read, never written) and each param group's ``rates``; ``sgd``: ``sgd_lr`` times the gradient
    of ``-coef`` times the mean loss."""

    def __init__(self, rule: str, params: dict[str, torch.nn.Parameter], client, group_of: dict[int, int],
                 rates, *, coef: float, sgd_lr: float | None, stage: int):
        self.rule, self.params, self.client, self.group_of = rule, list(params.values()), client, group_of
        self.rates, self.coef, self.sgd_lr, self.zero3 = list(rates), coef, sgd_lr, stage == 3

    def step(self, model, batch, *, loss_cap, max_grad_norm):
        params = self.params
        result, kept_losses = forget_batch_losses(model, batch, loss_cap, collective=self.zero3)
        kept = result["kept"]
        if result["skipped"] or kept == 0:
            return result
        weight = -1.0 if self.rule == "preconditioned" else -self.coef
        grads = None
        if kept_losses is not None and kept_losses.numel():
            grads = torch.autograd.grad(weight * kept_losses.sum() / kept, params, allow_unused=True)
        shapes = [p.ds_shape if self.zero3 else p.shape for p in params]
        grads = [torch.zeros(shape, dtype=torch.float32, device=p.device) if grads is None or grads[i] is None
                 else grads[i].float() for i, (p, shape) in enumerate(zip(params, shapes))]
        if not self.zero3:
            all_reduce_sum_(grads)
        norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(norm):
            result["skipped"] = 1
            return result
        if max_grad_norm > 0:  # as torch.nn.utils.clip_grad_norm_
            torch._foreach_mul_(grads, torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))
        if self.zero3:
            # Release every gathered copy first: a module whose input needs no gradient (the embedding) keeps its
            # weights gathered after an autograd pass, and its next forward would use them, not the updated slices.
            params[0]._z3_optimizer.empty_partition_cache()
        moved = sum(self._apply(p, g) for p, g in zip(params, grads))
        result["grad_norm"], result["applied"] = float(norm), int(float(moved) > 0)
        return result

    @torch.no_grad()
    def _apply(self, p: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """Update this rank's part of ``p``'s fp32 master copy and weights; returns the squared change."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_local_fp32_param,
            safe_set_full_fp32_param,
            safe_set_local_fp32_param,
        )

        if self.zero3:
            start, count = partition_range(p)
            grad = grad.reshape(-1)[start : start + count]
            master = safe_get_local_fp32_param(p).clone()
            part = master.narrow(0, 0, count)
        else:
            master = safe_get_full_fp32_param(p)
            if master is None:
                raise RuntimeError("A trainable parameter has no DeepSpeed fp32 master copy: is it in the optimizer?")
            part = master.view(-1)
        grad = grad.reshape(part.shape).to(part.device)
        if self.rule == "sgd":
            update = grad * self.sgd_lr
        else:
            group = self.client.param_groups[self.group_of[id(p)]]
            second, step = self._second_moment(p, bool(group.get("amsgrad", False)))
            update, _ = preconditioned_update(grad, second, step, beta2=float(group.get("betas", (0.9, 0.999))[1]),
                                              eps=float(group.get("eps", 1e-8)), lr=self.rates[self.group_of[id(p)]],
                                              coef=self.coef)
        change = apply_update_(part, update)
        if self.zero3:
            safe_set_local_fp32_param(p, master)
            p.ds_tensor.copy_(master.to(p.ds_tensor.dtype))
        else:
            safe_set_full_fp32_param(p, master)
            p.data.copy_(master.view_as(p))
        return change.pow(2).sum()

    def _second_moment(self, p: torch.nn.Parameter, amsgrad: bool) -> tuple[torch.Tensor | None, float]:
        """This rank's part of ``p``'s second moment in DeepSpeed's optimizer state and the step count (None before
        the first step). ZeRO-2 gathers the whole moment (collective: every rank asks for every parameter)."""
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        states = list(self.client.state.values())
        if not states or "step" not in states[0]:
            return None, 0.0
        key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        if self.zero3:
            second = safe_get_local_optimizer_state(p, key)
            return second.reshape(-1)[: partition_range(p)[1]], float(states[0]["step"])
        return safe_get_full_optimizer_state(p, key).reshape(-1), float(states[0]["step"])
