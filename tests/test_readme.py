"""Every command line in README.md runs as written, on this CPU-only machine, at tiny size.

Each shell command of the README's ``bash`` blocks is run with size flags appended (flags given later override
earlier ones, so the command itself is unchanged): a tiny model for the Hub or SmolLM2 one, a few steps, short
generations. A command this file does not know fails the test, so the README cannot drift from the code.
"""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import build_tokenizer, tiny_llama


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHARED_DATA = ROOT.parent / "shared" / "data"


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ``bash`` blocks: continuation lines joined, comments dropped, ``&&`` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


COMMANDS = shell_commands(README)


def test_readme_shows_the_demo_and_the_test_command():
    assert any(c.startswith("hf-lwf demo") for c in COMMANDS)
    assert "python -m pytest" in COMMANDS
    # .ci/run runs exactly the README's install-and-test chain
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = next(line for line in README.splitlines() if line.endswith("python -m pytest"))
    assert test_line.strip() in ci


def test_parser_joins_continuations_and_splits_chains():
    text = "```bash\n# note\npip install a && hf-lwf demo --x 1  # why\nhf-lwf train --a 1 \\\n  --b 2\n```\n"
    assert shell_commands(text) == ["pip install a", "hf-lwf demo --x 1", "hf-lwf train --a 1 --b 2"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_model")
    tokenizer = build_tokenizer(chat_template=True)
    model = tiny_llama(len(tokenizer))
    model.config.max_position_embeddings = 4096  # room for the real dental prompts under the character tokenizer
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _tiny_lwf(model_dir: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--max_steps", "2", "--lwf_unlearn_every", "1",
            "--per_device_train_batch_size", "2", "--lwf_max_new_tokens", "4", "--lwf_samples_per_prompt", "1",
            "--lwf_generation_batch_size", "32", "--lwf_forget_loss_cap", "50", "--max_train_samples", "8",
            "--disable_tqdm", "true", "--report_to", "none"]


def _needs_shared_data(argv: list[str]) -> bool:
    return any("../shared/data" in a for a in argv) or any(a.endswith(".yaml") for a in argv)


def run_command(command: str, model_dir: str, tmp_path: Path, monkeypatch) -> None:
    argv = shlex.split(command)
    monkeypatch.chdir(ROOT if _needs_shared_data(argv) else tmp_path)
    out = ["--output_dir", str(tmp_path / "out")]
    if argv[:1] == ["pip"]:
        # Installing cannot run inside the tests; check what it names exists.
        setup = (ROOT / "setup.cfg").read_text()
        for extra in re.findall(r'\.\[([a-z,]+)\]', command):
            for name in extra.split(","):
                assert re.search(rf"^{name} =", setup, flags=re.M), f"README installs unknown extra {name!r}"
        return
    if argv == ["python", "-m", "pytest"]:
        return  # this very suite
    if argv[:2] == ["hf-lwf", "demo"]:
        from hf_lwf.app.cli import main

        tiny = ["--quick", "--model_name_or_path", model_dir, "--n_train", "8", "--n_eval", "2",
                "--eval_max_new_tokens", "2", "--n_forget_prompts", "2", "--n_heldout_prompts", "1", "--max_steps",
                "2", "--lwf_unlearn_every", "1", "--lwf_max_new_tokens", "4", "--lwf_forget_loss_cap", "50",
                "--disable_tqdm", "true"]
        assert main(argv[1:] + out + tiny) == 0
        assert (tmp_path / "out" / "report.json").exists()
        return
    if argv[:2] in (["hf-lwf", "train"], ["hf-lwf", "inspect"]):
        from hf_lwf.app.cli import main

        if "--dataset" in argv:  # the local-files example: files of that name in the working directory
            _write_jsonl(tmp_path / argv[argv.index("--dataset") + 1], [
                {"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(8)])
            _write_jsonl(tmp_path / argv[argv.index("--lwf_forget_prompts") + 1], [
                {"question": q} for q in ("Hardest tissue of the tooth?", "What covers the root?")])
        tiny = _tiny_lwf(model_dir)
        if argv[1] == "inspect":
            tiny = [a for a in tiny if a not in ("--max_train_samples", "8")] + ["--inspect_steps", "1", "--show", "0"]
        if any(a.endswith(".yaml") for a in argv):
            tiny += ["--max_eval_samples", "2", "--eval_strategy", "no", "--save_strategy", "no"]
        assert main(argv[1:] + out + tiny) == 0
        return
    if argv[:2] == ["python", "examples/sft_lwf_gsm8k_forget_dental.py"]:
        import importlib.util

        pytest.importorskip("trl")
        spec = importlib.util.spec_from_file_location("readme_sft_example", ROOT / argv[1])
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        tiny = ["--model_name_or_path", model_dir, "--num_train_samples", "4", "--num_forget_prompts", "2",
                "--max_steps", "2", "--lwf_unlearn_every", "1", "--per_device_train_batch_size", "2",
                "--lwf_max_new_tokens", "4", "--lwf_forget_loss_cap", "50", "--max_length", "64",
                "--disable_tqdm", "true"]
        trainer = module.main(argv[2:] + out + tiny)
        assert trainer.lwf_callback.lwf_state.unlearn_points == 2
        return
    if argv[:3] == ["python", "-m", "experiments.run"]:
        from experiments.run import main

        assert main(argv[3:] + ["--dry_run", "--results_dir", str(tmp_path / "results")]) in (0, None)
        return
    if argv[:3] == ["python", "-m", "experiments.summarize"]:
        import shutil

        from experiments.summarize import main

        # the committed run files, summarised into a copy so that the repository is left as it is
        shutil.copytree(ROOT / "experiments" / "results", tmp_path / "results")
        assert main(argv[3:] + ["--results_dir", str(tmp_path / "results"), "--docs", str(tmp_path / "results.md")]) in (0, None)
        assert (tmp_path / "results.md").exists()
        return
    raise AssertionError(f"README command without a check in tests/test_readme.py: {command!r}")


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, tiny_model_dir, tmp_path, monkeypatch):
    if _needs_shared_data(shlex.split(command)) and not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data beside the repository")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_command(command, tiny_model_dir, tmp_path, monkeypatch)
