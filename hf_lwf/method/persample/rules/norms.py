"""Normalisation layers: ``nn.LayerNorm``, weight ``sum_t b_t * xhat_t`` and bias ``sum_t b_t``; Llama-style
``*RMSNorm``, weight ``sum_t b_t * xhat_t`` with ``xhat = x / rms(x)`` (any other parameter takes the fallback)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Rule, register


@register
class LayerNormRule(Rule):
    name = "layernorm"

    def matches(self, module):
        return isinstance(module, torch.nn.LayerNorm)

    def grad(self, use, local, rows, batch, out=None):
        module = use.module
        b = use.grad.float().reshape(batch, -1, *module.normalized_shape)
        if local == "bias":
            return b.sum(1)
        xhat = F.layer_norm(use.args[0].float(), module.normalized_shape, None, None, module.eps)
        return (b * xhat.reshape_as(b)).sum(1)


@register
class RMSNormRule(Rule):
    name = "rmsnorm"

    def matches(self, module):
        return "RMSNorm" in type(module).__name__ and _rms_eps(module) is not None

    def grad(self, use, local, rows, batch, out=None):
        if local != "weight":
            return None
        b = use.grad
        xhat = _rms_normalized(use.module, use.args[0].detach()).float()
        return (b.float() * xhat).reshape(batch, -1, b.shape[-1]).sum(1)


def _rms_eps(module) -> float | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _rms_normalized(module, x: torch.Tensor) -> torch.Tensor:
    """``x / rms(x)`` the way Llama-style RMSNorms compute it (fp32, then back to the input dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(module))
    return h.to(x.dtype)
