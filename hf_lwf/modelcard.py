"""The LWF section of the model card, delivered through transformers' own model-card path."""

from __future__ import annotations

import statistics
from typing import Any

import transformers.modelcard as hf_modelcard


MODEL_TAGS = ["lwf", "hf-lwf"]
PAPER = {
    "title": "Graceful Forgetting in Generative Language Models",
    "id": "2505.19715",
    "url": "https://arxiv.org/abs/2505.19715",
}
PAPER_URL = PAPER["url"]
CITATION = """@inproceedings{jiang2025graceful,
  title     = {Graceful Forgetting in Generative Language Models},
  author    = {Jiang and Chan and Cai and Liu and Xue and Guo},
  booktitle = {Proceedings of EMNLP 2025 (main conference)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2505.19715}
}"""
_START, _END = "<!-- hf_lwf:start -->", "<!-- hf_lwf:end -->"


def card_data(run, examples: int = 3, width: int = 160) -> dict[str, Any]:
    """Plain data for :func:`lwf_card_section` from an :class:`~hf_lwf.run.LWFRun`: what the weights being saved went
    through (the adopted checkpoint's record under ``load_best_model_at_end``)."""
    config, lwf = run.config, run.described
    scores = [s for s in lwf.scores if s > -1e29]  # -1e30 marks a non-finite score in the state
    unlearned = sorted((int(i) for i in lwf.unlearned), key=lambda i: lwf.scores[i] if i < len(lwf.scores)
                       else float("-inf"), reverse=True)
    shown = []
    if run.self_data is not None and len(lwf.scores) == len(run.self_data):
        for index in unlearned[:examples]:
            text = " ".join(run.self_data[index]["text"].split())
            shown.append((run.self_data[index]["task"], text if len(text) <= width else text[: width - 1] + "…"))
    tasks = run.self_data["task"] if run.self_data is not None else None
    per_task_unlearned = {task: 0 for task in lwf.self_data_sizes}
    if tasks is not None:
        for index in unlearned:
            if index < len(tasks):
                per_task_unlearned[tasks[index]] = per_task_unlearned.get(tasks[index], 0) + 1
    selected = set(lwf.forget_indices)
    never_drawn = sorted(i for i in selected if str(i) not in lwf.drawn)
    always_capped = sorted(i for i in selected if str(i) in lwf.drawn and str(i) not in lwf.unlearned)
    return {
        "config": config.lwf_dict(), "forget_amount": config.forget_amount, "summary": run.summary(),
        "self_data_sizes": dict(lwf.self_data_sizes), "forget_sizes": dict(lwf.forget_sizes),
        "unlearned_sizes": per_task_unlearned, "never_drawn": len(never_drawn),
        "always_capped": len(always_capped),
        "confidence": ({"mean": statistics.fmean(scores), "min": min(scores), "max": max(scores)}
                       if scores else None),
        "examples": shown, "is_adapter": run.is_adapter,
    }


