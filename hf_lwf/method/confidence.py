"""Step 3: forgetting confidence of each self-generated sample.

Learning a sample x with step size eta moves theta by u_x = -eta * g_x. In the quadratic model of the learning
task around its target theta + D with curvature F (masked), the learning loss then changes by

    c(x) = eta * g_x . w  +  eta**2 / 2 * sum_i M_i F_i g_{x,i}**2  =  eta * a(x) + eta**2 / 2 * n(x),

with w = M * F * D. With a learning rate per optimizer param group the step is u_x = -eta_g * g_x on the parameters
of group g, and c(x) = sum_g eta_g * a_g(x) + eta_g**2 / 2 * n_g(x), a_g and n_g the sums over that group's
parameters: the terms then carry the rates (``ScoringTerms(rates=...)``, :func:`parameter_rates`) and ``lr`` is 1.
:func:`batch_confidence` gets both terms for a whole batch from one forward+backward and
per-layer per-sample gradients (:mod:`hf_lwf.method.persample`); w and M * F are formed one parameter block at a time
from F, theta_ref and the live weights (:class:`~hf_lwf.method.fisher.ScoringTerms`). ``a(x)`` alone is also a
directional derivative, one forward-mode pass (:func:`alignment_scores`).
:func:`reference_confidence` computes both from plain per-sample backward passes; tests compare against it.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp
from tqdm.auto import tqdm

from ..distributed import all_reduce_, all_reduce_sum_, collective_device, input_device, is_sharded, shard_indices
from .common import TensorDict, batch_losses, eager_attention, sequence_losses, without_input_require_grads
from .fisher import ScoringTerms, per_sample_gradients, trainable_parameters
from .persample import DEFAULT_CHUNK_ELEMENTS, ScoreConsumer, per_sample_pass
from .selfgen import collate_self_data


def combine(alignment: torch.Tensor, norms: torch.Tensor | None, lr: float, mode: str) -> torch.Tensor:
    """``c = eta * a`` (alignment) or ``c = eta * a + eta**2 / 2 * n`` (deviation); ``lr`` 1 when ``a`` and ``n``
    already carry per-parameter rates."""
    if mode == "alignment":
        return lr * alignment
    if norms is None:
        raise ValueError("The 'deviation' confidence needs the Fisher-weighted gradient norms n(x).")
    return lr * alignment + 0.5 * lr**2 * norms


def parameter_rates(optimizer, params: dict[str, torch.Tensor], rates: list[float]) -> dict[str, float]:
    """Each trainable parameter's learning rate: ``rates[i]`` for the parameters of the optimizer's param group ``i``.

    ``optimizer``: an optimizer (an accelerate wrapper too) or its ``param_groups``; ``rates``: one per group, the
    rate each group's last step took. Parameters are matched by identity; one that is in no group (so no step
    moves it) is an error naming it."""
    groups = getattr(optimizer, "param_groups", optimizer)
    groups = list(groups)
    if len(rates) != len(groups):
        raise ValueError(f"`rates` has {len(rates)} learning rates for an optimizer with {len(groups)} param groups.")
    group_of = {id(p): i for i, group in enumerate(groups) for p in group["params"]}
    out = {}
    for name, p in params.items():
        if id(p) not in group_of:
            raise ValueError(f"The trainable parameter {name} is in no param group of the optimizer: LWF cannot tell "
                             "its learning rate (add it to the optimizer, or freeze it).")
        out[name] = float(rates[group_of[id(p)]])
    return out


def alignment_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], direction: TensorDict) -> torch.Tensor:
    """``a(x) = g_x . w`` for every sample of ``batch`` with one forward-mode (JVP) pass."""
    params = trainable_parameters(model)
    primals = {n: params[n].detach() for n in direction}
    tangents = {n: direction[n].to(device=params[n].device, dtype=params[n].dtype) for n in direction}
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}

    def losses(p: TensorDict) -> torch.Tensor:
        return sequence_losses(functional_call(model, p, args=(), kwargs=kwargs).logits, batch["labels"])

    with eager_attention(model), without_input_require_grads(model):
        _, derivative = jvp(losses, (primals,), (tangents,))
    return derivative.detach().float()


def batch_confidence(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    terms: ScoringTerms,
    norms: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a(x), n(x))`` for every sample of ``batch`` from one forward+backward (``n`` is None unless ``norms``).

    With ``norms=False`` only ``a(x)`` is computed, and no per-sample weight gradient is ever formed.
    ``loss_scale`` S (fp16): the backward runs on S times the loss; ``a`` is divided by S and ``n`` by S**2.
    """
    params = trainable_parameters(model)
    device = batch["input_ids"].device
    consumer = ScoreConsumer(terms, batch["input_ids"].shape[0], device, norms=norms)
    per_sample_pass(model, batch, consumer, None, params, chunk_elements, loss_scale=loss_scale)
    if loss_scale != 1.0:
        consumer.a.div_(loss_scale)
        consumer.n.div_(loss_scale**2)
    return consumer.a, (consumer.n if norms else None)


