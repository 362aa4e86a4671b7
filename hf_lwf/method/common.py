"""What every step of the method shares: the response loss, the tensor-dict type, fp32-output matmuls of 16-bit
tensors, and the switches a scoring pass puts around a model (eager attention, no input-grad hooks)."""

import contextlib

import torch
import torch.nn.functional as F


TensorDict = dict[str, torch.Tensor]

_HALF = (torch.bfloat16, torch.float16)
_NATIVE_F32_OUTPUT: dict[str, bool] = {}


def _native_f32_output(device: torch.device) -> bool:
    """Whether ``torch.mm``/``torch.bmm`` take ``out_dtype=torch.float32`` for 16-bit inputs on ``device`` (CUDA in
    torch 2.13; not the CPU). Tried once per device type."""
    kind = device.type
    if kind not in _NATIVE_F32_OUTPUT:
        ok = kind != "cpu"
        if ok:
            try:
                probe = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
                ok = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _NATIVE_F32_OUTPUT[kind] = ok
    return _NATIVE_F32_OUTPUT[kind]


def _mm_out_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The native 16-bit matmul with fp32 accumulation and output (tensor cores on a GPU)."""
    return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D, or 3-D batched) accumulated and returned in fp32.

    Two 16-bit operands of one dtype stay 16-bit where the device has an fp32-output matmul (a GPU: tensor cores,
    no fp32 copies of the operands); elsewhere both are cast to fp32 first. A product of two 16-bit numbers is
    exact in fp32, so both ways give the fp32-accumulated result."""
    if a.dtype in _HALF and b.dtype == a.dtype and _native_f32_output(a.device):
        return _mm_out_f32(a, b)
    return (torch.bmm if a.dim() == 3 else torch.mm)(a.float(), b.float())


def project_f32(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` in fp32 for a 16-bit or fp32 ``x`` ``[..., k]`` and an fp32 ``m`` ``[k, n]``.

    With bf16 ``x`` and an fp32-output matmul, ``m`` is split into two bf16 tensors ``m = hi + lo`` (the residual
    is below 2**-17 of ``|m|``, near fp32's own rounding) and ``x @ hi + x @ lo`` runs as two 16-bit matmuls with fp32
    accumulation; otherwise ``x`` is cast to fp32 (fp16 too: ``m`` such as ``w = M * F * D`` can lie below fp16's
    range)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if x.dtype == torch.bfloat16 and _native_f32_output(x.device):
        hi = m.to(torch.bfloat16)
        lo = (m - hi.float()).to(torch.bfloat16)
        out = _mm_out_f32(flat, hi).add_(_mm_out_f32(flat, lo))
    else:
        out = flat.float() @ m.float()
    return out.reshape(*shape[:-1], m.shape[-1])


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens of each sequence: shape ``[batch]``."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(logits.device)  # a model split over devices returns logits on its last
    token_losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted_labels.shape)
    counts = (shifted_labels != -100).sum(dim=1)
    return token_losses.sum(dim=1) / counts.clamp(min=1)


def batch_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample response losses of a collated D_self batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_losses(logits, batch["labels"])


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
