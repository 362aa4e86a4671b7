"""Aggregate the run JSONs into CSV tables, plots and the generated part of ``experiments/results/REPORT.md``.

    python -m experiments.summarize                       # results/*/*.json -> results/*.csv, plots, REPORT.md
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


# ------------------------------------------------------------------------------------ seed-level statistics
def seed_tests(deltas: list[float] | np.ndarray) -> dict[str, float]:
    """The primary analysis: per-seed paired differences (method - reference, one value per seed).

    Returns the mean, the SD, a 95 % t interval, the paired t-test p (a one-sample t-test of the differences is the
    paired t-test) and the exact Wilcoxon signed-rank p (two-sided; with 3 seeds its smallest possible value is
    0.25, with 5 seeds 0.0625, with 6 seeds 0.03125).
    """
    from scipy import stats

    d = np.asarray(deltas, float)
    n = d.size
    out = {"n_seeds": n, "mean": float(d.mean()) if n else float("nan"),
           "sd": float(d.std(ddof=1)) if n > 1 else float("nan"),
           "t_low": float("nan"), "t_high": float("nan"), "p_t": float("nan"), "p_wilcoxon": float("nan")}
    if n < 2:
        return out
    se = out["sd"] / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    out["t_low"], out["t_high"] = out["mean"] - half, out["mean"] + half
    if se > 0:
        out["p_t"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    elif out["mean"] != 0:
        out["p_t"] = 0.0
    else:
        out["p_t"] = 1.0
    if np.any(d != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)  # exact for small n without ties, as scipy decides
    else:
        out["p_wilcoxon"] = 1.0
    return out


def hierarchical_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Paired two-level bootstrap of ``mean(a - b)``; ``a``, ``b`` are ``seeds x items`` per-item scores.

    Each replicate draws the seeds with replacement, then, within each drawn seed, the items with replacement, and
    averages the paired differences. Seed-to-seed variance (a label-prior shift moves every item of a seed together)
    therefore enters the interval, unlike an item bootstrap with the seeds held fixed. Returns the mean, the 95 %
    percentile interval and the two-sided bootstrap p (twice the smaller tail share at 0).
    """
    diff = np.asarray(a, float) - np.asarray(b, float)
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError("hierarchical_bootstrap expects two equal seeds x items arrays.")
    n_seeds, n_items = diff.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    items = rng.integers(0, n_items, size=(n_boot, n_seeds, n_items))
    boot = diff[seeds[:, :, None], items].mean(axis=(1, 2))
    p = min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))
    return {"mean": float(diff.mean()), "low": float(np.percentile(boot, 2.5)),
            "high": float(np.percentile(boot, 97.5)), "p": float(p)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    valid = [(p, i) for i, p in enumerate(pvalues) if p == p]
    m = len(valid)
    adjusted = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_t_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test with ``n`` seeds to detect a true mean difference ``effect`` (noncentral t)."""
    from scipy import stats

    if n < 2 or sd <= 0:
        return float("nan")
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect / (sd / math.sqrt(n))
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, max_seeds: int = 1000) -> int:
    """The smallest number of seeds whose paired t-test detects ``effect`` at ``power`` given the per-seed Δ's ``sd``."""
    if sd <= 0 or effect <= 0:
        raise ValueError("seeds_needed needs a positive effect and a positive SD of the per-seed difference.")
    for n in range(2, max_seeds + 1):
        if paired_t_power(n, effect, sd, alpha) >= power:
            return n
    return max_seeds


def detectable_effect(n: int, sd: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference a two-sided paired t-test over ``n`` seeds detects at ``power``, given the
    per-seed Δ's ``sd``: what a finished design could and could not have seen."""
    if n < 2 or sd <= 0:
        return float("nan")
    lo, hi = 0.0, sd
    while paired_t_power(n, hi, sd, alpha) < power:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if paired_t_power(n, mid, sd, alpha) < power else (lo, mid)
    return hi


def tost(deltas: list[float] | np.ndarray, bound: float) -> dict[str, float]:
    """Equivalence test (two one-sided t-tests) of the per-seed differences against ``(-bound, +bound)``.

    ``p`` below 0.05 says the true mean difference lies within the bound: "no effect larger than the bound" is then
    a finding. It equals the larger of the two one-sided p-values.
    """
    from scipy import stats

    d = np.asarray(deltas, float)
    n = d.size
    if n < 2:
        return {"p": float("nan"), "p_lower": float("nan"), "p_upper": float("nan"), "bound": bound}
    se = d.std(ddof=1) / math.sqrt(n)
    if se == 0:
        inside = abs(d.mean()) < bound
        return {"p": 0.0 if inside else 1.0, "p_lower": float("nan"), "p_upper": float("nan"), "bound": bound}
    p_lower = float(stats.t.sf((d.mean() + bound) / se, n - 1))   # H0: mean <= -bound
    p_upper = float(stats.t.cdf((d.mean() - bound) / se, n - 1))  # H0: mean >= +bound
    return {"p": max(p_lower, p_upper), "p_lower": p_lower, "p_upper": p_upper, "bound": bound}


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


# Run files whose D_self came from an older self-generation: their forgotten texts differ, at the same D_self index,
# from every other run with the same seed (checked by `stale_runs`). They are listed, never tabled.
STALE_RUNS = ("qasc__dental__lwf__s0", "qasc__dental__lwf__s1", "qasc__dental__lwf__s2", "sst5__dental__lwf__s0",
              "sst5__dental__lwf__s1", "sst5__dental__lwf__s2", "sst5__dental__lwf_sgd__s0")


def stale_runs(runs: list[dict[str, Any]]) -> list[str]:
    """LWF runs whose D_self texts disagree with the ``ga_all`` run of the same seed and forgetting setting.

    ``ga_all`` ascends on all of D_self, so its record lists every self-generated text by index; a run from the same
    code and seed generates the same D_self and must agree at every index it lists.
    """
    reference = {}
    for r in runs:
        lwf = (r.get("train") or {}).get("lwf")
        if r["spec"]["method"] == "ga_all" and lwf:
            reference[(r["spec"]["forget"], r["spec"]["seed"])] = {x["index"]: x["text"] for x in lwf["forgotten"]}
    out = []
    for r in runs:
        lwf = (r.get("train") or {}).get("lwf")
        ref = reference.get((r["spec"]["forget"], r["spec"]["seed"]))
        if lwf and ref and any(ref.get(x["index"]) != x["text"] for x in lwf["forgotten"]):
            out.append(r["run_id"])
    return out


def endpoints(run: dict[str, Any], task: str) -> dict[str, Any]:
    """Per-item values of a task's endpoints in one run: ``acc``, ``acc_norm`` and the primary ``gold_logprob``."""
    e = run["eval"][task]
    out = {"acc": (e["score"], e["items"])}
    if "acc_norm" in e:
        out["acc_norm"] = (e["acc_norm"], e["items_acc_norm"])
    if "gold_logprobs" in e:
        out["gold_logprob"] = (e["mean_gold_logprob"], e["gold_logprobs"])
    if "margins" in e:
        out["margin"] = (e["mean_margin"], e["margins"])
    return out


def _cell_stats(pairs, task: str, key: str, item_level: bool = True) -> dict[str, Any] | None:
    """Seed-level tests, the hierarchical bootstrap and (secondary) the item-level tests of one endpoint."""
    if not all(key in endpoints(a, task) and key in endpoints(b, task) for a, b in pairs):
        return None
    a_items = np.array([endpoints(a, task)[key][1] for a, _ in pairs], float)
    b_items = np.array([endpoints(b, task)[key][1] for _, b in pairs], float)
    deltas = [endpoints(a, task)[key][0] - endpoints(b, task)[key][0] for a, b in pairs]
    out = {"deltas": deltas, "method": statistics.mean(endpoints(a, task)[key][0] for a, _ in pairs),
           "reference": statistics.mean(endpoints(b, task)[key][0] for _, b in pairs),
           "method_sd": _mean_std([endpoints(a, task)[key][0] for a, _ in pairs])[1],
           "seed": seed_tests(deltas), "hier": hierarchical_bootstrap(a_items, b_items)}
    if key in ("acc", "acc_norm"):
        out["tost"] = tost(deltas, TOST_BOUND)
    if item_level:
        out["item"] = paired_stats(a_items, b_items)
    return out


TOST_BOUND = 0.03  # equivalence bound of a null result: ±3 points of accuracy


def compare(runs: list[dict[str, Any]], methods: tuple[str, ...], reference: str = "vanilla",
            exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per (learning task, forgetting setting, method) with its seeds paired against ``reference``.

    ``reference`` is ``vanilla`` (same seed) or ``base`` (the untrained model, one evaluation for every seed).
    Each row holds, per endpoint (``acc``, ``acc_norm``, ``gold_logprob``, ``margin`` where recorded), the per-seed
    differences with the seed-level tests (primary), the hierarchical bootstrap, and the item-level bootstrap and
    sign test (secondary); and the forgetting tasks' endpoints for method, vanilla and base.
    """
    runs = [r for r in runs if r["run_id"] not in exclude]
    by_id = {(r["spec"]["learn"], r["spec"]["forget"], r["spec"]["method"], r["spec"]["seed"]): r for r in runs}
    cells = sorted({(r["spec"]["learn"], r["spec"]["forget"], r["spec"]["method"]) for r in runs
                    if r["spec"]["method"] in methods})
    rows = []
    for learn, forget, method in cells:
        def ref_run(seed):
            return by_id.get((learn, "none", "base", 0) if reference == "base" else (learn, "none", reference, seed))
        seeds = sorted(s for (l, f, m, s) in by_id if (l, f, m) == (learn, forget, method) and ref_run(s) is not None)
        if not seeds or method == reference:
            continue
        pairs = [(by_id[(learn, forget, method, s)], ref_run(s)) for s in seeds]
        for a, b in pairs:
            if a["eval"][learn]["doc_ids"] != b["eval"][learn]["doc_ids"]:
                raise ValueError(f"{a['run_id']} and {b['run_id']} were evaluated on different items.")
        row: dict[str, Any] = {"learn": learn, "forget": forget, "method": method, "reference": reference,
                               "seeds": len(seeds), "seed_list": seeds, "learn_stats": {}, "forget_stats": {},
                               "selfgen_stats": {}}
        for key in ("acc", "acc_norm", "gold_logprob", "margin"):
            stats_ = _cell_stats(pairs, learn, key)
            if stats_:
                row["learn_stats"][key] = stats_
        tasks = [t for t in pairs[0][0]["eval"] if t != learn and all(t in b["eval"] for _, b in pairs)]
        for task in tasks:
            for key in ("acc", "gold_logprob"):
                stats_ = _cell_stats(pairs, task, key, item_level=False)
                if stats_:
                    row["forget_stats"][f"{task}/{key}"] = stats_
        for task in pairs[0][0].get("selfgen_eval", {}):
            if all(task in b.get("selfgen_eval", {}) for _, b in pairs):
                deltas = [a["selfgen_eval"][task]["score"] - b["selfgen_eval"][task]["score"] for a, b in pairs]
                row["selfgen_stats"][task] = {
                    "method": statistics.mean(a["selfgen_eval"][task]["score"] for a, _ in pairs),
                    "reference": statistics.mean(b["selfgen_eval"][task]["score"] for _, b in pairs),
                    "deltas": deltas, "seed": seed_tests(deltas)}
        rows.append(row)
    return rows


def primary_key(row: dict[str, Any]) -> str:
    """The row's primary endpoint: gold log-probability where recorded (the new design), else accuracy (legacy)."""
    return "gold_logprob" if "gold_logprob" in row["learn_stats"] else "acc"


def add_holm(rows: list[dict[str, Any]]) -> int:
    """Holm-adjust the primary endpoint's seed-level t-test p over ``rows``; returns the number of comparisons."""
    ps = [r["learn_stats"][primary_key(r)]["seed"]["p_t"] for r in rows]
    for r, p in zip(rows, holm(ps)):
        r["p_holm"] = p
    return sum(p == p for p in ps)


def flat_row(r: dict[str, Any]) -> dict[str, Any]:
    """A CSV row of a comparison."""
    out = {k: r[k] for k in ("learn", "forget", "method", "reference", "seeds")}
    out["primary_endpoint"] = primary_key(r)
    out["p_holm"] = r.get("p_holm")
    for group in ("learn_stats", "forget_stats"):
        for key, st in r[group].items():
            prefix = key if group == "learn_stats" else f"forget_{key}"
            out[f"{prefix}_method"], out[f"{prefix}_reference"] = st["method"], st["reference"]
            out[f"{prefix}_deltas"] = " ".join(f"{d:+.4f}" for d in st["deltas"])
            for k, v in st["seed"].items():
                out[f"{prefix}_seed_{k}"] = v
            out[f"{prefix}_hier_low"], out[f"{prefix}_hier_high"], out[f"{prefix}_hier_p"] = (
                st["hier"]["low"], st["hier"]["high"], st["hier"]["p"])
            if "tost" in st:
                out[f"{prefix}_tost_p"] = st["tost"]["p"]
            for k, v in st.get("item", {}).items():
                out[f"{prefix}_item_{k}"] = v
    for task, st in r["selfgen_stats"].items():
        out[f"selfgen_{task}_method"], out[f"selfgen_{task}_reference"] = st["method"], st["reference"]
        out[f"selfgen_{task}_seed_p_t"] = st["seed"]["p_t"]
    return out


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


def _num(x: float | None, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _fmt(key: str, x: float | None, signed: bool = False) -> str:
    """Accuracies in percent (points when signed), log-probabilities and margins in nats."""
    if key in ("acc", "acc_norm"):
        return _pct(x, signed)
    return _num(x, "+.3f" if signed else ".3f")


def _p(x: float | None) -> str:
    return _num(x, ".3f")


def base_rows(runs: list[dict[str, Any]], exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The untrained model's run per learning task."""
    return {r["spec"]["learn"]: r for r in runs if r["spec"]["method"] == "base" and r["run_id"] not in exclude}


def markdown_comparison(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """The learning-task table: a base row per learning task, then each cell against its reference, seed level first."""
    if not rows:
        return "_No paired runs yet._\n"
    bases = base_rows(runs)
    lines = ["| learning task | forgetting | method vs reference | seeds | endpoint | reference | method (± SD over seeds) "
             "| Δ per seed | Δ mean [95 % t CI over seeds] | p t-test (seeds) | p Wilcoxon (seeds) | p Holm "
             "| hierarchical bootstrap 95 % CI, p | TOST ±3 pts p | item-level (secondary): bootstrap p, sign p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shown = set()
    for r in rows:
        learn = r["learn"]
        if learn not in shown and learn in bases:
            shown.add(learn)
            e = endpoints(bases[learn], learn)
            for key in [k for k in ("acc", "acc_norm", "gold_logprob") if k in e]:
                lines.append(f"| {learn} | - | **base** (untrained) | - | {key} | - | {_fmt(key, e[key][0])} "
                             "| - | - | - | - | - | - | - | - |")
        for key, st in r["learn_stats"].items():
            if key == "margin":
                continue
            sd, item = st["seed"], st.get("item", {})
            holm_p = _p(r.get("p_holm")) if key == primary_key(r) else ""
            lines.append(
                f"| {learn} | {r['forget']} | {r['method']} vs {r['reference']} | {r['seeds']} | {key}"
                f"{' (primary)' if key == primary_key(r) else ''} | {_fmt(key, st['reference'])} "
                f"| {_fmt(key, st['method'])} ± {_fmt(key, st['method_sd'])} "
                f"| {' '.join(_fmt(key, d, True) for d in st['deltas'])} | {_fmt(key, sd['mean'], True)} "
                f"[{_fmt(key, sd['t_low'], True)}, {_fmt(key, sd['t_high'], True)}] | {_p(sd['p_t'])} "
                f"| {_p(sd['p_wilcoxon'])} | {holm_p} | [{_fmt(key, st['hier']['low'], True)}, "
                f"{_fmt(key, st['hier']['high'], True)}], {_p(st['hier']['p'])} "
                f"| {_p(st['tost']['p']) if 'tost' in st else '-'} "
                f"| {_p(item.get('p_bootstrap'))}, {_p(item.get('p_sign'))} |")
    return "\n".join(lines) + "\n"


def markdown_forgetting(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """Forgetting endpoints: base → reference → method, with the seed-level t-test of method − reference."""
    bases = base_rows(runs)
    lines = ["| learning task | forgetting | method vs reference | measured on | base | reference | method "
             "| Δ mean [95 % t CI over seeds] | p t-test (seeds) |", "|---|---|---|---|---|---|---|---|---|"]
    n = 0
    for r in rows:
        base = bases.get(r["learn"])
        for name, st in r["forget_stats"].items():
            task, key = name.split("/")
            b = endpoints(base, task)[key][0] if base and task in base["eval"] and key in endpoints(base, task) else None
            sd = st["seed"]
            lines.append(f"| {r['learn']} | {r['forget']} | {r['method']} vs {r['reference']} | {task} {key} "
                         f"| {_fmt(key, b)} | {_fmt(key, st['reference'])} | {_fmt(key, st['method'])} "
                         f"| {_fmt(key, sd['mean'], True)} [{_fmt(key, sd['t_low'], True)}, {_fmt(key, sd['t_high'], True)}] "
                         f"| {_p(sd['p_t'])} |")
            n += 1
        for task, st in r["selfgen_stats"].items():
            b = base.get("selfgen_eval", {}).get(task, {}).get("score") if base else None
            sd = st["seed"]
            lines.append(f"| {r['learn']} | {r['forget']} | {r['method']} vs {r['reference']} "
                         f"| {task} held-out self-generated answers (per-token log-lik.) | {_num(b)} "
                         f"| {_num(st['reference'])} | {_num(st['method'])} | {_num(sd['mean'], '+.3f')} "
                         f"[{_num(sd['t_low'], '+.3f')}, {_num(sd['t_high'], '+.3f')}] | {_p(sd['p_t'])} |")
            n += 1
    return ("\n".join(lines) + "\n") if n else "_No forgetting endpoints recorded._\n"


def markdown_runs(runs: list[dict[str, Any]], stale: tuple[str, ...] = ()) -> str:
    """One line per run: learning-task endpoints, the prediction distribution, forgetting endpoints, CPU seconds."""
    lines = ["| run | learn acc | acc_norm | gold log p | predictions per choice | top share | dental acc / gold log p "
             "| psychol acc / gold log p | held-out self-gen log-lik. | final train loss | D_self / D_U "
             "| wall s (train / eval / total) | CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["run_id"]):
        learn = r["spec"]["learn"]
        e = r["eval"][learn]
        train = r.get("train") or {}
        losses = [x["loss"] for x in train.get("log_history", []) if "loss" in x]
        lwf = train.get("lwf") or {}
        counts = e.get("pred_counts", {})

        def forget(task):
            f = r["eval"].get(task)
            if not f:
                return "-"
            return f"{_pct(f['score'])} / {_num(f.get('mean_gold_logprob'))}"
        selfgen = "; ".join(f"{t} {_num(v['score'])}" for t, v in r.get("selfgen_eval", {}).items()) or "-"
        name = r["run_id"] + (" (**stale**)" if r["run_id"] in stale else "")
        lines.append(
            f"| {name} | {_pct(e['score'])} | {_pct(e.get('acc_norm'))} | {_num(e.get('mean_gold_logprob'))} "
            f"| {' '.join(f'{k}:{v}' for k, v in sorted(counts.items()))} "
            f"| {_pct(max(counts.values()) / len(e['items']) if counts else None)} | {forget('dental')} "
            f"| {forget('psychol')} | {selfgen} | {_num(losses[-1] if losses else None)} "
            f"| {sum(lwf.get('self_data_sizes', {}).values()) if lwf else '-'} / "
            f"{len(lwf.get('forget_indices', [])) if lwf else '-'} "
            f"| {_num(train.get('train_seconds'), '.0f')} / {_num(r.get('eval_seconds'), '.0f')} / "
            f"{_num(r.get('total_seconds'), '.0f')} | {_num(r.get('cpu_seconds'), '.0f')} |")
    return "\n".join(lines) + "\n"


def answer_word(text: str, words: tuple[str, ...] = ("positive", "negative")) -> str:
    """Which label word a self-generated answer gives: the first of ``words`` it contains, else ``other``."""
    low = text.lower()
    hits = [(low.index(w), w) for w in words if w in low]
    return min(hits)[1] if hits else "other"


def mechanism_markdown(runs: list[dict[str, Any]], task: str = "sst2swap",
                       choices: tuple[str, ...] = ("positive", "negative")) -> str:
    """Per run of the mechanism benchmark: accuracy per gold label, the share of each predicted label, the ascent steps
    taken and what the forgotten answers say. Shows whether a method moves item-specific knowledge or the label
    prior (a prior shift raises one gold label's accuracy and lowers the other's)."""
    lines = ["| run | acc | " + " | ".join(f"acc, gold \"{c}\"" for c in choices) + " | "
             + " | ".join(f"predicted \"{c}\"" for c in choices) + " | ascent steps / points | forgotten answers |",
             "|---|---|" + "---|" * (2 * len(choices)) + "---|---|"]
    for r in sorted(runs, key=lambda r: (r["spec"]["seed"], r["spec"]["method"])):
        e = r["eval"].get(task)
        if not e or "targets" not in e:
            continue
        targets, preds = e["targets"], e["preds"]
        acc = [sum(t == p == k for t, p in zip(targets, preds)) / max(1, targets.count(k)) for k in range(len(choices))]
        share = [preds.count(k) / len(preds) for k in range(len(choices))]
        lwf = (r.get("train") or {}).get("lwf") or {}
        words = [answer_word(x["text"], choices) for x in lwf.get("forgotten", [])]
        said = ", ".join(f"{w} {words.count(w)}" for w in (*choices, "other") if words.count(w)) or "-"
        steps = f"{lwf['unlearn_steps']} / {lwf['unlearn_points']}" if lwf else "-"
        lines.append(f"| {r['run_id']} | {_pct(e['score'])} | " + " | ".join(_pct(a) for a in acc) + " | "
                     + " | ".join(_pct(x) for x in share) + f" | {steps} | {said} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> str | None:
    """Per cell: the per-seed differences (dots) and their mean with the 95 % t interval over seeds (bar)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = primary_key(rows[0])
    scale = 100 if key == "acc" else 1
    labels = [f"{r['learn']}/{r['forget']}/{r['method']} vs {r['reference']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.4))
    y = np.arange(len(rows))
    for i, r in enumerate(rows):
        st = r["learn_stats"][primary_key(r)]
        sd = st["seed"]
        lo, hi = sd["t_low"], sd["t_high"]
        if lo == lo:
            ax.plot([scale * lo, scale * hi], [i, i], color="C0", lw=2)
        ax.plot(scale * sd["mean"], i, "o", color="C0")
        ax.plot([scale * d for d in st["deltas"]], [i] * len(st["deltas"]), "x", color="C1", ms=5)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, labels)
    spread = [abs(d) for r in rows for d in r["learn_stats"][primary_key(r)]["deltas"]]
    if spread and max(spread) > 0:  # a 2-seed t interval can be ten times wider than every seed's Δ: cut it
        ax.set_xlim(-3 * scale * max(spread), 3 * scale * max(spread))
    unit = "points of accuracy" if key == "acc" else "nats of gold log-probability"
    ax.set_xlabel(f"method minus reference ({unit})\nbar: 95 % t interval over seeds (cut at the axis), x: each seed")
    if title:
        ax.set_title(title, fontsize=9)
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


def gate(runs: list[dict[str, Any]], learn: str = "sst5", min_gain: float = 0.10, max_share: float = 0.5,
         max_sd: float = 0.03) -> dict[str, Any]:
    """The pilot's gate on ``learn``: vanilla beats base by ``min_gain``, no label takes more than ``max_share`` of the
    predictions in any vanilla run, vanilla's accuracy SD over seeds is at most ``max_sd``.

    Also reports the weaker gate of EVIDENCE.md (a gain of at least 5 points with a seed SD of at most 2 points, and
    the same collapse bound), the one the confirmatory run was pre-registered on.
    """
    base = base_rows(runs).get(learn)
    vanilla = sorted((r for r in runs if r["spec"]["learn"] == learn and r["spec"]["method"] == "vanilla"),
                     key=lambda r: r["spec"]["seed"])
    if base is None or not vanilla:
        return {"ready": False}
    accs = [r["eval"][learn]["score"] for r in vanilla]
    shares = [r["eval"][learn].get("max_pred_share") for r in vanilla]
    gain = statistics.mean(accs) - base["eval"][learn]["score"]
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    return {"ready": True, "seeds": [r["spec"]["seed"] for r in vanilla], "base": base["eval"][learn]["score"],
            "vanilla": accs, "gain": gain, "sd": sd, "max_share": max(s for s in shares if s is not None),
            "pass_gain": gain >= min_gain, "pass_share": all(s is not None and s <= max_share for s in shares),
            "pass_sd": sd == sd and sd <= max_sd,
            "pass_weak": gain >= 0.05 and sd == sd and sd <= 0.02 and all(s is not None and s <= max_share
                                                                          for s in shares)}


def gate_path(results_dir: str | Path) -> Path:
    """Where ``experiments.gated`` writes a pilot folder's verdict: ``<folder>.gate.json`` next to it."""
    path = Path(results_dir)
    return path.parent / f"{path.name}.gate.json"


def gate_markdown(g: dict[str, Any], record: dict[str, Any] | None = None) -> str:
    """The gate's statistics; with ``record`` (``<pilot>.gate.json`` from ``experiments.gated``) also the verdict
    under the rule the plan fixed in advance."""
    if not g.get("ready"):
        return "_The pilot has no base run and vanilla run yet._\n"
    verdict = "passed" if g["pass_gain"] and g["pass_share"] and g["pass_sd"] else "not passed"
    ruled = "" if record is None else (
        f"- **Verdict under the plan's pre-registered rule: {'passed' if record['passed'] else 'not passed'}** "
        f"(`--rule {record['rule']}`: {record['rule_text']}; judged by `experiments.gated` at {record['time']} on "
        f"seeds {', '.join(map(str, record['gate']['seeds']))}).\n")
    return (
        f"- Vanilla accuracy per seed ({', '.join(map(str, g['seeds']))}): "
        f"{', '.join(_pct(a) for a in g['vanilla'])} %; base {_pct(g['base'])} %.\n"
        f"- Gain over base: {_pct(g['gain'], True)} points (gate ≥ +10: {'yes' if g['pass_gain'] else 'no'}); "
        + (f"seed SD {100 * g['sd']:.2f} points" if g["sd"] == g["sd"] else "seed SD not measured (one seed)")
        + f" (gate ≤ 3: {'yes' if g['pass_sd'] else 'no'}); largest share of one label in "
        f"a vanilla run {_pct(g['max_share'])} % (gate ≤ 50 %: {'yes' if g['pass_share'] else 'no'}).\n"
        f"- **The issue's gate {verdict}.** Weaker gate of EVIDENCE.md (≥ +5 points, SD ≤ 2, no label > 50 %): "
        f"{'met' if g['pass_weak'] else 'not met'}.\n" + ruled)


def lwf_delta_sd(rows: list[dict[str, Any]], key: str = "acc") -> tuple[float, int] | None:
    """SD of the per-seed LWF − vanilla Δ of ``key`` in a section's comparison rows, with its number of seeds (≥ 2)."""
    for r in rows:
        if r["method"] == "lwf" and r["reference"] == "vanilla":
            deltas = r["learn_stats"].get(key, {}).get("deltas", [])
            if len(deltas) > 1:
                return statistics.stdev(deltas), len(deltas)
    return None


def power_markdown(g: dict[str, Any], legacy_sd: float | None, measured: tuple[float, int] | None = None) -> str:
    """Seeds needed for +3 points at 80 % power, under the SDs of the per-seed Δ that the data support so far."""
    lines = ["| SD of the per-seed Δ (points) | where it comes from | seeds for +3 points at 80 % (paired t, α 0.05) |",
             "|---|---|---|"]
    cases = []
    if measured is not None:
        sd, n = measured
        cases.append((max(sd, 1e-6), f"the pilot's LWF − vanilla Δ of accuracy, {n} seeds (measured; the issue's "
                                     "basis; with few seeds it is itself uncertain)"))
    if g.get("ready") and g["sd"] == g["sd"] and g["sd"] > 0:
        cases.append((math.sqrt(2) * g["sd"], "√2 × the pilot's vanilla seed SD (two independently noisy arms; "
                                              "to be replaced by the SD of the pilot's LWF − vanilla Δ)"))
    if legacy_sd:
        cases.append((legacy_sd, "pooled SD of the per-seed Δ in the legacy 16-step grid (issue 17 audit)"))
    for sd, source in cases:
        lines.append(f"| {100 * sd:.1f} | {source} | {seeds_needed(0.03, sd)} |")
    lines.append("\nThe confirmatory run takes the larger of that count and 5 seeds.")
    return "\n".join(lines) + "\n" if cases else "_No SD measured yet._\n"


def sensitivity_markdown(rows: list[dict[str, Any]]) -> str:
    """What the finished comparison of LWF against vanilla could detect: the smallest true Δ its paired t-test over
    seeds finds at 80 % power, from the SD of the per-seed Δ that it measured (accuracy and the primary endpoint)."""
    parts = []
    for key, unit, scale, fmt in (("gold_logprob", "nats of gold log-probability", 1, ".3f"),
                                  ("acc", "points of accuracy", 100, ".1f")):
        measured = lwf_delta_sd(rows, key)
        if measured is None:
            continue
        sd, n = measured
        if not sd > 0:  # every seed moved alike: no spread to size a test from
            continue
        parts.append(f"{scale * detectable_effect(n, sd):{fmt}} {unit} (SD of the per-seed Δ "
                     f"{scale * sd:{fmt}}, {n} seeds)")
    if not parts:
        return ""
    return ("Sensitivity (after the fact, from the run's own spread): at 80 % power, the seed-level t-test detects a "
            "true LWF − vanilla difference of " + "; and ".join(parts) + ".\n")


def pooled_delta_sd(rows: list[dict[str, Any]], key: str = "acc") -> float | None:
    """Pooled SD of the per-seed differences over cells (each cell's variance weighted by its degrees of freedom)."""
    num = den = 0
    for r in rows:
        d = r["learn_stats"].get(key, {}).get("deltas", [])
        if len(d) > 1:
            num += statistics.variance(d) * (len(d) - 1)
            den += len(d) - 1
    return math.sqrt(num / den) if den else None


def section(name: str, runs: list[dict[str, Any]], methods: tuple[str, ...], stale: tuple[str, ...] = (),
            against_base: tuple[str, ...] = ("vanilla",)) -> tuple[str, list]:
    """A results section: base row, ``against_base`` methods against base, ``methods`` against vanilla, forgetting,
    every run."""
    vs_base = compare(runs, against_base, reference="base", exclude=stale)
    vs_vanilla = compare(runs, methods, reference="vanilla", exclude=stale)
    m = add_holm(vs_vanilla)
    parts = [f"#### Learning task ({name})\n",
             "Against the untrained model (base):\n", markdown_comparison(vs_base, runs)]
    if vs_vanilla:
        holm_text = ("one comparison on the primary endpoint, so `p Holm` equals its p" if m == 1 else
                     f"{m} comparisons on the primary endpoint; `p Holm` corrects the seed-level t-test for them")
        parts += [f"\nAgainst vanilla fine-tuning with the same seed ({holm_text}):\n",
                  markdown_comparison(vs_vanilla, runs)]
    parts += [f"\n#### Forgetting endpoints ({name})\n", markdown_forgetting(vs_base + vs_vanilla, runs),
              f"\n#### Every run ({name})\n", markdown_runs(runs, stale)]
    return "\n".join(parts), vs_base + vs_vanilla


def generated_markdown(sections: dict[str, list[dict[str, Any]]],
                       probe_path: Path = RESULTS / "optimizer_probe.json",
                       verdicts: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, list]]:
    """The generated block of docs/results.md from the run files of each results folder (and the verdicts
    ``experiments.gated`` wrote, by pilot folder)."""
    parts, tables, verdicts = [], {}, verdicts or {}
    confirm = sections.get("confirm", [])
    if confirm:
        text, tables["confirm"] = section("confirmatory, test", confirm, ("lwf",), against_base=("vanilla", "lwf"))
        pairs = len({r["spec"]["seed"] for r in confirm if r["spec"]["method"] == "lwf"}
                    & {r["spec"]["seed"] for r in confirm if r["spec"]["method"] == "vanilla"})
        parts += [f"### Confirmatory run on the sst5 test split (`configs/{CONFIRM_CONFIG}`)\n",
                  f"{len(confirm)} run files in `experiments/results/confirm/`, under the plan pre-registered above "
                  "(gate on five vanilla dev seeds, then the test split read once). "
                  + ("" if pairs >= 5 else f"**Interim: {pairs} of the 5 planned seed pairs; the confirmatory test is "
                     "read only on all five.** ")
                  + "The one confirmatory test is the "
                  "seed-level t-test of the primary endpoint (`gold_logprob`) of LWF against vanilla; every other "
                  "column and table is secondary.\n",
                  sensitivity_markdown(tables["confirm"]) if pairs >= 5 else "", text,
                  "\n![per-seed Δ, confirmatory run](results_confirm.png)\n"]
    pilot = sections.get("pilot", [])
    g = gate(pilot)
    parts += ["### Pilot on the sst5 dev split (`configs/pilot.yaml`)\n",
              f"{len(pilot)} run files in `experiments/results/pilot/`. Accuracy in percent, Δ in points; "
              "`gold_logprob` (the primary endpoint) = mean over items of log p(gold | choices), the gold label's "
              "log-likelihood normalised across the choices, in nats (0 = certain; log 1/5 = −1.609 for uniform "
              "over five labels); `acc_norm` = lm-eval's byte-length-normalised accuracy (sst5 labels differ in "
              "length).\n", "#### Gate\n", gate_markdown(g, verdicts.get("pilot"))]
    legacy_runs = sections.get("runs", [])
    stale = tuple(stale_runs(legacy_runs))
    legacy_all = compare(legacy_runs, tuple(sorted(set(MAIN_METHODS + ABLATIONS + BASELINES + DEFAULTS))),
                         exclude=stale)
    if pilot:
        text, tables["pilot"] = section("pilot, dev", pilot, ("lwf", "lwf_random", "lwf_bottom"),
                                        against_base=("vanilla", "lwf", "lwf_random", "lwf_bottom"))
    parts += ["\n#### Power for the confirmatory run\n",
              power_markdown(g, pooled_delta_sd(legacy_all), lwf_delta_sd(tables.get("pilot", [])))]
    if pilot:
        parts += [text, "\n![per-seed Δ of the primary endpoint, pilot](results_pilot.png)\n"]
    for folder, config, what in PILOT_BUDGETS:
        more = sections.get(folder, [])
        if not more:
            continue
        g2 = gate(more)
        parts += [f"\n### Pilot, {what} (`configs/{config}`)\n",
                  f"{len(more)} run files in `experiments/results/{folder}/`; the same items and endpoints as the pilot "
                  "above.\n", "#### Gate\n", gate_markdown(g2, verdicts.get(folder))]
        text, tables[folder] = section(f"{folder}, dev", more, ("lwf", "lwf_random", "lwf_bottom"),
                                       against_base=("vanilla", "lwf", "lwf_random", "lwf_bottom"))
        parts.append(text)
    mech = sections.get("mechanism", [])
    parts += ["\n### Mechanism benchmark: swapped binary sentiment (`configs/mechanism.yaml`)\n",
              f"{len(mech)} run files in `experiments/results/mechanism/`. Primary endpoint: the gold (swapped) "
              "label's log-probability normalised across the two choices; `margin` (in the CSV) = ll(swapped label) − "
              "ll(true label).\n"]
    if mech:
        text, tables["mechanism"] = section("mechanism, dev", mech, ("lwf", "lwf_random", "lwf_bottom"),
                                            against_base=("vanilla", "lwf", "lwf_random", "lwf_bottom"))
        parts += [text, "\n#### Per gold label, and what was forgotten (mechanism, dev)\n", mechanism_markdown(mech)]
    else:
        parts.append("_No runs yet._\n")
    for folder, config, what in MECHANISM_BUDGETS:
        more = sections.get(folder, [])
        if not more:
            continue
        parts += [f"\n### Mechanism benchmark, {what} (`configs/{config}`; exploratory)\n",
                  f"{len(more)} run files in `experiments/results/{folder}/`; the same items and endpoints as the "
                  "mechanism benchmark above.\n"]
        methods = tuple(sorted({r["spec"]["method"] for r in more} - {"base", "vanilla"}))  # every variant run there
        text, tables[folder] = section(f"{folder}, dev", more, methods, against_base=("vanilla", *methods))
        parts += [text, f"\n#### Per gold label, and what was forgotten ({folder}, dev)\n", mechanism_markdown(more)]
    parts += ["\n### Legacy grid, exploratory (`configs/core.yaml`, `configs/defaults.yaml`; 16 steps, test split)\n",
              f"{len(legacy_runs)} run files in `experiments/results/runs/`. **Exploratory**: this design cannot answer "
              "whether LWF helps, because the learning task was not learned in 16 steps (see the text above). "
              f"Stale run files left out of every table ({len(stale)}): "
              + (", ".join(f"`{s}`" for s in stale) or "none") + ". The primary endpoint here is accuracy (the "
              "gold log-probability was not recorded per item then); seed-level tests first, item-level tests are "
              "secondary and ignore the seed-to-seed variance.\n"]
    if legacy_runs:
        text, tables["legacy"] = section("legacy, test", legacy_runs, tuple(sorted(set(
            MAIN_METHODS + ABLATIONS + BASELINES + DEFAULTS))), stale)
        parts += [text, "\n![per-seed Δ vs vanilla, legacy grid](results_delta.png)\n",
                  "\n#### One unlearning step: shared AdamW or a separate SGD (`experiments/optimizer_probe.py`)\n",
                  probe_markdown(probe_path)]
    return "\n".join(parts), tables


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


PILOT_BUDGETS = (  # further pilot budgets: folder, config, what differs from pilot.yaml
    ("pilot_lr1e-4", "pilot_lr1e-4.yaml", "learning rate 1e-4"),
    ("pilot_250", "pilot_250.yaml", "250 steps"),
    ("pilot_decay", "pilot_decay.yaml", "warm-up to 1e-4, then linear decay to 0"),
    ("pilot_decay300", "pilot_decay300.yaml", "the decaying rate over 300 steps"),
)
CONFIRM_CONFIG = "confirm_decay300.yaml"  # the plan the confirm/ folder runs under (the third pre-registered plan)
MECHANISM_BUDGETS = (  # further mechanism budgets: folder, config, what differs from mechanism.yaml
    ("mechanism_40", "mechanism_40.yaml", "half the budget (40 steps, a point every 10)"),
)
SECTIONS = ("confirm", "pilot", *(folder for folder, _, _ in PILOT_BUDGETS), "mechanism",
            *(folder for folder, _, _ in MECHANISM_BUDGETS), "runs")  # results/<folder>/*.json;
# "runs" is the legacy grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default=str(RESULTS), help="Folder holding confirm/, pilot/, pilot_lr1e-4/, pilot_250/, pilot_decay/, pilot_decay300/, mechanism/, mechanism_40/, runs/.")
    parser.add_argument("--docs", default=str(RESULTS / "REPORT.md"),
                        help="Markdown file whose generated block is replaced ('none' to skip).")
    args = parser.parse_args(argv)
    out = Path(args.results_dir)
    sections = {name: load_runs(str(out / name)) for name in SECTIONS}
    verdicts = {name: json.loads(gate_path(out / name).read_text(encoding="utf-8"))
                for name in SECTIONS if gate_path(out / name).is_file()}
    generated, tables = generated_markdown(sections, out / "optimizer_probe.json", verdicts)
    for name, rows in tables.items():
        write_csv(out / f"{name}.csv", [flat_row(r) for r in rows])
    print(generated)
    if args.docs != "none":
        docs = Path(args.docs)
        legacy = [r for r in tables.get("legacy", []) if r["reference"] == "vanilla"]
        figure = plot(legacy, docs.parent / "results_delta.png", "legacy grid (exploratory): accuracy, method − vanilla")
        pilot = tables.get("pilot", [])
        if pilot:
            plot(pilot, docs.parent / "results_pilot.png", "pilot (dev): gold log-probability, method − reference")
        confirm = [r for r in tables.get("confirm", []) if r["reference"] == "vanilla"]  # the tested comparison
        if confirm:
            plot(confirm, docs.parent / "results_confirm.png",
                 "confirmatory (test): gold log-probability, LWF − vanilla (same seed)")
        if figure:
            print(f"wrote {figure}")
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
