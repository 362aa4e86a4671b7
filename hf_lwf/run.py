"""``LWFRun``: Learning With Forgetting as a plain object, the method's state and its state machine.

A run starts fresh or from a checkpoint (:meth:`LWFRun.start`), folds every learning step's gradients into the
online Fisher (:meth:`~LWFRun.update_fisher`), and at each unlearning point (:meth:`~LWFRun.is_unlearning_point`)
scores D_self, selects D_U (:meth:`~LWFRun.score`, :meth:`~LWFRun.select`) and unlearns it by bounded gradient
ascent (:meth:`~LWFRun.unlearn`). It saves and restores itself with every checkpoint (:meth:`~LWFRun.save`) and
says what it did (:meth:`~LWFRun.summary`). It knows no Trainer: :class:`~hf_lwf.LWFCallback` and
:class:`~hf_lwf.LWFTrainerMixin` translate Trainer events into these verbs, and everything that depends on the
training engine goes through its :class:`~hf_lwf.backends.Backend`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import datasets
import torch
from datasets import Dataset
from transformers.utils import logging

from .backends import Backend, LocalBackend
from .checkpoint import check_weights, weights_sha256
from .checks import check_model, check_train_dataset, warn_if_unreachable
from .config import GENERATION_FIELDS, LWFConfig
from .data import load_forget_prompts
from .distributed import input_device
from .method import fisher as fisher_lib
from .method.confidence import parameter_rates, score_self_data
from .method.selfgen import collate_self_data, generate_self_data
from .method.unlearn import ForgetSampler, check_preconditioner, select_forget_set
from .resume import reconcile
from .state import CONFIG_NAME, SELF_DATA_DIR, STATE_JSON, LWFState, write_config


logger = logging.get_logger(__name__)

LearningExamples = Callable[[int], list[dict[str, torch.Tensor]]]  # seed -> single-example learning batches


class LWFUnlearningError(RuntimeError):
    """An unlearning point could not run. LWF stops the run instead of silently continuing without forgetting."""


class LWFRun:
    """The state and the steps of one LWF run.

    Args:
        config: the LWF settings.
        preview: score and select D_U at the first point (or before training, for the ``early`` schedule), then
            stop: no ascent step is taken (``hf-lwf inspect``). :attr:`previewed` says when that has happened.
    """

    def __init__(self, config: LWFConfig, *, preview: bool = False):
        self.config = config
        self.prompts = load_forget_prompts(config.lwf_forget_prompts, config.lwf_forget_prompt_column)
        self.state = LWFState()
        self.self_data: Dataset | None = None
        self.backend: Backend = LocalBackend()
        self.is_adapter = False
        self.preview = preview
        self.previewed = False
        self.scoring_rates: list[float] | None = None  # eta of each param group at the last scoring
        self.record: dict[str, Any] | None = None  # set by adopt_record: the saved weights are a checkpoint's
        self._metrics: dict[str, float] = {}
        self._sampler: ForgetSampler | None = None
        self._pad_id: int | None = None
        self._step_rates: list[float] | None = None
        self._fisher_step: int | None = None
        self._clip_coefficient: torch.Tensor | None = None
        self._saved_step: int | None = None
        self._loss_scale: float | None = None
        self._max_steps = -1

    # ---------------------------------------------------------------------------------------------- checks
    def use_backend(self, backend: Backend, *, via_trainer: bool, model=None) -> None:
        """Run on ``backend``, after its checks of this config (each names the argument and what works)."""
        backend.check(self.config, via_trainer=via_trainer, model=model)
        self.backend = backend

    def check(self, *, backend: Backend, via_trainer: bool, model=None, tokenizer=None, max_steps: int = -1) -> None:
        """Construction-time checks: engine, model, tokenizer, prompts and schedule. Each names what to change."""
        self.use_backend(backend, via_trainer=via_trainer, model=model)
        if model is None:
            return
        check_model(self.config, self.prompts, model, tokenizer)
        self._pad_id = tokenizer.pad_token_id
        if max_steps > 0:
            warn_if_unreachable(self.config, max_steps)

    def check_train_dataset(self, dataset) -> None:
        check_train_dataset(self.config, dataset)

    def warn_if_unreachable(self, max_steps: int) -> None:
        warn_if_unreachable(self.config, max_steps)

    # ---------------------------------------------------------------------------------------------- start
    def start(self, *, model, tokenizer, optimizer, global_step: int, max_steps: int, resume_dir: str | None,
              output_dir: str, should_save: bool, show_progress: bool = False,
              learning_examples: LearningExamples | None = None) -> None:
        """Begin training: restore the checkpoint's state (``resume_dir``, when ``global_step`` > 0) or start fresh,
        generate D_self if there is none, snapshot theta_ref, and run the ``early`` schedule's unlearning."""
        config = self.config
        self.is_adapter = hasattr(model, "peft_config")  # PEFT: only the adapter is saved and pushed
        self._pad_id = tokenizer.pad_token_id
        # Per-run transients: a second train() (hyperparameter search) must not inherit them.
        self._metrics, self._saved_step, self._fisher_step, self._clip_coefficient = {}, None, None, None
        self._step_rates, self.record, self.previewed = None, None, False
        self._max_steps = max_steps
        self._loss_scale = loss_scale_of(optimizer)
        if self.past_end(global_step):
            logger.warning(
                f"LWF: resuming at step {global_step} of max_steps={max_steps}: the run is complete. transformers "
                "takes one more learning step when it resumes a checkpoint at the end; LWF skips it (with LWFTrainer "
                "it has no forward pass and changes no weight; a plain Trainer still applies its optimizer step)."
            )
        if config.lwf_unlearn_optimizer == "preconditioned" and optimizer is not None:
            check_preconditioner(self.backend.learning_optimizer(optimizer))  # refused before training, not at a point
        current = LWFState(config=config.lwf_dict(), config_hash=config.lwf_hash(),
                           generation_hash=config.lwf_hash(GENERATION_FIELDS))
        params = fisher_lib.trainable_parameters(model)
        if global_step == 0 or not self._restore(resume_dir, output_dir, current, model):
            self.state, self.self_data, self._sampler = current, None, None
        else:
            self.backend.place(self.state, params, device=self._state_device)
        if self.self_data is None:
            self._build_self_data(model, tokenizer, output_dir, should_save, show_progress)
        if not self.state.reference:
            self.state.reference = self.backend.snapshot(model, device=self._state_device)
        if config.lwf_schedule == "early" and self.state.unlearn_points == 0:
            self._early_unlearning(model, optimizer, max_steps, learning_examples)

    def _restore(self, directory: str | None, output_dir: str, current: LWFState, model) -> bool:
        """Load the LWF state of the checkpoint being resumed; ``False`` for a checkpoint of a run without LWF."""
        if not os.path.isfile(os.path.join(directory, STATE_JSON)):
            if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
                raise FileNotFoundError(
                    f"Resuming from {directory}: it was saved by an LWF run but has no {STATE_JSON}, so LWF cannot "
                    "continue. Copy the whole checkpoint folder (lwf_state.json, lwf_state.safetensors, "
                    f"{SELF_DATA_DIR}), or resume from another checkpoint."
                )
            logger.warning(
                f"Resuming from {directory}, a checkpoint of a run without LWF (no {STATE_JSON}, no {CONFIG_NAME}): "
                "LWF starts with the model as it is now."
            )
            return False
        saved = self.backend.load_state(directory, fisher_lib.trainable_parameters(model))
        check_weights(directory, saved, lambda: weights_sha256(self.backend.whole_weights(model)))  # parts belong
        change = reconcile(saved, current, self.config, directory)
        self.state = saved
        if saved.generation_hash == current.generation_hash and saved.self_data_path:
            # The checkpoint's own copy first: it resumes on a node that has only the checkpoint folder.
            candidates = [os.path.join(directory, saved.self_data_path), os.path.join(output_dir, saved.self_data_path)]
            path = next((c for c in candidates if os.path.isdir(c)), None)
            if path is None:
                raise FileNotFoundError(
                    f"The checkpoint refers to D_self, which is in neither {candidates[0]} nor {candidates[1]}; "
                    "restore one of them to resume."
                )
            self.self_data = Dataset.load_from_disk(path)
        else:
            logger.warning("Generation settings changed: D_self is regenerated from the current model.")
            saved.generation_hash = current.generation_hash
            saved.scores, saved.forget_indices, saved.sampler = [], [], {}
            saved.drawn, saved.unlearned = {}, {}  # indices into the old D_self
            self.self_data = None
        if change.rescore and saved.scores:
            saved.scores, saved.forget_indices, saved.sampler = [], [], {}  # the next point scores again
        elif change.reselect and saved.scores:
            before = len(saved.forget_indices)
            scores = torch.tensor(saved.scores, dtype=torch.float64)
            scores[scores <= -1e29] = float("nan")  # the state's marker of a non-finite score
            self.select(scores, saved.selection_seed if saved.selection_seed >= 0 else self.config.lwf_seed + 1)
            logger.warning(f"LWF: D_U re-selected from the stored scores with the new settings: {before} -> "
                           f"{len(saved.forget_indices)} samples.")
            return True
        self._sampler = ForgetSampler(**saved.sampler) if saved.sampler else None
        return True

    def _build_self_data(self, model, tokenizer, output_dir: str, should_save: bool, show_progress: bool) -> None:
        config = self.config
        start = time.perf_counter()
        self.self_data = generate_self_data(
            model, tokenizer, self.prompts, samples_per_prompt=config.lwf_samples_per_prompt,
            max_new_tokens=config.lwf_max_new_tokens, temperature=config.lwf_temperature, top_p=config.lwf_top_p,
            batch_size=config.lwf_generation_batch_size, seed=config.lwf_seed, show_progress=show_progress,
        )
        self._metrics["lwf/generate_seconds"] = time.perf_counter() - start
        tasks = self.self_data["task"]
        self.state.self_data_sizes = {task: tasks.count(task) for task in self.prompts}
        self.state.self_data_path = SELF_DATA_DIR
        if should_save:
            with quiet_datasets():
                self.self_data.save_to_disk(os.path.join(output_dir, SELF_DATA_DIR))
        logger.info(f"LWF: generated D_self with {len(self.self_data)} samples {self.state.self_data_sizes}.")

    @property
    def _state_device(self) -> str | None:
        """Where F and theta_ref live: ``None`` means next to each parameter."""
        return "cpu" if self.config.lwf_state_device == "cpu" else None

    # ------------------------------------------------------------------------------------ learning steps
    def past_end(self, steps_done: int) -> bool:
        """Whether the learning step that follows ``steps_done`` steps lies beyond ``max_steps``: transformers takes
        such a step when it resumes a checkpoint written at the end of training."""
        return self._max_steps > 0 and steps_done >= self._max_steps

    def wants_online_fisher(self) -> bool:
        return self.config.lwf_schedule == "periodic" and self.config.lwf_fisher == "online"

    def update_fisher(self, model, step: int, grad_scale: float | torch.Tensor = 1.0, grads: dict | None = None,
                      fetch: Callable[[str, torch.nn.Parameter], torch.Tensor] | None = None) -> None:
        """Fold this step's gradients (divided by ``grad_scale``) into the online Fisher, on the device, no host sync.

        Called once per optimizer step (a second call for the same ``step`` does nothing): before gradient clipping
        by ``LWFTrainerMixin``, after the step by a bare callback (which sees no earlier gradients). Every trainable
        parameter has an entry from the first step on; one without a gradient decays with g = 0. ``grads``: the
        gradients when they are not in ``p.grad`` (an engine's partitioned buffers). ``fetch(name, param)``: returns
        one parameter's gradient on demand (ZeRO-2: a whole gradient, gathered); each is folded in before the next
        is fetched, so one whole gradient is held at a time."""
        if not self.wants_online_fisher() or self._fisher_step == step or self.past_end(step):
            return
        self._fisher_step = step
        params = fisher_lib.trainable_parameters(model)
        self._follow_trainable(params)
        if grads is None and fetch is None:
            grads = {n: p.grad for n, p in params.items()}
        dtype = getattr(torch, self.config.lwf_fisher_dtype)
        lwf = self.state
        if not lwf.fisher:
            lwf.fisher = fisher_lib.zeros_like_parameters(self.backend.fisher_layout(params, grads), dtype=dtype,
                                                          device=self._state_device)
        factor = lwf.fisher_factor if dtype == torch.float32 else None  # fp32 F: stored as F / factor
        options = dict(decay=self.config.lwf_fisher_decay, dtype=dtype, device=self._state_device,
                       grad_scale=grad_scale, seed=self.config.lwf_seed + lwf.fisher_updates, factor=factor)
        if fetch is None:
            factor = fisher_lib.online_fisher_update_(lwf.fisher, grads, **options)
        else:  # F's entries exist already: each decays exactly once, with its own gradient
            for name in lwf.fisher:
                grad = fetch(name, params[name])
                new = fisher_lib.online_fisher_update_({name: lwf.fisher[name]}, {name: grad}, **options)
                del grad
            factor = new if lwf.fisher else factor
        if factor is not None:
            lwf.fisher_factor = factor
        lwf.fisher_updates += 1

    def skip_fisher_step(self, step: int) -> None:
        """Leave F untouched for ``step`` (its gradients are not finite), also if asked again for it."""
        self._fisher_step = step

    def defer_fisher(self, clip_coefficient: torch.Tensor) -> None:
        """Under an fp16 loss scaler the Fisher waits for the optimizer step, which says whether the scaler skipped
        it; it then reads the unscaled, clipped gradients divided by this clipping coefficient (a device tensor)."""
        self._clip_coefficient = clip_coefficient

    def after_optimizer_step(self, model, optimizer, step: int, skipped: bool = False) -> None:
        """After the learning step: note the rates it took (eta of scoring and of the ascent), and fold its
        gradients into F unless the step was skipped, by the caller's word or by the fp16 loss scaler (its scale
        fell, whatever flag the optimizer wrapper set)."""
        if self.past_end(step):
            return
        self.note_step_rates(optimizer)
        if self._scaler_skipped(optimizer) or skipped:
            self._fisher_step, self._clip_coefficient = step, None
            return
        coefficient, self._clip_coefficient = self._clip_coefficient, None
        self.update_fisher(model, step, grad_scale=1.0 if coefficient is None else coefficient)

    def note_step_rates(self, optimizer) -> None:
        """Record each param group's rate of the step just taken (the scheduler steps only after it)."""
        raw = self.backend.learning_optimizer(optimizer) if optimizer is not None else None
        self._step_rates = [group["lr"] for group in raw.param_groups] if raw is not None else None

    def _scaler_skipped(self, optimizer) -> bool:
        scale = loss_scale_of(optimizer)
        previous, self._loss_scale = self._loss_scale, scale
        return previous is not None and scale < previous

    def _follow_trainable(self, params: dict[str, torch.nn.Parameter]) -> None:
        """F and theta_ref follow the trainable set: a parameter frozen since the run started leaves them; one that
        became trainable stops the run, naming it (it has no theta_ref and a Fisher averaged over no step)."""
        known = self.state.reference or self.state.fisher
        if not known:
            return
        new = sorted(set(params) - set(known))
        if new:
            raise ValueError(
                f"LWF: {len(new)} parameter(s) became trainable after the run started ({', '.join(new[:5])}"
                f"{', ...' if len(new) > 5 else ''}): LWF has no theta_ref and no Fisher for them. Set requires_grad "
                "before training starts, or start a new run from this model."
            )
        gone = sorted(set(known) - set(params))
        if gone:
            for group in (self.state.fisher, self.state.reference):
                for name in gone:
                    group.pop(name, None)
            logger.warning(f"LWF: {len(gone)} parameter(s) are no longer trainable ({', '.join(gone[:5])}"
                           f"{', ...' if len(gone) > 5 else ''}); their Fisher and theta_ref are dropped.")

    # ------------------------------------------------------------------------------------ unlearning points
    def is_unlearning_point(self, step: int) -> bool:
        every = self.config.lwf_unlearn_every
        return self.config.lwf_schedule == "periodic" and step > 0 and step % every == 0 and not self.past_end(step - 1)

    def unlearning_point(self, *, model, optimizer, step: int, max_grad_norm: float,
                         learning_examples: LearningExamples | None = None, show_progress: bool = False) -> None:
        """Score D_self (at the first point, every ``lwf_rescore_every`` points, or when the scores were reset),
        select D_U, unlearn it, and start the next period from the weights as they are."""
        try:
            self._unlearning_point(model, optimizer, step, max_grad_norm, learning_examples, show_progress)
        except Exception as err:
            raise LWFUnlearningError(_failure_message(step, err)) from err

    def _unlearning_point(self, model, optimizer, step, max_grad_norm, learning_examples, show_progress) -> None:
        config, lwf = self.config, self.state
        point = lwf.unlearn_points + 1
        rescore = config.lwf_rescore_every > 0 and (point - 1) % config.lwf_rescore_every == 0
        self._follow_trainable(fisher_lib.trainable_parameters(model))
        if point == 1 or rescore or not lwf.scores:
            # w, M * F, D and the bias correction are formed per parameter block inside scoring (ScoringTerms).
            if config.lwf_fisher == "online":
                fisher_lib.check_finite(lwf.fisher)
                scale = fisher_lib.bias_correction(lwf.fisher_updates, config.lwf_fisher_decay) * lwf.fisher_factor
                fisher = lwf.fisher
            else:
                examples = self._examples(learning_examples, config.lwf_seed + point)
                fisher, scale = self.backend.empirical_fisher(
                    model, examples, batch_size=config.lwf_fisher_batch_size,
                    chunk_elements=config.lwf_score_chunk_size, loss_scale=loss_scale_of(optimizer)), 1.0
            lr, rates = self._scoring_rates(model, optimizer, self._step_rates)
            terms = self.backend.scoring_terms(fisher, model=model, reference=lwf.reference, scale=scale,
                                               mask_ratio=config.lwf_mask_ratio, rates=rates)
            scores = self.score(model, terms, lr, loss_scale=loss_scale_of(optimizer), show_progress=show_progress)
            self.select(scores, config.lwf_seed + point)
            self._metrics["lwf/num_selected"] = float(len(lwf.forget_indices))
        if self.preview:
            self.previewed = True
            self._metrics["lwf/unlearn_seconds"] = 0.0
        else:
            self.unlearn(model, optimizer, config.lwf_unlearn_steps, max_grad_norm)
        lwf.unlearn_points = point
        lwf.reference = self.backend.snapshot(model, out=lwf.reference)  # in place: no second copy of theta_ref
        self._finish_point(step)

    def _early_unlearning(self, model, optimizer, max_steps: int, learning_examples: LearningExamples | None) -> None:
        """The ``early`` ablation: all ascent steps before fine-tuning, scored with the empirical Fisher and
        D = -eta * the mean learning gradient, eta each group's configured rate."""
        config = self.config
        examples = self._examples(learning_examples, config.lwf_seed)
        curvature, delta = fisher_lib.empirical_fisher(model, examples, batch_size=config.lwf_fisher_batch_size,
                                                       chunk_elements=config.lwf_score_chunk_size,
                                                       loss_scale=loss_scale_of(optimizer))
        lr, rates = self._scoring_rates(model, optimizer, self.ascent_rates(optimizer))  # the configured peaks
        for name, g in delta.items():
            g.mul_(-(rates[name] if rates else lr))  # D = -eta_g * mean learning gradient, in place
        terms = fisher_lib.ScoringTerms.from_state(curvature, delta=delta, mask_ratio=config.lwf_mask_ratio,
                                                   rates=rates)
        scores = self.score(model, terms, lr, loss_scale=loss_scale_of(optimizer))
        self.select(scores, config.lwf_seed)
        self._metrics["lwf/num_selected"] = float(len(self.state.forget_indices))
        del curvature, delta, terms
        periods = max(1, max_steps // config.lwf_unlearn_every) if max_steps > 0 else 1
        if self.preview:
            self.previewed = True
        else:
            self.unlearn(model, optimizer, config.lwf_unlearn_steps * periods, self._max_grad_norm)
        self.state.unlearn_points = 1
        self.state.reference = self.backend.snapshot(model, out=self.state.reference)
        self._finish_point(0)

    def _examples(self, learning_examples: LearningExamples | None, seed: int) -> list[dict[str, torch.Tensor]]:
        if learning_examples is None:
            raise ValueError("`lwf_fisher='empirical'` and `lwf_schedule='early'` need the learning data: train with a "
                             "map-style train dataset.")
        return learning_examples(seed)

    def ascent_rates(self, optimizer) -> list[float]:
        """eta per param group of the learning optimizer: the rate of the step just taken.

        Never the scheduler's next value (0 at the end of a decaying schedule). Before any step (the ``early``
        schedule) and where the step just taken had rate 0 (the first step of a warm-up from 0), the group's
        configured peak: the scheduler's ``initial_lr`` (the group's ``lr`` without a scheduler), so a counted
        ascent step always moves the weights, while a group configured at rate 0 stays where it is."""
        raw = self.backend.learning_optimizer(optimizer) if optimizer is not None else None
        groups = raw.param_groups if raw is not None else [{}]
        peaks = [float(group.get("initial_lr", group.get("lr", self._default_lr))) for group in groups]
        rates = self._step_rates if self._step_rates is not None else [0.0] * len(peaks)
        return [float(lr) if lr > 0 else peak for lr, peak in zip(rates, peaks)]

    _default_lr = 5e-5  # TrainingArguments' default: the rate of a run without an optimizer (set by the callback)
    _max_grad_norm = 1.0

    @property
    def _step_rate(self) -> float:
        """eta of c(x): the first param group's rate of the step just taken (the scheduler steps only after it)."""
        return float(self._step_rates[0]) if self._step_rates else self._default_lr

    def configure(self, *, learning_rate: float, max_grad_norm: float) -> None:
        """The Trainer's ``learning_rate`` (rate of a run without an optimizer) and ``max_grad_norm`` (ascent
        clipping before any step, the early schedule)."""
        self._default_lr, self._max_grad_norm = float(learning_rate), float(max_grad_norm)

    def _scoring_rates(self, model, optimizer, rates: list[float] | None) -> tuple[float, dict[str, float] | None]:
        """``(lr, rates)`` of c(x): where every param group took the same rate, that rate for all parameters;
        otherwise each parameter's group rate (``rates`` by name, ``lr`` 1: the terms carry eta)."""
        if optimizer is None or not rates:
            return self._step_rate, None
        if len(set(rates)) == 1:
            return float(rates[0]), None
        groups = [{"params": members} for members in self.backend.parameter_groups(optimizer)]
        return 1.0, parameter_rates(groups, fisher_lib.trainable_parameters(model), rates)

    def score(self, model, terms, lr: float, *, loss_scale: float = 1.0, show_progress: bool = False) -> torch.Tensor:
        """c(x) of every D_self sample (float64 on the CPU, NaN where not finite); records the statistics."""
        config, lwf = self.config, self.state
        start = time.perf_counter()
        self.scoring_rates = [lr] if getattr(terms, "rates", None) is None else sorted(set(terms.rates.values()))
        scores = score_self_data(
            model, self.self_data, self._pad_id, terms, None, lr, mode=config.lwf_confidence,
            batch_size=config.lwf_score_batch_size, show_progress=show_progress,
            chunk_elements=config.lwf_score_chunk_size, loss_scale=loss_scale,
        )
        finite = torch.isfinite(scores)
        if not finite.all():
            logger.warning(f"LWF: {int((~finite).sum())} samples got a non-finite confidence; they are never selected.")
        # JSON has no NaN: the state records non-finite scores as -1e30 (selection uses the real values).
        lwf.scores = torch.where(finite, scores, torch.full_like(scores, -1e30)).tolist()
        valid = scores[finite] if finite.any() else torch.zeros(1)
        self._metrics.update({
            "lwf/confidence_mean": float(valid.mean()),
            "lwf/confidence_max": float(valid.max()),
            "lwf/confidence_min": float(valid.min()),
            "lwf/score_seconds": time.perf_counter() - start,
        })
        return scores

    def select(self, scores: torch.Tensor, seed: int) -> list[int]:
        """D_U from ``scores`` under the current selection settings, with a fresh sampler over it."""
        config, lwf = self.config, self.state
        tasks = self.self_data["task"]
        lwf.forget_indices = select_forget_set(
            scores, tasks, config.forget_amount, threshold=config.lwf_confidence_threshold,
            selection=config.lwf_selection, per_task=config.lwf_per_task_selection, seed=seed,
        )
        lwf.selection_seed = seed
        lwf.forget_sizes = {task: 0 for task in lwf.self_data_sizes}
        for index in lwf.forget_indices:
            lwf.forget_sizes[tasks[index]] = lwf.forget_sizes.get(tasks[index], 0) + 1
        self._sampler = ForgetSampler(len(lwf.forget_indices), seed=seed)
        lwf.sampler = self._sampler.state_dict()
        return lwf.forget_indices

    def unlearn(self, model, optimizer, steps: int, max_grad_norm: float) -> int:
        """``steps`` bounded ascent steps on mini-batches drawn from D_U; returns how many moved the weights."""
        lwf = self.state
        start = time.perf_counter()
        if not lwf.forget_indices:
            lwf.empty_selections += 1
            lwf.idle_points += 1
            logger.warning("LWF: D_U is empty after selection (no confidence above the threshold); nothing unlearned.")
            self._metrics.update({"lwf/forget_loss": float("nan"), "lwf/ascent_steps": 0.0, "lwf/unlearn_seconds": 0.0})
            return 0
        config = self.config
        ascent = self.backend.ascent(
            config.lwf_unlearn_optimizer, optimizer=optimizer, params=fisher_lib.trainable_parameters(model),
            rates=self.ascent_rates(optimizer), coef=config.lwf_unlearn_coef, sgd_lr=config.lwf_unlearn_lr,
            loss_scale=loss_scale_of(optimizer),
        )
        device = input_device(model)
        losses, dropped, applied = [], 0, 0
        for _ in range(steps):
            positions = self._sampler.next_batch(config.lwf_unlearn_batch_size)
            indices = [lwf.forget_indices[p] for p in positions]
            batch = {k: v.to(device) for k, v in collate_self_data([self.self_data[i] for i in indices],
                                                                    self._pad_id).items()}
            result = ascent.step(model, batch, loss_cap=config.lwf_forget_loss_cap, max_grad_norm=max_grad_norm)
            losses.append(result["forget_loss"])
            dropped += len(indices) - result["kept"]
            lwf.skipped_steps += result["skipped"]
            applied += result["applied"]
            for index in indices:
                lwf.drawn[str(index)] = lwf.drawn.get(str(index), 0) + 1
            if result["applied"]:
                for row in result.get("kept_rows", ()):
                    lwf.unlearned[str(indices[row])] = lwf.unlearned.get(str(indices[row]), 0) + 1
        lwf.unlearn_steps += applied
        if not applied:
            lwf.idle_points += 1
            logger.warning(
                f"LWF: none of the {steps} ascent steps of this unlearning point was applied (every sample already "
                f"above lwf_forget_loss_cap={config.lwf_forget_loss_cap}, or non-finite losses/gradients)."
            )
        lwf.sampler = self._sampler.state_dict()
        finite = [x for x in losses if math.isfinite(x)]
        self._metrics.update({
            "lwf/forget_loss": sum(finite) / len(finite) if finite else float("nan"),
            "lwf/capped_samples": float(dropped),
            "lwf/ascent_steps": float(applied),
            "lwf/unlearn_seconds": time.perf_counter() - start,
        })
        return applied

    def _finish_point(self, step: int) -> None:
        lwf = self.state
        self._metrics["lwf/skipped_steps"] = float(lwf.skipped_steps)
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in self._metrics.items()}}
        lwf.history.append(record)
        logger.info(
            f"LWF unlearning point {lwf.unlearn_points} at step {step}: |D_U|={len(lwf.forget_indices)} "
            f"forget_loss={self._metrics.get('lwf/forget_loss', float('nan')):.4f} "
            f"ascent_steps={int(self._metrics.get('lwf/ascent_steps', 0))} (total {lwf.unlearn_steps}) "
            f"skipped={lwf.skipped_steps}"
        )

    # ----------------------------------------------------------------------------------- logging and saving
    def pop_metrics(self) -> dict[str, float]:
        """The ``lwf/*`` scalars gathered since the last call (the Trainer's ``log`` merges them)."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def save(self, directory: str, step: int, *, should_save: bool, model=None, create: bool = False) -> None:
        """Write D_self, the LWF state and ``lwf_config.json`` into a checkpoint folder (once per step).

        When the backend's state is partitioned every rank must call it: each tensor is gathered whole for the
        main process to write, so a checkpoint holds whole tensors whatever the world size. ``create``: make the
        folder if it does not exist yet (sharded checkpoints write the model only after ``save_model``)."""
        if self._saved_step == step:
            return
        tensors = None
        if self.backend.partitioned:  # every rank: each tensor gathered whole for the main process
            params = fisher_lib.trainable_parameters(model) if model is not None else {}
            tensors = self.backend.tensors_for_saving(self.state, params, keep=should_save)
            self._saved_step = step
        writes = should_save and (create or os.path.isdir(directory))
        digest = None  # of the weights saved with this state (collective where they are partitioned)
        if model is not None and (writes or self.backend.partitioned):
            digest = weights_sha256(self.backend.whole_weights(model), keep=should_save)
        if not writes:
            return
        if self.self_data is not None:  # a copy per checkpoint: the folder alone is enough to resume (multi-node)
            with quiet_datasets():
                self.self_data.save_to_disk(os.path.join(directory, SELF_DATA_DIR))
        self.state.save(directory, tensors, weights_sha256=digest or "")
        write_config(directory, self.config.lwf_dict(), self.state.run_summary())
        self._saved_step = step

    def write_record(self, directory: str) -> str:
        """Write ``lwf_config.json`` (settings and :meth:`summary`) next to saved weights."""
        return write_config(directory, self.config.lwf_dict(), self.summary())

    def adopt_record(self, checkpoint: str, step: int | None = None) -> None:
        """The weights about to be saved are those of ``checkpoint`` (``load_best_model_at_end``): from now on the
        summary and the model card describe what they went through, read from that checkpoint's LWF state."""
        saved = LWFState.read_scalars(checkpoint)
        self.record = {"checkpoint": checkpoint, "step": step, "state": saved}

    @property
    def described(self) -> LWFState:
        """The state that describes the weights a save writes: the adopted checkpoint's, or the live one."""
        return self.record["state"] if self.record else self.state

    def summary(self) -> dict[str, Any]:
        """What LWF actually did to the weights being saved: the counts ``lwf_config.json`` and the card report."""
        summary = self.described.run_summary()
        if self.record:
            summary["from_checkpoint_step"] = self.record["step"]
        return summary

    def finish(self) -> None:
        """At the end of training: say loudly when nothing (or little) was forgotten."""
        lwf = self.state
        if self.preview or (lwf.unlearn_steps and not lwf.idle_points):
            return
        reached = "no unlearning point was reached" if not lwf.unlearn_points else (
            f"{lwf.idle_points} of {lwf.unlearn_points} unlearning points applied no ascent step "
            f"({lwf.empty_selections} with an empty D_U, {lwf.skipped_steps} non-finite steps skipped)"
        )
        verdict = "NOTHING WAS FORGOTTEN: this run is plain fine-tuning" if not lwf.unlearn_steps else (
            f"only {lwf.unlearn_steps} ascent steps were applied"
        )
        logger.warning(
            f"\n{'!' * 100}\nLWF: {reached}; {verdict}. The model card and lwf_config.json record these counts.\n"
            "Check lwf_unlearn_every against the number of steps, lwf_confidence_threshold / lwf_forget_ratio, and "
            f"lwf_forget_loss_cap.\n{'!' * 100}"
        )


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars while D_self is written."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def loss_scale_of(optimizer) -> float:
    """The fp16 loss scale of the learning step (accelerate's GradScaler), or 1 under bf16/fp32 and without an
    optimizer."""
    if optimizer is None:
        return 1.0
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _failure_message(step: int, err: Exception) -> str:
    hint = (
        "Something in the model (a forward hook or custom op) is not compatible with the torch.func forward-mode "
        "pass used for scoring; remove it from the model or report the model to hf_lwf."
        if "functorch" in str(err) or "forward-mode" in str(err).lower()
        else "Fix the cause, then resume from the last checkpoint with `trainer.train(resume_from_checkpoint=True)`."
    )
    return (
        f"LWF: the unlearning point at step {step} failed with {type(err).__name__}: {err}\n{hint}\n"
        "hf_lwf stops here rather than let training continue without forgetting while the run claims LWF."
    )
