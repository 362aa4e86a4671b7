"""A ``Trainer`` mixin that adds regularisation penalties to the training loss, scaled right under gradient accumulation."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


class Regularizer:
    """A penalty added to the training loss. Subclasses set ``name`` and implement :meth:`penalty`."""

    name: str = "regularizer"
    needs_hidden_states: bool = False

    def setup(self, model: torch.nn.Module) -> None:
        """Called once when the trainer is built (e.g. to snapshot the starting weights)."""

    def penalty(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        raise NotImplementedError


class RegularizationMixin:
    """Adds ``sum(r.penalty(...))`` of its ``regularizers`` to ``compute_loss``.

    The penalty is meant once per optimizer step. When the model's loss is already normalised over the whole
    gradient-accumulation window (``num_items_in_batch`` given to a model that accepts loss kwargs), the Trainer does
    not divide by the accumulation steps, so the penalty is divided by ``current_gradient_accumulation_steps`` here;
    otherwise the Trainer divides the summed loss itself. Penalty values go to the logs as ``baseline/<name>``.
    """

    def __init__(self, *args: Any, regularizers: list[Regularizer] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.regularizers = list(regularizers or [])
        for reg in self.regularizers:
            if not isinstance(reg, Regularizer):
                raise TypeError(f"`regularizers` must hold Regularizer objects, got {type(reg).__name__}.")
            reg.setup(self.model)
        self._reg_sums: dict[str, float] = {}
        self._reg_count = 0

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not self.regularizers or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if any(r.needs_hidden_states for r in self.regularizers):
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        scaled_by_model = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if self.loss_is_scaled_for_ga is not None:
            scaled_by_model = self.loss_is_scaled_for_ga
        divisor = self.current_gradient_accumulation_steps if scaled_by_model else 1
        for reg in self.regularizers:
            value = reg.penalty(self.accelerator.unwrap_model(model), inputs, outputs)
            loss = loss + value / divisor
            self._reg_sums[reg.name] = self._reg_sums.get(reg.name, 0.0) + float(value.detach())
        self._reg_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._reg_count and "loss" in logs:
            logs.update({f"baseline/{k}": v / self._reg_count for k, v in self._reg_sums.items()})
            self._reg_sums, self._reg_count = {}, 0
        super().log(logs, *args, **kwargs)


class RegularizedTrainer(RegularizationMixin, Trainer):
    """A :class:`~transformers.Trainer` with regularisation baselines: ``RegularizedTrainer(..., regularizers=[...])``."""
