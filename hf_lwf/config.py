"""Configuration of Learning With Forgetting: one set of ``lwf_*`` fields.

The fields are declared once, on :class:`LWFConfig`. :class:`LWFTrainingArguments` inherits them next to
every :class:`~transformers.TrainingArguments` field, so ``HfArgumentParser``, ``to_dict()``, the saved
training arguments, the command line and the README table all read the same definitions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from transformers import TrainingArguments


# Fields that change what the self-generated data D_self contains; a change forces regeneration on resume.
GENERATION_FIELDS = (
    "lwf_forget_prompts",
    "lwf_forget_prompt_column",
    "lwf_samples_per_prompt",
    "lwf_max_new_tokens",
    "lwf_temperature",
    "lwf_top_p",
    "lwf_seed",
)

# What a changed value does on resume (hf_lwf.callback): a selection field re-selects D_U from the stored scores, a
# scoring field makes the next unlearning point score D_self again, and a Fisher-state field is refused (the saved F
# was accumulated under the old value). Every other field applies from the next unlearning point.
SELECTION_FIELDS = (
    "lwf_forget_ratio",
    "lwf_forget_top_k",
    "lwf_confidence_threshold",
    "lwf_selection",
    "lwf_per_task_selection",
)
SCORING_FIELDS = ("lwf_confidence", "lwf_mask_ratio", "lwf_fisher_samples")
FIXED_ON_RESUME_FIELDS = ("lwf_fisher", "lwf_fisher_decay", "lwf_fisher_dtype", "lwf_schedule")


@dataclass
class LWFConfig:
    """Settings of Learning With Forgetting (LWF).

    Step numbers refer to ``docs/method.md``: self-generation (1), Fisher and intended update (2), forgetting
    confidence (3), selection of the forget set D_U (4), periodic bounded gradient ascent (5).
    """

    lwf_forget_prompts: Union[list[str], str, dict, None] = field(
        default=None,
        metadata={
            "help": "Prompts of the forgetting task(s): a list of prompt strings, a .txt/.json/.jsonl/.csv/.parquet "
            "file, a datasets.Dataset, or a Hub dataset id. Several files or a dict {task name: source} (JSON on "
            "the command line) give the mixed setting, one task each."
        },
    )
    lwf_forget_prompt_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column holding the prompt in tabular sources. Default: the first of prompt, question, "
            "instruction, text that exists."
        },
    )
    lwf_samples_per_prompt: int = field(
        default=2, metadata={"help": "Step 1: responses K sampled from the model for every forgetting prompt."}
    )
    lwf_max_new_tokens: int = field(default=64, metadata={"help": "Step 1: maximum length of each response."})
    lwf_temperature: float = field(
        default=1.0, metadata={"help": "Step 1: sampling temperature; 0 means greedy decoding."}
    )
    lwf_top_p: float = field(default=0.95, metadata={"help": "Step 1: nucleus sampling probability mass."})
    lwf_generation_batch_size: int = field(
        default=8, metadata={"help": "Step 1: prompts per generate() call (left padded)."}
    )
    lwf_fisher: Literal["online", "empirical"] = field(
        default="online",
        metadata={
            "help": "Step 2: 'online' = running mean of squared learning gradients at every optimizer step (free); "
            "'empirical' = mean of squared per-sample gradients of lwf_fisher_samples learning examples."
        },
    )
    lwf_fisher_decay: float = field(
        default=0.95, metadata={"help": "Step 2: decay beta of the online Fisher (bias corrected)."}
    )
    lwf_fisher_samples: int = field(
        default=32, metadata={"help": "Step 2: learning examples for the empirical Fisher (and the early schedule)."}
    )
    lwf_mask_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Step 2: fraction rho of trainable entries kept by the update mask (top |F*D|); 1 disables it."
        },
    )
    lwf_confidence: Literal["deviation", "alignment"] = field(
        default="deviation",
        metadata={
            "help": "Step 3: 'deviation' = full quadratic c(x) = eta*a(x) + eta^2/2*n(x); 'alignment' = eta*a(x) "
            "only; both cost about the same scoring time. Default provisional: an exploratory sweep (old 16-step grid, "
            "test split) found no difference beyond seed noise; the dev-set pilot decides (docs/results.md)."
        },
    )
    lwf_confidence_threshold: float = field(
        default=0.0, metadata={"help": "Step 4: only samples with confidence above this value can be forgotten."}
    )
    lwf_forget_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "Step 4: fraction r of D_self forgotten (ceil(r*|D_self|)). Default 0.25 when lwf_forget_top_k "
            "is not set; set only one of the two. Default provisional: 0.1 and 0.5 were not better than 0.25 in an "
            "exploratory sweep (old 16-step grid, test split); the dev-set pilot decides (docs/results.md)."
        },
    )
    lwf_forget_top_k: Optional[int] = field(
        default=None, metadata={"help": "Step 4: forget a fixed number of samples instead of a ratio."}
    )
    lwf_selection: Literal["top", "bottom", "random", "all"] = field(
        default="top",
        metadata={
            "help": "Step 4: 'top' (highest confidence, the method); ablations 'bottom', 'random' (same size) and "
            "'all'."
        },
    )
    lwf_per_task_selection: bool = field(
        default=False,
        metadata={"help": "Step 4: in the mixed setting, apply ratio/top-k within each forgetting task."},
    )
    lwf_unlearn_every: int = field(
        default=50,
        metadata={
            "help": "Step 5: unlearn every N learning optimizer steps, starting at step N. Aim for at least 3 points "
            "per run: fewer points forget less. Default provisional: 3, 5 or 8 of 16 steps did not differ beyond "
            "seed noise in an exploratory sweep (old grid, test split); the dev-set pilot decides (docs/results.md)."
        },
    )
    lwf_unlearn_steps: int = field(
        default=1,
        metadata={
            "help": "Step 5: gradient-ascent steps per unlearning point. Default provisional: 3 was not better than 1 "
            "and mostly hit lwf_forget_loss_cap in an exploratory sweep (old grid, test split; docs/results.md)."
        },
    )
    lwf_unlearn_batch_size: int = field(default=4, metadata={"help": "Step 5: D_U samples per ascent step."})
    lwf_unlearn_coef: float = field(
        default=1.0,
        metadata={
            "help": "Step 5: weight lambda of the ascent loss. With 'preconditioned' it scales the step after clipping "
            "(each coordinate moves at most lambda*eta); under 'shared' it barely matters (Adam normalises the scale: "
            "0.1 forgot as much as 1 end to end, docs/results.md, defaults)."
        },
    )
    lwf_forget_loss_cap: float = field(
        default=5.0,
        metadata={
            "help": "Step 5: bounded ascent; samples whose loss already exceeds this cap are dropped from the batch."
        },
    )
    lwf_unlearn_optimizer: Literal["preconditioned", "sgd", "shared"] = field(
        default="preconditioned",
        metadata={
            "help": "Step 5: 'preconditioned' = +lambda*eta*g/max(sqrt(v_hat), |g|) with the learning AdamW's second "
            "moment v_hat read, never written (eta = learning rate of the step just taken; SGD: identity; other "
            "optimizers are refused); 'sgd' = a separate plain SGD with lwf_unlearn_lr; 'shared' = a step of the "
            "Trainer's optimizer at eta, which WRITES the ascent gradient into AdamW's moments and step count. "
            "Measured per ascent step on SmolLM2-135M (docs/results.md, optimizer probe, 2 seeds): preconditioned "
            "raised the forget loss 2.6x as much as shared (+1.58 against +0.61) and harmed the learning loss 18x less "
            "(+0.014 against +0.26); shared has cosine 0.60 with a momentum-only step. To be confirmed on dev data."
        },
    )
    lwf_unlearn_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Step 5: learning rate of the 'sgd' unlearning optimizer, required with it (with max_grad_norm "
            "clipping it bounds the step's norm). Measured on SmolLM2-135M full fine-tuning: 0.1 raises the forget "
            "loss as much as one shared-AdamW step; the learning rate (1e-4) does nothing (docs/results.md)."
        },
    )
    lwf_rescore_every: int = field(
        default=0,
        metadata={"help": "Steps 2-4: score and select D_U again every k unlearning points; 0 scores only once."},
    )
    lwf_schedule: Literal["periodic", "early"] = field(
        default="periodic",
        metadata={
            "help": "'periodic' (the method) or 'early' (ablation: the same number of ascent steps, all before "
            "fine-tuning, with the empirical Fisher)."
        },
    )
    lwf_score_batch_size: int = field(
        default=8,
        metadata={
            "help": "Step 3: self-generated samples per scoring batch; with lwf_fisher_batch_size it bounds the "
            "activations and fp32 logits held at once (memory model in docs/benchmarks.md)."
        },
    )
    lwf_fisher_batch_size: int = field(
        default=8,
        metadata={
            "help": "Step 2: learning examples per forward+backward of the empirical Fisher (lwf_fisher='empirical' "
            "and the 'early' schedule); lower it if that pass runs out of memory."
        },
    )
    lwf_score_chunk_size: int = field(
        default=1 << 25,
        metadata={
            "help": "Steps 2-3: most per-sample gradient numbers formed at once by scoring and the empirical Fisher "
            "(large weights such as lm_head are processed in row blocks of this size; 2**25 fp32 numbers = 128 MiB)."
        },
    )
    lwf_fisher_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "Step 2: storage dtype of the online Fisher F. 'bfloat16' halves its memory; it is updated in fp32 "
            "and rounded stochastically, so it keeps decaying at lwf_fisher_decay close to 1 (measured on SmolLM2: "
            "1.5e-4 relative score error, same ranking; docs/benchmarks.md)."
        },
    )
    lwf_state_device: Literal["auto", "cpu"] = field(
        default="auto",
        metadata={
            "help": "Where F and theta_ref live: 'auto' next to their parameters; 'cpu' in pinned host memory, which "
            "frees F and theta_ref on the accelerator at the cost of a non-blocking gradient copy to the host and one "
            "wait per step."
        },
    )
    lwf_seed: int = field(default=42, metadata={"help": "Seed of generation, selection and the D_U sampler."})

    def __post_init__(self):
        self._validate_lwf()
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()

    def _validate_lwf(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"`{name}` {message} (got {getattr(self, name)!r}).")

        positive_ints = (
            "lwf_samples_per_prompt",
            "lwf_max_new_tokens",
            "lwf_generation_batch_size",
            "lwf_fisher_samples",
            "lwf_unlearn_every",
            "lwf_unlearn_steps",
            "lwf_unlearn_batch_size",
            "lwf_score_batch_size",
            "lwf_fisher_batch_size",
            "lwf_score_chunk_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        choices = {
            "lwf_fisher": ("online", "empirical"),
            "lwf_confidence": ("deviation", "alignment"),
            "lwf_selection": ("top", "bottom", "random", "all"),
            "lwf_unlearn_optimizer": ("preconditioned", "sgd", "shared"),
            "lwf_schedule": ("periodic", "early"),
            "lwf_fisher_dtype": ("float32", "bfloat16"),
            "lwf_state_device": ("auto", "cpu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {', '.join(allowed)}")
        for f in lwf_fields():
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f.name, "must be a finite number")
        if self.lwf_temperature < 0:
            fail("lwf_temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.lwf_top_p <= 1:
            fail("lwf_top_p", "must be in (0, 1]")
        if not 0 <= self.lwf_fisher_decay < 1:
            fail("lwf_fisher_decay", "must be in [0, 1)")
        if not 0 < self.lwf_mask_ratio <= 1:
            fail("lwf_mask_ratio", "must be in (0, 1]; 1 disables the update mask")
        if self.lwf_forget_ratio is not None and self.lwf_forget_top_k is not None:
            raise ValueError(
                "`lwf_forget_ratio` and `lwf_forget_top_k` are contradictory: set only one of them "
                f"(got {self.lwf_forget_ratio!r} and {self.lwf_forget_top_k!r})."
            )
        if self.lwf_forget_ratio is not None and not 0 < self.lwf_forget_ratio <= 1:
            fail("lwf_forget_ratio", "must be in (0, 1]")
        top_k = self.lwf_forget_top_k
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            fail("lwf_forget_top_k", "must be a positive integer")
        if self.lwf_unlearn_coef <= 0:
            fail("lwf_unlearn_coef", "must be > 0")
        if self.lwf_forget_loss_cap <= 0:
            fail("lwf_forget_loss_cap", "must be > 0")
        if self.lwf_unlearn_lr is not None and self.lwf_unlearn_lr <= 0:
            fail("lwf_unlearn_lr", "must be > 0")
        if self.lwf_unlearn_lr is None and self.lwf_unlearn_optimizer == "sgd":
            raise ValueError(
                "`lwf_unlearn_lr` must be set with lwf_unlearn_optimizer='sgd'. A plain SGD step at the learning "
                "rate is far too small to unlearn anything (measured: +0.0006 forget loss per step at 1e-4 on a "
                "135M model, docs/results.md); 0.1 matched one shared-AdamW ascent step there."
            )
        if self.lwf_unlearn_lr is not None and self.lwf_unlearn_optimizer != "sgd":
            raise ValueError(
                "`lwf_unlearn_lr` only applies to `lwf_unlearn_optimizer='sgd'` "
                f"(got lwf_unlearn_optimizer={self.lwf_unlearn_optimizer!r})."
            )
        if self.lwf_rescore_every < 0:
            fail("lwf_rescore_every", "must be >= 0")
        if self.lwf_forget_prompts is not None and not _is_prompt_source(self.lwf_forget_prompts):
            fail("lwf_forget_prompts", "must be a list of strings, a path, a Hub dataset id, a dict, or a Dataset")

    @property
    def forget_amount(self) -> tuple[str, float]:
        """``("top_k", k)`` or ``("ratio", r)`` with the 0.25 default applied."""
        if self.lwf_forget_top_k is not None:
            return "top_k", self.lwf_forget_top_k
        return "ratio", 0.25 if self.lwf_forget_ratio is None else self.lwf_forget_ratio

    def lwf_dict(self) -> dict[str, Any]:
        """The ``lwf_*`` values as JSON-serialisable data (a Dataset is described, not dumped)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in lwf_fields()}

    def lwf_hash(self, names: tuple[str, ...] | None = None) -> str:
        """A stable hash of the ``lwf_*`` values (or only ``names``), used to detect a changed config on resume."""
        values = self.lwf_dict()
        if names is not None:
            values = {k: values[k] for k in names}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LWFTrainingArguments(LWFConfig, TrainingArguments):
    """:class:`~transformers.TrainingArguments` plus every ``lwf_*`` field of :class:`LWFConfig`."""

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(self.lwf_dict())
        return d


def lwf_fields() -> tuple[dataclasses.Field, ...]:
    """The ``lwf_*`` dataclass fields, in declaration order."""
    return dataclasses.fields(LWFConfig)


def config_from_args(args: Any) -> LWFConfig:
    """An :class:`LWFConfig` carrying the ``lwf_*`` values of ``args`` (``LWFTrainingArguments`` or ``LWFConfig``)."""
    return LWFConfig(**{f.name: getattr(args, f.name) for f in lwf_fields()})


def _is_prompt_source(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, str) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_prompt_source(v) for k, v in value.items())
    return type(value).__name__ in ("Dataset", "IterableDataset")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    fingerprint = getattr(value, "_fingerprint", None)
    return f"<{type(value).__name__} {fingerprint or len(value)}>"


def fields_markdown_table() -> str:
    """The README/docs table of every ``lwf_*`` field, generated from the dataclass (one source of truth)."""
    rows = ["| field | default | description |", "|---|---|---|"]
    for f in lwf_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default!r}` | {help_text} |")
    return "\n".join(rows)