def lwf_card_section(data: dict[str, Any]) -> str:
    """Markdown saying what was forgotten, how much, and on what schedule, from :func:`card_data`."""
    config, summary = data["config"], data["summary"]
    kind, amount = data["forget_amount"]
    size_rule = f"top-k = {int(amount)}" if kind == "top_k" else f"ratio r = {amount}"
    method = f"*Learning With Forgetting* ([{PAPER['title']}]({PAPER['url']}), EMNLP 2025)"
    if summary["unlearn_steps"]:
        intro = (
            f"This model was fine-tuned with hf_lwf {method}: while it learned the training task, it unlearned, by "
            "bounded gradient ascent, its own answers to the forgetting task(s) below that a Fisher-weighted "
            "confidence score marked as conflicting with the training task."
        )
    else:
        intro = (
            f"This model was trained with hf_lwf {method} configured, but **no unlearning step was applied** "
            f"({summary['unlearn_points']} unlearning point(s) reached): nothing was forgotten, and it is plain "
            "fine-tuning."
        )
    lines = [_START, "## Learning With Forgetting", "", intro, ""]
    if summary.get("from_checkpoint_step") is not None:
        lines += [f"These weights are the best checkpoint's, of step {summary['from_checkpoint_step']} "
                  "(`load_best_model_at_end`); everything below describes that checkpoint.", ""]
    lines += [
        "| forgetting task | self-generated samples (D_self) | selected (D_U) | unlearned |",
        "|---|---|---|---|",
    ]
    for task, size in data["self_data_sizes"].items():
        lines.append(f"| {task} | {size} | {data['forget_sizes'].get(task, 0)} | "
                     f"{data['unlearned_sizes'].get(task, 0)} |")
    lines += ["", "*Unlearned*: the samples that entered an ascent step that moved the weights (under the loss cap)."]
    if data["never_drawn"] or data["always_capped"]:
        lines.append(f"Of the last D_U, {data['never_drawn']} sample(s) were never drawn into an ascent step and "
                     f"{data['always_capped']} were always above the loss cap when drawn: selected, not unlearned.")
    confidence = data["confidence"]
    if confidence:
        lines += [
            "",
            f"Forgetting confidence over D_self ({config['lwf_confidence']}): mean {confidence['mean']:.4g}, "
            f"min {confidence['min']:.4g}, max {confidence['max']:.4g}; threshold "
            f"{config['lwf_confidence_threshold']}, selection `{config['lwf_selection']}` with {size_rule}.",
        ]
    schedule = (
        f"every {config['lwf_unlearn_every']} optimizer steps, {config['lwf_unlearn_steps']} ascent step(s)"
        if config["lwf_schedule"] == "periodic"
        else "all ascent steps before fine-tuning (early schedule)"
    )
    lines += [
        "",
        f"Unlearning schedule: {schedule} of batch {config['lwf_unlearn_batch_size']}, coefficient "
        f"{config['lwf_unlearn_coef']}, loss cap {config['lwf_forget_loss_cap']}, `{config['lwf_unlearn_optimizer']}` "
        f"optimizer; Fisher `{config['lwf_fisher']}`.",
        "",
        f"What actually ran: {summary['unlearn_points']} unlearning point(s), {summary['idle_points']} of them "
        f"without any applied ascent step ({summary['empty_selections']} with an empty D_U); "
        f"{summary['unlearn_steps']} ascent step(s) applied, {summary['skipped_steps']} skipped as non-finite.",
    ]
    if data["examples"]:
        lines += ["", "Highest-confidence unlearned samples:", ""]
        lines += [f"- *{task}*: {text}" for task, text in data["examples"]]
    lines += [
        "",
        "All `lwf_*` settings are in `lwf_config.json`. "
        + ("Loading this adapter needs `transformers` and `peft`." if data["is_adapter"]
           else "Loading this model needs only `transformers`."),
        "",
        "```bibtex",
        CITATION,
        "```",
        _END,
        "",
    ]
    return "\n".join(lines)


def install_card_section(section: str) -> None:
    """Put ``section`` into the text transformers writes after the card's YAML header (idempotent).

    This is the route transformers' own integrations use from a callback (``AUTOGENERATED_TRAINER_COMMENT``).
    """
    hf_modelcard.AUTOGENERATED_TRAINER_COMMENT = _strip(hf_modelcard.AUTOGENERATED_TRAINER_COMMENT) + "\n" + section


def insert_card_section(readme: str, section: str) -> None:
    """Put ``section`` into the card at ``readme`` right after its YAML header, replacing an earlier one.

    Works on whatever card the Trainer class wrote (transformers' or TRL's template).
    """
    with open(readme, encoding="utf-8") as handle:
        text = _strip(handle.read())
    header_end = 0
    if text.startswith("---"):
        close = text.find("\n---", 3)
        if close != -1:
            newline = text.find("\n", close + 4)
            header_end = len(text) if newline == -1 else newline + 1
    text = text[:header_end] + "\n" + section + "\n" + text[header_end:].lstrip("\n")
    with open(readme, "w", encoding="utf-8") as handle:
        handle.write(text)


def _strip(text: str) -> str:
    start, end = text.find(_START), text.find(_END)
    if start == -1 or end == -1:
        return text
    return (text[:start] + text[end + len(_END) :]).rstrip("\n") + "\n"
