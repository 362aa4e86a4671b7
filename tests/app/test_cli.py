"""The hf-lwf command line: config files and flags, learning-data preparation, `train` and `inspect` end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import LEARN_TEXTS, write_cli_files
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_lwf.app.cli import TOP_HELP, inspect_parser, main, parse_command, train_parser
from hf_lwf.config import lwf_fields
from hf_lwf.app.learning_data import LearningCollator, prepare_learning_dataset
from hf_lwf.app.inspect import format_table, ranked_samples


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_cli_files(tmp_path_factory.mktemp("cli"))


def _config(workdir, **overrides):
    values = {
        "model_name_or_path": str(workdir / "model"),
        "dataset": str(workdir / "learn.jsonl"),
        "lwf_forget_prompts": str(workdir / "forget.txt"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": "1e-3",  # a string to YAML 1.1: the parser converts it with the flag's type
        "logging_steps": 1,
        "lwf_unlearn_every": 2,
        "lwf_max_new_tokens": 6,
        "lwf_unlearn_optimizer": "sgd",
        "lwf_unlearn_lr": 0.05,
        "lwf_forget_loss_cap": 50.0,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    values.update(overrides)
    return values


def _write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


# ---------------------------------------------------------------------------------------- config parsing
def test_config_file_values_and_flag_overrides(workdir, tmp_path):
    config = _write_yaml(tmp_path / "run.yaml", _config(workdir, lwf_forget_ratio=0.5))
    model_args, data_args, command, args = parse_command(
        train_parser(), [config, "--output_dir", str(tmp_path / "out"), "--learning_rate", "2e-3", "--no_lwf",
                         "--lwf_unlearn_every", "3"]
    )
    assert args.learning_rate == 2e-3  # flag beats file
    assert args.lwf_unlearn_every == 3
    assert args.max_steps == 4 and args.lwf_forget_ratio == 0.5  # from the file
    assert args.lwf_forget_prompts == str(workdir / "forget.txt")
    assert model_args.model_name_or_path == str(workdir / "model") and data_args.dataset.endswith("learn.jsonl")
    assert command.lwf is False and command.plots is True
    assert args.output_dir == str(tmp_path / "out")


def test_string_numbers_in_yaml_are_converted(workdir, tmp_path):
    config = _write_yaml(tmp_path / "run.yaml", _config(workdir, lwf_unlearn_lr="5e-2"))
    *_, args = parse_command(train_parser(), [config, "--output_dir", str(tmp_path)])
    assert args.learning_rate == 1e-3 and isinstance(args.learning_rate, float)
    assert args.lwf_unlearn_lr == 0.05


def test_json_config_and_dash_keys(workdir, tmp_path):
    values = _config(workdir)
    values["lwf-unlearn-every"] = values.pop("lwf_unlearn_every")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    *_, args = parse_command(train_parser(), [str(path), "--output_dir", str(tmp_path)])
    assert args.lwf_unlearn_every == 2 and args.max_steps == 4


def test_round_trip_through_a_config_file(workdir, tmp_path):
    flags = ["--model_name_or_path", "m", "--dataset", "d.jsonl", "--prompt_column", "q", "--max_length", "64",
             "--output_dir", str(tmp_path), "--lwf_forget_prompts", '{"dental": "a.jsonl", "psy": "b.jsonl"}',
             "--lwf_selection", "bottom", "--lwf_forget_top_k", "3", "--lwf_per_task_selection", "--lwf_fisher_decay",
             "0.9", "--learning_rate", "3e-5", "--max_steps", "7"]
    model_args, data_args, _, args = parse_command(train_parser(), flags)
    dumped = {"model_name_or_path": model_args.model_name_or_path, **{
        k: v for k, v in vars(data_args).items() if not k.startswith("_")}, **args.lwf_dict(),
        "output_dir": args.output_dir, "learning_rate": args.learning_rate, "max_steps": args.max_steps}
    config = _write_yaml(tmp_path / "dump.yaml", dumped)
    model2, data2, _, args2 = parse_command(train_parser(), [config])
    assert model2 == model_args and data2 == data_args
    assert args2.lwf_dict() == args.lwf_dict()
    assert (args2.learning_rate, args2.max_steps, args2.lwf_per_task_selection) == (3e-5, 7, True)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"not_a_flag": 1}, "unknown argument(s) not_a_flag"),
        ({"max_steps": "many"}, "invalid value 'many' for 'max_steps'"),
        ({"lwf_forget_ratio": 0.5, "lwf_forget_top_k": 3}, "contradictory"),
    ],
)
def test_bad_config_values_are_usage_errors(workdir, tmp_path, capsys, values, message):
    config = _write_yaml(tmp_path / "bad.yaml", _config(workdir, **values))
    with pytest.raises(SystemExit) as info:
        parse_command(train_parser(), [config, "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_required_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_command(train_parser(), ["--dataset", "d.jsonl", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert "required: --model_name_or_path" in capsys.readouterr().err


def test_train_requires_forget_prompts_unless_no_lwf(workdir, tmp_path, capsys):
    values = _config(workdir)
    values.pop("lwf_forget_prompts")
    config = _write_yaml(tmp_path / "run.yaml", values)
    with pytest.raises(SystemExit):
        main(["train", config, "--output_dir", str(tmp_path)])
    assert "--lwf_forget_prompts is required" in capsys.readouterr().err


@pytest.mark.parametrize("parser_fn", [train_parser, inspect_parser])
def test_help_lists_every_field(parser_fn):
    text = parser_fn().format_help()
    for f in lwf_fields():
        assert f"--{f.name}" in text
    for name in ("--learning_rate", "--max_steps", "--output_dir", "--model_name_or_path", "--dataset",
                 "--prompt_column", "--max_length", "--gguf_file"):
        assert name in text
    assert "(required)" in text and "usage:" in text


def test_top_level_dispatch(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 2
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--help"])
    assert info.value.code == 0
    assert "--inspect_steps" in capsys.readouterr().out


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "hf_lwf", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == TOP_HELP.strip()


# ------------------------------------------------------------------------------------- learning data
def test_prompt_response_masks_the_prompt(chat_tokenizer):
    data = Dataset.from_dict({"question": ["Tom has 3 apples."], "answer": ["The answer is 7."]})
    row = prepare_learning_dataset(data, chat_tokenizer, max_length=128)[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    masked = row["labels"].index(next(label for label in row["labels"] if label != -100))
    assert chat_tokenizer.decode(trained) == "The answer is 7.<eos>"
    assert chat_tokenizer.decode(row["input_ids"][:masked]) == "<|user|>Tom has 3 apples.<eos><|assistant|>"
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_plain_text_and_truncation(tokenizer):
    data = Dataset.from_dict({"text": LEARN_TEXTS[:3]})
    rows = prepare_learning_dataset(data, tokenizer, max_length=5)
    assert all(len(r["input_ids"]) == 5 and r["labels"] == r["input_ids"] for r in rows)
    full = prepare_learning_dataset(data, tokenizer, max_length=512)[0]
    assert full["input_ids"][-1] == tokenizer.eos_token_id


def test_prompt_longer_than_max_length_is_dropped_or_rejected(chat_tokenizer):
    data = Dataset.from_dict({"prompt": ["Tom has 3 apples " * 20, "Hi"], "response": ["7", "7"]})
    assert len(prepare_learning_dataset(data, chat_tokenizer, max_length=12)) == 1
    with pytest.raises(ValueError, match="raise `max_length`"):
        prepare_learning_dataset(data.select([0]), chat_tokenizer, max_length=12)


def test_column_errors(tokenizer):
    data = Dataset.from_dict({"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="Cannot tell which columns"):
        prepare_learning_dataset(data, tokenizer)
    with pytest.raises(ValueError, match="`prompt_column`='q' is not a column"):
        prepare_learning_dataset(data, tokenizer, prompt_column="q", response_column="b")
    assert len(prepare_learning_dataset(data, tokenizer, prompt_column="a", response_column="b")) == 1


def test_collator_right_pads_with_ignored_labels():
    batch = LearningCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
         {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ---------------------------------------------------------------------------------------- train, inspect
def test_train_end_to_end_with_local_files(workdir, tmp_path, capsys):
    config = _write_yaml(tmp_path / "run.yaml", _config(workdir))
    out = tmp_path / "out"
    assert main(["train", config, "--output_dir", str(out), "--eval_split", "train", "--max_eval_samples", "8"]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "lwf_config.json", "report.json",
                 "learning_loss.png", "forget_loss.png", "confidence_histogram.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "train" and report["lwf"] is True
    assert report["training_args"]["learning_rate"] == 1e-3
    assert [h["step"] for h in report["lwf_summary"]["history"]] == [2, 4]
    assert report["lwf_summary"]["unlearn_steps"] == 2
    assert "eval_loss" in report["metrics"] and report["final_train_loss"] is not None
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(workdir / "model")
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert "Model saved to" in capsys.readouterr().out


def test_inspect_prints_and_saves_the_ranking(workdir, tmp_path, capsys):
    config = _write_yaml(tmp_path / "run.yaml", _config(workdir, lwf_forget_top_k=3))
    out = tmp_path / "inspect"
    assert main(["inspect", config, "--output_dir", str(out), "--show", "2", "--max_steps", "10"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "inspect.json").read_text())
    rows = [json.loads(line) for line in (out / "inspect.jsonl").read_text().splitlines()]
    assert summary["samples"] == rows and summary["inspect_steps"] == 2
    assert summary["learning_rate"] > 0  # the real run's schedule (10 steps), not one ending at step 2
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["confidence"] for r in rows] == sorted((r["confidence"] for r in rows), reverse=True)
    assert sum(r["selected"] for r in rows) == summary["num_selected"] == 3
    assert set(rows[0]) == {"rank", "index", "task", "confidence", "selected", "prompt", "text"}
    assert "rank  task" in printed and "confidence" in printed and "inspect.jsonl" in printed
    assert not (out / "model.safetensors").exists()


def test_inspect_applies_no_ascent(workdir, tmp_path, monkeypatch):
    import hf_lwf.backends.base as backend_module
    from hf_lwf import LWFRun

    called, steps = [], []
    monkeypatch.setattr(LWFRun, "unlearn", lambda self, *a, **k: called.append(1))
    real_ascent = backend_module.ascent_step
    monkeypatch.setattr(backend_module, "ascent_step", lambda *a, **k: steps.append(1) or real_ascent(*a, **k))
    config = _write_yaml(tmp_path / "run.yaml", _config(workdir))
    assert main(["inspect", config, "--output_dir", str(tmp_path / "o"), "--show", "0"]) == 0
    assert called == [] and steps == []


def test_format_table_truncates_and_elides():
    data = Dataset.from_dict({
        "task": ["a", "b", "a", "b", "a"], "prompt": ["p"] * 5,
        "text": ["short", "x " * 100, "line\nbreak\x05", "four", "five"],
    })
    samples = ranked_samples(data, [0.1, 0.5, -0.2, 0.3, 0.0], [1, 3])
    assert [s["index"] for s in samples] == [1, 3, 0, 4, 2]
    assert [s["selected"] for s in samples] == [True, True, False, False, False]
    table = format_table(samples, limit=1, width=20)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "task", "confidence", "forget", "text"]
    assert len(lines) == 5 and "(3 more)" in lines[3]
    assert all(len(line) < 80 for line in lines)
    assert "line break" in format_table(samples)


@pytest.mark.parametrize(
    "example", sorted(p for p in os.listdir(os.path.join(os.path.dirname(__file__), "..", "..", "examples")) if p.endswith(".yaml"))
)
def test_examples_parse(example):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", example)
    model_args, data_args, command, args = parse_command(train_parser(), [path, "--use_cpu", "--bf16", "false"])
    assert model_args.model_name_or_path and data_args.dataset and args.lwf_forget_prompts and command.lwf
