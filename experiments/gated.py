"""One pre-registered plan, one command: run the pilot, apply its gate, and start the confirmatory run only if the
gate passes.

    python -m experiments.gated --pilot experiments/configs/pilot_decay300.yaml \\
        --confirm experiments/configs/confirm_decay300.yaml --rule issue_or_weak --workers 2 --data_dir /path/to/data
    # the same design with the paper's model on a GPU
    python -m experiments.gated --pilot experiments/configs/full_pilot.yaml --confirm experiments/configs/full.yaml \\
        --rule issue_or_weak --workers 1 --model meta-llama/Llama-3.2-1B --confirm_dir experiments/results/full \\
        --data_dir /path/to/data

The gate is :func:`experiments.summarize.gate` on the pilot's vanilla seeds (``--rule conflict``: the conflict
benchmark's :func:`experiments.summarize.conflict_gate`), judged once all of them have finished; ``--rule`` names which
of its criteria the plan fixed in advance. The verdict is written next to the pilot's folder
(``<pilot results>.gate.json``). Resumable like the runner: finished runs are skipped and the verdict is recomputed
from the pilot's run files, so the same command continues a plan that stopped. Runs that
another process holds (a live ``.lock``) are waited for, never judged half-done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import run as runner
from . import summarize


RULES = {
    "weak": "mean gain >= +5 points, seed SD <= 2 points, no seed with more than half its predictions on one label",
    "issue_or_weak": "the strict gate (>= +10 points, SD <= 3, the same collapse bound) or the weak one",
    "conflict": "the conflict benchmark's gate: vanilla gains >= 20 points of swapped accuracy over base in the trained "
                "(plain) format; its chat-format swapped accuracy is >= 15 points below its trained-format accuracy; "
                "the seed SD of the chat-format accuracy lets a paired t-test over 5 seeds detect +5 points at 80 % "
                "power (SD of a paired difference taken as sqrt(2) x the vanilla seed SD)",
}


def verdict(g: dict[str, Any], rule: str, seeds: int) -> bool:
    """Whether gate statistics ``g`` (from :func:`summarize.gate`) pass ``rule`` on exactly ``seeds`` vanilla seeds."""
    if rule not in RULES:
        raise ValueError(f"--rule must be one of {sorted(RULES)}, got {rule!r}.")
    if not g.get("ready") or len(g["seeds"]) != seeds:
        return False
    if rule == "conflict":
        return bool(g["passed"])
    issue = g["pass_gain"] and g["pass_sd"] and g["pass_share"]
    return bool(g["pass_weak"] or (rule == "issue_or_weak" and issue))


def pending_runs(config: str, results_dir: str) -> list[str]:
    """Run ids of ``config``'s grid that have no result file in ``results_dir`` yet."""
    plan = runner.grid_plan(runner.load_config(config).get("grid") or [])
    return [spec.run_id for spec, _ in plan if not os.path.isfile(os.path.join(results_dir, f"{spec.run_id}.json"))]


def worker_command(config: str, results_dir: str, data_dir: str, model: str | None = None) -> list[str]:
    return [sys.executable, "-m", "experiments.run", "--config", config, "--results_dir", results_dir,
            "--data_dir", data_dir, *(["--model", model] if model else [])]


