"""The response loss from the output layer's input, a chunk of tokens at a time.

A causal LM's logits are ``h W^T`` over the whole vocabulary at every position, and the plain loss holds them,
their fp32 upcast, the log-softmax and its gradient for the whole batch: ``[batch, tokens, vocab]`` fp32 several
times over. The response loss needs logits only at the labelled positions, and never all at once.
:func:`response_losses` runs the model with its output layer fed an empty sequence (so the model builds no logits),
takes that layer's input ``h`` at the labelled positions, and computes the cross-entropy of at most
``chunk_elements`` logits at a time in fp32; the backward recomputes each chunk's logits. Prompt and padding
positions cost nothing, and neither the fp32 logits nor their gradient ever exists for a whole batch.

This takes the place of the model's own logits when its output layer (``get_output_embeddings()``) is a plain
``nn.Linear`` without bias whose output the model returns unchanged (no soft-capping or scaling after it), checked
once per model on a short probe. Otherwise, and under FSDP or DeepSpeed ZeRO-3 (whose hooks gather the weight
inside the layer's call), the loss comes from the model's logits (:func:`~hf_lwf.method.common.batch_losses`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distributed import is_sharded
from .common import _HALF, _native_f32_output, batch_losses, matmul_f32, without_input_require_grads


logger = logging.getLogger(__name__)

LOSS_CHUNK_ELEMENTS = 1 << 26
"""Logits computed at once on an accelerator (64 Mi fp32 numbers, 256 MiB: few, large matmuls)."""
LOSS_CHUNK_ELEMENTS_CPU = 1 << 22
"""Logits computed at once on the CPU (4 Mi fp32 numbers, 16 MiB: the host's peak memory is what counts there)."""

_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config fields of a transform after lm_head
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loss_chunk_elements(device: torch.device) -> int:
    """How many logits one chunk of the response loss computes at once on ``device``."""
    return LOSS_CHUNK_ELEMENTS_CPU if device.type == "cpu" else LOSS_CHUNK_ELEMENTS


@dataclass
class Selection:
    """The labelled positions of a batch, packed sample after sample: the output layer's inputs there
    (``hidden [n, h]``, differentiable), the next-token ``targets``, the ``sample`` of each, its loss weight
    ``1 / (labelled tokens of its sample)``, its ``slot`` among its sample's labelled tokens, and ``width``, the
    most labelled tokens of one sample."""

    hidden: torch.Tensor
    targets: torch.Tensor
    sample: torch.Tensor
    weight: torch.Tensor
    slot: torch.Tensor
    width: int
    batch: int


def select_labelled(hidden: torch.Tensor, labels: torch.Tensor) -> Selection:
    """The positions whose next token is labelled (``labels[:, 1:] != -100``), as in
    :func:`~hf_lwf.method.common.sequence_losses`."""
    shifted = labels[:, 1:].to(hidden.device)
    labelled = shifted != -100
    sample, position = labelled.nonzero(as_tuple=True)  # sample-major, positions ascending
    counts = labelled.sum(1)
    starts = counts.cumsum(0) - counts
    return Selection(
        hidden=hidden[:, :-1][sample, position],
        targets=shifted[sample, position],
        sample=sample,
        weight=1.0 / counts.clamp(min=1).float()[sample],
        slot=torch.arange(sample.numel(), device=hidden.device) - starts[sample],
        width=int(counts.max()) if counts.numel() else 0,
        batch=labels.shape[0],
    )


# ----------------------------------------------------------------------------------------- the model's head
def linear_head(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.nn.Linear | None:
    """The model's output layer if the chunked loss applies to it, else None (see the module docstring).

    The first call per model (and output layer) runs the probe: the model's logits of the first row's first tokens
    against ``h W^T`` from the layer's input, in eval mode and without gradients."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        head = None
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return None
    weight = head.weight
    if (head.bias is not None or not weight.is_floating_point() or weight.device.type == "meta"
            or hasattr(weight, "ds_id") or is_sharded(weight) or is_sharded(model)):
        return None
    known = _VERDICTS.get(model)
    if known is None or known[0] is not head:
        verdict, why = _probe(model, head, batch)
        if not verdict:
            logger.info(f"Response loss: {type(model).__name__} takes the loss from its full logits ({why}).")
        _VERDICTS[model] = known = (head, verdict)
    return head if known[1] else None


@contextlib.contextmanager
def head_input(head: torch.nn.Module):
    """While active, the output layer records its input in ``box["hidden"]`` and computes its output for an empty
    sequence instead (``[..., 0, vocab]``): the model's forward builds no logits."""
    box: dict[str, torch.Tensor] = {}

    def swap(module, args, kwargs):
        if "hidden" in box:
            raise RuntimeError("The output layer was called more than once in one forward.")
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            raise RuntimeError("The output layer was not called on a [..., tokens, hidden] tensor.")
        box["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(swap, prepend=True, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def head_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], head: torch.nn.Linear) -> torch.Tensor:
    """The model's forward on ``batch`` with no logits built: the output layer's input ``[batch, tokens, hidden]``
    (on the layer's device)."""
    with head_input(head) as box:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if "hidden" not in box:
        raise RuntimeError("The output layer was not called in the forward.")
    return box["hidden"].to(head.weight.device)


def _probe(model, head, batch) -> tuple[bool, str]:
    config = getattr(model, "config", None)
    for field in _POST_HEAD:
        value = getattr(config, field, None)
        if value not in (None, 0, 1, 0.0, 1.0):
            return False, f"config.{field} = {value} transforms the output layer's output"
    ids = batch["input_ids"][:1, :16]
    mask = batch["attention_mask"][:1, :16] if "attention_mask" in batch else torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), without_input_require_grads(model):
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            with head_input(head) as box:
                empty = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            hidden = box.get("hidden")
            if hidden is None or empty is None or empty.numel() != 0:
                return False, "its logits do not come from one call of the output layer"
            mine = F.linear(hidden.to(head.weight.device), head.weight).float()
            full = full.float().to(mine.device)
            if mine.shape != full.shape:
                return False, "its logits are not the output layer's output"
            tolerance = 1e-6 if head.weight.dtype in (torch.float32, torch.float64) else 2.0**-7
            scale = float(full.abs().max()) if bool(torch.isfinite(full).all()) else float("nan")
            if not float((mine - full).abs().max()) <= tolerance * max(scale, 1e-30):  # NaN: not the same
                return False, "its logits differ from the output layer's output"
    except Exception as error:  # noqa: BLE001 - any failure of the probe: the plain loss
        return False, f"the probe failed: {error!r}"
    finally:
        model.train(was_training)
    return True, ""


# ------------------------------------------------------------------------------------------ the chunked loss
def logits_f32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight^T`` in fp32 without an fp32 copy of ``weight``: an fp32-output matmul of 16-bit tensors on a
    GPU, the layer's own 16-bit matmul upcast afterwards where there is none (the CPU), fp32 otherwise."""
    if hidden.dtype == weight.dtype and weight.dtype in _HALF and not _native_f32_output(weight.device):
        return (hidden @ weight.t()).float()
    return matmul_f32(hidden, weight.t())


def softmax_minus_onehot_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``softmax(logits) - onehot(targets)`` in place of ``logits`` ``[..., vocab]``: the gradient of each token's
    cross-entropy with respect to its logits. ``lse``: the logits' log-sum-exp ``[...]``."""
    grad = logits.sub_(lse.unsqueeze(-1)).exp_()
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(lse, -1.0).unsqueeze(-1))
    return grad


def _to_hidden(grad: torch.Tensor, weight: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``grad @ weight`` in fp32, with a 16-bit ``weight``'s matmul run on ``grad_scale * grad`` rounded to 16 bits
    (as the plain backward rounds the logits' gradient: fp16 needs the loss scale against underflow)."""
    if weight.dtype not in _HALF:
        return grad @ weight.float()
    if grad_scale != 1.0:
        grad = grad.mul(grad_scale)
    low = grad.to(weight.dtype)
    out = matmul_f32(low, weight) if _native_f32_output(weight.device) else (low @ weight).float()
    return out.div_(grad_scale) if grad_scale != 1.0 else out


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype an enclosing ``torch.autocast`` gives matmuls on ``device`` (None when it is off)."""
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except (RuntimeError, TypeError):  # pragma: no cover - a device type autocast does not know
        return None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-sample mean cross-entropy of the selected tokens from ``hidden`` and the output layer's ``weight``.

    ``dtype``: the matmuls' dtype under an enclosing autocast at the forward (as the layer's own call would run)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, sample, token_weight, batch, chunk, unit, grad_scale, on_chunk, stats,
                dtype):
        n = hidden.shape[0]
        original, weight = weight, _cast(weight, dtype)
        token_losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        unit_grad = torch.zeros(n, hidden.shape[-1], dtype=torch.float32, device=hidden.device) if unit else None
        for rows in _chunks(n, chunk):
            logits = logits_f32(_cast(hidden[rows], dtype), weight)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            token_losses[rows] = lse[rows] - logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            if unit or on_chunk is not None:
                grad = softmax_minus_onehot_(logits, lse[rows], targets[rows]).mul_(token_weight[rows].unsqueeze(1))
                if on_chunk is not None:
                    on_chunk(rows, grad)
                if unit:
                    unit_grad[rows] = _to_hidden(grad, weight, grad_scale)
            del logits
        losses = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
        losses.index_add_(0, sample, token_losses * token_weight)
        ctx.save_for_backward(hidden, original, targets, sample, token_weight, lse, unit_grad)
        ctx.chunk, ctx.dtype = chunk, dtype
        if stats is not None:
            stats["lse"] = lse
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, original, targets, sample, token_weight, lse, unit_grad = ctx.saved_tensors
        dtype = ctx.dtype
        per_token = grad_losses.float()[sample]
        grad_hidden = grad_weight = None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if unit_grad is not None and not ctx.needs_input_grad[1]:
                grad_hidden = (unit_grad * per_token.unsqueeze(1)).to(hidden.dtype)
            else:  # recompute every chunk's logits: the gradients of the hidden states and of the weight
                scale = per_token * token_weight
                weight = _cast(original, dtype)
                if ctx.needs_input_grad[0]:
                    grad_hidden = torch.zeros_like(hidden)
                if ctx.needs_input_grad[1]:
                    grad_weight = torch.zeros_like(original)
                for rows in _chunks(hidden.shape[0], ctx.chunk):
                    x = _cast(hidden[rows], weight.dtype)
                    logits = logits_f32(x, weight)
                    grad = softmax_minus_onehot_(logits, lse[rows], targets[rows]).mul_(scale[rows].unsqueeze(1))
                    grad = grad.to(weight.dtype)
                    del logits
                    if grad_hidden is not None:
                        grad_hidden[rows] = (grad @ weight).to(hidden.dtype)
                    if grad_weight is not None and grad_weight.dtype == weight.dtype:
                        grad_weight.addmm_(grad.t(), x)
                    elif grad_weight is not None:  # an autocast dtype: accumulate in the weight's own dtype
                        grad_weight.add_(matmul_f32(grad.t(), x))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def _chunks(n: int, tokens: int):
    for start in range(0, n, tokens):
        yield slice(start, min(start + tokens, n))


def chunked_cross_entropy(
    selection: Selection,
    weight: torch.Tensor,
    chunk_elements: int,
    *,
    unit: bool = False,
    grad_scale: float = 1.0,
    on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Per-sample mean cross-entropy ``[batch]`` (fp32) of the selected tokens, ``chunk_elements`` logits at a time.

    The backward recomputes each chunk's logits. With ``unit`` (the weight frozen, as in the per-sample pass) the
    forward instead keeps ``d loss_x / d hidden_t`` per token (``[n, hidden]`` fp32; 16-bit weights see the logits'
    gradient times ``grad_scale`` rounded to 16 bits), and the backward only scales it. ``on_chunk(rows, grad)``
    sees each chunk's ``d loss_x / d logits_t`` (fp32 ``[tokens, vocab]``); ``stats["lse"]`` receives each token's
    log-sum-exp, ``stats["dtype"]`` the matmuls' dtype under an enclosing autocast (None when it is off)."""
    tokens = max(1, chunk_elements // max(1, weight.shape[0]))
    dtype = autocast_dtype(weight.device)
    if stats is not None:
        stats["dtype"] = dtype
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(selection.hidden, weight, selection.targets, selection.sample,
                                          selection.weight, selection.batch, tokens, unit, float(grad_scale),
                                          on_chunk, stats, dtype)


def response_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_elements: int | None = None
                    ) -> torch.Tensor:
    """Per-sample mean cross-entropy of the labelled (response) tokens ``[batch]``, as
    :func:`~hf_lwf.method.common.batch_losses`, with the logits formed a chunk of tokens at a time where the model's
    output layer allows it (see the module docstring)."""
    head = linear_head(model, batch)
    if head is None:
        return batch_losses(model, batch)
    selection = select_labelled(head_hidden(model, batch, head), batch["labels"])
    return chunked_cross_entropy(selection, head.weight, chunk_elements or loss_chunk_elements(head.weight.device))
