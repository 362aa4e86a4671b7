"""``nn.Linear`` (and so LoRA's A/B and PEFT's base layers): ``G_x = sum_t b_t a_t^T``, bias ``sum_t b_t``."""

from __future__ import annotations

import torch

from ...common import matmul_f32, project_f32
from .base import Rule, register


class _Affine(Rule):
    """``y = a W^T + c`` with the weight stored ``[out, in]`` (``transposed``: ``[in, out]``, rows are inputs)."""

    rows = frozenset({"weight"})
    transposed = False

    def grad(self, use, local, rows, batch, out=None):
        b = use.grad.reshape(batch, -1, use.grad.shape[-1])
        if local == "bias":
            return b.float().sum(1)
        x = use.args[0]
        a = x.reshape(batch, -1, x.shape[-1])
        # 16-bit activations and output gradients stay 16-bit, accumulated in fp32 (tensor cores on a GPU); the output
        # gradient is sliced to ``rows`` before that (an ``lm_head`` block reads only its columns of the gradient)
        if self.transposed:
            return matmul_f32((a if rows is None else a[..., rows]).transpose(1, 2), b)
        return matmul_f32((b if rows is None else b[..., rows]).transpose(1, 2), a)

    def project(self, use, local, v, own, batch):
        if local != "weight":
            return None
        x, b = use.args[0], use.grad
        a = x.reshape(batch, -1, x.shape[-1])
        b = b.reshape(batch, -1, b.shape[-1])
        if self.transposed:  # the shard holds input rows: b_t . (v a_t) with the roles swapped
            a, b = b, (a if own is None else a[..., own])
        else:  # the shard holds output rows
            b = b if own is None else b[..., own]
        # b_t . (v a_t), projected through v on the narrower side (fewer fp32 numbers to multiply)
        if v.shape[0] >= v.shape[1]:
            return (project_f32(b, v) * a).sum((1, 2))
        return (project_f32(a, v.t()) * b).sum((1, 2))


@register
class LinearRule(_Affine):
    name = "linear"

    def matches(self, module):
        return isinstance(module, torch.nn.Linear)
