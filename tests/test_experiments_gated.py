"""experiments/gated.py: a pilot's gate decides, once all its seeds have finished, whether the confirmatory run starts."""

import copy
import json
import os
import platform
import sys
import threading
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("lm_eval", reason="the experiments need the [experiments] extra (lm-eval)")
sys.path.insert(0, str(REPO))

from experiments import gated, summarize  # noqa: E402


PILOT = REPO / "experiments" / "results" / "pilot_decay"  # committed run files: +9.6 points, seed SD 3.23


def _records(accs: list[float] | None = None, shares: list[float] | None = None) -> list[dict]:
    """The committed pilot_decay records (base + vanilla seeds 0-4), with the vanilla accuracies/shares replaced."""
    runs = summarize.load_runs(str(PILOT))
    runs = [copy.deepcopy(r) for r in runs]
    vanilla = sorted((r for r in runs if r["spec"]["method"] == "vanilla"), key=lambda r: r["spec"]["seed"])
    for i, r in enumerate(vanilla):
        if accs is not None:
            r["eval"]["sst5"]["score"] = accs[i]
        if shares is not None:
            r["eval"]["sst5"]["max_pred_share"] = shares[i]
    return runs


def test_verdict_of_the_committed_pilot_fails_both_rules():
    g = summarize.gate(_records())
    assert g["gain"] == pytest.approx(0.096) and g["sd"] == pytest.approx(0.0323, abs=1e-4)
    assert not gated.verdict(g, "weak", 5) and not gated.verdict(g, "issue_or_weak", 5)


@pytest.mark.parametrize("accs, shares, weak, issue_or_weak", [
    ([0.53, 0.50, 0.56, 0.51, 0.55], None, False, True),    # +12.0 points, SD 2.55: only the strict gate
    ([0.47, 0.46, 0.48, 0.47, 0.465], None, True, True),    # +5.9 points, SD 0.74: the weak gate
    ([0.47, 0.46, 0.48, 0.47, 0.465], [0.4, 0.4, 0.51, 0.4, 0.4], False, False),  # one seed collapses
    ([0.45, 0.44, 0.46, 0.45, 0.455], None, False, False),  # +4.1 points
    ([0.60, 0.45, 0.55, 0.52, 0.50], None, False, False),   # +11.4 points, SD 5.6
])
def test_verdict_rules(accs, shares, weak, issue_or_weak):
    g = summarize.gate(_records(accs, shares))
    assert gated.verdict(g, "weak", 5) is weak
    assert gated.verdict(g, "issue_or_weak", 5) is issue_or_weak


def test_verdict_needs_every_seed_and_a_known_rule():
    runs = [r for r in _records([0.47, 0.46, 0.48, 0.47, 0.465]) if r["spec"]["seed"] != 4 or r["spec"]["method"] == "base"]
    assert not gated.verdict(summarize.gate(runs), "weak", 5)  # four seeds: the gate is not judged
    assert not gated.verdict({"ready": False}, "weak", 5)
    with pytest.raises(ValueError, match="--rule"):
        gated.verdict(summarize.gate(_records()), "strict", 5)


def _config(path: Path, grid: str) -> str:
    path.write_text("settings: {}\ngrid:\n" + grid, encoding="utf-8")
    return str(path)


PILOT_GRID = "  - {learn: [sst5], methods: [base], seeds: [0]}\n  - {learn: [sst5], methods: [vanilla], seeds: [0, 1, 2, 3, 4]}\n"


def _fake_workers(monkeypatch, pilot_cfg: str, accs) -> list[tuple]:
    """Replace the worker processes: the pilot "finishes" with the vanilla accuracies ``accs()``; returns the calls."""
    calls = []

    def fake_workers(config, results_dir, workers, log_dir, data_dir, model=None):
        calls.append((config, results_dir, workers, model, data_dir))
        if config == pilot_cfg:
            os.makedirs(results_dir, exist_ok=True)
            for r in _records(accs()):
                Path(results_dir, f"{r['run_id']}.json").write_text(json.dumps(r), encoding="utf-8")
        return []

    monkeypatch.setattr(gated, "run_workers", fake_workers)
    return calls


