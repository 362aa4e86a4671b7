"""Run reports: ``report.json`` and PNG plots (learning loss, forget loss, confidence histogram).

Plots use matplotlib's non-interactive ``Agg`` backend (``pip install "hf_lwf[demo]"``); without matplotlib,
:func:`write_plots` skips them with a warning and the JSON report is still written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

REPORT_JSON = "report.json"
LEARNING_LOSS_PNG = "learning_loss.png"
FORGET_LOSS_PNG = "forget_loss.png"
CONFIDENCE_PNG = "confidence_histogram.png"


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/inf become ``None``, tensors and arrays lists, unknown objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def write_report(path: str, report: Mapping[str, Any]) -> str:
    """Write ``report`` as indented, strict JSON (``allow_nan=False``) to ``path``; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(jsonable(report), handle, indent=2, allow_nan=False)
        handle.write("\n")
    return path


def loss_curve(log_history: Sequence[Mapping[str, Any]], key: str = "loss") -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the training-loss entries (``key``) of a ``trainer.state.log_history``."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(value))
    return steps, values


def final_loss(log_history: Sequence[Mapping[str, Any]]) -> float | None:
    """The last logged training loss (the mean over the last logging window), or ``None``."""
    _, values = loss_curve(log_history)
    return values[-1] if values else None


def forget_curve(history: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """``(steps, lwf/forget_loss)`` per unlearning point of an ``LWFState.history``."""
    return loss_curve(history, key="lwf/forget_loss")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('Plots need matplotlib: pip install "hf_lwf[demo]" (or pip install matplotlib).') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_learning_loss(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str,
    title: str | None = None,
    unlearn_steps: Sequence[int] = (),
) -> str:
    """One line per run: learning-task training loss against the optimizer step (unlearning points dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (steps, values) in curves.items():
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    for i, step in enumerate(unlearn_steps):
        ax.axvline(step, linestyle=":", color="tab:red", alpha=0.6, label="LWF unlearning point" if i == 0 else None)
    _integer_axis(ax.xaxis)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning-task loss")
    ax.set_title(title or "Learning-task training loss")
    ax.grid(alpha=0.3)
    if any(steps for steps, _ in curves.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_forget_loss(history: Sequence[Mapping[str, Any]], path: str, cap: float | None = None) -> str:
    """Forget loss (mean response loss of the D_U batch before each ascent step) per unlearning point."""
    plt = _pyplot()
    steps, values = forget_curve(history)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if steps:
        ax.plot(steps, values, marker="o", color="tab:red", label="forget loss (D_U, before ascent)")
    else:
        ax.text(0.5, 0.5, "no unlearning point reached", ha="center", va="center", transform=ax.transAxes)
    if cap is not None:
        ax.axhline(cap, linestyle="--", color="gray", label=f"loss cap {cap:g}")
    _integer_axis(ax.xaxis)
    ax.set_xlabel("optimizer step (unlearning point)")
    ax.set_ylabel("forget loss")
    ax.set_title("LWF forget loss per unlearning point")
    ax.grid(alpha=0.3)
    if steps or cap is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confidence_histogram(scores: Sequence[float], selected: Sequence[int], path: str, bins: int = 30) -> str:
    """Histogram of the forgetting confidence c(x) over D_self; the selected D_U is drawn on top in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    finite = [s for s in scores if math.isfinite(s)]
    if finite:
        low, high = min(finite), max(finite)
        if low == high:
            low, high = low - 0.5, high + 0.5
        edges = [low + (high - low) * i / bins for i in range(bins + 1)]
        chosen = set(selected)
        kept = [s for i, s in enumerate(scores) if i not in chosen and math.isfinite(s)]
        forgotten = [scores[i] for i in sorted(chosen) if math.isfinite(scores[i])]
        ax.hist(kept, bins=edges, color="tab:blue", alpha=0.7, label=f"kept ({len(kept)})")
        ax.hist(forgotten, bins=edges, color="tab:red", alpha=0.8, label=f"selected D_U ({len(forgotten)})")
        ax.axvline(0.0, linestyle="--", color="gray", linewidth=1)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no scores (no unlearning point reached)", ha="center", va="center", transform=ax.transAxes)
    _integer_axis(ax.yaxis)
    ax.set_xlabel("forgetting confidence c(x)")
    ax.set_ylabel("self-generated samples")
    ax.set_title("Forgetting confidence over D_self")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    output_dir: str,
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    lwf_state=None,
    cap: float | None = None,
) -> list[str]:
    """Write the three PNGs into ``output_dir`` (the LWF ones only when ``lwf_state`` is given).

    Returns the written paths; without matplotlib, logs a warning and returns ``[]``.
    """
    try:
        _pyplot()
    except ImportError as err:
        logger.warning(f"{err} Skipping the plots.")
        return []
    os.makedirs(output_dir, exist_ok=True)
    marks = [int(h["step"]) for h in lwf_state.history] if lwf_state is not None else []
    paths = [plot_learning_loss(curves, os.path.join(output_dir, LEARNING_LOSS_PNG), unlearn_steps=marks)]
    if lwf_state is not None:
        paths.append(plot_forget_loss(lwf_state.history, os.path.join(output_dir, FORGET_LOSS_PNG), cap=cap))
        paths.append(
            plot_confidence_histogram(lwf_state.scores, lwf_state.forget_indices, os.path.join(output_dir, CONFIDENCE_PNG))
        )
    return paths


def lwf_summary(run, text_chars: int = 200) -> dict[str, Any]:
    """What an LWF run (an :class:`~hf_lwf.run.LWFRun`, or the callback holding one) did: D_self sizes, unlearning
    points, scores, the selected D_U and the samples actually unlearned (text truncated)."""
    run = getattr(run, "run", run)
    state = run.state
    summary: dict[str, Any] = {
        "config": run.config.lwf_dict() if run.config is not None else None,
        "self_data_sizes": dict(state.self_data_sizes),
        "unlearn_points": state.unlearn_points,
        "unlearn_steps": state.unlearn_steps,
        "skipped_steps": state.skipped_steps,
        "history": list(state.history),
        "scores": list(state.scores),
        "forget_indices": list(state.forget_indices),
        "unlearned": {int(i): n for i, n in state.unlearned.items()},
    }
    data = run.self_data
    if data is not None and state.unlearned:
        summary["forgotten"] = [
            {
                "index": i,
                "task": data[i]["task"],
                "confidence": state.scores[i] if i < len(state.scores) else None,
                "ascent_steps": state.unlearned[str(i)],
                "prompt": data[i]["prompt"],
                "text": data[i]["text"][:text_chars],
            }
            for i in sorted(int(k) for k in state.unlearned)
        ]
    return summary
