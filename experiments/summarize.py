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


def arm(run: dict[str, Any]) -> str:
    """A run's method with its variant (``oracle-d3``), as ``experiments.run.RunSpec.arm``."""
    spec = run["spec"]
    return f"{spec['method']}-{spec['variant']}" if spec.get("variant") else spec["method"]


def compare(runs: list[dict[str, Any]], methods: tuple[str, ...], reference: str = "vanilla",
            exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per (learning task, forgetting setting, arm) with its seeds paired against ``reference``.

    An arm is a method with its variant (:func:`arm`); ``methods`` selects arms by their name or their method.
    ``reference`` is ``base`` (the untrained model, one evaluation for every seed) or another arm with the same seed
    (``vanilla``, or e.g. ``random``), looked up under the same forgetting setting first, then under ``none``.
    Each row holds, per endpoint (``acc``, ``acc_norm``, ``gold_logprob``, ``margin`` where recorded), the per-seed
    differences with the seed-level tests (primary), the hierarchical bootstrap, and the item-level bootstrap and
    sign test (secondary); and the forgetting tasks' endpoints for method, vanilla and base.
    """
    runs = [r for r in runs if r["run_id"] not in exclude]
    by_id = {(r["spec"]["learn"], r["spec"]["forget"], arm(r), r["spec"]["seed"]): r for r in runs}
    cells = sorted({(r["spec"]["learn"], r["spec"]["forget"], arm(r)) for r in runs
                    if arm(r) in methods or r["spec"]["method"] in methods})
    rows = []
    for learn, forget, method in cells:
        def ref_run(seed):
            if reference == "base":
                return by_id.get((learn, "none", "base", 0))
            return by_id.get((learn, forget, reference, seed)) or by_id.get((learn, "none", reference, seed))
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


def _listed(rows: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows if isinstance(rows, list) else [rows]


def flat_conflict_row(r: dict[str, Any]) -> list[dict[str, Any]]:
    """CSV rows of a conflict-benchmark comparison: one per endpoint."""
    out = []
    for name, st in r["stats"].items():
        row = {"comparison": r["comparison"], "preregistered": r["preregistered"], "endpoint": name,
               "seeds": " ".join(map(str, r["seeds"])), "a": st["method"], "b": st["reference"],
               "deltas": " ".join(f"{d:+.4f}" for d in st["deltas"]),
               "p_holm": r.get("p_holm") if name == f"{CHAT}/gold_logprob" else None}
        row.update({f"seed_{k}": v for k, v in st["seed"].items()})
        row.update({"tost_p": st.get("tost", {}).get("p"), "tost_bound": st.get("tost", {}).get("bound"),
                    "hier_low": st["hier"]["low"], "hier_high": st["hier"]["high"], "hier_p": st["hier"]["p"]})
        out.append(row)
    return out


def flat_dose_row(r: dict[str, Any]) -> dict[str, Any]:
    """A CSV row of a dose arm against vanilla."""
    row = {"arm": r["arm"], "dose": r["dose"], "seeds": " ".join(map(str, r["seeds"])),
           "ascent_steps": " ".join(str(x) for x in r["ascent_steps"])}
    for key, st in r.items():
        if isinstance(st, dict) and "deltas" in st:
            row[f"{key}_deltas"] = " ".join(f"{d:+.4f}" for d in st["deltas"])
            row.update({f"{key}_{k}": st["seed"][k] for k in ("mean", "sd", "t_low", "t_high", "p_t")})
    return row


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

    Also reports the weak gate (a gain of at least 5 points with a seed SD of at most 2 points, and
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
        f"- **The strict gate {verdict}.** Weak gate (≥ +5 points, SD ≤ 2, no label > 50 %): "
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
        cases.append((max(sd, 1e-6), f"the pilot's LWF − vanilla Δ of accuracy, {n} seeds (measured;"
                                     " with few seeds it is itself uncertain)"))
    if g.get("ready") and g["sd"] == g["sd"] and g["sd"] > 0:
        cases.append((math.sqrt(2) * g["sd"], "√2 × the pilot's vanilla seed SD (two independently noisy arms; "
                                              "to be replaced by the SD of the pilot's LWF − vanilla Δ)"))
    if legacy_sd:
        cases.append((legacy_sd, "pooled SD of the per-seed Δ in the legacy 16-step grid"))
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
              f"\n#### Every run ({name})\n", provenance_markdown(runs), markdown_runs(runs, stale)]
    return "\n".join(parts), vs_base + vs_vanilla


def generated_markdown(sections: dict[str, list[dict[str, Any]]],
                       probe_path: Path = RESULTS / "optimizer_probe.json",
                       verdicts: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, list]]:
    """The generated block of docs/results.md from the run files of each results folder (and the verdicts
    ``experiments.gated`` wrote, by pilot folder)."""
    parts, tables, verdicts = [], {}, verdicts or {}
    text, tables = positive_control_markdown(sections, verdicts)
    if text:
        parts.append(text)
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


# ------------------------------------------------------------------------------------ provenance and compute
def provenance_markdown(runs: list[dict[str, Any]]) -> str:
    """Which commits a folder's run files come from, and which were written from a dirty tree (named)."""
    if not runs:
        return ""
    recorded = [r for r in runs if "provenance" in r]
    missing = len(runs) - len(recorded)
    commits: dict[str, int] = {}
    for r in recorded:
        commits[r["provenance"]["commit"] or "unknown"] = commits.get(r["provenance"]["commit"] or "unknown", 0) + 1
    dirty = sorted(r["run_id"] for r in recorded if r["provenance"]["dirty"])
    parts = []
    if commits:
        parts.append("run files by commit: " + ", ".join(f"`{c[:12]}` ({n})" for c, n in sorted(commits.items())))
    if missing:
        parts.append(f"{missing} run files record no commit (written before run files carried provenance)")
    text = "Provenance: " + "; ".join(parts) + ". "
    if dirty:
        text += (f"**{len(dirty)} run files come from a dirty working tree** (their code may differ from the recorded "
                 "commit): " + ", ".join(f"`{d}`" for d in dirty) + ".\n")
    elif recorded:
        text += "Every run file with provenance comes from a clean working tree.\n"
    else:
        text += "\n"
    return text


def compute_rows(sections: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """CPU time by results folder and arm, from the run files' ``cpu_seconds`` (process CPU time of each run)."""
    rows = []
    for folder, runs in sections.items():
        by_arm: dict[str, list[float]] = {}
        for r in runs:
            by_arm.setdefault(arm(r), []).append(float(r.get("cpu_seconds") or 0.0))
        for name, values in sorted(by_arm.items()):
            rows.append({"folder": folder, "arm": name, "runs": len(values), "cpu_hours": sum(values) / 3600,
                         "cpu_minutes_per_run": statistics.mean(values) / 60})
    return rows


def compute_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| results folder | arm | runs | CPU hours | CPU minutes per run |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['folder']} | {row['arm']} | {row['runs']} | {row['cpu_hours']:.2f} "
                     f"| {row['cpu_minutes_per_run']:.1f} |")
    total = sum(row["cpu_hours"] for row in rows)
    lines.append(f"| **total** | | {sum(row['runs'] for row in rows)} | **{total:.2f}** | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the conflict benchmark
TRAINED, CHAT = "sst2plain", "sst2chat"  # the trained (plain) format and the held-out chat format
# The pre-registered comparisons of the test run (experiments/plans/), Holm-corrected together, and two more reported.
CONFLICT_COMPARISONS = (("oracle", "vanilla"), ("lwf", "vanilla"), ("lwf", "random"), ("lwf", "oracle"))
CONFLICT_SECONDARY = (("random", "vanilla"), ("ga_all", "vanilla"))
CONFLICT_TOST_NATS = 0.05  # equivalence bound of the primary endpoint (nats of gold log-probability), fixed in the plan
CONFLICT_ENDPOINTS = ((CHAT, "gold_logprob"), (CHAT, "acc"), (TRAINED, "acc"), (TRAINED, "gold_logprob"))


def conflict_gate(runs: list[dict[str, Any]], min_gain: float = 0.20, min_gap: float = 0.15, effect: float = 0.05,
                  planned_seeds: int = 5) -> dict[str, Any]:
    """The conflict benchmark's pilot gate on its base run and vanilla seeds (dev).

    * ``pass_gain``: vanilla learns the trained format: mean swapped accuracy there >= base + ``min_gain``;
    * ``pass_gap``: the chat-format conflict survives: mean chat-format swapped accuracy >= ``min_gap`` below the
      trained format's;
    * ``pass_sd``: seeds are steady enough to see ``effect`` (+5 points) in the chat format: a paired t-test over
      ``planned_seeds`` seeds detects it at 80 % power when the SD of a per-seed difference is sqrt(2) x the vanilla
      seed SD of chat-format accuracy (two independently noisy arms).
    """
    base = next((r for r in runs if r["spec"]["method"] == "base" and r["spec"]["learn"] == TRAINED), None)
    vanilla = sorted((r for r in runs if r["spec"]["method"] == "vanilla" and r["spec"]["learn"] == TRAINED
                      and CHAT in r["eval"]), key=lambda r: r["spec"]["seed"])
    if base is None or CHAT not in base["eval"] or not vanilla:
        return {"ready": False}
    plain = [r["eval"][TRAINED]["score"] for r in vanilla]
    chat = [r["eval"][CHAT]["score"] for r in vanilla]
    gain = statistics.mean(plain) - base["eval"][TRAINED]["score"]
    gap = statistics.mean(plain) - statistics.mean(chat)
    sd = statistics.stdev(chat) if len(chat) > 1 else float("nan")
    detectable = detectable_effect(planned_seeds, math.sqrt(2) * sd) if sd == sd and sd > 0 else float("nan")
    if sd == 0:
        detectable = 0.0
    out = {"ready": True, "seeds": [r["spec"]["seed"] for r in vanilla],
           "base_plain": base["eval"][TRAINED]["score"], "base_chat": base["eval"][CHAT]["score"],
           "base_chat_gold_logprob": base["eval"][CHAT].get("mean_gold_logprob"),
           "vanilla_plain": plain, "vanilla_chat": chat,
           "vanilla_chat_gold_logprob": [r["eval"][CHAT].get("mean_gold_logprob") for r in vanilla],
           "gain": gain, "gap": gap, "sd": sd, "sd_plain": statistics.stdev(plain) if len(plain) > 1 else float("nan"),
           "detectable": detectable, "min_gain": min_gain, "min_gap": min_gap, "effect": effect,
           "pass_gain": gain >= min_gain, "pass_gap": gap >= min_gap,
           "pass_sd": detectable == detectable and detectable <= effect}
    out["passed"] = bool(out["pass_gain"] and out["pass_gap"] and out["pass_sd"])
    return out


def conflict_gate_markdown(g: dict[str, Any], record: dict[str, Any] | None = None) -> str:
    if not g.get("ready"):
        return "_The pilot has no base run and vanilla run yet._\n"
    yes = {True: "yes", False: "no"}
    ruled = "" if record is None else (
        f"- **Verdict under the plan's pre-registered rule: {'passed' if record['passed'] else 'not passed'}** "
        f"(`--rule {record['rule']}`; judged by `experiments.gated` at {record['time']} on seeds "
        f"{', '.join(map(str, record['gate']['seeds']))}).\n")
    return (
        f"- Swapped accuracy, trained (plain) format: base {_pct(g['base_plain'])} %, vanilla per seed "
        f"({', '.join(map(str, g['seeds']))}) {', '.join(_pct(a) for a in g['vanilla_plain'])} %; gain "
        f"{_pct(g['gain'], True)} points (gate >= +{100 * g['min_gain']:.0f}: {yes[g['pass_gain']]}).\n"
        f"- Swapped accuracy, chat format: base {_pct(g['base_chat'])} %, vanilla "
        f"{', '.join(_pct(a) for a in g['vanilla_chat'])} %; {_pct(g['gap'])} points below the trained format "
        f"(gate >= {100 * g['min_gap']:.0f}: {yes[g['pass_gap']]}). Chat-format gold log-probability: base "
        f"{_num(g['base_chat_gold_logprob'])}, vanilla {', '.join(_num(x) for x in g['vanilla_chat_gold_logprob'])}.\n"
        f"- Seed SD of chat-format accuracy {100 * g['sd']:.2f} points: a paired t-test over 5 seeds detects "
        f"{_pct(g['detectable'], True)} points at 80 % power (gate <= +{100 * g['effect']:.0f}: "
        f"{yes[g['pass_sd']]}).\n"
        f"- **Gate {'passed' if g['passed'] else 'not passed'}.**\n" + ruled)


def _by_arm_seed(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(arm(r), r["spec"]["seed"]): r for r in runs if r["spec"]["method"] != "base"}


def conflict_comparisons(runs: list[dict[str, Any]], comparisons=CONFLICT_COMPARISONS + CONFLICT_SECONDARY,
                         bound: float = CONFLICT_TOST_NATS) -> list[dict[str, Any]]:
    """Seed-paired comparisons of arms on the conflict benchmark's endpoints (primary: chat-format gold
    log-probability): per-seed differences, seed-level paired t, exact Wilcoxon, TOST (``bound`` nats on the primary,
    ±3 points on accuracy), the hierarchical bootstrap and (secondary) item-level tests. The pre-registered
    comparisons (:data:`CONFLICT_COMPARISONS`) get a Holm correction over their primary p-values."""
    by = _by_arm_seed(runs)
    rows = []
    for a, b in comparisons:
        seeds = sorted(s for (name, s) in by if name == a and (b, s) in by)
        if not seeds:
            continue
        pairs = [(by[(a, s)], by[(b, s)]) for s in seeds]
        for x, y in pairs:
            for task in (TRAINED, CHAT):
                if x["eval"][task]["doc_ids"] != y["eval"][task]["doc_ids"]:
                    raise ValueError(f"{x['run_id']} and {y['run_id']} were evaluated on different {task} items.")
        row = {"comparison": f"{a} − {b}", "a": a, "b": b, "seeds": seeds, "stats": {},
               "preregistered": (a, b) in CONFLICT_COMPARISONS}
        for task, key in CONFLICT_ENDPOINTS:
            st = _cell_stats(pairs, task, key)
            if st is not None:
                if key == "gold_logprob":
                    st["tost"] = tost(st["deltas"], bound)
                row["stats"][f"{task}/{key}"] = st
        rows.append(row)
    pre = [r for r in rows if r["preregistered"]]
    for r, p in zip(pre, holm([r["stats"][f"{CHAT}/gold_logprob"]["seed"]["p_t"] for r in pre])):
        r["p_holm"] = p
    return rows


def conflict_comparison_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_No paired runs yet._\n"
    lines = ["| comparison | seeds | endpoint | a (mean ± SD) | b | Δ per seed | Δ mean [95 % t CI] | p t | p Wilcoxon "
             "| p Holm (4 pre-registered) | TOST p (bound) | hierarchical bootstrap 95 % CI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, st in r["stats"].items():
            task, key = name.split("/")
            sd = st["seed"]
            primary = name == f"{CHAT}/gold_logprob"
            label = {"sst2chat": "chat", "sst2plain": "trained"}[task] + f" {key}" + (" (primary)" if primary else "")
            bound = (f"{_num(st['tost']['p'])} (±{st['tost']['bound']:g} nats)" if key == "gold_logprob" else
                     f"{_num(st['tost']['p'])} (±{100 * st['tost']['bound']:g} pts)") if "tost" in st else "-"
            lines.append(
                f"| {r['comparison']}{'' if r['preregistered'] else ' (secondary)'} | {len(r['seeds'])} | {label} "
                f"| {_fmt(key, st['method'])} ± {_fmt(key, st['method_sd'])} | {_fmt(key, st['reference'])} "
                f"| {' '.join(_fmt(key, d, True) for d in st['deltas'])} | {_fmt(key, sd['mean'], True)} "
                f"[{_fmt(key, sd['t_low'], True)}, {_fmt(key, sd['t_high'], True)}] | {_p(sd['p_t'])} "
                f"| {_p(sd['p_wilcoxon'])} | {_p(r.get('p_holm')) if primary and r['preregistered'] else ''} "
                f"| {bound} | [{_fmt(key, st['hier']['low'], True)}, {_fmt(key, st['hier']['high'], True)}] |")
    return "\n".join(lines) + "\n"


def conflict_reading(rows: list[dict[str, Any]], alpha: float = 0.05, seeds: int = 5) -> dict[str, Any]:
    """The reading the test plan fixed in advance, applied to the pre-registered comparisons (Holm-adjusted seed-level
    t-tests of the primary endpoint). "helps" = mean > 0 and adjusted p < alpha; "lwf ≈ oracle" = TOST p < alpha.

    * oracle helps, lwf helps and lwf > random: the mechanism works at this scale;
    * oracle helps, lwf does not help: the confidence score is the weak link;
    * oracle helps, lwf helps, lwf not above random: forgetting helps, the selection adds nothing measurable;
    * oracle does not help: the premise fails at this scale (nothing here can show that forgetting helps).
    """
    by = {(r["a"], r["b"]): r for r in rows if r["preregistered"]}
    if len(by) < 4 or any(len(r["seeds"]) < seeds for r in by.values()):
        return {"ready": False}

    def up(a, b):
        st = by[(a, b)]["stats"][f"{CHAT}/gold_logprob"]
        return st["seed"]["mean"] > 0 and by[(a, b)]["p_holm"] < alpha

    oracle, lwf, over_random = up("oracle", "vanilla"), up("lwf", "vanilla"), up("lwf", "random")
    equivalent = by[("lwf", "oracle")]["stats"][f"{CHAT}/gold_logprob"]["tost"]["p"] < alpha
    if not oracle:
        reading = "premise fails: forgetting the right knowledge does not move the endpoint at this scale"
    elif not lwf:
        reading = "the confidence score is the weak link: the oracle helps, LWF's selection does not"
    elif over_random:
        reading = "the mechanism works at this scale: the oracle helps and LWF helps beyond random selection"
    else:
        reading = "forgetting helps, but LWF's selection adds nothing measurable over random selection"
    return {"ready": True, "oracle_helps": oracle, "lwf_helps": lwf, "lwf_above_random": over_random,
            "lwf_equivalent_to_oracle": equivalent, "reading": reading}


def audit_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per LWF-like run of the conflict benchmark: what its D_U (and D_self) answers say against each review's true
    label (``conflicting`` = the true label, the knowledge the swapped task contradicts; ``agreeing`` = the swapped
    label; ``other``), how many are in the scored form, and the mean confidence of each class in D_self."""
    rows = []
    for r in sorted(runs, key=lambda r: (arm(r), r["spec"]["seed"])):
        items = (r.get("train") or {}).get("d_self") or []
        items = [x for x in items if "audit" in x]
        if not items:
            continue
        lwf = r["train"].get("lwf") or {}
        row = {"run_id": r["run_id"], "arm": arm(r), "seed": r["spec"]["seed"], "d_self": len(items),
               "d_u": sum(x["forgotten"] for x in items), "ascent_steps": lwf.get("unlearn_steps"),
               "unlearn_points": lwf.get("unlearn_points")}
        for scope, chosen in (("d_u", [x for x in items if x["forgotten"]]), ("d_self", items)):
            for c in AUDIT:
                row[f"{scope}_{c}"] = sum(x["audit"] == c for x in chosen)
            row[f"{scope}_scored_form"] = sum(bool(x.get("scored_form")) for x in chosen)
        for c in AUDIT:
            scores = [x["score"] for x in items if x["audit"] == c and x.get("score") is not None]
            row[f"mean_score_{c}"] = statistics.mean(scores) if scores else None
        said = [x["text"].strip().lower() for x in items if x["forgotten"]]
        row["d_u_says_positive"] = sum(t.startswith("positive") for t in said)
        row["d_u_true_positive"] = sum(x["true_label"] == "positive" for x in items if x["forgotten"])
        rows.append(row)
    return rows


AUDIT = ("conflicting", "agreeing", "other")


def audit_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_No LWF-like runs with a D_self record yet._\n"
    lines = ["| run | D_U conflicting / agreeing / other | D_U in the scored form | D_U answers \"positive\" "
             "| D_U reviews truly positive | D_self conflicting / agreeing / other | mean confidence in D_self: "
             "conflicting / agreeing / other | ascent steps / points |", "|---|---|---|---|---|---|---|---|"]
    totals: dict[str, dict[str, int]] = {}
    for r in rows:
        lines.append(
            f"| {r['run_id']} | {r['d_u_conflicting']} / {r['d_u_agreeing']} / {r['d_u_other']} "
            f"| {r['d_u_scored_form']} of {r['d_u']} | {r['d_u_says_positive']} | {r['d_u_true_positive']} "
            f"| {r['d_self_conflicting']} / {r['d_self_agreeing']} / {r['d_self_other']} "
            f"| {' / '.join(_num(r[f'mean_score_{c}'], '.3g') for c in AUDIT)} "
            f"| {r['ascent_steps']} / {r['unlearn_points']} |")
        t = totals.setdefault(r["arm"], {"runs": 0, **{c: 0 for c in AUDIT}, "d_u": 0})
        t["runs"] += 1
        t["d_u"] += r["d_u"]
        for c in AUDIT:
            t[c] += r[f"d_u_{c}"]
    lines += ["", "| arm | runs | forgotten answers | conflicting | agreeing | other |", "|---|---|---|---|---|---|"]
    for name, t in sorted(totals.items()):
        lines.append(f"| {name} | {t['runs']} | {t['d_u']} | {t['conflicting']} | {t['agreeing']} | {t['other']} |")
    return "\n".join(lines) + "\n"


def dose_settings(run: dict[str, Any]) -> str:
    """The ascent dose a run used: every, steps, lambda, cap, the D_U size (from its resolved LWF settings)."""
    cfg = ((run.get("train") or {}).get("lwf_config")) or {}
    if not cfg:
        return "-"
    lwf = (run.get("train") or {}).get("lwf") or {}
    return (f"every {cfg['lwf_unlearn_every']}, {cfg['lwf_unlearn_steps']} step(s) × {cfg['lwf_unlearn_batch_size']}, "
            f"λ {cfg['lwf_unlearn_coef']:g}, cap {cfg['lwf_forget_loss_cap']:g}, D_U {len(lwf.get('forget_indices', []))}")


def dose_rows(runs: list[dict[str, Any]], endpoints: tuple[tuple[str, str], ...], harm: tuple[str, str],
              reference: str = "vanilla") -> list[dict[str, Any]]:
    """Per arm against ``reference`` (same seed): the dose, the ascent steps applied, and the per-seed differences of
    each endpoint (``(task, key)``) with its mean, SD and seed-level t interval; ``harm`` names the endpoint whose drop
    the dose rule bounds (the learning task's accuracy)."""
    by = _by_arm_seed(runs)
    out = []
    for name in sorted({a for a, _ in by} - {reference}):
        seeds = sorted(s for (a, s) in by if a == name and (reference, s) in by)
        if not seeds:
            continue
        row = {"arm": name, "seeds": seeds, "dose": dose_settings(by[(name, seeds[0])]),
               "ascent_steps": [((by[(name, s)].get("train") or {}).get("lwf") or {}).get("unlearn_steps")
                                for s in seeds]}
        for task, key in endpoints:
            pairs = [(endpoints_of(by[(name, s)], task, key), endpoints_of(by[(reference, s)], task, key))
                     for s in seeds]
            if all(a is not None and b is not None for a, b in pairs):  # a run without the values: no column
                deltas = [a - b for a, b in pairs]
                row[f"{task}/{key}"] = {"deltas": deltas, "seed": seed_tests(deltas)}
        row["harm"] = row[f"{harm[0]}/{harm[1]}"]["seed"]["mean"]
        out.append(row)
    return out


def endpoints_of(run: dict[str, Any], task: str, key: str) -> float | None:
    """One endpoint's value in one run; ``swapped_auc`` is the item ranking of :func:`swapped_auc` (None when the run
    file has no per-choice log-likelihoods)."""
    if key == "swapped_auc":
        return swapped_auc(run["eval"].get(task))
    return endpoints(run, task)[key][0]


# The oracle doses of the dose-sweep plan (experiments/plans/conflict_b_dose.md), mildest first: its tie and fallback order.
CONFLICT_DOSE_ORDER = ("oracle-d1", "oracle-d2", "oracle-d3", "oracle-d3k48", "oracle-d3cap10", "oracle-d4")


def choose_dose(rows: list[dict[str, Any]], primary: tuple[str, str] = (CHAT, "gold_logprob"),
                max_harm: float = 0.05, order: tuple[str, ...] = CONFLICT_DOSE_ORDER) -> dict[str, Any]:
    """The dose rule of the dose-sweep plan: of the doses in ``order`` whose mean trained-format accuracy is at most
    ``max_harm`` below vanilla's, the one with the largest mean gain on the primary endpoint (ties: the earlier in
    ``order``). If no dose keeps within the bound: the first dose in ``order`` whose gain's 95 % t interval excludes 0,
    else the first dose in ``order``."""
    ranked = sorted((r for r in rows if r["arm"] in order), key=lambda r: order.index(r["arm"]))
    if not ranked:
        return {"chosen": None, "reason": "no dose of the sweep has paired runs yet"}

    def gain(r):
        return r[f"{primary[0]}/{primary[1]}"]["seed"]

    eligible = [r for r in ranked if r["harm"] >= -max_harm]
    if eligible:
        best = max(eligible, key=lambda r: (gain(r)["mean"], -ranked.index(r)))
        reason = (f"largest mean gain on the primary endpoint among doses within {100 * max_harm:.0f} points of "
                  "vanilla's trained-format accuracy")
    else:
        moved = [r for r in ranked if gain(r)["t_low"] > 0]
        best = moved[0] if moved else ranked[0]
        reason = (f"every dose lowers trained-format accuracy by more than {100 * max_harm:.0f} points: the mildest "
                  + ("that moved the primary endpoint" if moved else "dose (none moved the primary endpoint)"))
    g = gain(best)
    return {"chosen": best["arm"], "dose": best["dose"], "gain": g["mean"], "t_low": g["t_low"], "t_high": g["t_high"],
            "moves": g["t_low"] > 0, "reason": reason}


def dose_markdown(rows: list[dict[str, Any]], endpoints: tuple[tuple[str, str], ...]) -> str:
    if not rows:
        return "_No dose runs paired with vanilla yet._\n"
    head = " | ".join(f"Δ {t} {k} (per seed; mean [95 % t CI])" for t, k in endpoints)
    lines = [f"| arm | dose | seeds | ascent steps applied | {head} |", "|---|---|---|---|" + "---|" * len(endpoints)]
    for r in rows:
        cells = []
        for task, key in endpoints:
            st = r.get(f"{task}/{key}")
            if st is None:
                cells.append("-")
                continue
            sd = st["seed"]
            cells.append(f"{' '.join(_fmt(key, d, True) for d in st['deltas'])}; **{_fmt(key, sd['mean'], True)}** "
                         f"[{_fmt(key, sd['t_low'], True)}, {_fmt(key, sd['t_high'], True)}]")
        lines.append(f"| {r['arm']} | {r['dose']} | {len(r['seeds'])} | {' '.join(str(x) for x in r['ascent_steps'])} "
                     f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def swapped_auc(e: dict[str, Any]) -> float | None:
    """How well a binary sentiment task's scores rank the items by their swapped gold label, whatever the label prior:
    the AUC of ll(" positive") − ll(" negative") between gold-"positive" and gold-"negative" items (ties count half).
    1 = the swap is learned item by item, 0.5 = no item-specific knowledge, near 0 = the true sentiment ranks them."""
    if not e or "choice_lls" not in e:
        return None
    score = [lls[0] - lls[1] for lls in e["choice_lls"]]
    pos = [x for x, t in zip(score, e["targets"]) if t == 0]
    neg = [x for x, t in zip(score, e["targets"]) if t == 1]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def conflict_runs_markdown(runs: list[dict[str, Any]]) -> str:
    """One line per run of the conflict benchmark: both formats, the dose, provenance and CPU seconds."""
    lines = ["| run | trained acc | trained gold log p | trained swapped AUC | chat acc | chat gold log p "
             "| chat swapped AUC | chat: predicted \"positive\" | held-out self-answers log-lik. | D_self / D_U "
             "| ascent steps | commit | dirty | CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (arm(r), r["spec"]["seed"])):
        t, c = r["eval"].get(TRAINED, {}), r["eval"].get(CHAT, {})
        lwf = (r.get("train") or {}).get("lwf") or {}
        prov = r.get("provenance") or {}
        selfgen = "; ".join(_num(v["score"]) for v in r.get("selfgen_eval", {}).values()) or "-"
        pos = c.get("pred_counts", {}).get("0", 0) / max(1, len(c.get("items", []))) if c else None
        lines.append(
            f"| {r['run_id']} | {_pct(t.get('score'))} | {_num(t.get('mean_gold_logprob'))} | {_num(swapped_auc(t))} "
            f"| {_pct(c.get('score'))} | {_num(c.get('mean_gold_logprob'))} | {_num(swapped_auc(c))} | {_pct(pos)} "
            f"| {selfgen} "
            f"| {sum(lwf.get('self_data_sizes', {}).values()) if lwf else '-'} / "
            f"{len(lwf.get('forget_indices', [])) if lwf else '-'} | {lwf.get('unlearn_steps', '-') if lwf else '-'} "
            f"| `{(prov.get('commit') or '-')[:10]}` | {'**yes**' if prov.get('dirty') else ('no' if prov else '-')} "
            f"| {_num(r.get('cpu_seconds'), '.0f')} |")
    return "\n".join(lines) + "\n"


CONFLICT_DOSE_ENDPOINTS = ((CHAT, "gold_logprob"), (CHAT, "acc"), (TRAINED, "acc"),
                           (CHAT, "swapped_auc"))  # the last one descriptive: the item ranking, whatever the prior
SST5_DOSE_ENDPOINTS = (("sst5", "gold_logprob"), ("sst5", "acc"), ("dental", "acc"), ("dental", "gold_logprob"))


def sst5_dose_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sst5 × dental dose-response: :func:`dose_rows` plus the held-out dental self-answers' log-likelihood."""
    rows = dose_rows(runs, SST5_DOSE_ENDPOINTS, harm=("sst5", "acc"))
    by = _by_arm_seed(runs)
    for row in rows:
        deltas = [by[(row["arm"], s)]["selfgen_eval"]["dental"]["score"] - by[("vanilla", s)]["selfgen_eval"]["dental"]["score"]
                  for s in row["seeds"] if "dental" in by[(row["arm"], s)].get("selfgen_eval", {})]
        row["selfgen_dental"] = {"deltas": deltas, "seed": seed_tests(deltas)}
    return rows


# The reading of plan (d) (experiments/plans/sst5_dental_dose.md): a dose moves sst5 when both seeds' Δ gold
# log-probability share a sign and their mean is at least MOVE_NATS in size; it clearly harms when its mean accuracy Δ
# is at most -HARM_ACC or its mean gold log-probability Δ at most -HARM_NATS.
SST5_DOSE_MOVE_NATS, SST5_DOSE_HARM_ACC, SST5_DOSE_HARM_NATS = 0.02, 0.03, 0.05


def sst5_dose_reading(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plan (d)'s pre-registered reading per dose: ``moves`` (None with fewer than two seeds: a one-seed dose is
    described, not read), ``harms`` (applied to whatever seeds there are) and the seeds it rests on."""
    out = []
    for r in rows:
        deltas, mean = r["sst5/gold_logprob"]["deltas"], r["sst5/gold_logprob"]["seed"]["mean"]
        moves = None
        if len(deltas) >= 2:
            same_sign = all(d > 0 for d in deltas) or all(d < 0 for d in deltas)
            moves = same_sign and abs(mean) >= SST5_DOSE_MOVE_NATS
        harms = r["sst5/acc"]["seed"]["mean"] <= -SST5_DOSE_HARM_ACC or mean <= -SST5_DOSE_HARM_NATS
        out.append({"arm": r["arm"], "seeds": r["seeds"], "moves": moves, "harms": harms})
    return out


def sst5_dose_markdown(rows: list[dict[str, Any]]) -> str:
    text = dose_markdown(rows, SST5_DOSE_ENDPOINTS)
    if rows:
        text += ("\nHeld-out dental self-answers (per-token log-likelihood of the untrained model's greedy answers), "
                 "Δ against vanilla per seed: " + "; ".join(
                     f"{r['arm']} {' '.join(_num(d, '+.3f') for d in r['selfgen_dental']['deltas'])}" for r in rows)
                 + ".\n")
        reading, lines = sst5_dose_reading(rows), []
        for x in reading:
            n = len(x["seeds"])
            moves = ("one seed: described, not read" if x["moves"] is None
                     else "moves sst5" if x["moves"] else "no detectable movement")
            harm = ("clearly harms" if x["harms"] else "does not clearly harm") + (" (one seed)" if n == 1 else "")
            lines.append(f"- {x['arm']} ({n} seed{'s' if n > 1 else ''}): {moves}; {harm}.")
        reached = any(x["harms"] for x in reading)
        text += ("\nPlan (d)'s reading (moves: both seeds' Δ sst5 gold log-probability of one sign and |mean| ≥ "
                 f"{SST5_DOSE_MOVE_NATS} nats; clearly harms: mean Δ sst5 accuracy ≤ −{100 * SST5_DOSE_HARM_ACC:.0f} "
                 f"points or mean Δ gold log-probability ≤ −{SST5_DOSE_HARM_NATS} nats):\n\n" + "\n".join(lines)
                 + ("\n\nThe harmful end was reached.\n" if reached else "\n\nThe harmful end was not reached.\n"))
    return text


def positive_control_markdown(sections: dict[str, list[dict[str, Any]]],
                              verdicts: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, list]]:
    """The conflict benchmark (pilot gate, oracle dose sweep, test run) and the sst5 × dental dose-response."""
    verdicts, parts, tables = verdicts or {}, [], {}
    dev, test, sst5 = (sections.get(k, []) for k in ("conflict_dev", "conflict_test", "sst5_dental_dose"))
    if dev:
        parts += ["### Conflict benchmark, dev: pilot gate and oracle dose sweep (`configs/conflict_pilot.yaml`, "
                  "`configs/conflict_dose.yaml`)\n",
                  f"{len(dev)} run files in `experiments/results/conflict_dev/`. Swapped binary sentiment trained in the "
                  "plain format; endpoints in the trained format and in the chat format (primary: the swapped gold "
                  "label's log-probability across the two words, in nats).\n", provenance_markdown(dev),
                  "\n#### Gate\n", conflict_gate_markdown(conflict_gate(dev), verdicts.get("conflict_dev"))]
        rows = dose_rows(dev, CONFLICT_DOSE_ENDPOINTS, harm=(TRAINED, "acc"))
        tables["conflict_dose"] = rows
        choice = choose_dose(rows)
        parts += ["\n#### Dose sweep against vanilla (same seed)\n", dose_markdown(rows, CONFLICT_DOSE_ENDPOINTS)]
        if any(r["arm"].startswith("oracle-") for r in rows):
            parts.append(f"\nDose rule: {choice['reason']}: **{choice['chosen']}**"
                         + (f" ({choice['dose']}; gain {_num(choice['gain'], '+.3f')} nats "
                            f"[{_num(choice['t_low'], '+.3f')}, {_num(choice['t_high'], '+.3f')}])"
                            if choice["chosen"] else "") + ".\n")
        parts += ["\n#### Chat format per gold label: a shifted label prior or item-specific knowledge? (dev)\n",
                  mechanism_markdown(dev, task=CHAT), "\n#### D_U audit (dev)\n", audit_markdown(audit_rows(dev)),
                  "\n#### Every run (conflict, dev)\n", conflict_runs_markdown(dev)]
    for folder, config, what in CONFLICT_PILOTS:
        runs = sections.get(folder, [])
        if runs:
            parts += [f"\n### Conflict benchmark, dev: pilot {what} (`configs/{config}`)\n",
                      f"{len(runs)} run files in `experiments/results/{folder}/`.\n", provenance_markdown(runs),
                      "\n#### Gate\n", conflict_gate_markdown(conflict_gate(runs), verdicts.get(folder))]
            rows = dose_rows(runs, CONFLICT_DOSE_ENDPOINTS, harm=(TRAINED, "acc"))
            if any(r["arm"].startswith("oracle-") for r in rows):
                tables[f"{folder}_dose"] = rows
                choice = choose_dose(rows)
                parts += [f"\n#### Dose sweep against vanilla (same seed, {folder})\n",
                          dose_markdown(rows, CONFLICT_DOSE_ENDPOINTS),
                          f"\nDose rule: {choice['reason']}: **{choice['chosen']}**"
                          + (f" ({choice['dose']}; gain {_num(choice['gain'], '+.3f')} nats "
                             f"[{_num(choice['t_low'], '+.3f')}, {_num(choice['t_high'], '+.3f')}])"
                             if choice["chosen"] else "") + ".\n",
                          f"\n#### D_U audit ({folder})\n", audit_markdown(audit_rows(runs))]
            parts += [f"\n#### Chat format per gold label ({folder})\n", mechanism_markdown(runs, task=CHAT),
                      f"\n#### Every run ({folder})\n", conflict_runs_markdown(runs)]
    if test:
        rows = conflict_comparisons(test)
        tables["conflict_test"] = rows
        arms = dose_rows([r for r in test if arm(r) != "base"], CONFLICT_DOSE_ENDPOINTS, harm=(TRAINED, "acc"))
        tables["conflict_test_arms"] = arms
        reading = conflict_reading(rows)
        parts += ["\n### Conflict benchmark, test: the positive control (`configs/conflict_test.yaml`)\n",
                  f"{len(test)} run files in `experiments/results/conflict_test/`. Seed-level tests first; the four "
                  "pre-registered comparisons are Holm-corrected on the primary endpoint.\n", provenance_markdown(test),
                  conflict_comparison_markdown(rows),
                  ("\n**Pre-registered reading: " + reading["reading"] + ".** "
                   f"oracle helps: {reading['oracle_helps']}; LWF helps: {reading['lwf_helps']}; LWF above random: "
                   f"{reading['lwf_above_random']}; LWF equivalent to the oracle (TOST ±{CONFLICT_TOST_NATS} nats): "
                   f"{reading['lwf_equivalent_to_oracle']}.\n") if reading["ready"] else
                  "\n_Interim: the reading is applied only when every pre-registered comparison has 5 seeds._\n",
                  "\n#### Every arm against vanilla (same seed), the chat-format swapped AUC included (descriptive)\n",
                  dose_markdown(arms, CONFLICT_DOSE_ENDPOINTS),
                  "\n#### Chat format per gold label (test)\n", mechanism_markdown(test, task=CHAT),
                  "\n#### D_U audit (test)\n", audit_markdown(audit_rows(test)),
                  "\n#### Every run (conflict, test)\n", conflict_runs_markdown(test)]
    if sst5:
        rows = sst5_dose_rows(sst5)
        tables["sst5_dental_dose"] = rows
        parts += ["\n### sst5 × dental dose-response, dev (`configs/sst5_dental_dose.yaml`)\n",
                  f"{len(sst5)} run files in `experiments/results/sst5_dental_dose/`.\n", provenance_markdown(sst5),
                  sst5_dose_markdown(rows), "\n#### Every run (sst5 × dental dose, dev)\n", markdown_runs(sst5)]
    return "\n".join(parts), tables


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
CONFLICT_PILOTS = (  # further conflict pilots, each with its own gate: folder, config, what differs from B1
    ("conflict_dev160", "conflict_pilot160.yaml", "B2, 160 steps"),
    ("conflict_dev_s2", "conflict_pilot_s2.yaml", "S2, the chat answer opened by \"The sentiment of this movie review is\""
                                                  " (its oracle dose sweep: `configs/conflict_dose_s2.yaml`)"),
)
POSITIVE_CONTROL = ("conflict_dev", *(folder for folder, _, _ in CONFLICT_PILOTS), "conflict_test",
                    "sst5_dental_dose")  # the conflict benchmark, the dose-response
SECTIONS = (*POSITIVE_CONTROL, "confirm", "pilot", *(folder for folder, _, _ in PILOT_BUDGETS), "mechanism",
            *(folder for folder, _, _ in MECHANISM_BUDGETS), "runs")  # results/<folder>/*.json;
# "runs" is the legacy grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default=str(RESULTS), help="Folder holding confirm/, pilot/, pilot_lr1e-4/, pilot_250/, pilot_decay/, pilot_decay300/, mechanism/, mechanism_40/, runs/.")
    parser.add_argument("--docs", default=str(RESULTS / "REPORT.md"),
                        help="Markdown file whose generated block is replaced ('none' to skip).")
    parser.add_argument("--tables_md", default=None, help="Also write the conflict benchmark's and the dose-response's "
                        "tables, and the compute table of their folders, to this Markdown file.")
    args = parser.parse_args(argv)
    out = Path(args.results_dir)
    sections = {name: load_runs(str(out / name)) for name in SECTIONS}
    verdicts = {name: json.loads(gate_path(out / name).read_text(encoding="utf-8"))
                for name in SECTIONS if gate_path(out / name).is_file()}
    generated, tables = generated_markdown(sections, out / "optimizer_probe.json", verdicts)
    for name, rows in tables.items():
        flat = (flat_conflict_row if name == "conflict_test" else
                flat_dose_row if name.endswith(("_dose", "_arms")) else flat_row)
        write_csv(out / f"{name}.csv", [row for r in rows for row in _listed(flat(r))])
    if args.tables_md:
        text, _ = positive_control_markdown(sections, verdicts)
        compute = compute_markdown(compute_rows({k: sections[k] for k in POSITIVE_CONTROL if sections[k]}))
        Path(args.tables_md).write_text(
            "<!-- generated by python -m experiments.summarize --tables_md; do not edit -->\n# Conflict benchmark and "
            "dose-response: generated tables\n\n" + text + "\n### Compute (CPU time from the run files)\n\n" + compute,
            encoding="utf-8")
        print(f"wrote {args.tables_md}")
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