@pytest.mark.parametrize("accs, starts_confirm", [(None, False), ([0.53, 0.50, 0.56, 0.51, 0.55], True)])
def test_main_starts_the_confirmatory_run_only_after_a_pass(tmp_path, monkeypatch, accs, starts_confirm):
    pilot_cfg = _config(tmp_path / "pilot.yaml", PILOT_GRID)
    confirm_cfg = _config(tmp_path / "confirm.yaml", "  - {learn: [sst5], methods: [vanilla], seeds: [0]}\n")
    pilot_dir, confirm_dir = tmp_path / "results" / "pilot", tmp_path / "results" / "confirm"
    calls = _fake_workers(monkeypatch, pilot_cfg, lambda: accs)
    argv = ["--pilot", pilot_cfg, "--confirm", confirm_cfg, "--rule", "issue_or_weak", "--pilot_dir", str(pilot_dir),
            "--confirm_dir", str(confirm_dir), "--workers", "2", "--log_dir", str(tmp_path / "logs"), "--model", "m/x",
            "--data_dir", "d"]
    assert gated.main(argv) == 0
    assert [c[0] for c in calls] == [pilot_cfg] + ([confirm_cfg] if starts_confirm else [])
    assert {(c[2], c[3], c[4]) for c in calls} == {(2, "m/x", "d")}  # every stage: the workers, model and data asked for
    record = json.loads((tmp_path / "results" / "pilot.gate.json").read_text())
    assert record["passed"] is starts_confirm and record["rule"] == "issue_or_weak" and record["gate"]["seeds"] == [0, 1, 2, 3, 4]
    text = summarize.gate_markdown(record["gate"], record)  # docs/results.md shows the verdict under the plan's rule
    assert f"Verdict under the plan's pre-registered rule: {'passed' if starts_confirm else 'not passed'}**" in text
    assert "--rule issue_or_weak" in text and "The strict gate" in text


def test_main_keeps_the_first_verdict_and_refuses_a_different_one(tmp_path, monkeypatch, capsys):
    pilot_cfg = _config(tmp_path / "pilot.yaml", PILOT_GRID)
    pilot_dir = tmp_path / "results" / "pilot"
    accs = [[0.53, 0.50, 0.56, 0.51, 0.55]]
    calls = _fake_workers(monkeypatch, pilot_cfg, lambda: accs[0])

    def confirms():  # the confirmatory stages started so far
        return [c for c in calls if c[0] != pilot_cfg]

    argv = ["--pilot", pilot_cfg, "--confirm", pilot_cfg + ".c", "--rule", "issue_or_weak", "--pilot_dir",
            str(pilot_dir), "--log_dir", str(tmp_path / "logs"), "--data_dir", "d"]
    Path(pilot_cfg + ".c").write_text("grid: []\n")
    assert gated.main(argv) == 0
    verdict_file = tmp_path / "results" / "pilot.gate.json"
    first = json.loads(verdict_file.read_text())
    first["time"] = "2026-01-01T00:00:00Z"  # as if judged in an earlier session
    verdict_file.write_text(json.dumps(first))
    assert gated.main(argv) == 0  # resumed: same files, same verdict, first judgment kept
    assert json.loads(verdict_file.read_text())["time"] == "2026-01-01T00:00:00Z" and len(confirms()) == 2
    assert "verdict on record since 2026-01-01T00:00:00Z" in capsys.readouterr().out
    accs[0] = [0.45, 0.44, 0.46, 0.45, 0.455]  # the pilot's run files changed after the verdict: refused
    assert gated.main(argv) == 2 and len(confirms()) == 2
    assert "a plan is judged once" in capsys.readouterr().out
    assert json.loads(verdict_file.read_text()) == first
    accs[0] = [0.53, 0.50, 0.56, 0.51, 0.55]  # the same files, but another confirmatory config or model: refused
    other = str(tmp_path / "other.yaml")
    Path(other).write_text("grid: []\n")
    assert gated.main(argv[:3] + [other] + argv[4:]) == 2 and gated.main(argv + ["--model", "m/x"]) == 2
    assert gated.main(argv[:5] + ["weak"] + argv[6:]) == 2 and len(confirms()) == 2  # another rule
    verdict_file.write_text("{not json")  # a damaged verdict file is refused by name, not crashed on
    assert gated.main(argv) == 2 and "unreadable verdict file" in capsys.readouterr().out


