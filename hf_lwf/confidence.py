"""Step 3: forgetting confidence of each self-generated sample.

Learning a sample x with step size eta moves theta by u_x = -eta * g_x. In the quadratic model of the learning
task around its target theta + D with curvature F (masked), the learning loss then changes by

    c(x) = eta * g_x . w  +  eta**2 / 2 * sum_i M_i F_i g_{x,i}**2  =  eta * a(x) + eta**2 / 2 * n(x),

with w = M * F * D. :func:`batch_confidence` gets both terms for a whole batch from one forward+backward and
per-layer per-sample gradients (:mod:`hf_lwf.persample`); w and M * F are formed one parameter block at a time
from F, theta_ref and the live weights (:class:`~hf_lwf.fisher.ScoringTerms`). ``a(x)`` alone is also a
directional derivative, one forward-mode pass (:func:`alignment_scores`).
:func:`reference_confidence` computes both from plain per-sample backward passes; tests compare against it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from tqdm.auto import tqdm

from .distributed import all_reduce_sum_, is_sharded, shard_indices
from .fisher import ScoringTerms, TensorDict, per_sample_gradients, trainable_parameters
from .persample import DEFAULT_CHUNK_ELEMENTS, ScoreConsumer, per_sample_pass
from .selfgen import collate_self_data


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens of each sequence: shape ``[batch]``."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    token_losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted_labels.shape)
    counts = (shifted_labels != -100).sum(dim=1)
    return token_losses.sum(dim=1) / counts.clamp(min=1)


def batch_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample response losses of a collated D_self batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_losses(logits, batch["labels"])


def combine(alignment: torch.Tensor, norms: torch.Tensor | None, lr: float, mode: str) -> torch.Tensor:
    """``c = eta * a`` (alignment) or ``c = eta * a + eta**2 / 2 * n`` (deviation)."""
    if mode == "alignment":
        return lr * alignment
    if norms is None:
        raise ValueError("The 'deviation' confidence needs the Fisher-weighted gradient norms n(x).")
    return lr * alignment + 0.5 * lr**2 * norms


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """Run with the ``eager`` attention implementation: fused SDPA kernels have no forward-mode AD rule on CPU."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = current not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


# transformers' ``enable_input_require_grads`` hook and PEFT's fallback for models without that method.
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def without_input_require_grads(model: torch.nn.Module):
    """Lift the forward hooks that make the input embeddings require grad for the duration, then put them back.

    Gradient checkpointing (Trainer, TRL's defaults) and PEFT install a forward hook that calls
    ``requires_grad_()`` on the input embeddings; that call is illegal inside a ``torch.func`` transform.
    Scoring differentiates with respect to the parameters only, so it does not need the hook.

    Every such hook is lifted, not only the last set that ``_require_grads_hooks`` remembers: TRL and PEFT call
    ``enable_input_require_grads`` more than once, and each call adds hooks without removing the earlier ones.
    The same hook objects go back in their places, so nothing is added or lost across scoring rounds.
    """
    known = {h.id for m in model.modules() for h in (m.__dict__.get("_require_grads_hooks") or ())}
    lifted = []
    for module in model.modules():
        hooks = module._forward_hooks
        ids = [i for i, fn in hooks.items() if i in known or getattr(fn, "__name__", None) in _INPUT_GRAD_HOOKS]
        if ids:
            lifted.append((module, list(hooks.items()), set(ids)))
            for i in ids:
                del hooks[i]
    try:
        yield
    finally:
        for module, before, ids in lifted:
            hooks = module._forward_hooks
            after = dict(hooks)
            hooks.clear()
            hooks.update((i, fn) for i, fn in before if i in ids or i in after)
            hooks.update((i, fn) for i, fn in after.items() if i not in hooks)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a(x), n(x))`` for every sample of ``batch`` from one forward+backward (``n`` is None unless ``norms``).

    With ``norms=False`` only ``a(x)`` is computed, and no per-sample weight gradient is ever formed.
    """
    params = trainable_parameters(model)
    device = batch["input_ids"].device
    consumer = ScoreConsumer(terms, batch["input_ids"].shape[0], device, norms=norms)
    per_sample_pass(model, batch, consumer, batch_losses, params, chunk_elements)
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
) -> torch.Tensor:
    """Confidence c(x) of every row of D_self, the same on every rank.

    ``direction`` is a :class:`~hf_lwf.fisher.ScoringTerms` (then ``curvature`` is None), or the ``w`` dict with
    ``curvature`` the ``M * F`` dict. Rows are scored in batches of ``batch_size``, sorted by length to limit
    padding. ``alignment="jvp"`` computes the alignment mode with a forward-mode pass instead of the hooks.

    Under DDP the rows are split across ranks; under FSDP every rank runs every row and sums over the parameter
    rows of its shard. Either way ``a(x)`` and ``n(x)`` are sums of disjoint parts, added with one all-reduce.
    """
    terms = direction if isinstance(direction, ScoringTerms) else ScoringTerms.explicit(direction, curvature)
    device = next(model.parameters()).device
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
                a, n = batch_confidence(model, batch, terms, norms=mode == "deviation", chunk_elements=chunk_elements)
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


def alignment_scores_from_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], terms: ScoringTerms) -> torch.Tensor:
    """:func:`alignment_scores` with ``w`` taken from ``terms`` (one whole-model ``w`` exists for the JVP)."""
    params = trainable_parameters(model)
    direction = {n: terms.chunk(n)[0] for n in params if terms.has(n)}
    return alignment_scores(model, batch, {n: w for n, w in direction.items() if w is not None})
