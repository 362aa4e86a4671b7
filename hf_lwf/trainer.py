"""``LWFTrainerMixin`` and ``LWFTrainer``: Learning With Forgetting built into a Trainer class.

The mixin registers one :class:`~hf_lwf.LWFCallback` (whose :class:`~hf_lwf.run.LWFRun` does all the work, so
results equal callback-only use) and adds what only a subclass can give: ``lwf/*`` metrics through ``log`` (so every
``report_to`` integration receives them), the online Fisher from the gradients *before* clipping (or inside the
engine's step, where the engine steps in backward), the LWF state and ``lwf_config.json`` written with the model
before any Hub upload (collectively where the state is partitioned), the exact checkpoint path on resume, the LWF
section on every model card, ``training_args.json`` in place of the pickled ``training_args.bin``, and the train-set
checks at construction. Put it first in the bases of any ``Trainer`` subclass, e.g. TRL's::

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

from .callback import LWFCallback
from .checkpoint import resolve_resume, writing_checkpoint
from .config import LWFConfig
from .distributed import full_tensor
from .method.fisher import trainable_parameters
from .modelcard import MODEL_TAGS, card_data, insert_card_section, lwf_card_section
from .state import atomic_write_text


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
        self.lwf_callback.run.check_train_dataset(self.train_dataset)

    @property
    def lwf_run(self):
        """The :class:`~hf_lwf.run.LWFRun` of this trainer."""
        return self.lwf_callback.run

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # `True`: the newest *complete* checkpoint (hf_lwf.checkpoint); a path: refused when incomplete. The callback
        # is told the exact folder.
        found = resolve_resume(self.args, resume_from_checkpoint)
        self.lwf_callback.resume_dir = found
        return super().train(found, *args, **kwargs)

    def training_step(self, model, inputs, *args: Any, **kwargs: Any) -> torch.Tensor:
        # transformers resumes a checkpoint written at max_steps with one more step: no forward, no gradient, so
        # its optimizer step changes nothing and the restarted run ends with the weights it was saved with
        if self.lwf_run.past_end(self.state.global_step):
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        # complete or ignored: marked after every rank has written, rotation only over complete checkpoints
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with writing_checkpoint(self.args, self.state, folder):
            super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(self.lwf_callback.pop_metrics())
        super().log(logs, *args, **kwargs)

    def _prepare_for_training(self, *args: Any, **kwargs: Any):
        """Where the engine steps the optimizer inside backward, read the online Fisher in its step."""
        prepared = super()._prepare_for_training(*args, **kwargs)
        run = self.lwf_run
        if run is not None and run.backend.owns_optimizer_step:
            run.backend.install_step_hook(self.model_wrapped, self._engine_fisher_update)
        return prepared

    def _engine_fisher_update(self) -> None:
        """The online Fisher inside the engine's step (collective: every rank is there)."""
        run = self.lwf_run
        if not run.wants_online_fisher():
            return
        model = self.accelerator.unwrap_model(self.model_wrapped)
        grads, fetch = run.backend.fisher_gradients(trainable_parameters(model))
        if fetch is None and not grads:  # a non-finite gradient on some rank: no update anywhere
            run.skip_fisher_step(self.state.global_step)
            return
        run.update_fisher(model, self.state.global_step, grads=grads, fetch=fetch)

    def _clip_grad_norm(self, model):
        """Feed the online Fisher the gradients before they are clipped (docs/method.md, step 2), then clip.

        Under an fp16 loss scaler the Fisher waits for the optimizer step (``on_optimizer_step``): only then is it
        known whether the step was skipped for overflow. It then reads the unscaled, clipped gradients and divides
        them by the clipping coefficient, kept here as a device tensor (no host sync). Where the engine steps inside
        backward the Fisher was read in its step already.
        """
        run = self.lwf_run
        if run.backend.owns_optimizer_step:
            return super()._clip_grad_norm(model)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            run.update_fisher(self.accelerator.unwrap_model(model), self.state.global_step)
            return super()._clip_grad_norm(model)
        norm = super()._clip_grad_norm(model)
        run.defer_fisher(clip_coefficient(norm, self.args.max_grad_norm))
        return norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        run = self.lwf_run
        output_dir = output_dir or self.args.output_dir
        checkpoint = os.path.basename(os.path.normpath(output_dir)).startswith("checkpoint-")
        model = self.accelerator.unwrap_model(self.model_wrapped)
        if checkpoint and run is not None and run.backend.partitioned:
            # collective: every rank; a sharded checkpoint's folder may not exist yet
            run.save(output_dir, self.state.global_step, should_save=self.args.should_save, create=True, model=model)
        if not self.args.should_save or run is None:
            return
        if checkpoint:
            run.save(output_dir, self.state.global_step, should_save=True, model=model)
        else:
            run.write_record(output_dir)
        _replace_pickled_args(output_dir, self.args)

    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(*args, tags=tags + [tag for tag in MODEL_TAGS if tag not in tags], **kwargs)
        if self.lwf_run is not None and self.is_world_process_zero():
            insert_card_section(os.path.join(self.args.output_dir, "README.md"), lwf_card_section(card_data(self.lwf_run)))


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
