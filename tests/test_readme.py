"""Every command line in README.md and docs/*.md runs as written, on this CPU-only machine, at tiny size.

Each shell command of the ``bash`` blocks is run with size flags appended (flags given later override earlier ones,
so the command itself is unchanged): a tiny model for the Hub or SmolLM2 one, a few steps, short generations, and
tiny generated files where the command reads data. A command this file does not know fails the test, so the docs
cannot drift from the code.
"""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_tokenizer, tiny_llama


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ``bash`` blocks: continuation lines joined, comments dropped, ``&&`` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


COMMANDS = [(path.relative_to(ROOT).as_posix(), command) for path in DOCS for command in shell_commands(path.read_text())]


def test_readme_shows_the_demo_and_the_test_command():
    readme_commands = shell_commands(README)
    assert any(c.startswith("hf-lwf demo") for c in readme_commands)
    assert "python -m pytest" in readme_commands
    # .ci/run runs exactly the README's install-and-test chain
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = next(line for line in README.splitlines() if line.endswith("python -m pytest"))
    assert test_line.strip() in ci


def test_parser_joins_continuations_and_splits_chains():
    text = "```bash\n# note\npip install a && hf-lwf demo --x 1  # why\nhf-lwf train --a 1 \\\n  --b 2\n```\n"
    assert shell_commands(text) == ["pip install a", "hf-lwf demo --x 1", "hf-lwf train --a 1 --b 2"]


