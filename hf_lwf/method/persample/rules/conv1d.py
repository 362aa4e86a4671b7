"""``transformers``' ``Conv1D`` (GPT-2's linear layer, weight stored ``[in, out]``): ``G_x = sum_t a_t b_t^T``."""

from __future__ import annotations

from .base import register
from .linear import _Affine


try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


@register
class Conv1DRule(_Affine):
    name = "conv1d"
    transposed = True

    def matches(self, module):
        return Conv1D is not None and isinstance(module, Conv1D)
