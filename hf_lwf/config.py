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
import functools
import types
import typing
from typing import Any, Literal, Optional, Union

from transformers import TrainingArguments


# What a changed value does when a run resumes (``metadata["on_resume"]`` of each field; hf_lwf.resume applies it):
ON_RESUME = {
    "regenerate": "D_self is generated again from the current model",
    "reselect": "D_U is selected again from the stored scores",
    "rescore": "D_self is scored and D_U selected again at the next unlearning point",
    "fixed": "refused: the saved Fisher (or the unlearning already done) depends on it",
    "runtime": "changes only how fast or where the work runs, never its result",
    "next_point": "applies from the next unlearning point",
}


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
            "the command line) give the mixed setting, one task each.",
            "on_resume": "regenerate",
        },
    )
    lwf_forget_prompt_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column holding the prompt in tabular sources. Default: the first of prompt, question, "
            "instruction, text that exists.",
            "on_resume": "regenerate",
        },
    )
    lwf_samples_per_prompt: int = field(
        default=2,
        metadata={"help": "Step 1: responses K sampled from the model for every forgetting prompt.",
                  "on_resume": "regenerate", "min": 1},
    )
    lwf_max_new_tokens: int = field(
        default=64, metadata={"help": "Step 1: maximum length of each response.", "on_resume": "regenerate", "min": 1}
    )
    lwf_temperature: float = field(
        default=1.0, metadata={"help": "Step 1: sampling temperature; 0 means greedy decoding.", "on_resume": "regenerate"}
    )
    lwf_top_p: float = field(
        default=0.95, metadata={"help": "Step 1: nucleus sampling probability mass.", "on_resume": "regenerate"}
    )
    lwf_generation_batch_size: int = field(
        default=8,
        metadata={"help": "Step 1: prompts per generate() call (left padded).", "on_resume": "runtime", "min": 1},
    )
    lwf_fisher: Literal["online", "empirical"] = field(
        default="online",
        metadata={
            "help": "Step 2: 'online' = running mean of squared learning gradients at every optimizer step (free); "
            "'empirical' = mean of squared per-sample gradients of lwf_fisher_samples learning examples.",
            "on_resume": "fixed",
        },
    )
    lwf_fisher_decay: float = field(
        default=0.95,
        metadata={"help": "Step 2: decay beta of the online Fisher (bias corrected).", "on_resume": "fixed"},
    )
    lwf_fisher_samples: int = field(
        default=32,
        metadata={"help": "Step 2: learning examples for the empirical Fisher (and the early schedule).",
                  "on_resume": "rescore", "min": 1},
    )
    lwf_mask_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Step 2: fraction rho of trainable entries kept by the update mask: exactly round(rho*N) entries "
            "of largest |F*D|, ties broken by parameter name and index; 1 disables it.",
            "on_resume": "rescore",
        },
    )
    lwf_confidence: Literal["deviation", "alignment"] = field(
        default="deviation",
        metadata={
            "help": "Step 3: 'deviation' = full quadratic c(x) = sum over param groups of eta_g*a_g(x) + "
            "eta_g^2/2*n_g(x); 'alignment' = the first term only. Both cost about one forward+backward per batch.",
            "on_resume": "rescore",
        },
    )
    lwf_confidence_threshold: float = field(
        default=0.0,
        metadata={"help": "Step 4: only samples with confidence above this value can be forgotten.",
                  "on_resume": "reselect"},
    )
    lwf_forget_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "Step 4: fraction r of D_self forgotten (ceil(r*|D_self|)); 0.25 when lwf_forget_top_k is not "
            "set. Set only one of the two.",
            "on_resume": "reselect",
        },
    )
    lwf_forget_top_k: Optional[int] = field(
        default=None,
        metadata={"help": "Step 4: forget a fixed number of samples instead of a ratio.", "on_resume": "reselect"},
    )
    lwf_selection: Literal["top", "bottom", "random", "all"] = field(
        default="top",
        metadata={
            "help": "Step 4: 'top' (highest confidence, the method); ablations 'bottom', 'random' (same size) and "
            "'all'.",
            "on_resume": "reselect",
        },
    )
    lwf_per_task_selection: bool = field(
        default=False,
        metadata={"help": "Step 4: in the mixed setting, apply ratio/top-k within each forgetting task.",
                  "on_resume": "reselect"},
    )
    lwf_unlearn_every: int = field(
        default=50,
        metadata={
            "help": "Step 5: unlearn every N learning optimizer steps, starting at step N. Aim for at least 3 points "
            "per run: fewer points forget less.",
            "on_resume": "next_point", "min": 1,
        },
    )
    lwf_unlearn_steps: int = field(
        default=1,
        metadata={"help": "Step 5: gradient-ascent steps per unlearning point.", "on_resume": "next_point", "min": 1},
    )
    lwf_unlearn_batch_size: int = field(
        default=4, metadata={"help": "Step 5: D_U samples per ascent step.", "on_resume": "next_point", "min": 1}
    )
    lwf_unlearn_coef: float = field(
        default=1.0,
        metadata={
            "help": "Step 5: weight lambda of the ascent loss. With 'preconditioned' it scales the step after "
            "clipping (each coordinate moves at most lambda*eta).",
            "on_resume": "next_point",
        },
    )
    lwf_forget_loss_cap: float = field(
        default=5.0,
        metadata={
            "help": "Step 5: bounded ascent; samples whose loss already exceeds this cap are dropped from the batch.",
            "on_resume": "next_point",
        },
    )
    lwf_unlearn_optimizer: Literal["preconditioned", "sgd", "shared"] = field(
        default="preconditioned",
        metadata={
            "help": "Step 5: 'preconditioned' = +lambda*eta*g/max(sqrt(v_hat), |g|) with the learning optimizer's "
            "second moment v_hat read, never written (eta = learning rate of the step just taken, per param group; "
            "SGD: identity; other optimizers are refused); 'sgd' = a separate plain SGD with lwf_unlearn_lr; "
            "'shared' = a step of the Trainer's optimizer at eta, which WRITES the ascent gradient into its moments "
            "and step count. Measurements: docs/options.md.",
            "on_resume": "next_point",
        },
    )
    lwf_unlearn_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Step 5: learning rate of the 'sgd' unlearning optimizer, required with it (with max_grad_norm "
            "clipping it bounds the step's norm).",
            "on_resume": "next_point",
        },
    )
    lwf_rescore_every: int = field(
        default=0,
        metadata={"help": "Steps 2-4: score and select D_U again every k unlearning points; 0 scores only once.",
                  "on_resume": "next_point"},
    )
    lwf_schedule: Literal["periodic", "early"] = field(
        default="periodic",
        metadata={
            "help": "'periodic' (the method) or 'early' (ablation: the same number of ascent steps, all before "
            "fine-tuning, with the empirical Fisher).",
            "on_resume": "fixed",
        },
    )
    lwf_score_batch_size: int = field(
        default=8,
        metadata={
            "help": "Step 3: self-generated samples per scoring batch; it bounds the activations held at once "
            "(memory model: docs/method.md).",
            "on_resume": "runtime", "min": 1,
        },
    )
    lwf_fisher_batch_size: int = field(
        default=8,
        metadata={
            "help": "Step 2: learning examples per forward+backward of the empirical Fisher (lwf_fisher='empirical' "
            "and the 'early' schedule); lower it if that pass runs out of memory.",
            "on_resume": "next_point", "min": 1,
        },
    )
    lwf_score_chunk_size: int = field(
        default=1 << 25,
        metadata={
            "help": "Steps 2-3: most per-sample gradient numbers formed at once by scoring and the empirical Fisher "
            "(large weights such as lm_head are processed in row blocks of this size; 2**25 fp32 numbers = 128 MiB).",
            "on_resume": "runtime", "min": 1,
        },
    )
    lwf_fisher_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "Step 2: storage dtype of the online Fisher F. 'bfloat16' halves its memory; it is updated in fp32 "
            "and rounded stochastically, so it keeps decaying at lwf_fisher_decay close to 1.",
            "on_resume": "fixed",
        },
    )
    lwf_state_device: Literal["auto", "cpu"] = field(
        default="auto",
        metadata={
            "help": "Where F and theta_ref live: 'auto' next to their parameters; 'cpu' in pinned host memory, which "
            "frees F and theta_ref on the accelerator at the cost of a non-blocking gradient copy to the host and one "
            "wait per step.",
            "on_resume": "runtime",
        },
    )
    lwf_seed: int = field(
        default=42,
        metadata={"help": "Seed of generation, selection and the D_U sampler.", "on_resume": "regenerate"},
    )

    def __post_init__(self):
        self._validate_lwf()
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()

    def _validate_lwf(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"`{name}` {message} (got {getattr(self, name)!r}).")

        for f in lwf_fields():
            value = getattr(self, f.name)
            if "min" in f.metadata and (not isinstance(value, int) or isinstance(value, bool) or value < f.metadata["min"]):
                fail(f.name, "must be a positive integer")
            allowed = choices(f)
            if allowed and value not in allowed:
                fail(f.name, f"must be one of {', '.join(allowed)}")
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
                "`lwf_unlearn_lr` must be set with lwf_unlearn_optimizer='sgd': a plain SGD step at the learning rate "
                "is far too small to unlearn anything (docs/options.md)."
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

    def to_dict(self) -> dict[str, Any]:
        """The parent's ``to_dict()`` (``TrainingArguments`` when combined with it) with the ``lwf_*`` values as JSON
        data."""
        parent = super()
        data = parent.to_dict() if hasattr(parent, "to_dict") else {}
        data.update(self.lwf_dict())
        return data

    def lwf_hash(self, names: tuple[str, ...] | None = None) -> str:
        """A stable hash of the ``lwf_*`` values (or only ``names``), used to detect a changed config on resume."""
        values = self.lwf_dict()
        if names is not None:
            values = {k: values[k] for k in names}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class _FieldMetadata(dict):
    """A field's metadata that lists, as its keys, only what ``argparse.add_argument`` accepts.

    HfArgumentParser turns each field's metadata into ``add_argument`` keywords (``dict(field.metadata)``);
    ``on_resume`` and ``min`` are hf_lwf's own keys, read with ``field.metadata.get(...)``."""

    OWN_KEYS = ("on_resume", "min")

    def keys(self):
        return [k for k in super().keys() if k not in self.OWN_KEYS]