def test_the_committed_verdict_is_what_its_run_files_give():
    pilot_dir = REPO / "experiments" / "results" / "pilot_decay300"
    record = json.loads(summarize.gate_path(pilot_dir).read_text())
    g = summarize.gate(summarize.load_runs(str(pilot_dir)))
    passed = gated.verdict(g, "issue_or_weak", 5)  # and the documented resume command names the same plan
    assert record["passed"] and gated.same_verdict(record, "issue_or_weak", 5, g, passed,
                                                   "experiments/configs/confirm_decay300.yaml", None)


def test_main_gives_no_verdict_while_pilot_runs_are_missing(tmp_path, monkeypatch):
    pilot_cfg = _config(tmp_path / "pilot.yaml", PILOT_GRID)
    monkeypatch.setattr(gated, "run_workers", lambda *a, **k: ["sst5__none__vanilla__s4"])
    assert gated.main(["--pilot", pilot_cfg, "--confirm", pilot_cfg, "--rule", "weak",
                       "--pilot_dir", str(tmp_path / "p"), "--data_dir", "d"]) == 1
    assert not (tmp_path / "p.gate.json").exists()


def test_main_names_a_missing_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gated.main(["--pilot", str(tmp_path / "nope.yaml"), "--confirm", str(tmp_path / "nope.yaml"), "--rule", "weak",
                    "--data_dir", "d"])
    assert "--pilot: no such config file" in capsys.readouterr().err


def test_run_workers_waits_for_runs_a_live_process_holds(tmp_path, monkeypatch):
    """Two real worker processes run; a run locked by a live process is waited for, a dead owner's lock is not."""
    cfg = _config(tmp_path / "c.yaml", "  - {learn: [sst5], methods: [vanilla], seeds: [0, 1, 2]}\n")
    results = tmp_path / "r"
    results.mkdir()
    started = tmp_path / "started"
    monkeypatch.setattr(gated, "worker_command", lambda config, results_dir, data_dir, model: [
        sys.executable, "-c", f"import os; open(os.path.join({str(started)!r}, str(os.getpid())), 'w').close()"])
    started.mkdir()
    (results / "sst5__none__vanilla__s0.json").write_text("{}")  # finished
    (results / "sst5__none__vanilla__s1.lock").write_text(f"{platform.node()}:{os.getpid()}")  # held by this process
    (results / "sst5__none__vanilla__s2.lock").write_text(f"{platform.node()}:999999999")  # owner gone

    def finish_s1():
        (results / "sst5__none__vanilla__s1.json").write_text("{}")
        (results / "sst5__none__vanilla__s1.lock").unlink()

    timer = threading.Timer(0.5, finish_s1)
    timer.start()
    left = gated.run_workers(cfg, str(results), 2, str(tmp_path / "logs"), "d", stagger=0.0, poll=0.05)
    timer.join()
    assert left == ["sst5__none__vanilla__s2"]  # s1 was waited for; s2's dead lock did not block
    assert len(os.listdir(started)) == 2 and (tmp_path / "logs" / "r_w1.log").exists()


