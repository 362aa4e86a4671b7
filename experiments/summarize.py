"""Aggregate the run JSONs into CSV tables, plots and the generated part of ``docs/results.md``.

    python -m experiments.summarize                       # results/runs/*.json -> results/*.csv, plots, docs
    python -m experiments.summarize --results_dir DIR --docs none

Every comparison is paired: a method's run and the vanilla run with the same learning task and seed share the
training examples, their order and the evaluation items. Per cell we report the learning-task difference as mean and
standard deviation over seeds, and over test items a paired bootstrap (items resampled, differences averaged over
seeds) and a two-sided sign test on the items where the two disagree.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np


REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
BEGIN, END = "<!-- BEGIN GENERATED (python -m experiments.summarize) -->", "<!-- END GENERATED -->"
MAIN_METHODS = ("lwf", "lwf_alignment")
ABLATIONS = ("lwf", "lwf_random", "lwf_bottom", "lwf_early", "lwf_sgd")
BASELINES = ("lwf", "ga_all", "l2sp", "bss")
DEFAULTS = ("lwf", "lwf_every3", "lwf_every8", "lwf_ratio10", "lwf_ratio50", "lwf_coef01", "lwf_steps3")


def load_runs(runs_dir: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    return runs


def paired_stats(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Paired comparison of per-item scores ``a`` (method) and ``b`` (vanilla), both ``seeds x items``.

    Returns the mean difference, a 95 % bootstrap interval over items, the bootstrap two-sided p-value and the
    sign-test p-value over items whose seed-averaged difference is non-zero.
    """
    diff = (np.asarray(a, float) - np.asarray(b, float)).mean(axis=0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    boot = diff[idx].mean(axis=1)
    p_boot = min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {"delta": float(diff.mean()), "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)), "p_bootstrap": float(p_boot),
            "items_better": wins, "items_worse": losses, "p_sign": sign_test(wins, losses)}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))


def run_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        spec, train = r["spec"], r.get("train") or {}
        losses = [e["loss"] for e in train.get("log_history", []) if "loss" in e]
        lwf = train.get("lwf") or {}
        forget_losses = [h.get("lwf/forget_loss") for h in lwf.get("history", []) if isinstance(h, dict)]
        row = {"run_id": r["run_id"], **spec, "model": r["model"],
               "learn_score": r["eval"][spec["learn"]]["score"], "learn_metric": r["eval"][spec["learn"]]["metric"],
               "n_learn_items": len(r["eval"][spec["learn"]]["items"])}
        learn_eval = r["eval"][spec["learn"]]
        if "pred_counts" in learn_eval:
            top = max(learn_eval["pred_counts"], key=learn_eval["pred_counts"].get)
            row["learn_top_pred"] = top
            row["learn_top_pred_share"] = learn_eval["pred_counts"][top] / len(learn_eval["items"])
        for task, value in r["eval"].items():
            if task != spec["learn"]:
                row[f"{task}_acc"] = value["score"]
                if "mean_gold_prob" in value:
                    row[f"{task}_gold_prob"] = value["mean_gold_prob"]
                    row[f"{task}_top_pred_share"] = max(value["pred_counts"].values()) / len(value["items"])
        row.update({"final_train_loss": losses[-1] if losses else None,
                    "d_self": sum(lwf.get("self_data_sizes", {}).values()) if lwf else None,
                    "d_u": len(lwf.get("forget_indices", [])) if lwf else None,
                    "ascent_steps": lwf.get("unlearn_steps") if lwf else None,
                    "skipped_steps": lwf.get("skipped_steps") if lwf else None,
                    "forget_loss_first": next((x for x in forget_losses if x is not None), None),
                    "forget_loss_last": next((x for x in reversed(forget_losses) if x is not None), None),
                    "train_seconds": train.get("train_seconds"), "eval_seconds": r.get("eval_seconds"),
                    "total_seconds": r.get("total_seconds"), "cpu_seconds": r.get("cpu_seconds")})
        rows.append(row)
    return rows


def _forget_tasks(forget: str) -> list[str]:
    return ["dental", "psychol"] if forget == "mixed" else forget.split("+")