def test_docs_have_commands_beyond_the_readme():
    assert {path for path, _ in COMMANDS} >= {"README.md", "docs/cli.md", "docs/usage.md", "docs/results.md"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_model")
    tokenizer = build_tokenizer(chat_template=True)
    model = tiny_llama(len(tokenizer))
    model.config.max_position_embeddings = 4096
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


GSM8K = [{"id": f"g{i}", "question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}",
          "final_answer": str(i + 2)} for i in range(8)]
DENTAL = [{"id": f"d{i}", "question": q, "options": ["Enamel", "Dentin", "Pulp", "Cementum"], "answer": None,
           "answer_letter": None, "subject": "Dental", "source": "test"}
          for i, q in enumerate(("Hardest tissue of the tooth?", "What covers the root?", "Why brush teeth?"))]


def _data_dir(root: Path) -> Path:
    """A data folder in the layout of the local copies (gsm8k/, dental/), tiny."""
    _write_jsonl(root / "gsm8k" / "train.jsonl", GSM8K)
    _write_jsonl(root / "gsm8k" / "test.jsonl", GSM8K)
    _write_jsonl(root / "dental" / "test_unlabeled.jsonl", DENTAL)
    _write_jsonl(root / "dental" / "validation.jsonl", DENTAL)
    return root


def _tiny_lwf(model_dir: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--max_steps", "2", "--lwf_unlearn_every", "1",
            "--per_device_train_batch_size", "2", "--lwf_max_new_tokens", "4", "--lwf_samples_per_prompt", "1",
            "--lwf_generation_batch_size", "32", "--lwf_forget_loss_cap", "50", "--max_train_samples", "8",
            "--disable_tqdm", "true", "--report_to", "none"]


def _check_install(command: str) -> None:
    """Installing cannot run inside the tests; check that the extras it names exist."""
    setup = (ROOT / "setup.cfg").read_text()
    for extra in re.findall(r"\.\[([a-z,]+)\]", command):
        for name in extra.split(","):
            assert re.search(rf"^{name} =", setup, flags=re.M), f"docs install unknown extra {name!r}"


def _run_cli(argv: list[str], model_dir: str, tmp_path: Path, monkeypatch) -> None:
    """hf-lwf train / inspect / demo, in a scratch folder that holds whatever files the command names."""
    from hf_lwf.app.cli import main

    monkeypatch.chdir(tmp_path)
    out = ["--output_dir", str(tmp_path / "out")]
    if argv[1] == "demo":
        tiny = ["--quick", "--model_name_or_path", model_dir, "--n_train", "8", "--n_eval", "2",
                "--eval_max_new_tokens", "2", "--n_forget_prompts", "2", "--n_heldout_prompts", "1", "--max_steps",
                "2", "--lwf_unlearn_every", "1", "--lwf_max_new_tokens", "4", "--lwf_forget_loss_cap", "50",
                "--disable_tqdm", "true"]
        assert main(argv[1:] + out + tiny) == 0
        assert (tmp_path / "out" / "report.json").exists()
        return
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.endswith((".yaml", ".yml")):  # a config file of the repository, its data files in the scratch folder
            argv[i] = str(ROOT / arg)
            config = yaml.safe_load((ROOT / arg).read_text())
            for key in ("dataset", "eval_dataset", "lwf_forget_prompts"):
                if key in config:
                    _write_jsonl(tmp_path / config[key], DENTAL if key == "lwf_forget_prompts" else GSM8K)
    for flag, rows in (("--dataset", GSM8K), ("--lwf_forget_prompts", DENTAL)):
        if flag in argv:
            _write_jsonl(tmp_path / argv[argv.index(flag) + 1], rows)
    tiny = _tiny_lwf(model_dir)
    if argv[1] == "inspect":
        tiny = [a for a in tiny if a not in ("--max_train_samples", "8")] + ["--inspect_steps", "1", "--show", "0"]
    if any(a.endswith(".yaml") for a in argv):
        tiny += ["--max_eval_samples", "2", "--eval_strategy", "no", "--save_strategy", "no"]
    assert main(argv[1:] + out + tiny) == 0


def _run_example(argv: list[str], model_dir: str, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    _data_dir(tmp_path / argv[argv.index("--data_dir") + 1] if "--data_dir" in argv else tmp_path / "data")
    spec = importlib.util.spec_from_file_location("docs_sft_example", ROOT / argv[1])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    tiny = ["--model_name_or_path", model_dir, "--num_train_samples", "4", "--num_forget_prompts", "2",
            "--max_steps", "2", "--lwf_unlearn_every", "1", "--per_device_train_batch_size", "2",
            "--lwf_max_new_tokens", "4", "--lwf_forget_loss_cap", "50", "--max_length", "64",
            "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")]
    trainer = module.main(argv[2:] + tiny)
    assert trainer.lwf_run.summary()["unlearn_points"] == 2


def _run_experiments(argv: list[str], model_dir: str, tmp_path: Path, monkeypatch) -> None:
    module = argv[2]
    if module == "experiments.run":
        from experiments.run import main

        monkeypatch.chdir(ROOT)
        assert main(argv[3:] + ["--dry_run", "--results_dir", str(tmp_path / "results")]) in (0, None)
    elif module == "experiments.summarize":
        from experiments import summarize

        # the committed run files, summarised into a copy: the generated block equals the committed report
        monkeypatch.chdir(ROOT)
        shutil.copytree(ROOT / "experiments" / "results", tmp_path / "results")
        report = tmp_path / "results" / "REPORT.md"
        assert summarize.main(argv[3:] + ["--results_dir", str(tmp_path / "results"), "--docs", str(report)]) == 0

        def block(text: str) -> str:
            return text[text.index(summarize.BEGIN):text.index(summarize.END)]

        assert block(report.read_text()) == block((ROOT / "experiments" / "results" / "REPORT.md").read_text())
    elif module == "experiments.gated":
        from experiments import gated

        # the plan's recorded verdict is reproduced from the committed pilot files; no worker is started
        monkeypatch.chdir(ROOT)
        pilot = (Path(argv[argv.index("--pilot_dir") + 1]).name if "--pilot_dir" in argv
                 else Path(argv[argv.index("--pilot") + 1]).stem)
        shutil.copytree(ROOT / "experiments" / "results" / pilot, tmp_path / pilot)
        shutil.copy(ROOT / "experiments" / "results" / f"{pilot}.gate.json", tmp_path / f"{pilot}.gate.json")
        started = []
        monkeypatch.setattr(gated, "run_workers", lambda config, *a, **k: started.append(config) or [])
        assert gated.main(argv[3:] + ["--pilot_dir", str(tmp_path / pilot), "--confirm_dir", str(tmp_path / "c"),
                                      "--log_dir", str(tmp_path / "logs")]) == 0
        assert started == [argv[argv.index("--pilot") + 1], argv[argv.index("--confirm") + 1]]
    elif module == "experiments.optimizer_probe":
        from experiments import optimizer_probe
        from test_experiments import make_data

        tiny = ["--model", model_dir, "--data_dir", str(make_data(tmp_path / "data")), "--learn_steps", "2",
                "--batch_size", "2", "--n_prompts", "8", "--cap", "50", "--out", str(tmp_path / "probe.json")]
        assert optimizer_probe.main(argv[3:] + tiny) == 0
        assert json.loads((tmp_path / "probe.json").read_text())["seeds"]
    else:
        raise AssertionError(f"docs command without a check in tests/test_readme.py: {' '.join(argv)!r}")


def _check_benchmark_report() -> None:
    """``benchmarks/run.py --report-only`` regenerates docs/benchmarks.md: the committed page is its output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {path.stem: json.loads(path.read_text()) for path in sorted((ROOT / "benchmarks" / "results").glob("*.json"))}
    assert module.markdown(results) == (ROOT / "docs" / "benchmarks.md").read_text()


def test_benchmarks_page_is_what_report_only_writes():
    _check_benchmark_report()


def run_command(command: str, model_dir: str, tmp_path: Path, monkeypatch) -> None:
    argv = shlex.split(command)
    if argv[:1] == ["pip"]:
        _check_install(command)
    elif argv == ["python", "-m", "pytest"]:
        return  # this very suite
    elif argv[:1] == ["hf-lwf"] and argv[1:2] in (["demo"], ["train"], ["inspect"]):
        _run_cli(argv, model_dir, tmp_path, monkeypatch)
    elif argv[:2] == ["python", "examples/sft_lwf_gsm8k_forget_dental.py"]:
        _run_example(argv, model_dir, tmp_path, monkeypatch)
    elif argv[:3] in (["python", "-m", "experiments.run"], ["python", "-m", "experiments.summarize"],
                      ["python", "-m", "experiments.gated"], ["python", "-m", "experiments.optimizer_probe"]):
        _run_experiments(argv, model_dir, tmp_path, monkeypatch)
    elif argv == ["python", "benchmarks/run.py", "--report-only"]:
        _check_benchmark_report()
    else:
        raise AssertionError(f"docs command without a check in tests/test_readme.py: {command!r}")


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_docs_command_runs(where, command, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_command(command, tiny_model_dir, tmp_path, monkeypatch)
