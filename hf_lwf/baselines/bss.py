"""BSS, Batch Spectral Shrinkage (Chen, Wang, Fu, Long & Wang, NeurIPS 2019).

BSS penalises the ``k`` smallest singular values of the batch feature matrix, the directions least useful to the new
task and the likeliest to carry negative transfer. For a causal LM the features are the final hidden states of the
trained tokens (``labels != -100``, shifted like the loss), one row per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .mixin import Regularizer


@dataclass
class BSSConfig:
    """Settings of the BSS penalty ``bss_eta * sum_{i=1..k} sigma_{-i}^2``."""

    bss_eta: float = field(default=0.001, metadata={"help": "Weight eta of the penalty (Chen et al. use 0.001)."})
    bss_k: int = field(default=1, metadata={"help": "Number k of smallest singular values shrunk (Chen et al.: 1)."})

    def __post_init__(self):
        if not isinstance(self.bss_eta, (int, float)) or isinstance(self.bss_eta, bool) or self.bss_eta <= 0:
            raise ValueError(f"`bss_eta` must be a positive number (got {self.bss_eta!r}).")
        if not isinstance(self.bss_k, int) or isinstance(self.bss_k, bool) or self.bss_k < 1:
            raise ValueError(f"`bss_k` must be a positive integer (got {self.bss_k!r}).")


def bss_penalty(features: torch.Tensor, k: int, eta: float) -> torch.Tensor:
    """``eta * sum`` of the ``k`` smallest squared singular values of the 2-D ``features`` (rows = samples)."""
    if features.dim() != 2:
        raise ValueError(f"`features` must be 2-D (samples x dims), got shape {tuple(features.shape)}.")
    singular = torch.linalg.svdvals(features.float())  # descending
    k = min(k, singular.numel())
    return eta * (singular[-k:] ** 2).sum()


class BSS(Regularizer):
    """BSS penalty on the final hidden states of the trained tokens."""

    name = "bss"
    needs_hidden_states = True

    def __init__(self, config: BSSConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else BSSConfig(**kwargs)

    def penalty(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        hidden = outputs["hidden_states"][-1]
        labels = inputs.get("labels")
        if labels is not None:
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != -100  # the positions whose prediction the loss trains
        else:
            mask = inputs["attention_mask"].bool()
        return bss_penalty(hidden[mask], self.config.bss_k, self.config.bss_eta)
