"""What every step of the method shares: the response loss, the tensor-dict type, and the switches a scoring pass
puts around a model (eager attention, no input-grad hooks)."""

import contextlib

import torch
import torch.nn.functional as F


TensorDict = dict[str, torch.Tensor]


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
