"""Evaluation through lm-evaluation-harness on the in-memory model, over the task YAMLs in ``experiments/tasks``.

The YAMLs name their files as ``DATA_DIR/<task>/<file>.jsonl``; :func:`task_configs` replaces ``DATA_DIR`` with the
evaluation data directory. When that directory is not the training data directory, every item of a file is
evaluated (``process_docs: all_docs``): a separate evaluation file shares no split with training by construction.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any


TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PLACEHOLDER = "DATA_DIR"
MC_TASKS = ("sst5", "qasc", "dental", "psychol")
ALL_TASKS = ("gsm8k", *MC_TASKS)


def _substitute(value: Any, data_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, data_dir)
    if isinstance(value, dict):
        return {k: _substitute(v, data_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, data_dir) for v in value]
    return value


def task_config(task: str, data_dir: str, whole_files: bool = False, max_gen_toks: int | None = None) -> dict[str, Any]:
    """The lm-eval config dict of ``lwf_<task>`` reading its files from ``data_dir``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if task not in ALL_TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(ALL_TASKS)}.")
    config = load_yaml(TASKS_DIR / f"lwf_{task}.yaml")
    config = {k: (v if callable(v) else _substitute(copy.deepcopy(v), os.path.abspath(data_dir)))
              for k, v in config.items()}
    if whole_files:
        from lm_eval.tasks._yaml_loader import _import_func_in_yml

        config["process_docs"] = _import_func_in_yml("utils.all_docs", TASKS_DIR)
    if max_gen_toks is not None and "generation_kwargs" in config:
        config["generation_kwargs"] = dict(config["generation_kwargs"], max_gen_toks=max_gen_toks)
    return config


def choice_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per item of a multiple-choice task: the predicted choice and the probability of the gold choice.

    The gold probability is the softmax of the choices' log-likelihoods at the gold index: a continuous measure of
    what the model knows that still moves when the arg-max prediction does not (a small model that always answers
    "A" has a constant accuracy however much it forgets).
    """
    import math

    preds, gold_probs = [], []
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        top = max(lls)
        weights = [math.exp(x - top) for x in lls]
        gold = int(s["target"])
        preds.append(max(range(len(lls)), key=lls.__getitem__))
        gold_probs.append(weights[gold] / sum(weights))
    counts = {str(i): preds.count(i) for i in sorted(set(preds))}
    return {"preds": preds, "targets": [int(s["target"]) for s in samples], "gold_probs": gold_probs,
            "pred_counts": counts,
            "mean_gold_prob": sum(gold_probs) / max(len(gold_probs), 1)}


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
        configs = [task_config(t, data_dir, whole_files, max_gen_toks) for t in tasks]
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
        if task == "gsm8k":
            results[task]["sample_responses"] = [s["filtered_resps"][0] for s in samples[:4]]
        else:
            results[task].update(choice_stats(samples))
    return results
