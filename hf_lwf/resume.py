"""Resuming an LWF run: which checkpoint folder the Trainer resumed from, and what changed settings mean.

Each ``lwf_*`` field declares what a changed value does on resume (``metadata["on_resume"]``, see
:data:`hf_lwf.config.ON_RESUME`); :func:`reconcile` applies those declarations to a saved state.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

from transformers.utils import logging

from .config import GENERATION_FIELDS, LWFConfig, fields_where
from .state import STATE_JSON, LWFState


logger = logging.get_logger(__name__)


@dataclass
class Reconciled:
    """What a resumed run must redo because settings changed since the checkpoint."""

    reselect: list[str] = field(default_factory=list)
    rescore: list[str] = field(default_factory=list)
    regenerate: list[str] = field(default_factory=list)


def reconcile(saved: LWFState, current: LWFState, config: LWFConfig, directory: str) -> Reconciled:
    """Compare the saved and the current ``lwf_*`` values and say what the resumed run redoes.

    ``fixed`` fields that changed are refused; under the ``early`` schedule, whose unlearning is over once a point
    ran, every field that shaped it is refused. The saved state takes the current config when the change is
    accepted.
    """
    if saved.config_hash == current.config_hash:
        return Reconciled()
    changed = sorted(k for k in current.config if saved.config.get(k) != current.config[k])
    fixed = [k for k in changed if k in fields_where("on_resume", "fixed")]
    if config.lwf_schedule == "early" and saved.unlearn_points:
        kept = fields_where("on_resume", "regenerate") + fields_where("on_resume", "runtime")
        fixed = [k for k in changed if k not in kept]
    if fixed:
        values = ", ".join(f"{k}: {saved.config.get(k)!r} -> {current.config[k]!r}" for k in fixed)
        raise ValueError(
            f"Resuming from {directory} with changed LWF settings that cannot apply to this run ({values}): the "
            "saved Fisher (or, for the early schedule, the unlearning already done) depends on them. Resume with "
            "the saved values (lwf_config.json in the checkpoint) or start a new run."
        )
    result = Reconciled(reselect=[k for k in changed if k in fields_where("on_resume", "reselect")],
                        rescore=[k for k in changed if k in fields_where("on_resume", "rescore")],
                        regenerate=[k for k in changed if k in GENERATION_FIELDS])
    rest = [k for k in changed if k not in result.reselect + result.rescore + result.regenerate]
    what = []
    if result.rescore and saved.scores:
        what.append(f"{', '.join(result.rescore + result.reselect)}: D_self is scored and D_U selected again at the "
                    "next unlearning point")
    elif result.reselect and saved.scores:
        what.append(f"{', '.join(result.reselect)}: D_U is re-selected now from the stored scores")
    elif result.rescore or result.reselect:
        what.append(f"{', '.join(result.rescore + result.reselect)}: nothing was scored yet; they apply at the first "
                    "point")
    if rest:
        what.append(f"{', '.join(rest)}: applied from the next unlearning point")
    if result.regenerate:
        what.append("generation settings: D_self is regenerated")
    if what:
        logger.warning(f"The LWF config changed since {directory} was saved. " + "; ".join(what) + ".")
    saved.config, saved.config_hash = current.config, current.config_hash
    return result


def resume_directory(step: int, output_dir: str, *candidates: str | os.PathLike | None) -> str:
    """The checkpoint folder the Trainer resumed from.

    In order: the ``candidates`` (an explicit folder, the path ``LWFTrainer.train`` recorded), the path the running
    ``Trainer`` resumed from (:func:`trainer_resume_path`, for a bare callback), and ``output_dir/checkpoint-<step>``
    only when that folder holds the LWF state of this very step."""
    for directory in (*candidates, trainer_resume_path()):
        if directory:
            return str(directory)
    fallback = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.isfile(os.path.join(fallback, STATE_JSON)):
        return fallback
    raise ValueError(
        f"LWF cannot tell which checkpoint this run resumed from (global step {step}), and {fallback} has no LWF "
        "state: continuing would restart LWF. Pass the folder explicitly, LWFCallback(..., resume_from='<checkpoint "
        "folder>'), or train with hf_lwf.LWFTrainer."
    )


def trainer_resume_path() -> str | None:
    """The checkpoint the running ``Trainer`` resumed from, read from its training loop's arguments.

    The bare-callback fallback: a callback is not given the path; ``Trainer._inner_training_loop`` (which calls
    ``on_train_begin``) holds it as its ``resume_from_checkpoint`` argument, already resolved from ``True``. ``None``
    when it is not found."""
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
