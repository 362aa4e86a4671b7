"""``nn.Embedding``: rows of the sample's tokens, ``G_x[v] = sum_{t: id_t = v} b_t`` (``padding_idx`` excluded), times
``s`` for a subclass whose output is ``s * lookup`` (Gemma's ``embed_scale``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....distributed import is_sharded
from .base import Rule, register


@register
class EmbeddingRule(Rule):
    name = "embedding"
    rows = frozenset({"weight"})
    accumulates = True  # its rows are added into the block of a tied weight's dense uses in place

    def matches(self, module):
        return isinstance(module, torch.nn.Embedding)

    def scale(self, module, inputs, output):
        if type(module).forward is torch.nn.Embedding.forward:
            return 1.0
        return _embedding_scale(module, inputs, output)

    def grad(self, use, local, rows, batch, out=None):
        module = use.module
        ids = use.args[0].reshape(batch, -1)
        b = use.grad.reshape(batch, -1, use.grad.shape[-1])
        start, stop = (0, module.num_embeddings) if rows is None else (rows.start, rows.stop)
        keep = (ids >= start) & (ids < stop)
        if module.padding_idx is not None:
            keep &= ids != module.padding_idx
        sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
        if out is None:
            out = torch.zeros(batch, stop - start, b.shape[-1], dtype=torch.float32, device=b.device)
        # every token adds its row, zero outside these rows: no boolean indexing (a device-to-host sync per block)
        values = b * (keep * use.scale).unsqueeze(-1)  # fp32 (keep * scale is), never in place on the gradient
        out.index_put_((sample, (ids - start).clamp_(0, stop - start - 1)), values.to(out.dtype), accumulate=True)
        return out

    def project(self, use, local, v, own, batch):
        if local != "weight":
            return None
        ids = use.args[0].reshape(batch, -1)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if use.module.padding_idx is not None:
            keep &= ids != use.module.padding_idx
        if own is not None:
            keep &= (ids >= own.start) & (ids < own.stop)
            ids = (ids - own.start).clamp(0, own.stop - own.start - 1)
        rows = F.embedding(ids, v.float()) * keep.unsqueeze(-1)
        return (rows * use.grad.float().reshape(batch, -1, use.grad.shape[-1])).sum((1, 2)) * use.scale


def _embedding_scale(module: torch.nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> float:
    """``s`` with ``output == s * lookup`` for an embedding subclass that rescales its rows (Gemma's ``embed_scale``).

    Least squares over the call; the class check then confirms the rule with that ``s`` against exact autograd."""
    weight = module.weight.detach()
    if is_sharded(weight):  # FSDP2 has resharded the weight by now: take the scale the Gemma family stores
        scale = getattr(module, "embed_scale", None)
        if scale is None:
            raise NotImplementedError(f"Per-sample gradients under FSDP: {type(module).__name__} overrides the "
                                      "forward of nn.Embedding and cannot be checked on a sharded weight.")
        return float(scale)
    lookup = F.embedding(ids, weight, module.padding_idx).float()
    denominator = float(lookup.square().sum())
    if denominator == 0.0:
        return 1.0
    return float((output.detach().float() * lookup).sum()) / denominator