def run_workers(config: str, results_dir: str, workers: int, log_dir: str, data_dir: str, stagger: float = 20.0,
                poll: float = 20.0, model: str | None = None) -> list[str]:
    """Run ``config``'s grid with ``workers`` runner processes (one torch thread each) and wait until every run has a
    result file or none is running any more; returns the runs still pending (those whose worker failed)."""
    os.makedirs(log_dir, exist_ok=True)
    # the workers run from the repository root
    config, results_dir, data_dir = os.path.abspath(config), os.path.abspath(results_dir), os.path.abspath(data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    name = Path(results_dir).name
    procs = []
    for i in range(workers):
        if i:
            time.sleep(stagger)  # the first worker claims its run before the next one looks
        log = open(os.path.join(log_dir, f"{name}_w{i + 1}.log"), "a", encoding="utf-8")
        procs.append((subprocess.Popen(worker_command(config, results_dir, data_dir, model), stdout=log,
                                       stderr=subprocess.STDOUT,
                                       cwd=runner.REPO, env=env), log))
    for proc, log in procs:
        proc.wait()
        log.close()
    while True:  # runs another live process holds are waited for
        pending = pending_runs(config, results_dir)
        if not any(held(results_dir, r) for r in pending):
            return pending
        time.sleep(poll)


def held(results_dir: str, run_id: str) -> bool:
    """Whether a live process on this machine holds ``run_id``'s lock (a dead owner's lock does not count)."""
    holder = runner.lock_owner(results_dir, run_id)
    return holder is not None and holder[0] == platform.node() and runner.pid_alive(holder[1])


def same_verdict(record: dict[str, Any], rule: str, seeds: int, g: dict[str, Any], passed: bool, confirm: str,
                 model: str | None) -> bool:
    """Whether a recorded verdict is the one this command would give now: same rule, seeds, gate statistics and
    outcome, and the same confirmatory config and model (a verdict never starts a run its plan did not name)."""
    same_stats = json.dumps(record.get("gate"), sort_keys=True) == json.dumps(g, sort_keys=True)  # NaN-safe
    keys = ("rule", "seeds", "passed", "confirm", "model")
    return same_stats and tuple(record.get(k) for k in keys) == (rule, seeds, passed, confirm, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilot", required=True, help="The pilot's config (dev split): its vanilla seeds are gated.")
    parser.add_argument("--confirm", required=True, help="The confirmatory config, run only if the gate passes.")
    parser.add_argument("--rule", required=True, choices=sorted(RULES), help="The gate the plan fixed: "
                        + "; ".join(f"{k}: {v}" for k, v in RULES.items()).replace("%", "%%") + ".")
    parser.add_argument("--seeds", type=int, default=5, help="Vanilla seeds the gate is judged on.")
    parser.add_argument("--learn", default="sst5", help="The learning task the gate is judged on.")
    parser.add_argument("--pilot_dir", default=None, help="Pilot results (default: results/<pilot config name>).")
    parser.add_argument("--confirm_dir", default=str(summarize.RESULTS / "confirm"), help="Confirmatory results.")
    parser.add_argument("--workers", type=int, default=2, help="Runner processes (one per core).")
    parser.add_argument("--model", default=None, help="Hub id or local dir for every run (default: the configs' "
                        "model, else SmolLM2-135M-Instruct offline).")
    parser.add_argument("--log_dir", default=str(summarize.RESULTS.parent / "logs"), help="Worker logs.")
    parser.add_argument("--data_dir", required=True, help="The data sets, passed to every worker (experiments.run).")
    args = parser.parse_args(argv)
    for flag in ("pilot", "confirm"):
        if not os.path.isfile(getattr(args, flag)):
            parser.error(f"--{flag}: no such config file: {getattr(args, flag)}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    pilot_dir = args.pilot_dir or str(summarize.RESULTS / Path(args.pilot).stem)

    left = run_workers(args.pilot, pilot_dir, args.workers, args.log_dir, args.data_dir, model=args.model)
    if left:
        print(f"[gated] pilot runs did not finish: {', '.join(left)}; no verdict", flush=True)
        return 1
    pilot_runs = summarize.load_runs(pilot_dir)
    g = summarize.conflict_gate(pilot_runs) if args.rule == "conflict" else summarize.gate(pilot_runs, learn=args.learn)
    passed = verdict(g, args.rule, args.seeds)
    path = summarize.gate_path(pilot_dir)
    if path.exists():  # judged once: a resumed plan keeps its first verdict, and refuses a different one
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            print(f"[gated] {path}: unreadable verdict file ({err}); nothing is started.", flush=True)
            return 2
        if not same_verdict(record, args.rule, args.seeds, g, passed, args.confirm, args.model):
            print(f"[gated] {path} (judged {record.get('time')}) records another rule, seed count, confirmatory "
                  "config, model, gate statistics or verdict than this command and the pilot's run files give now; "
                  "a plan is judged once, so nothing is started. Restore the pilot's run files and arguments, or "
                  "move the verdict file away to judge a new plan.", flush=True)
            return 2
        print(f"[gated] verdict on record since {record.get('time')}", flush=True)
    else:
        record = {"pilot": args.pilot, "confirm": args.confirm, "model": args.model, "rule": args.rule,
                  "rule_text": RULES[args.rule], "seeds": args.seeds, "gate": g, "passed": passed,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"[gated] gate {'PASSED' if passed else 'NOT PASSED'} ({args.rule}): gain {100 * g.get('gain', 0):+.1f} "
          f"points, seed SD {100 * g.get('sd', float('nan')):.2f}"
          + ("" if args.rule == "conflict" else f", largest label share {100 * g.get('max_share', float('nan')):.1f} %"),
          flush=True)
    if not passed:
        return 0
    left = run_workers(args.confirm, args.confirm_dir, args.workers, args.log_dir, args.data_dir, model=args.model)
    if left:
        print(f"[gated] confirmatory runs did not finish: {', '.join(left)}", flush=True)
        return 1
    print("[gated] confirmatory run complete", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
