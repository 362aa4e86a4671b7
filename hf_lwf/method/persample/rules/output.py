"""The output layer under the response loss (:mod:`hf_lwf.method.head`): the layer runs on an empty sequence, the
loss forms the logits of the labelled tokens a chunk at a time, and ``G_x[rows] = sum_t b_t[rows] h_t^T`` is formed
per block of rows with the logits' gradient ``b_t[rows]`` recomputed from the kept log-sum-exp: no ``[batch,
tokens, vocab]`` tensor, and prompt and padding positions cost nothing.

The rule matches no module by itself: the pass gives it the output layer that :func:`~hf_lwf.method.head.linear_head`
picks, with one :class:`_HeadRecord` as the call's only argument."""

from __future__ import annotations

import torch

from ...common import matmul_f32
from ...head import Selection, logits_f32
from .base import Rule, register


class _HeadRecord:
    """The output layer's part of the response loss, kept from the forward for its per-sample weight gradient: the
    labelled tokens' inputs, targets, loss weights (times the loss scale) and log-sum-exp, padded per sample to
    ``[batch, width]``. ``values``: ``sum_i v_i g_{x,i}`` for a linear consumer, formed in the forward from each
    chunk's logit gradients."""

    def __init__(self, selection: Selection, batch: int, scale: float, dtype: torch.dtype | None):
        width, device = selection.width, selection.hidden.device
        self.dtype = dtype  # the loss's matmul dtype under an enclosing autocast: logits recomputed alike
        index = (selection.sample, selection.slot)
        self.hidden = selection.hidden.new_zeros(batch, width, selection.hidden.shape[-1])
        self.hidden[index] = selection.hidden.detach()
        self.targets = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.targets[index] = selection.targets
        self.weight = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.weight[index] = selection.weight * scale
        self.lse = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.index, self.width = index, width
        self.values: torch.Tensor | None = None

    def grad(self, weight: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """Per-sample gradients ``[batch, rows, hidden]`` (fp32) of ``weight[rows]``: ``sum_t b_t h_t^T`` with each
        token's logit gradient ``b_t`` (softmax minus one-hot, times its loss weight) recomputed for these rows."""
        start, stop = (0, weight.shape[0]) if rows is None else (rows.start, rows.stop)
        batch, width, size = self.hidden.shape
        hidden = self.hidden if self.dtype is None else self.hidden.to(self.dtype)
        rows_ = weight[start:stop] if self.dtype is None else weight[start:stop].to(self.dtype)
        logits = logits_f32(hidden.reshape(batch * width, size), rows_).view(batch, width, -1)
        grad = logits.sub_(self.lse.unsqueeze(-1)).exp_()
        inside = (self.targets >= start) & (self.targets < stop)
        grad.scatter_add_(2, (self.targets - start).clamp_(0, stop - start - 1).unsqueeze(-1),
                          -inside.to(grad.dtype).unsqueeze(-1))
        grad.mul_(self.weight.unsqueeze(-1))  # padding slots: weight 0
        return matmul_f32(grad.transpose(1, 2).to(hidden.dtype), hidden)


@register
class OutputRule(Rule):
    name = "head"
    rows = frozenset({"weight"})
    in_forward = True

    def grad(self, use, local, rows, batch, out=None):
        return use.args[0].grad(getattr(use.module, local).detach(), rows)

    def project(self, use, local, v, own, batch):
        return use.args[0].values

    def block_numel(self, use):
        return use.args[0].width  # a row block also holds its logits [batch, width, rows]