for _field in dataclasses.fields(LWFConfig):
    _field.metadata = types.MappingProxyType(_FieldMetadata(_field.metadata))


@dataclass
class LWFTrainingArguments(LWFConfig, TrainingArguments):
    """:class:`~transformers.TrainingArguments` plus every ``lwf_*`` field of :class:`LWFConfig`."""


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(LWFConfig)


def lwf_fields() -> tuple[dataclasses.Field, ...]:
    """The ``lwf_*`` dataclass fields, in declaration order."""
    return dataclasses.fields(LWFConfig)


def choices(f: dataclasses.Field) -> tuple[Any, ...]:
    """The values a ``Literal``-typed field allows (empty for other fields)."""
    kind = f.type if not isinstance(f.type, str) else _hints()[f.name]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def fields_where(key: str, value: Any) -> tuple[str, ...]:
    """Names of the ``lwf_*`` fields whose ``metadata[key]`` is ``value``, in declaration order."""
    return tuple(f.name for f in lwf_fields() if f.metadata.get(key) == value)


GENERATION_FIELDS = fields_where("on_resume", "regenerate")
SELECTION_FIELDS = fields_where("on_resume", "reselect")
SCORING_FIELDS = fields_where("on_resume", "rescore")
FIXED_ON_RESUME_FIELDS = fields_where("on_resume", "fixed")
RUNTIME_FIELDS = fields_where("on_resume", "runtime")


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
