"""Evaluation through lm-evaluation-harness on the in-memory model, over the task YAMLs in ``experiments/tasks``.

The YAMLs name their files as ``DATA_DIR/<task>/<file>.jsonl``; :func:`task_configs` replaces ``DATA_DIR`` with the
evaluation data directory. When that directory is not the training data directory, every item of a file is
evaluated (``process_docs: all_docs``): a separate evaluation file shares no split with training by construction.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any


TASKS_DIR = Path(__file__).resolve().parent / "tasks"
if str(TASKS_DIR) not in sys.path:
    sys.path.insert(0, str(TASKS_DIR))
PLACEHOLDER = "DATA_DIR"
MC_TASKS = ("sst5", "qasc", "dental", "psychol", "sst2swap", "sst2plain", "sst2chat")
ALL_TASKS = ("gsm8k", *MC_TASKS)


def _substitute(value: Any, data_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, data_dir)
    if isinstance(value, dict):
        return {k: _substitute(v, data_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, data_dir) for v in value]
    return value


def task_config(task: str, data_dir: str, whole_files: bool = False, max_gen_toks: int | None = None,
                split: str = "test", prompt_style: str = "legacy") -> dict[str, Any]:
    """The lm-eval config dict of ``lwf_<task>`` reading its ``split`` from ``data_dir`` in ``prompt_style``.

    ``split`` is ``"dev"`` (the pilot, every tuning decision) or ``"test"`` (the confirmatory run, once). The file of a
    split has the same name in any data directory (``task_utils.FILES``), so ``--eval_data_dir`` works unchanged.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    import utils as task_utils  # experiments/tasks/utils.py

    if task not in ALL_TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(ALL_TASKS)}.")
    if split not in ("dev", "test"):
        raise ValueError(f"Unknown evaluation split {split!r}; choose from dev, test.")
    config = load_yaml(TASKS_DIR / f"lwf_{task}.yaml")
    config = {k: (v if callable(v) else _substitute(copy.deepcopy(v), os.path.abspath(data_dir)))
              for k, v in config.items()}
    path = os.path.join(os.path.abspath(data_dir), task_utils.file_for(task, split))
    config["dataset_kwargs"] = dict(config.get("dataset_kwargs") or {}, data_files={"test": path})
    process = task_utils.all_docs if whole_files else task_utils.split_process_docs(task, split)
    if task_utils.source_task(task) != task:  # the binary sentiment tasks: sst5 without neutral
        config["process_docs"] = lambda dataset: task_utils.sst2_docs(process(dataset))
    else:
        config["process_docs"] = process
    config["doc_to_text"] = task_utils.doc_to_text(task, prompt_style)
    if max_gen_toks is not None and "generation_kwargs" in config:
        config["generation_kwargs"] = dict(config["generation_kwargs"], max_gen_toks=max_gen_toks)
    return config


def choice_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per item of a multiple-choice task: the predicted choice, the gold choice's probability and log-probability.

    ``gold_logprobs`` is the primary endpoint: log p(gold | choices) = ll(gold) - logsumexp(ll(choices)), the
    log-likelihood of the gold answer normalised across the choices (in nats; 0 is certainty, log(1/k) is uniform).
    It is continuous and still moves when the arg-max prediction does not (a small model that always answers "A"
    has a constant accuracy however much it forgets). ``margins`` is ll(gold) - max ll(other choices).
    """
    import math

    preds, gold_probs, gold_logprobs, margins, lls_all = [], [], [], [], []
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        top = max(lls)
        log_z = top + math.log(sum(math.exp(x - top) for x in lls))
        gold = int(s["target"])
        preds.append(max(range(len(lls)), key=lls.__getitem__))
        gold_logprobs.append(lls[gold] - log_z)
        gold_probs.append(math.exp(lls[gold] - log_z))
        margins.append(lls[gold] - max((x for i, x in enumerate(lls) if i != gold), default=float("nan")))
        lls_all.append([round(x, 4) for x in lls])
    counts = {str(i): preds.count(i) for i in sorted(set(preds))}
    n = max(len(samples), 1)
    return {"preds": preds, "targets": [int(s["target"]) for s in samples], "gold_probs": gold_probs,
            "gold_logprobs": gold_logprobs, "margins": margins, "choice_lls": lls_all, "pred_counts": counts,
            "max_pred_share": max(counts.values(), default=0) / n,
            "mean_gold_prob": sum(gold_probs) / n, "mean_gold_logprob": sum(gold_logprobs) / n,
            "mean_margin": sum(margins) / n}


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str,
    limit: int | None = None,
    batch_size: int = 16,
    whole_files: bool = False,
    max_gen_toks: int | None = None,
    seed: int = 0,
    split: str = "test",
    prompt_style: str = "legacy",
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on ``tasks``; returns ``{task: {"metric": name, "score": value, "items": [0/1 per item]}}``.

    ``items`` are in document order (MD5 order of ids), so two runs on the same files are paired item by item.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=1024)
        configs = [task_config(t, data_dir, whole_files, max_gen_toks, split, prompt_style) for t in tasks]
        out = lm_eval.simple_evaluate(
            model=lm, tasks=configs, limit=limit, task_manager=TaskManager(include_defaults=False),
            log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        )
    finally:
        model.train(was_training)
    results = {}
    for task in tasks:
        name = f"lwf_{task}"
        metric = "exact_match" if task == "gsm8k" else "acc"
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        results[task] = {
            "metric": metric,
            "score": float(out["results"][name][f"{metric},none"]),
            "items": [float(s[metric]) for s in samples],
            "doc_ids": [str(s["doc"]["id"]) for s in samples],
        }
        if "acc_norm" in samples[0]:
            results[task]["acc_norm"] = float(out["results"][name]["acc_norm,none"])
            results[task]["items_acc_norm"] = [float(s["acc_norm"]) for s in samples]
        if task == "gsm8k":
            results[task]["sample_responses"] = [s["filtered_resps"][0] for s in samples[:4]]
        else:
            results[task].update(choice_stats(samples))
    return results
