"""``LWFCallback``: Learning With Forgetting on any ``transformers.Trainer``.

The callback only wires Trainer events to the modules that do the work: D_self is generated when training
starts (:mod:`.selfgen`), the Fisher is accumulated at every optimizer step (:mod:`.fisher`), and every
``lwf_unlearn_every`` steps the samples are scored (:mod:`.confidence`), D_U is selected and unlearned
(:mod:`.unlearn`). All state lives in one :class:`~hf_lwf.state.LWFState`, saved with every checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Callable
from typing import Any

import datasets
import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.utils import logging

from . import checkpoint as checkpoints
from . import deepspeed_support
from .config import (
    FIXED_ON_RESUME_FIELDS,
    GENERATION_FIELDS,
    SCORING_FIELDS,
    SELECTION_FIELDS,
    LWFConfig,
    config_from_args,
)
from .method import fisher as fisher_lib
from .method.confidence import score_self_data
from .data import load_forget_prompts
from .distributed import input_device, is_sharded, local_rows
from .modelcard import install_card_section, lwf_card_section
from .method.selfgen import check_can_generate, collate_self_data, context_length, encode_prompts, generate_self_data
from .method.unlearn import ForgetSampler, PreconditionedAscent, ascent_step, check_preconditioner, select_forget_set
from .state import CONFIG_NAME, SELF_DATA_DIR, STATE_JSON, LWFState, write_config


logger = logging.get_logger(__name__)

MODEL_TAGS = ["lwf", "hf-lwf"]


class LWFUnlearningError(RuntimeError):
    """An unlearning point could not run. LWF stops the run instead of silently continuing without forgetting."""


class LWFCallback(TrainerCallback):
    """Adds Learning With Forgetting to a Trainer.

    Args:
        config: the LWF settings. Leave it out when the Trainer's ``args`` is an
            :class:`~hf_lwf.LWFTrainingArguments`: the ``lwf_*`` fields are read from there.
        resume_from: the checkpoint folder to take the LWF state from when the Trainer resumes. Rarely needed: the
            callback finds the folder ``trainer.train(resume_from_checkpoint=...)`` resumed from, and refuses to
            start when it cannot (rather than restart LWF).
        **kwargs: ``lwf_*`` fields, as a shortcut for ``LWFCallback(LWFConfig(**kwargs))``.
    """

    def __init__(self, config: LWFConfig | None = None, *, resume_from: str | os.PathLike | None = None,
                 **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("Pass either an LWFConfig or lwf_* keyword arguments to LWFCallback, not both.")
        if kwargs:
            config = LWFConfig(**kwargs)
        if config is not None and not isinstance(config, LWFConfig):
            raise TypeError(f"`config` must be an LWFConfig, got {type(config).__name__}.")
        self.config = config_from_args(config) if config is not None else None
        self.prompts = self._load_prompts() if self.config is not None else None
        self.lwf_state = LWFState()
        self.self_data: Dataset | None = None
        self.resume_from = resume_from  # an explicit checkpoint folder to resume LWF from (see _resume_directory)
        self.resume_dir: str | None = None  # set by LWFTrainer.train to the checkpoint it resumes from
        self.via_trainer = False  # registered by LWFTrainerMixin: it writes the card and is needed under FSDP
        self._metrics: dict[str, float] = {}
        self._sampler: ForgetSampler | None = None
        self._sgd: torch.optim.Optimizer | None = None
        self._pad_id: int | None = None
        self._checked = False
        self._saved_step: int | None = None
        self._step_lr: float | None = None
        self._step_lrs: list[float] | None = None  # every param group's rate of the step just taken
        self._fisher_step: int | None = None
        self._clip_coefficient: torch.Tensor | None = None  # fp16 under LWFTrainer: F is updated after the step
        self.is_adapter = False
        self.deepspeed_stage: int | None = None  # the ZeRO stage under DeepSpeed

    # ----------------------------------------------------------------------------------------------- setup
    def _load_prompts(self) -> dict[str, list[str]]:
        return load_forget_prompts(self.config.lwf_forget_prompts, self.config.lwf_forget_prompt_column)

    def _check(self, args, model, tokenizer) -> None:
        """Construction-time checks: config, prompts, model, tokenizer, distributed engine."""
        if self.config is None:
            if not isinstance(args, LWFConfig):
                raise ValueError(
                    "LWFCallback() without a config needs `LWFTrainingArguments` as the Trainer's args; "
                    "otherwise pass LWFCallback(LWFConfig(lwf_forget_prompts=...))."
                )
            self.config = config_from_args(args)
            self.prompts = self._load_prompts()
        self._check_engine(args)
        if model is None:
            return
        check_can_generate(model, tokenizer)
        encode_prompts(tokenizer, self.prompts, context_length(model), self.config.lwf_max_new_tokens)
        self._pad_id = tokenizer.pad_token_id
        if args.max_steps > 0:
            self._warn_if_unreachable(args.max_steps)
        self._checked = True

    def _check_engine(self, args, model=None) -> None:
        """DeepSpeed (ZeRO-2 and ZeRO-3) and FSDP (FSDP2 only) run through LWFTrainer (or the mixin)."""
        engine = _sharded_engine(args)
        if engine is None and model is not None and is_sharded(model):
            engine = "FSDP"  # a model sharded with fully_shard by hand
        if engine == "DeepSpeed":
            self.deepspeed_stage = deepspeed_support.deepspeed_stage(args)
            deepspeed_support.check_supported(self.config, args, self.deepspeed_stage, self.via_trainer)
            return
        if engine != "FSDP":
            return
        if not self.via_trainer:
            raise ValueError(
                "Under FSDP, LWF must run through `LWFTrainer` (or a Trainer subclass with `LWFTrainerMixin` first in "
                "its bases), not a plain LWFCallback: the sharded state is saved from `save_model` on every rank and "
                "the Fisher is read from the sharded gradients before clipping."
            )
        version = int((getattr(args, "fsdp_config", None) or {}).get("version", os.environ.get("FSDP_VERSION", 2)))
        if version != 2:
            raise ValueError(
                f"hf_lwf supports FSDP2 (`fully_shard`) only; this run asks for FSDP version {version}, whose flat "
                "parameters LWF cannot address. Set `fsdp_config={'version': 2}`."
            )
        if self.config.lwf_state_device == "cpu":
            raise ValueError("`lwf_state_device='cpu'` is not supported under FSDP: LWF's state is sharded like the "
                             "parameters, so FSDP2 already divides its memory by the number of ranks.")
        if _fsdp_offloads(args, model):
            raise ValueError(
                "hf_lwf does not support FSDP2 with CPU offloading (`fsdp='... offload'`, `fsdp_offload_params`, "
                "`CPUOffloadPolicy`): the offloaded shards and their gradients live on the host while the layers run "
                "on the GPU, and LWF's per-sample scoring would mix the two. Use FSDP2 without offloading (LWF's "
                "state is sharded like the parameters), or more ranks; see docs/distributed.md."
            )

    def check_train_dataset(self, dataset) -> None:
        """The empirical Fisher and the early schedule draw learning examples by index: they need a map-style set."""
        if self.config.lwf_fisher != "empirical" and self.config.lwf_schedule != "early":
            return
        if dataset is not None and not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(
                f"lwf_fisher={self.config.lwf_fisher!r} with lwf_schedule={self.config.lwf_schedule!r} draws learning "
                f"examples by index, which a streaming/iterable train set ({type(dataset).__name__}) cannot give: use "
                "a map-style dataset, or lwf_fisher='online' with lwf_schedule='periodic'."
            )

    def _warn_if_unreachable(self, max_steps: int) -> None:
        every = self.config.lwf_unlearn_every
        if self.config.lwf_schedule == "periodic" and 0 < max_steps < every:
            logger.warning(
                f"This run has {max_steps} optimizer steps < lwf_unlearn_every={every}: no unlearning point "
                "will be reached and nothing will be forgotten. Lower `lwf_unlearn_every` or train longer."
            )

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._check(args, model, processing_class)

    # -------------------------------------------------------------------------------------- train begin
    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        if not self._checked:
            self._check(args, model, processing_class)
        self._check_engine(args, model)
        config = self.config
        self.check_train_dataset(getattr(train_dataloader, "dataset", None))
        if args.max_steps <= 0:  # epoch-based: the number of steps is known now (max_steps was checked at init)
            self._warn_if_unreachable(state.max_steps)
        self.is_adapter = hasattr(model, "peft_config")  # PEFT: only the adapter is saved and pushed
        # Per-run transients: a second train() (hyperparameter search) must not inherit them.
        self._metrics, self._sgd, self._saved_step, self._step_lr, self._fisher_step = {}, None, None, None, None
        self._clip_coefficient = None
        self._step_lrs = None
        if config.lwf_unlearn_optimizer == "preconditioned" and optimizer is not None:
            check_preconditioner(optimizer)  # an optimizer without a known preconditioner is refused before training
        current = LWFState(config=config.lwf_dict(), config_hash=config.lwf_hash(),
                           generation_hash=config.lwf_hash(GENERATION_FIELDS))
        if not self._restore(args, state, current, model):
            self.lwf_state, self.self_data, self._sampler = current, None, None
        elif self.deepspeed_stage != 3:  # ZeRO-3: _restore read this rank's slices already
            self.lwf_state.place_like(fisher_lib.trainable_parameters(model), device=self._state_device)
        if self.self_data is None:
            self._build_self_data(args, model, processing_class)
        if not self.lwf_state.reference:
            self.lwf_state.reference = self._snapshot(model)
        if config.lwf_schedule == "early" and self.lwf_state.unlearn_points == 0:
            self._early_unlearning(args, state, model, optimizer, train_dataloader)

    def _restore(self, args, state, current: LWFState, model) -> bool:
        """Load the LWF state of the checkpoint being resumed; ``False`` when this is a fresh start."""
        if state.global_step == 0:
            return False
        directory = self._resume_directory(args, state)
        if not os.path.isfile(os.path.join(directory, STATE_JSON)):
            if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
                raise FileNotFoundError(
                    f"Resuming from {directory}: it was saved by an LWF run but has no {STATE_JSON}, so LWF cannot "
                    "continue. Copy the whole checkpoint folder (lwf_state.json, lwf_state.safetensors, "
                    f"{SELF_DATA_DIR}), or resume from another checkpoint."
                )
            logger.warning(
                f"Resuming from {directory}, a checkpoint of a run without LWF (no {STATE_JSON}, no {CONFIG_NAME}): "
                f"LWF starts at step {state.global_step} with the model as it is now."
            )
            return False
        params = fisher_lib.trainable_parameters(model)
        if self.deepspeed_stage == 3:  # the rows that cover this rank's slice, then the slice
            saved = LWFState.load(directory, rows={n: deepspeed_support.partition_rows(p) for n, p in params.items()})
            for group in (saved.fisher, saved.reference):
                for name in list(group):
                    group[name] = deepspeed_support.rows_to_partition(group[name], params[name])
        else:
            saved = LWFState.load(directory, rows={n: local_rows(p) for n, p in params.items()})  # FSDP: own rows
        checkpoints.check_weights(directory, saved, model, zero3=self.deepspeed_stage == 3)  # parts belong together
        reselect, rescore = self._changed_config(saved, current, directory)
        self.lwf_state = saved
        if saved.generation_hash == current.generation_hash and saved.self_data_path:
            # The checkpoint's own copy first: it resumes on a node that has only the checkpoint folder.
            candidates = [os.path.join(directory, saved.self_data_path), os.path.join(args.output_dir, saved.self_data_path)]
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
        if rescore and saved.scores:
            saved.scores, saved.forget_indices, saved.sampler = [], [], {}  # the next point scores again
        elif reselect and saved.scores:
            before = len(saved.forget_indices)
            scores = torch.tensor(saved.scores, dtype=torch.float64)
            scores[scores <= -1e29] = float("nan")  # the state's marker of a non-finite score
            seed = saved.selection_seed if saved.selection_seed >= 0 else self.config.lwf_seed + 1
            self._select(scores, seed)
            logger.warning(f"LWF: D_U re-selected from the stored scores with the new settings: {before} -> "
                           f"{len(saved.forget_indices)} samples.")
            return True
        self._sampler = ForgetSampler(**saved.sampler) if saved.sampler else None
        return True

    def _resume_directory(self, args, state) -> str:
        """The checkpoint folder the Trainer resumed from.

        In order: ``LWFCallback(resume_from=...)``, the path ``LWFTrainer.train`` recorded, the path the running
        ``Trainer`` resumed from (read from its training loop, since a callback is not given it), and
        ``output_dir/checkpoint-<step>`` only when that folder holds the LWF state of this very step."""
        for directory in (self.resume_from, self.resume_dir, _trainer_resume_path()):
            if directory:
                return str(directory)
        fallback = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isfile(os.path.join(fallback, STATE_JSON)):
            return fallback
        raise ValueError(
            f"LWF cannot tell which checkpoint this run resumed from (global step {state.global_step}), and "
            f"{fallback} has no LWF state: continuing would restart LWF. Pass the folder explicitly, "
            "LWFCallback(..., resume_from='<checkpoint folder>'), or train with hf_lwf.LWFTrainer."
        )

    def _changed_config(self, saved: LWFState, current: LWFState, directory: str) -> tuple[list[str], list[str]]:
        """Compare the saved and the current ``lwf_*`` values; return (selection, scoring) fields that changed.

        Fisher-state fields are refused; for the early schedule, whose unlearning is over, every field that would
        have shaped it is refused. The caller re-selects or rescores; the other fields apply from the next point.
        """
        if saved.config_hash == current.config_hash:
            return [], []
        changed = sorted(k for k in current.config if saved.config.get(k) != current.config[k])
        fixed = [k for k in changed if k in FIXED_ON_RESUME_FIELDS]
        if self.config.lwf_schedule == "early" and saved.unlearn_points:
            fixed = [k for k in changed if k not in GENERATION_FIELDS and k not in _RUNTIME_FIELDS]
        if fixed:
            values = ", ".join(f"{k}: {saved.config.get(k)!r} -> {current.config[k]!r}" for k in fixed)
            raise ValueError(
                f"Resuming from {directory} with changed LWF settings that cannot apply to this run ({values}): the "
                "saved Fisher (or, for the early schedule, the unlearning already done) depends on them. Resume with "
                "the saved values (lwf_config.json in the checkpoint) or start a new run."
            )
        reselect = [k for k in changed if k in SELECTION_FIELDS]
        rescore = [k for k in changed if k in SCORING_FIELDS]
        rest = [k for k in changed if k not in SELECTION_FIELDS + SCORING_FIELDS + GENERATION_FIELDS]
        what = []
        if rescore and saved.scores:
            what.append(f"{', '.join(rescore + reselect)}: D_self is scored and D_U selected again at the next "
                        "unlearning point")
        elif reselect and saved.scores:
            what.append(f"{', '.join(reselect)}: D_U is re-selected now from the stored scores")
        elif rescore or reselect:
            what.append(f"{', '.join(rescore + reselect)}: nothing was scored yet; they apply at the first point")
        if rest:
            what.append(f"{', '.join(rest)}: applied from the next unlearning point")
        if any(k in GENERATION_FIELDS for k in changed):
            what.append("generation settings: D_self is regenerated")
        logger.warning(f"The LWF config changed since {directory} was saved. " + "; ".join(what) + ".")
        saved.config, saved.config_hash = current.config, current.config_hash
        return reselect, rescore

    def _build_self_data(self, args, model, tokenizer) -> None:
        config = self.config
        start = time.perf_counter()
        self.self_data = generate_self_data(
            model,
            tokenizer,
            self.prompts,
            samples_per_prompt=config.lwf_samples_per_prompt,
            max_new_tokens=config.lwf_max_new_tokens,
            temperature=config.lwf_temperature,
            top_p=config.lwf_top_p,
            batch_size=config.lwf_generation_batch_size,
            seed=config.lwf_seed,
            show_progress=_show_progress(args),
        )
        self._metrics["lwf/generate_seconds"] = time.perf_counter() - start
        tasks = self.self_data["task"]
        self.lwf_state.self_data_sizes = {task: tasks.count(task) for task in self.prompts}
        self.lwf_state.self_data_path = SELF_DATA_DIR
        if args.should_save:
            with _quiet_datasets():
                self.self_data.save_to_disk(os.path.join(args.output_dir, SELF_DATA_DIR))
        logger.info(f"LWF: generated D_self with {len(self.self_data)} samples {self.lwf_state.self_data_sizes}.")

    @property
    def _state_device(self) -> str | None:
        """Where F and theta_ref live: ``None`` means next to each parameter."""
        return "cpu" if self.config.lwf_state_device == "cpu" else None

    def _snapshot(self, model, out=None):
        """theta_ref: a copy of the trainable weights (under ZeRO-3, of this rank's slices), into ``out`` if given."""
        if self.deepspeed_stage == 3:
            return deepspeed_support.snapshot_partitions(fisher_lib.trainable_parameters(model), out=out)
        if out is not None:
            return fisher_lib.snapshot(model, out=out)
        return fisher_lib.snapshot(model, device=self._state_device)

    # ----------------------------------------------------------------------------------- learning steps
    def update_fisher(
        self, model, step: int, grad_scale: float | torch.Tensor = 1.0, grads: dict | None = None,
        fetch: Callable[[str, torch.nn.Parameter], torch.Tensor] | None = None,
    ) -> None:
        """Fold this step's gradients (divided by ``grad_scale``) into the online Fisher, on the device, no host sync.

        ``LWFTrainer`` calls it before gradient clipping (bf16/fp32), or after an fp16 step that was not skipped with
        ``grad_scale`` the clipping coefficient (the gradients are then unscaled and clipped; dividing by the
        coefficient gives the pre-clip ones). The callback alone calls it from ``on_optimizer_step``, after clipping
        (a callback sees no earlier gradients). Steps the optimizer skipped (fp16 overflow) contribute nothing.
        Every trainable parameter has an entry from the first step on; one without a gradient decays with g = 0.
        ``grads``: the gradients when they are not in ``p.grad`` (DeepSpeed's partitioned buffers, read by
        ``LWFTrainerMixin`` before the engine's step). ``fetch(name, param)``: instead of ``grads``, returns one
        parameter's gradient (ZeRO-2: a whole fp32 gradient, gathered on demand); each is folded into ``F`` before
        the next is fetched, so one whole gradient is held at a time. Same result as ``grads``, bf16 rounding too.
        """
        if not self.wants_online_fisher() or self._fisher_step == step:
            return
        self._fisher_step = step
        params = fisher_lib.trainable_parameters(model)
        if grads is None and fetch is None:
            grads = {n: p.grad for n, p in params.items()}
        dtype = getattr(torch, self.config.lwf_fisher_dtype)
        lwf = self.lwf_state
        if not lwf.fisher:  # under ZeRO-3 a parameter holds no data: F is laid out like this rank's gradient slices
            layout = grads if self.deepspeed_stage == 3 else params
            lwf.fisher = fisher_lib.zeros_like_parameters(layout, dtype=dtype, device=self._state_device)
        options = dict(decay=self.config.lwf_fisher_decay, dtype=dtype, device=self._state_device,
                       grad_scale=grad_scale, seed=self.config.lwf_seed + lwf.fisher_updates)
        if fetch is None:
            fisher_lib.online_fisher_update_(lwf.fisher, grads, **options)
        else:  # F's entries exist already: each decays exactly once, with its own gradient
            for index, name in enumerate(lwf.fisher):
                grad = fetch(name, params[name])
                fisher_lib.online_fisher_update_({name: lwf.fisher[name]}, {name: grad}, index_offset=index, **options)
                del grad
        lwf.fisher_updates += 1

    def skip_fisher_step(self, step: int) -> None:
        """Leave F untouched for ``step`` (its gradients are not finite), also if asked again for it."""
        self._fisher_step = step

    def wants_online_fisher(self) -> bool:
        return self.config.lwf_schedule == "periodic" and self.config.lwf_fisher == "online"

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # eta of c(x): the rate of the step just taken (the scheduler steps only after this event).
        raw = getattr(optimizer, "optimizer", optimizer)
        self._step_lrs = [group["lr"] for group in raw.param_groups] if raw is not None else None
        self._step_lr = self._step_lrs[0] if self._step_lrs else args.learning_rate
        if getattr(optimizer, "step_was_skipped", False):
            self._fisher_step = state.global_step
            return
        coefficient, self._clip_coefficient = self._clip_coefficient, None
        self.update_fisher(model, state.global_step, grad_scale=1.0 if coefficient is None else coefficient)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                    train_dataloader=None, **kwargs):
        every = self.config.lwf_unlearn_every
        if self.config.lwf_schedule != "periodic" or state.global_step == 0 or state.global_step % every:
            return
        lr = self._step_lr if self._step_lr is not None else args.learning_rate
        try:
            self._unlearning_point(args, state, model, optimizer, train_dataloader, lr)
        except Exception as err:
            raise LWFUnlearningError(_failure_message(state.global_step, err)) from err
        control.should_log = True

    # ------------------------------------------------------------------------------- unlearning points
    def _unlearning_point(self, args, state, model, optimizer, train_dataloader, lr: float) -> None:
        config, lwf = self.config, self.lwf_state
        point = lwf.unlearn_points + 1
        rescore = config.lwf_rescore_every > 0 and (point - 1) % config.lwf_rescore_every == 0
        if point == 1 or rescore or not lwf.scores:
            # w, M * F, D and the bias correction are formed per parameter block inside scoring (fisher.ScoringTerms).
            if config.lwf_fisher == "online":
                fisher_lib.check_finite(lwf.fisher)
                fisher, scale = lwf.fisher, fisher_lib.bias_correction(lwf.fisher_updates, config.lwf_fisher_decay)
            else:
                examples = self._learning_examples(train_dataloader, model, seed=config.lwf_seed + point)
                if self.deepspeed_stage == 3:  # this rank's slices only
                    fisher, scale = deepspeed_support.empirical_fisher_partitions(
                        model, examples, batch_size=config.lwf_fisher_batch_size,
                        chunk_elements=config.lwf_score_chunk_size), 1.0
                else:
                    (fisher, _), scale = fisher_lib.empirical_fisher(
                        model, examples, batch_size=config.lwf_fisher_batch_size,
                        chunk_elements=config.lwf_score_chunk_size, with_mean=False,
                        loss_scale=_loss_scale(optimizer),
                    ), 1.0
            terms_class = deepspeed_support.PartitionTerms if self.deepspeed_stage == 3 else fisher_lib.ScoringTerms
            terms = terms_class.from_state(
                fisher, model=model, reference=lwf.reference, scale=scale, mask_ratio=config.lwf_mask_ratio
            )
            self._score_and_select(args, model, terms, lr, seed=config.lwf_seed + point,
                                   loss_scale=_loss_scale(optimizer))
        self._unlearn(args, model, optimizer, config.lwf_unlearn_steps)
        lwf.unlearn_points = point
        lwf.reference = self._snapshot(model, out=lwf.reference)  # in place: no second copy of theta_ref
        self._finish_point(state.global_step)

    def _early_unlearning(self, args, state, model, optimizer, train_dataloader) -> None:
        """The ``early`` ablation: all ascent steps before fine-tuning, scored with the empirical Fisher."""
        config = self.config
        examples = self._learning_examples(train_dataloader, model, seed=config.lwf_seed)
        curvature, delta = fisher_lib.empirical_fisher(model, examples, batch_size=config.lwf_fisher_batch_size,
                                                       chunk_elements=config.lwf_score_chunk_size,
                                                       loss_scale=_loss_scale(optimizer))
        for g in delta.values():
            g.mul_(-args.learning_rate)  # D = -eta * mean learning gradient, in place
        terms = fisher_lib.ScoringTerms.from_state(curvature, delta=delta, mask_ratio=config.lwf_mask_ratio)
        self._score_and_select(args, model, terms, args.learning_rate, seed=config.lwf_seed,
                               loss_scale=_loss_scale(optimizer))
        del curvature, delta, terms
        periods = max(1, state.max_steps // config.lwf_unlearn_every) if state.max_steps > 0 else 1
        self._unlearn(args, model, optimizer, config.lwf_unlearn_steps * periods)
        self.lwf_state.unlearn_points = 1
        self.lwf_state.reference = self._snapshot(model, out=self.lwf_state.reference)
        self._finish_point(state.global_step)

    def _score_and_select(self, args, model, terms, lr: float, seed: int, loss_scale: float = 1.0) -> None:
        config, lwf = self.config, self.lwf_state
        start = time.perf_counter()
        scores = score_self_data(
            model, self.self_data, self._pad_id, terms, None, lr,
            mode=config.lwf_confidence, batch_size=config.lwf_score_batch_size, show_progress=_show_progress(args),
            chunk_elements=config.lwf_score_chunk_size, loss_scale=loss_scale,
        )
        finite = torch.isfinite(scores)
        if not finite.all():
            logger.warning(f"LWF: {int((~finite).sum())} samples got a non-finite confidence; they are never selected.")
        # JSON has no NaN: the state records non-finite scores as -1e30 (selection used the real values).
        lwf.scores = torch.where(finite, scores, torch.full_like(scores, -1e30)).tolist()
        self._select(scores, seed)
        valid = scores[finite] if finite.any() else torch.zeros(1)
        self._metrics.update({
            "lwf/num_selected": float(len(lwf.forget_indices)),
            "lwf/confidence_mean": float(valid.mean()),
            "lwf/confidence_max": float(valid.max()),
            "lwf/confidence_min": float(valid.min()),
            "lwf/score_seconds": time.perf_counter() - start,
        })

    def _select(self, scores: torch.Tensor, seed: int) -> None:
        """D_U from ``scores`` under the current selection settings, with a fresh sampler over it."""
        config, lwf = self.config, self.lwf_state
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

    def _unlearn(self, args, model, optimizer, steps: int) -> None:
        lwf = self.lwf_state
        start = time.perf_counter()
        if not lwf.forget_indices:
            lwf.empty_selections += 1
            lwf.idle_points += 1
            logger.warning("LWF: D_U is empty after selection (no confidence above the threshold); nothing unlearned.")
            self._metrics.update({"lwf/forget_loss": float("nan"), "lwf/ascent_steps": 0.0, "lwf/unlearn_seconds": 0.0})
            return
        rates = self._ascent_rates(args, optimizer)
        step_optimizer = (self._unlearning_optimizer(args, model, optimizer, rates)
                          if self.deepspeed_stage is None else None)
        device = input_device(model)
        loss_scale = _loss_scale(optimizer)
        losses, dropped, applied = [], 0, 0
        for _ in range(steps):
            positions = self._sampler.next_batch(self.config.lwf_unlearn_batch_size)
            rows = [self.self_data[lwf.forget_indices[p]] for p in positions]
            batch = {k: v.to(device) for k, v in collate_self_data(rows, self._pad_id).items()}
            if self.deepspeed_stage is not None:  # sgd only (checked at construction), through the engine's buffers
                result = deepspeed_support.ascent_step(
                    model, fisher_lib.trainable_parameters(model), batch, lr=self.config.lwf_unlearn_lr,
                    coef=self.config.lwf_unlearn_coef, loss_cap=self.config.lwf_forget_loss_cap,
                    max_grad_norm=args.max_grad_norm,
                )
            else:
                with _learning_rates(step_optimizer, rates if self.config.lwf_unlearn_optimizer == "shared" else None):
                    result = ascent_step(
                        model, batch, step_optimizer, coef=self.config.lwf_unlearn_coef,
                        loss_cap=self.config.lwf_forget_loss_cap, max_grad_norm=args.max_grad_norm,
                        loss_scale=loss_scale,
                    )
            losses.append(result["forget_loss"])
            dropped += len(rows) - result["kept"]
            lwf.skipped_steps += result["skipped"]
            applied += result["applied"]
        lwf.unlearn_steps += applied
        if not applied:
            lwf.idle_points += 1
            logger.warning(
                f"LWF: none of the {steps} ascent steps of this unlearning point was applied (every sample already "
                f"above lwf_forget_loss_cap={self.config.lwf_forget_loss_cap}, or non-finite losses/gradients)."
            )
        lwf.sampler = self._sampler.state_dict()
        finite = [x for x in losses if math.isfinite(x)]
        self._metrics.update({
            "lwf/forget_loss": sum(finite) / len(finite) if finite else float("nan"),
            "lwf/capped_samples": float(dropped),
            "lwf/ascent_steps": float(applied),
            "lwf/unlearn_seconds": time.perf_counter() - start,
        })

    def _ascent_rates(self, args, optimizer) -> list[float]:
        """eta of the ascent, per param group of the learning optimizer: the rate of the step just taken.

        Never the scheduler's next value (0 at the end of a decaying schedule). Before any step (the ``early``
        schedule) and where the step just taken had rate 0 (the first step of a warm-up from 0), the group's
        configured peak: the scheduler's ``initial_lr`` (the group's ``lr`` without a scheduler), so a counted
        ascent step always moves the weights, while a group configured at rate 0 stays where it is."""
        raw = getattr(optimizer, "optimizer", optimizer)
        groups = raw.param_groups if raw is not None else [{}]
        peaks = [float(group.get("initial_lr", group.get("lr", args.learning_rate))) for group in groups]
        rates = self._step_lrs if self._step_lrs is not None else [0.0] * len(peaks)
        return [float(lr) if lr > 0 else peak for lr, peak in zip(rates, peaks)]

    def _unlearning_optimizer(self, args, model, optimizer, rates: list[float]):
        """What takes the ascent step (see ``lwf_unlearn_optimizer``)."""
        choice = self.config.lwf_unlearn_optimizer
        if choice == "sgd":
            if self._sgd is None:
                params = list(fisher_lib.trainable_parameters(model).values())
                self._sgd = torch.optim.SGD(params, lr=self.config.lwf_unlearn_lr)
            return self._sgd
        if choice == "preconditioned":
            params = list(fisher_lib.trainable_parameters(model).values())
            return PreconditionedAscent(optimizer, params, coef=self.config.lwf_unlearn_coef, lrs=rates)
        # 'shared': the raw torch optimizer (accelerate's wrapper would unscale our unscaled gradients under fp16),
        # stepped at `rates` (see _learning_rates); it writes the ascent gradient into AdamW's moments and step count.
        return getattr(optimizer, "optimizer", optimizer)

    def _learning_examples(self, train_dataloader, model, seed: int) -> list[dict[str, torch.Tensor]]:
        """``lwf_fisher_samples`` single-example batches of the learning data, drawn without touching its sampler."""
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                "`lwf_fisher='empirical'` and `lwf_schedule='early'` need a map-style train dataset to draw "
                "learning examples from."
            )
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[: self.config.lwf_fisher_samples].tolist()
        device = input_device(model)
        examples = []
        for i in indices:
            batch = train_dataloader.collate_fn([dataset[i]])
            if "labels" not in batch:
                raise ValueError("The empirical Fisher needs `labels` in the learning batches (use a LM collator).")
            examples.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return examples

    def _finish_point(self, step: int) -> None:
        lwf = self.lwf_state
        self._metrics["lwf/skipped_steps"] = float(lwf.skipped_steps)
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in self._metrics.items()}}
        lwf.history.append(record)
        logger.info(
            f"LWF unlearning point {lwf.unlearn_points} at step {step}: |D_U|={len(lwf.forget_indices)} "
            f"forget_loss={self._metrics.get('lwf/forget_loss', float('nan')):.4f} "
            f"ascent_steps={int(self._metrics.get('lwf/ascent_steps', 0))} (total {lwf.unlearn_steps}) "
            f"skipped={lwf.skipped_steps}"
        )

    # ------------------------------------------------------------------------------ logging and saving
    def pop_metrics(self) -> dict[str, float]:
        """The ``lwf/*`` scalars gathered since the last log (``LWFTrainer.log`` merges them)."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.pop_metrics()
        if metrics and logs is not None:
            logs.update(metrics)
            if state.log_history:
                state.log_history[-1].update(metrics)

    def state_is_partitioned(self) -> bool:
        """Whether F and theta_ref are held in parts across ranks (FSDP2 shards, ZeRO-3 slices): saving is collective."""
        return self.lwf_state.is_sharded() or self.deepspeed_stage == 3

    def save_state(self, args, directory: str, step: int, create: bool = False, model=None) -> None:
        """Write D_self, the LWF state and ``lwf_config.json`` into a checkpoint folder (main process only).

        Under FSDP and ZeRO-3 every rank must call it: the sharded F and theta_ref are gathered (one tensor at a time)
        for the main process to write, so the checkpoint holds whole tensors whatever the world size (ZeRO-3 needs
        ``model`` for the parameters' shapes). ``create``: make the
        folder if it does not exist yet (FSDP's sharded checkpoints write the model only after ``save_model``)."""
        if self._saved_step == step:
            return
        tensors = None
        if self.deepspeed_stage == 3:  # every rank: each tensor all-gathered whole for the main process
            params = fisher_lib.trainable_parameters(model)
            tensors = {f"{group}/{name}": tensor for group in ("fisher", "reference") for name, tensor in
                       deepspeed_support.gather_partitions(getattr(self.lwf_state, group), params,
                                                           keep=args.should_save).items()}
            self._saved_step = step
        elif self.lwf_state.is_sharded():
            tensors = self.lwf_state.tensors_for_saving(keep=args.should_save)
            self._saved_step = step
        digest = None  # of the weights saved with this state; collective when the model is partitioned
        writes = args.should_save and (create or os.path.isdir(directory))
        if model is not None and (writes or self.state_is_partitioned()):
            digest = checkpoints.weights_sha256(model, zero3=self.deepspeed_stage == 3, keep=args.should_save)
        if not writes:
            return
        if self.self_data is not None:  # a copy per checkpoint: the folder alone is enough to resume (multi-node)
            with _quiet_datasets():
                self.self_data.save_to_disk(os.path.join(directory, SELF_DATA_DIR))
        self.lwf_state.save(directory, tensors, weights_sha256=digest or "")
        write_config(directory, self.config.lwf_dict(), self.lwf_state.run_summary())
        self._saved_step = step

    def on_train_end(self, args, state, control, **kwargs):
        lwf = self.lwf_state
        if lwf.unlearn_steps and not lwf.idle_points:
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

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.save_state(args, folder, state.global_step, model=model)
        if not self.via_trainer:  # LWFTrainer marks its checkpoints itself, before it rotates them
            checkpoints.mark_complete(args, folder, state.global_step)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not self.state_is_partitioned():  # runs on rank 0 only: no gather here (save_model did it on every rank)
            self.save_state(args, checkpoint, state.global_step, model=model)
        if model is not None and hasattr(model, "add_model_tags"):
            model.add_model_tags(MODEL_TAGS)
        if args.should_save:
            write_config(args.output_dir, self.config.lwf_dict(), self.lwf_state.run_summary())
        if not self.via_trainer:
            install_card_section(lwf_card_section(self))


@contextlib.contextmanager
def _quiet_datasets():
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


# Fields that change only how fast or where the work runs, never its result.
_RUNTIME_FIELDS = ("lwf_generation_batch_size", "lwf_score_batch_size", "lwf_score_chunk_size", "lwf_state_device")


def _trainer_resume_path() -> str | None:
    """The checkpoint the running ``Trainer`` resumed from, read from its training loop's arguments.

    A callback is not given the path; ``Trainer._inner_training_loop`` (which calls ``on_train_begin``) holds it
    as its ``resume_from_checkpoint`` argument, already resolved from ``True``. ``None`` when it is not found."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop" and "resume_from_checkpoint" in frame.f_code.co_varnames:
                path = frame.f_locals.get("resume_from_checkpoint")
                return path if isinstance(path, (str, os.PathLike)) else None
            frame = frame.f_back
        return None
    finally:
        del frame


def _sharded_engine(args) -> str | None:
    """The sharded training engine ``args`` (or the accelerate launcher) selects, if any."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return "DeepSpeed"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def _fsdp_offloads(args, model=None) -> bool:
    """Whether FSDP is asked to (or does) keep the parameter shards on the host: the ``offload`` option of
    ``TrainingArguments.fsdp``, ``offload_params``/``cpu_offload`` in ``fsdp_config``, accelerate's
    ``FSDP_OFFLOAD_PARAMS``, or a sharded parameter held on the CPU of a mesh that computes elsewhere."""
    options = getattr(args, "fsdp", None) or []
    if isinstance(options, str):
        options = options.split()
    options = [getattr(o, "value", o) for o in options] if isinstance(options, (list, tuple)) else []
    config = getattr(args, "fsdp_config", None) or {}
    if "offload" in options or any(config.get(k) in (True, "true", "True") for k in
                                   ("offload_params", "cpu_offload", "fsdp_offload_params")):
        return True
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        return True
    if model is None:
        return False
    return any(is_sharded(p) and p.to_local().device.type == "cpu" and p.device_mesh.device_type != "cpu"
               for p in model.parameters())


@contextlib.contextmanager
def _learning_rates(optimizer, rates: list[float] | None):
    """Set the param groups' ``lr`` to ``rates`` for the ``shared`` ascent step, then put the scheduler's back."""
    if rates is None:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def _loss_scale(optimizer) -> float:
    """The fp16 loss scale of the learning step (accelerate's GradScaler), or 1 under bf16/fp32."""
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


def _show_progress(args) -> bool:
    return not args.disable_tqdm and args.process_index == 0
