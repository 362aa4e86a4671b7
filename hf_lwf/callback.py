"""``LWFCallback``: Learning With Forgetting on any ``transformers.Trainer``.

The callback translates Trainer events into the verbs of one :class:`~hf_lwf.run.LWFRun`, which does the work:
training begins (:meth:`~hf_lwf.run.LWFRun.start`), each optimizer step feeds the online Fisher, each
``lwf_unlearn_every`` steps is an unlearning point, and every checkpoint carries the run's state.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from .backends import detect_backend
from .checkpoint import mark_complete
from .config import LWFConfig, config_from_args
from .distributed import input_device
from .modelcard import MODEL_TAGS, card_data, install_card_section, lwf_card_section
from .resume import resume_directory
from .run import LWFRun, LWFUnlearningError


__all__ = ["LWFCallback", "LWFUnlearningError", "MODEL_TAGS"]


class LWFCallback(TrainerCallback):
    """Adds Learning With Forgetting to a Trainer.

    Args:
        config: the LWF settings. Leave it out when the Trainer's ``args`` is an
            :class:`~hf_lwf.LWFTrainingArguments`: the ``lwf_*`` fields are read from there.
        resume_from: the checkpoint folder to take the LWF state from when the Trainer resumes. Rarely needed: the
            callback finds the folder ``trainer.train(resume_from_checkpoint=...)`` resumed from, and refuses to
            start when it cannot (rather than restart LWF).
        preview: score and select D_U at the first unlearning point (before training under the ``early``
            schedule), then stop training without any ascent step (``hf-lwf inspect``).
        **kwargs: ``lwf_*`` fields, as a shortcut for ``LWFCallback(LWFConfig(**kwargs))``.
    """

    def __init__(self, config: LWFConfig | None = None, *, resume_from: str | os.PathLike | None = None,
                 preview: bool = False, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("Pass either an LWFConfig or lwf_* keyword arguments to LWFCallback, not both.")
        if kwargs:
            config = LWFConfig(**kwargs)
        if config is not None and not isinstance(config, LWFConfig):
            raise TypeError(f"`config` must be an LWFConfig, got {type(config).__name__}.")
        self.preview = preview
        self.run: LWFRun | None = LWFRun(config_from_args(config), preview=preview) if config is not None else None
        self.resume_from = resume_from
        self.resume_dir: str | None = None  # set by LWFTrainer.train to the checkpoint it resumes from
        self.via_trainer = False  # registered by LWFTrainerMixin: it writes the card; sharded engines need it
        self.checked = False

    # The run's parts, for code that reads them from the callback.
    config = property(lambda self: self.run.config if self.run is not None else None)
    prompts = property(lambda self: self.run.prompts if self.run is not None else None)
    lwf_state = property(lambda self: self.run.state)
    self_data = property(lambda self: self.run.self_data)
    is_adapter = property(lambda self: self.run.is_adapter)

    def check(self, args, model=None, tokenizer=None) -> None:
        """Construction-time checks of config, prompts, model, tokenizer and training engine."""
        if self.run is None:
            if not isinstance(args, LWFConfig):
                raise ValueError(
                    "LWFCallback() without a config needs `LWFTrainingArguments` as the Trainer's args; "
                    "otherwise pass LWFCallback(LWFConfig(lwf_forget_prompts=...))."
                )
            self.run = LWFRun(config_from_args(args), preview=self.preview)
        self.run.configure(learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm)
        self.run.check(backend=detect_backend(args, model), via_trainer=self.via_trainer, model=model,
                       tokenizer=tokenizer, max_steps=args.max_steps)
        self.checked = model is not None

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.check(args, model, processing_class)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        if not self.checked:
            self.check(args, model, processing_class)
        run = self.run
        run.use_backend(detect_backend(args, model), via_trainer=self.via_trainer, model=model)  # sharded by hand?
        run.check_train_dataset(getattr(train_dataloader, "dataset", None))
        if args.max_steps <= 0:  # epoch-based: the number of steps is known now (max_steps was checked at init)
            run.warn_if_unreachable(state.max_steps)
        resume = (resume_directory(state.global_step, args.output_dir, self.resume_from, self.resume_dir)
                  if state.global_step > 0 else None)
        run.start(model=model, tokenizer=processing_class, optimizer=optimizer, global_step=state.global_step,
                  max_steps=state.max_steps, resume_dir=resume, output_dir=args.output_dir,
                  should_save=args.should_save, show_progress=_show_progress(args),
                  learning_examples=_learning_examples(train_dataloader, model, run.config.lwf_fisher_samples))
        if run.previewed:
            control.should_training_stop = True

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.run.after_optimizer_step(model, optimizer, state.global_step,
                                      skipped=bool(getattr(optimizer, "step_was_skipped", False)))

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        run = self.run
        if not run.is_unlearning_point(state.global_step):
            return
        run.unlearning_point(model=model, optimizer=optimizer, step=state.global_step,
                             max_grad_norm=args.max_grad_norm, show_progress=_show_progress(args),
                             learning_examples=_learning_examples(train_dataloader, model,
                                                                  run.config.lwf_fisher_samples))
        control.should_log = True
        if run.previewed:
            control.should_training_stop = True

    def pop_metrics(self) -> dict[str, float]:
        """The ``lwf/*`` scalars gathered since the last log (``LWFTrainer.log`` merges them)."""
        return self.run.pop_metrics() if self.run is not None else {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.pop_metrics()
        if metrics and logs is not None:
            logs.update(metrics)
            if state.log_history:
                state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.run.save(folder, state.global_step, should_save=args.should_save, model=model)
        if not self.via_trainer:  # LWFTrainer marks its checkpoints itself, before it rotates them
            mark_complete(args, folder, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            step = int(os.path.basename(os.path.normpath(state.best_model_checkpoint)).rpartition("-")[2] or 0)
            self.run.adopt_record(state.best_model_checkpoint, step)
        self.run.finish()

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        run = self.run
        if not run.backend.partitioned:  # runs on rank 0 only: no gather here (save_model did it on every rank)
            run.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state.global_step,
                     should_save=args.should_save, model=model)
        if model is not None and hasattr(model, "add_model_tags"):
            model.add_model_tags(MODEL_TAGS)
        if args.should_save:
            run.write_record(args.output_dir)
        if not self.via_trainer:
            install_card_section(lwf_card_section(card_data(run)))


def _learning_examples(train_dataloader, model, count: int):
    """``seed -> count`` single-example batches of the learning data, drawn without touching its sampler (None
    when the train set cannot be indexed)."""
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return None

    def draw(seed: int) -> list[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        device = input_device(model)
        examples = []
        for i in indices:
            batch = train_dataloader.collate_fn([dataset[i]])
            if "labels" not in batch:
                raise ValueError("The empirical Fisher needs `labels` in the learning batches (use a LM collator).")
            examples.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return examples

    return draw


def _show_progress(args) -> bool:
    return not args.disable_tqdm and args.process_index == 0
