"""L2-SP: pull the fine-tuned weights towards the starting point (Li, Grandvalet & Davoine, ICML 2018)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .mixin import Regularizer


@dataclass
class L2SPConfig:
    """Settings of the L2-SP penalty ``l2sp_alpha / 2 * sum_i (theta_i - theta0_i)^2`` over trainable weights."""

    l2sp_alpha: float = field(
        default=0.01,
        metadata={"help": "Weight alpha of the squared distance to the starting weights (Li et al. use 0.01-0.1)."},
    )

    def __post_init__(self):
        if not isinstance(self.l2sp_alpha, (int, float)) or isinstance(self.l2sp_alpha, bool) or self.l2sp_alpha <= 0:
            raise ValueError(f"`l2sp_alpha` must be a positive number (got {self.l2sp_alpha!r}).")


def l2sp_penalty(params: list[torch.Tensor], reference: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``alpha / 2 * sum ||p - r||^2`` over paired tensors."""
    if len(params) != len(reference):
        raise ValueError(f"{len(params)} parameters but {len(reference)} reference tensors.")
    total = sum(((p - r.to(p.device, p.dtype)) ** 2).sum() for p, r in zip(params, reference))
    return 0.5 * alpha * total


class L2SP(Regularizer):
    """L2-SP penalty towards the weights the model had when the trainer was built (trainable parameters only)."""

    name = "l2sp"

    def __init__(self, config: L2SPConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else L2SPConfig(**kwargs)
        self.names: list[str] = []
        self.reference: list[torch.Tensor] = []

    def setup(self, model: torch.nn.Module) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.reference = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def penalty(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        if not self.reference:
            raise RuntimeError("L2SP.setup(model) was not called; use it through RegularizedTrainer.")
        params = [p for p in model.parameters() if p.requires_grad]
        return l2sp_penalty(params, self.reference, self.config.l2sp_alpha)