def fisher_norms(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], curvature: TensorDict,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``n(x) = sum_i M_i F_i g_{x,i}**2`` for every sample of ``batch`` (one batched forward+backward)."""
    return batch_confidence(model, batch, ScoringTerms.explicit({}, curvature), True, chunk_elements)[1]


def reference_confidence(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], direction: TensorDict, curvature: TensorDict, lr: float, mode: str
) -> torch.Tensor:
    """The slow, obvious c(x): full per-sample gradients, then the formula term by term."""
    a, n = [], []
    for grads in _per_sample_gradients(model, batch):
        a.append(sum((grads[k] * direction[k]).sum() for k in direction))
        n.append(sum((curvature[k] * grads[k].pow(2)).sum() for k in curvature))
    model.zero_grad(set_to_none=True)
    return combine(torch.stack(a), torch.stack(n), lr, mode)


def _per_sample_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One plain backward per row, each row alone and without its padding (the positions its mask leaves out)."""
    singles = []
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        singles.append({k: v[i][keep].unsqueeze(0) for k, v in batch.items()})
    return per_sample_gradients(model, singles, lambda m, b: batch_losses(m, b)[0])


def score_self_data(
    model: torch.nn.Module,
    rows,
    pad_id: int,
    direction: TensorDict | ScoringTerms,
    curvature: TensorDict | None = None,
    lr: float = 1.0,
    mode: str = "deviation",
    batch_size: int = 8,
    show_progress: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    alignment: str = "hooks",
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Confidence c(x) of every row of D_self, the same on every rank.

    ``direction`` is a :class:`~hf_lwf.method.fisher.ScoringTerms` (then ``curvature`` is None), or the ``w`` dict with
    ``curvature`` the ``M * F`` dict. Rows are scored in batches of ``batch_size``, sorted by length to limit
    padding. ``alignment="jvp"`` computes the alignment mode with a forward-mode pass instead of the hooks.

    Under DDP the rows are split across ranks; under FSDP every rank runs every row and sums over the parameter
    rows of its shard. Either way ``a(x)`` and ``n(x)`` are sums of disjoint parts, added with one all-reduce.

    ``loss_scale`` (the learning step's fp16 loss scale S): each batch's backward runs on S times its loss, as the
    learning step's does, so small per-sample gradients do not underflow in half precision; ``a`` is divided by S
    and ``n`` by S**2. A batch with a non-finite result is scored again at S/2, down to S = 1 (an overflow), and
    a sample still non-finite then is never selected.

    Terms with per-parameter ``rates`` already hold eta: ``lr`` must then be 1.
    """
    terms = direction if isinstance(direction, ScoringTerms) else ScoringTerms.explicit(direction, curvature)
    if terms.rates is not None and lr != 1.0:
        raise ValueError(f"`lr` is {lr} but the scoring terms carry per-parameter rates already: pass lr=1.")
    device = input_device(model)
    sharded = is_sharded(model)
    if sharded and mode == "alignment" and alignment == "jvp":
        raise NotImplementedError("The forward-mode (jvp) alignment pass needs whole parameters; under FSDP use the "
                                  "default hook pass.")
    a_all = torch.zeros(len(rows), dtype=torch.float32, device=device)
    n_all = torch.zeros(len(rows), dtype=torch.float32, device=device)
    mine = list(range(len(rows))) if sharded else shard_indices(len(rows))
    mine = sorted(mine, key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["response_ids"]))
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(mine), desc="LWF confidence scoring", disable=not show_progress, leave=False)
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_self_data([rows[i] for i in indices], pad_id).items()}
            if mode == "alignment" and alignment == "jvp":
                a, n = alignment_scores_from_terms(model, batch, terms), None
            else:
                scale = float(loss_scale)
                while True:
                    a, n = batch_confidence(model, batch, terms, norms=mode == "deviation",
                                            chunk_elements=chunk_elements, loss_scale=scale)
                    if scale <= 1.0 or not _overflowed(a, n, sharded):
                        break
                    scale = max(1.0, scale / 2)
            a_all[indices] = a.to(device)
            if n is not None:
                n_all[indices] = n.to(device)
            bar.update(len(indices))
        bar.close()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    all_reduce_sum_([a_all, n_all])
    return combine(a_all, n_all if mode == "deviation" else None, lr, mode).cpu()


def _overflowed(a: torch.Tensor, n: torch.Tensor | None, sharded: bool) -> bool:
    """Whether a scaled batch produced a non-finite number (under FSDP: on any rank, so all ranks retry together)."""
    bad = (~torch.isfinite(a)).any() | ((~torch.isfinite(n)).any() if n is not None else False)
    flag = bad.float().reshape(1).to(collective_device(a.device))
    if sharded:
        all_reduce_(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def alignment_scores_from_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], terms: ScoringTerms) -> torch.Tensor:
    """:func:`alignment_scores` with ``w`` taken from ``terms`` (one whole-model ``w`` exists for the JVP)."""
    params = trainable_parameters(model)
    direction = {n: terms.chunk(n)[0] for n in params if terms.has(n)}
    return alignment_scores(model, batch, {n: w for n, w in direction.items() if w is not None})
