"""``LWFTrainer``: a ``Trainer`` with Learning With Forgetting built in.

It registers one :class:`~hf_lwf.LWFCallback` (which does all the work, so results equal callback-only use) and
adds the conveniences only a subclass can give: ``lwf/*`` metrics through ``Trainer.log`` (so every
``report_to`` integration receives them), the LWF state and ``lwf_config.json`` written with the model before
any Hub upload, the exact checkpoint path on resume, the LWF model-card section on every card, and ``training_args.json`` in
place of the pickled ``training_args.bin``.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import get_last_checkpoint

from .callback import MODEL_TAGS, LWFCallback
from .config import LWFConfig
from .modelcard import card_section, lwf_card_section
from .state import atomic_write_text, write_config


class LWFTrainer(Trainer):
    """A :class:`~transformers.Trainer` running Learning With Forgetting.

    Args:
        lwf_config: the LWF settings; by default they are read from ``args`` (an ``LWFTrainingArguments``).
        *args, **kwargs: everything :class:`~transformers.Trainer` accepts. An ``LWFCallback`` already in
            ``callbacks`` is used instead of a new one.
    """

    _tag_names = MODEL_TAGS

    def __init__(self, *args: Any, lwf_config: LWFConfig | None = None, **kwargs: Any):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        existing = [cb for cb in callbacks if isinstance(cb, LWFCallback)]
        if len(existing) > 1:
            raise ValueError("Register at most one LWFCallback.")
        if existing and lwf_config is not None:
            raise ValueError("Pass either `lwf_config` or an LWFCallback in `callbacks`, not both.")
        self.lwf_callback = existing[0] if existing else LWFCallback(lwf_config)
        self.lwf_callback.card_via_trainer = True
        if not existing:
            callbacks.append(self.lwf_callback)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self.lwf_callback.resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(self.lwf_callback.pop_metrics())
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save or self.lwf_callback.config is None:
            return
        write_config(output_dir, self.lwf_callback.config.lwf_dict())
        _replace_pickled_args(output_dir, self.args)
        if os.path.basename(os.path.normpath(output_dir)).startswith("checkpoint-"):
            self.lwf_callback.save_state(self.args, output_dir, self.state.global_step)

    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        if self.lwf_callback.config is None:
            return super().create_model_card(*args, tags=tags, **kwargs)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in self._tag_names if tag not in tags]
        with card_section(lwf_card_section(self.lwf_callback)):
            super().create_model_card(*args, tags=tags, **kwargs)


def _replace_pickled_args(output_dir: str, args) -> None:
    """Swap the Trainer's pickled ``training_args.bin`` for ``training_args.json``: nothing hf_lwf saves is a pickle."""
    atomic_write_text(output_dir, "training_args.json", args.to_json_string())
    pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
    if os.path.isfile(pickled):
        os.remove(pickled)
