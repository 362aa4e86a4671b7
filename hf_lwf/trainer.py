"""``LWFTrainerMixin`` and ``LWFTrainer``: Learning With Forgetting built into a Trainer class.

The mixin registers one :class:`~hf_lwf.LWFCallback` (which does all the work, so results equal callback-only
use) and adds what only a subclass can give: ``lwf/*`` metrics through ``log`` (so every ``report_to``
integration receives them), the online Fisher from the gradients *before* clipping, the LWF state and
``lwf_config.json`` written with the model before any Hub upload, the exact checkpoint path on resume, the LWF
section on every model card, ``training_args.json`` in place of the pickled ``training_args.bin``, and the
train-set checks at construction. Put it first in the bases of any ``Trainer`` subclass, e.g. TRL's::

    class LWFSFTTrainer(LWFTrainerMixin, SFTTrainer):
        pass
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint as checkpoints
from .callback import MODEL_TAGS, LWFCallback
from .config import LWFConfig
from .deepspeed_support import full_gradient, install_fisher_hook, local_gradients
from .distributed import full_tensor
from .method.fisher import trainable_parameters
from .modelcard import insert_card_section, lwf_card_section
from .state import atomic_write_text, write_config


class LWFTrainerMixin:
    """Adds Learning With Forgetting to a :class:`~transformers.Trainer` subclass (list it first in the bases).

    Args:
        lwf_config: the LWF settings; by default they are read from ``args`` (an ``LWFTrainingArguments``).
        *args, **kwargs: everything the Trainer class accepts. An ``LWFCallback`` already in ``callbacks`` is
            used instead of a new one.
    """

    def __init__(self, *args: Any, lwf_config: LWFConfig | None = None, **kwargs: Any):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        existing = [cb for cb in callbacks if isinstance(cb, LWFCallback)]
        if len(existing) > 1:
            raise ValueError("Register at most one LWFCallback.")
        if existing and lwf_config is not None:
            raise ValueError("Pass either `lwf_config` or an LWFCallback in `callbacks`, not both.")
        self.lwf_callback = existing[0] if existing else LWFCallback(lwf_config)
        self.lwf_callback.via_trainer = True
        if not existing:
            callbacks.append(self.lwf_callback)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(MODEL_TAGS)
        self.lwf_callback.check_train_dataset(self.train_dataset)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # `True`: the newest *complete* checkpoint (hf_lwf.checkpoint); a path: refused when incomplete. The callback
        # is told the exact folder.
        found = checkpoints.resolve_resume(self.args, resume_from_checkpoint)
        self.lwf_callback.resume_dir = found
        return super().train(found, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        # complete or ignored: marked after every rank has written, rotation only over complete checkpoints
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with checkpoints.writing_checkpoint(self.args, self.state, folder):
            super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(self.lwf_callback.pop_metrics())
        super().log(logs, *args, **kwargs)

    def _prepare_for_training(self, *args: Any, **kwargs: Any):
        """Under DeepSpeed, wrap the engine's step: the online Fisher reads the gradients there, before clipping."""
        prepared = super()._prepare_for_training(*args, **kwargs)
        if self.is_deepspeed_enabled and self.lwf_callback.config is not None:
            install_fisher_hook(self.model_wrapped, self._deepspeed_fisher_update)
        return prepared

    def _deepspeed_fisher_update(self) -> None:
        callback = self.lwf_callback
        if not callback.wants_online_fisher():
            return
        model = self.accelerator.unwrap_model(self.model_wrapped)
        # collective: every rank is inside engine.step
        if callback.deepspeed_stage != 3:  # ZeRO-2: whole gradients, gathered and folded in one at a time
            callback.update_fisher(model, self.state.global_step, fetch=full_gradient)
            return
        grads = local_gradients(trainable_parameters(model))  # ZeRO-3: this rank's slices, 1/world of a copy
        if not grads:  # a non-finite gradient on some rank: no update anywhere
            callback.skip_fisher_step(self.state.global_step)
            return
        callback.update_fisher(model, self.state.global_step, grads=grads)

    def _clip_grad_norm(self, model):
        """Feed the online Fisher the gradients before they are clipped (METHOD.md, step 2), then clip.

        Under an fp16 loss scaler the Fisher waits for the optimizer step (``on_optimizer_step``): only then is it
        known, without a host sync of our own, whether the step was skipped for overflow. It then reads the
        unscaled, clipped gradients and divides them by the clipping coefficient, kept here as a device tensor.
        Under DeepSpeed the engine has stepped and clipped already; the Fisher was read in its step.
        """
        if self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            self.lwf_callback.update_fisher(self.accelerator.unwrap_model(model), self.state.global_step)
            return super()._clip_grad_norm(model)
        norm = super()._clip_grad_norm(model)
        self.lwf_callback._clip_coefficient = clip_coefficient(norm, self.args.max_grad_norm)
        return norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        checkpoint = os.path.basename(os.path.normpath(output_dir)).startswith("checkpoint-")
        if checkpoint and self.lwf_callback.config is not None and self.lwf_callback.state_is_partitioned():
            # collective: every rank; under FSDP's sharded checkpoints the folder does not exist yet
            self.lwf_callback.save_state(self.args, output_dir, self.state.global_step, create=True,
                                         model=self.accelerator.unwrap_model(self.model_wrapped))
        if not self.args.should_save or self.lwf_callback.config is None:
            return
        write_config(output_dir, self.lwf_callback.config.lwf_dict(), self.lwf_callback.lwf_state.run_summary())
        _replace_pickled_args(output_dir, self.args)
        if checkpoint:
            self.lwf_callback.save_state(self.args, output_dir, self.state.global_step,
                                         model=self.accelerator.unwrap_model(self.model_wrapped))

    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(*args, tags=tags + [tag for tag in MODEL_TAGS if tag not in tags], **kwargs)
        if self.lwf_callback.config is not None and self.is_world_process_zero():
            insert_card_section(os.path.join(self.args.output_dir, "README.md"), lwf_card_section(self.lwf_callback))


class LWFTrainer(LWFTrainerMixin, Trainer):
    """A :class:`~transformers.Trainer` running Learning With Forgetting (:class:`LWFTrainerMixin` on ``Trainer``)."""


def clip_coefficient(norm, max_norm: float):
    """What ``torch.nn.utils.clip_grad_norm_`` multiplied the gradients by, as a device tensor (no host sync)."""
    norm = full_tensor(norm) if torch.is_tensor(norm) else torch.tensor(float(norm))
    return (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)


def _replace_pickled_args(output_dir: str, args) -> None:
    """Swap the Trainer's pickled ``training_args.bin`` for ``training_args.json``: nothing hf_lwf saves is a pickle."""
    atomic_write_text(output_dir, "training_args.json", args.to_json_string())
    pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
    if os.path.isfile(pickled):
        os.remove(pickled)
