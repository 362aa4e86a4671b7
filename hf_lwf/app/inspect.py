"""``hf-lwf inspect``: what LWF would forget, without committing to a full run.

It builds D_self, trains up to the run's first unlearning point (``lwf_unlearn_every`` steps, or ``inspect_steps``;
none under the ``early`` schedule) under the run's own learning-rate schedule, scores every self-generated sample
there exactly as that point of a real run would, and stops: no gradient ascent is applied and no model is saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from typing import Any

from ..callback import LWFCallback
from .report import jsonable
from ..trainer import LWFTrainer


INSPECT_JSON = "inspect.json"
INSPECT_JSONL = "inspect.jsonl"


def inspect_arguments(args, inspect_steps: int | None):
    """Copy of the training arguments for an inspection run: score where the run would first score, save nothing.

    The periodic schedule scores at its first unlearning point, after ``lwf_unlearn_every`` learning steps
    (``inspect_steps`` moves that point); the ``early`` schedule scores before any learning step."""
    if args.lwf_schedule == "early":
        if inspect_steps is not None:
            raise ValueError("`inspect_steps` does not apply to lwf_schedule='early': that schedule scores before the "
                             "first learning step, and so does its preview.")
        steps = 0
    else:
        steps = inspect_steps or args.lwf_unlearn_every
        if steps < 1:
            raise ValueError(f"`inspect_steps` must be a positive integer (got {steps}).")
        if args.max_steps > 0 and steps > args.max_steps:
            raise ValueError(f"`inspect_steps`={steps} exceeds `max_steps`={args.max_steps}: nothing would be scored.")
    changes = dict(save_strategy="no", eval_strategy="no", load_best_model_at_end=False, push_to_hub=False,
                   report_to=[])
    if steps:
        changes["lwf_unlearn_every"] = steps
    return dataclasses.replace(args, **changes), steps


def run_inspection(model, tokenizer, train_dataset, args, data_collator=None, inspect_steps: int | None = None) -> dict[str, Any]:
    """Score D_self where the previewed run would first score it, and return the ranked samples (see
    :func:`ranked_samples`). No ascent step is taken and nothing is saved.

    ``args`` is the :class:`~hf_lwf.LWFTrainingArguments` of the run being previewed; its schedule (``max_steps``
    or epochs, warmup, ``lwf_schedule``) is kept so the learning rate at the scoring point equals the real run's.
    """
    inspect_args, steps = inspect_arguments(args, inspect_steps)
    callback = LWFCallback(preview=True)
    trainer = LWFTrainer(
        model=model,
        args=inspect_args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    run = callback.run
    state = run.state
    if not state.scores:
        raise RuntimeError(f"No scoring happened within {steps} learning steps (the run ended at step "
                           f"{trainer.state.global_step}); lower `inspect_steps`.")
    record = state.history[-1] if state.history else {}
    return {
        "inspect_steps": steps,
        "schedule": run.config.lwf_schedule,
        "learning_rate": run.scoring_rates[0] if run.scoring_rates else None,
        "self_data_sizes": dict(state.self_data_sizes),
        "num_selected": len(state.forget_indices),
        "confidence": {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("lwf/confidence")},
        "lwf_config": run.config.lwf_dict(),
        "samples": ranked_samples(run.self_data, state.scores, state.forget_indices),
    }


def ranked_samples(self_data, scores, forget_indices) -> list[dict[str, Any]]:
    """Every self-generated sample, highest forgetting confidence first, with whether D_U selected it."""
    selected = set(forget_indices)
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return [
        {
            "rank": rank,
            "index": i,
            "task": self_data[i]["task"],
            "confidence": float(scores[i]),
            "selected": i in selected,
            "prompt": self_data[i]["prompt"],
            "text": self_data[i]["text"],
        }
        for rank, i in enumerate(order, start=1)
    ]


def format_table(samples: list[dict[str, Any]], limit: int | None = None, width: int = 70) -> str:
    """A plain-text ranked table: rank, task, confidence, selected?, and the response text (one line, truncated).

    With ``limit``, shows the top ``limit`` and the bottom ``limit`` rows (what is forgotten first and what is kept).
    """
    rows = samples
    skipped = 0
    if limit is not None and len(samples) > 2 * limit:
        rows = samples[:limit] + [None] + samples[-limit:]
        skipped = len(samples) - 2 * limit
    task_width = max([4] + [len(s["task"]) for s in samples])
    header = f"{'rank':>4}  {'task':<{task_width}}  {'confidence':>11}  {'forget':<6}  text"
    lines = [header, "-" * len(header)]
    for s in rows:
        if s is None:
            lines.append(f"{'...':>4}  ({skipped} more)")
            continue
        printable = "".join(c if c.isprintable() else " " for c in s["text"])
        text = textwrap.shorten(" ".join(printable.split()), width=width, placeholder=" ...") or "(empty)"
        lines.append(
            f"{s['rank']:>4}  {s['task']:<{task_width}}  {s['confidence']:>11.4g}  {'yes' if s['selected'] else 'no':<6}  {text}"
        )
    return "\n".join(lines)


def save_inspection(result: dict[str, Any], output_dir: str) -> tuple[str, str]:
    """Write ``inspect.json`` (summary and samples) and ``inspect.jsonl`` (one sample a line) into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, jsonl_path = os.path.join(output_dir, INSPECT_JSON), os.path.join(output_dir, INSPECT_JSONL)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(jsonable(result), handle, indent=2, allow_nan=False)
        handle.write("\n")
    with open(jsonl_path, "w", encoding="utf-8") as handle:
        for sample in result["samples"]:
            handle.write(json.dumps(jsonable(sample), allow_nan=False) + "\n")
    return json_path, jsonl_path