def test_worker_command_passes_the_data_and_the_model():
    assert gated.worker_command("c.yaml", "r", "d")[-6:] == ["--config", "c.yaml", "--results_dir", "r", "--data_dir", "d"]
    assert gated.worker_command("c.yaml", "r", "d", "meta-llama/Llama-3.2-1B")[-2:] == [
        "--model", "meta-llama/Llama-3.2-1B"]


CONFIGS = REPO / "experiments" / "configs"
PLANS = [("pilot.yaml", "confirm.yaml"), ("pilot_decay.yaml", "confirm_decay.yaml"),
         ("pilot_decay300.yaml", "confirm_decay300.yaml"), ("full_pilot.yaml", "full.yaml")]
EVAL_ONLY = {"eval_split", "n_eval_learn", "n_eval_forget", "threads"}  # what a confirmatory run may change


@pytest.mark.parametrize("pilot, confirm", PLANS)
def test_a_confirmatory_config_trains_as_its_pilot(pilot, confirm):
    """Each plan's confirmatory sst5 runs train exactly as the gated pilot's (dev) runs; only the split and the item
    counts differ, as the pre-registered plans say."""
    from experiments import run

    def sst5_settings(name):
        config = run.load_config(str(CONFIGS / name))
        return {spec.method: run.merged_settings({**(config.get("settings") or {}), **block}, [])
                for spec, block in run.grid_plan(config["grid"]) if spec.learn == "sst5"}

    dev, test = sst5_settings(pilot), sst5_settings(confirm)
    assert {"vanilla", "lwf"} <= set(test) and "vanilla" in dev
    for method in ("vanilla", "lwf"):
        differ = {k for k in dev["vanilla"] if dev["vanilla"][k] != test[method][k]}
        assert differ <= EVAL_ONLY, (confirm, method, {k: (dev["vanilla"][k], test[method][k]) for k in differ})
        assert dev["vanilla"]["eval_split"] == "dev" and test[method]["eval_split"] == "test"


def test_run_workers_hands_absolute_paths_to_workers(tmp_path, monkeypatch):
    """Workers run from the repository root, so relative paths given from elsewhere must arrive absolute."""
    _config(tmp_path / "c.yaml", "  - {learn: [sst5], methods: [vanilla], seeds: [0]}\n")
    seen = []
    monkeypatch.setattr(gated, "worker_command", lambda config, results_dir, data_dir, model: seen.append(
        (config, results_dir, data_dir)) or [sys.executable, "-c", "pass"])
    monkeypatch.chdir(tmp_path)
    assert gated.run_workers("c.yaml", "r", 1, "logs", "data", poll=0.01) == ["sst5__none__vanilla__s0"]
    assert seen == [(str(tmp_path / "c.yaml"), str(tmp_path / "r"), str(tmp_path / "data"))]


def test_runner_claim_takes_over_only_a_dead_owners_lock(tmp_path):
    """The runner and gated read locks the same way: a live owner keeps its run, a dead owner's lock is taken over."""
    from experiments import run

    (tmp_path / "a.lock").write_text(f"{platform.node()}:{os.getpid()}")
    (tmp_path / "b.lock").write_text(f"{platform.node()}:999999999")
    (tmp_path / "c.lock").write_text("garbled")
    assert run.lock_owner(str(tmp_path), "a") == (platform.node(), os.getpid())
    assert run.lock_owner(str(tmp_path), "c") is None and run.lock_owner(str(tmp_path), "none") is None
    assert not run.claim(str(tmp_path), "a") and gated.held(str(tmp_path), "a")
    assert run.claim(str(tmp_path), "b") and (tmp_path / "b.lock").read_text() == f"{platform.node()}:{os.getpid()}"
    assert not run.claim(str(tmp_path), "c")  # unreadable: left alone
    assert run.claim(str(tmp_path), "d")  # no lock yet


def test_help_prints_every_rule(capsys):
    with pytest.raises(SystemExit) as exit_:
        gated.main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(rule in out for rule in gated.RULES) and "80 % power" in out