def compare(runs: list[dict[str, Any]], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per (learning task, forgetting setting, method) with paired seeds against vanilla."""
    by_id = {(r["spec"]["learn"], r["spec"]["forget"], r["spec"]["method"], r["spec"]["seed"]): r for r in runs}
    cells = sorted({(r["spec"]["learn"], r["spec"]["forget"], r["spec"]["method"]) for r in runs
                    if r["spec"]["method"] in methods})
    rows = []
    for learn, forget, method in cells:
        seeds = sorted(s for (l, f, m, s) in by_id if (l, f, m) == (learn, forget, method)
                       and (learn, "none", "vanilla", s) in by_id)
        if not seeds:
            continue
        pairs = [(by_id[(learn, forget, method, s)], by_id[(learn, "none", "vanilla", s)]) for s in seeds]
        for a, b in pairs:
            if a["eval"][learn]["doc_ids"] != b["eval"][learn]["doc_ids"]:
                raise ValueError(f"{a['run_id']} and {b['run_id']} were evaluated on different items.")
        deltas = [a["eval"][learn]["score"] - b["eval"][learn]["score"] for a, b in pairs]
        stats = paired_stats(np.array([a["eval"][learn]["items"] for a, _ in pairs]),
                             np.array([b["eval"][learn]["items"] for _, b in pairs]))
        mean, std = _mean_std(deltas)
        row = {"learn": learn, "forget": forget, "method": method, "seeds": len(seeds),
               "vanilla": statistics.mean(b["eval"][learn]["score"] for _, b in pairs),
               "score": statistics.mean(a["eval"][learn]["score"] for a, _ in pairs),
               "delta_mean": mean, "delta_std": std, "seeds_better": sum(d > 0 for d in deltas),
               "seeds_worse": sum(d < 0 for d in deltas), "deltas": " ".join(f"{100 * d:+.1f}" for d in deltas),
               **{k: v for k, v in stats.items() if k != "delta"}}
        base = by_id.get((learn, "none", "base", 0))
        if forget != "none":
            for task in _forget_tasks(forget):
                if task in pairs[0][0]["eval"]:
                    row[f"{task}_after_vanilla"] = statistics.mean(b["eval"][task]["score"] for _, b in pairs)
                    row[f"{task}_after_method"] = statistics.mean(a["eval"][task]["score"] for a, _ in pairs)
                    if base is not None and task in base["eval"]:
                        row[f"{task}_before"] = base["eval"][task]["score"]
                    gold_pairs = [(a, b) for a, b in pairs if "gold_probs" in a["eval"][task] and "gold_probs" in b["eval"][task]]
                    if gold_pairs:  # runs from before the gold-choice probability was recorded are left out
                        g = paired_stats(np.array([a["eval"][task]["gold_probs"] for a, _ in gold_pairs]),
                                         np.array([b["eval"][task]["gold_probs"] for _, b in gold_pairs]))
                        row[f"{task}_goldprob_seeds"] = len(gold_pairs)
                        row[f"{task}_goldprob_vanilla"] = statistics.mean(
                            b["eval"][task]["mean_gold_prob"] for _, b in gold_pairs)
                        row[f"{task}_goldprob_method"] = statistics.mean(
                            a["eval"][task]["mean_gold_prob"] for a, _ in gold_pairs)
                        row[f"{task}_goldprob_delta"] = g["delta"]
                        row[f"{task}_goldprob_ci_low"], row[f"{task}_goldprob_ci_high"] = g["ci_low"], g["ci_high"]
                        row[f"{task}_goldprob_p"] = g["p_bootstrap"]
                        if base is not None and "gold_probs" in base["eval"].get(task, {}):
                            row[f"{task}_goldprob_before"] = base["eval"][task]["mean_gold_prob"]
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown_comparison(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_No paired runs yet._\n"
    lines = ["| learning task | forgetting | method | seeds | vanilla | method | Δ per seed (pts) | Δ mean ± std (pts) "
             "| 95 % CI (bootstrap) "
             "| p (bootstrap) | items +/− | p (sign) | forget acc: before → vanilla → method "
             "| forget gold-choice prob: before → vanilla → method (Δ, 95 % CI, p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        forget = "; ".join(
            f"{t} {_pct(r.get(f'{t}_before'))} → {_pct(r.get(f'{t}_after_vanilla'))} → {_pct(r.get(f'{t}_after_method'))}"
            for t in _forget_tasks(r["forget"]) if f"{t}_after_method" in r) or "-"
        gold = "; ".join(
            f"{t} {_pct(r.get(f'{t}_goldprob_before'))} → {_pct(r[f'{t}_goldprob_vanilla'])} → "
            f"{_pct(r[f'{t}_goldprob_method'])} ({_pct(r[f'{t}_goldprob_delta'], True)}, "
            f"[{_pct(r[f'{t}_goldprob_ci_low'], True)}, {_pct(r[f'{t}_goldprob_ci_high'], True)}], "
            f"p {r[f'{t}_goldprob_p']:.2f}, {r[f'{t}_goldprob_seeds']} seed(s))"
            for t in _forget_tasks(r["forget"]) if f"{t}_goldprob_method" in r) or "-"
        lines.append(
            f"| {r['learn']} | {r['forget']} | {r['method']} | {r['seeds']} | {_pct(r['vanilla'])} | {_pct(r['score'])} "
            f"| {r['deltas']} | {_pct(r['delta_mean'], True)} ± {_pct(r['delta_std'])} | [{_pct(r['ci_low'], True)}, "
            f"{_pct(r['ci_high'], True)}] | {r['p_bootstrap']:.2f} | {r['items_better']}/{r['items_worse']} "
            f"| {r['p_sign']:.2f} | {forget} | {gold} |")
    return "\n".join(lines) + "\n"


def markdown_runs(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | learn score (most frequent prediction, share) | dental acc / gold prob / top-choice share | psychol acc / gold prob / top-choice share "
             "| final train loss | D_self / D_U | ascent steps | D_U loss at 1st → last point | wall seconds (train / eval / total) "
             "| CPU seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["learn"], r["forget"], r["method"], r["seed"])):
        def num(key, fmt):
            v = r.get(key)
            return "-" if v is None else format(v, fmt)
        lines.append(
            f"| {r['run_id']} | {_pct(r['learn_score'])}"
            + (f" (choice {r['learn_top_pred']}, {_pct(r['learn_top_pred_share'])} %) " if "learn_top_pred" in r else " ")
            + f"| {_pct(r.get('dental_acc'))} / {_pct(r.get('dental_gold_prob'))} / {_pct(r.get('dental_top_pred_share'))} "
            f"| {_pct(r.get('psychol_acc'))} / {_pct(r.get('psychol_gold_prob'))} / {_pct(r.get('psychol_top_pred_share'))} "
            f"| {num('final_train_loss', '.3f')} | {num('d_self', 'd')} / {num('d_u', 'd')} | {num('ascent_steps', 'd')} "
            f"| {num('forget_loss_first', '.2f')} → {num('forget_loss_last', '.2f')} "
            f"| {num('train_seconds', '.0f')} / {num('eval_seconds', '.0f')} / {num('total_seconds', '.0f')} "
            f"| {num('cpu_seconds', '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['learn']}/{r['forget']}/{r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))
    means = [100 * r["delta_mean"] for r in rows]
    lows = [100 * (r["delta_mean"] - r["ci_low"]) for r in rows]
    highs = [100 * (r["ci_high"] - r["delta_mean"]) for r in rows]
    ax.errorbar(means, y, xerr=[lows, highs], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, labels)
    ax.set_xlabel("learning-task accuracy minus vanilla (points; 95 % bootstrap CI over items)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def probe_markdown(path: Path) -> str:
    """Table of ``optimizer_probe.json``: mean ± std over seeds of what one ascent step did, per optimizer option."""
    if not path.exists():
        return "_Not measured yet (python -m experiments.optimizer_probe)._\n"
    report = json.loads(path.read_text(encoding="utf-8"))
    seeds = report["seeds"]
    if not seeds:
        return "_No seed finished._\n"
    a = report["args"]
    lines = [f"{len(seeds)} seed(s); {a['learn_steps']} AdamW steps (lr {a['lr']:g}, batch {a['batch_size']}) on "
             f"{a['learn']}, then from that state {a['ascent_steps']} bounded ascent steps (cap {a['cap']}, grad clip 1.0) "
             f"on a batch of self-generated {a['forget']} answers. Loss changes are after the first step.\n",
             "| optimizer | lr | Δ forget loss, ascent batch | Δ forget loss, held-out D_self | Δ learning loss, held-out "
             "| Δ forget loss after all steps | update norm | cos(update, momentum-only step) | cos(update, ascent direction) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:+.3g}"
        return f"{statistics.mean(values):+.3g} ± {statistics.stdev(values):.2g}"

    for i, first in enumerate(seeds[0]["options"]):
        opts = [s["options"][i] for s in seeds]
        lines.append(
            f"| {first['optimizer']} | {first['lr']:g} | {ms([o['delta_forget_batch_step1'] for o in opts])} "
            f"| {ms([o['delta_forget_heldout_step1'] for o in opts])} | {ms([o['delta_learn_heldout_step1'] for o in opts])} "
            f"| {ms([o['delta_forget_batch_total'] for o in opts])} | {ms([o['steps'][0]['update_norm'] for o in opts])} "
            f"| {ms([o['steps'][0]['cos_momentum_only'] for o in opts])} "
            f"| {ms([o['steps'][0]['cos_ascent_direction'] for o in opts])} |")
    return "\n".join(lines) + "\n"


def generated_markdown(runs: list[dict[str, Any]], tables: dict[str, list[dict[str, Any]]], rows,
                       probe_path: Path = RESULTS / "optimizer_probe.json") -> str:
    models = sorted({r["model"] for r in runs})
    common, varying = settings_summary(runs)
    parts = [
        f"Generated from {len(runs)} run files in `experiments/results/runs/` (model: {', '.join(models) or '-'}).",
        "Scores are accuracy in percent (exact match for gsm8k); Δ in percentage points against vanilla fine-tuning "
        "with the same seed. Settings of all runs: " + ", ".join(f"`{k}={v}`" for k, v in sorted(common.items()))
        + "".join(f". `{k}` differs between runs: " + ", ".join(f"{v} in {n} runs" for v, n in values)
                  for k, values in sorted(varying.items())),
        "\n### Main table: learning task × forgetting task\n", markdown_comparison(tables["main"]),
        "\n### Ablations (selection and schedule; unlearning optimizer)\n", markdown_comparison(tables["ablation"]),
        "\n### Baselines\n", markdown_comparison(tables["baselines"]),
        "\n### The `lwf_*` defaults, one setting changed at a time (`configs/defaults.yaml`)\n",
        "`lwf` = `lwf_unlearn_every=5` (of 16 steps), `lwf_forget_ratio=0.25`, `lwf_unlearn_coef=1`, "
        "`lwf_unlearn_steps=1`; `every3`/`every8` change the interval, `ratio10`/`ratio50` the ratio, `coef01` the "
        "coefficient, `steps3` the ascent steps per point.\n",
        markdown_comparison(tables["defaults"]),
        "\n### One unlearning step: shared AdamW or a separate SGD (`experiments/optimizer_probe.py`)\n",
        probe_markdown(probe_path),
        "\n![Δ vs vanilla](results_delta.png)\n" if rows else "",
        "\n### Every run\n", markdown_runs(rows),
    ]
    return "\n".join(parts)


def settings_summary(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    """The settings every run shares, and for the others each value with its number of runs."""
    keys = sorted({k for r in runs for k in r["settings"]})
    common, varying = {}, {}
    for key in keys:
        counts: dict[str, int] = {}
        for r in runs:
            value = repr(r["settings"].get(key))
            counts[value] = counts.get(value, 0) + 1
        if len(counts) == 1:
            common[key] = runs[0]["settings"].get(key)
        else:
            varying[key] = sorted(counts.items())
    return common, varying


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default=str(RESULTS), help="Folder holding runs/ (CSV and plots go here).")
    parser.add_argument("--docs", default=str(REPO / "docs" / "results.md"),
                        help="Markdown file whose generated block is replaced ('none' to skip).")
    args = parser.parse_args(argv)
    out = Path(args.results_dir)
    runs = load_runs(str(out / "runs"))
    rows = run_rows(runs)
    tables = {"main": compare(runs, MAIN_METHODS), "ablation": compare(runs, ABLATIONS),
              "baselines": compare(runs, BASELINES), "defaults": compare(runs, DEFAULTS)}
    write_csv(out / "runs.csv", rows)
    for name, table in tables.items():
        write_csv(out / f"{name}.csv", table)
    all_rows = compare(runs, tuple(sorted(set(MAIN_METHODS + ABLATIONS + BASELINES + DEFAULTS))))
    print(f"{len(runs)} runs; {len(all_rows)} paired cells")
    print(markdown_comparison(all_rows))
    if args.docs != "none":
        docs = Path(args.docs)
        figure = plot(all_rows, docs.parent / "results_delta.png")
        if figure:
            print(f"wrote {figure}")
        generated = generated_markdown(runs, tables, rows, out / "optimizer_probe.json")
        block = f"{BEGIN}\n{generated}\n{END}"
        text = docs.read_text(encoding="utf-8") if docs.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
        if BEGIN not in text:
            text += f"\n{BEGIN}\n{END}\n"
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        docs.write_text(text, encoding="utf-8")
        print(f"wrote {docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
