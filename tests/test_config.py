"""LWFConfig / LWFTrainingArguments: defaults, validation messages, parser round trips, serialisation, hashing."""

import dataclasses
import json

import pytest
from transformers import HfArgumentParser

from hf_lwf import LWFConfig, LWFTrainingArguments
from hf_lwf.config import GENERATION_FIELDS, config_from_args, fields_markdown_table, lwf_fields
from hf_lwf.data import load_forget_prompts


BAD_VALUES = [
    ("lwf_samples_per_prompt", 0),
    ("lwf_samples_per_prompt", -2),
    ("lwf_samples_per_prompt", 1.5),
    ("lwf_samples_per_prompt", True),
    ("lwf_max_new_tokens", 0),
    ("lwf_max_new_tokens", "8"),
    ("lwf_generation_batch_size", 0),
    ("lwf_fisher_samples", 0),
    ("lwf_unlearn_every", 0),
    ("lwf_unlearn_every", -5),
    ("lwf_unlearn_steps", 0),
    ("lwf_unlearn_batch_size", 0),
    ("lwf_score_batch_size", 0),
    ("lwf_fisher_batch_size", 0),
    ("lwf_score_chunk_size", 0),
    ("lwf_score_chunk_size", 2.5),
    ("lwf_fisher_dtype", "float16"),
    ("lwf_state_device", "cuda"),
    ("lwf_fisher", "offline"),
    ("lwf_confidence", "cosine"),
    ("lwf_selection", "best"),
    ("lwf_unlearn_optimizer", "adam"),
    ("lwf_schedule", "late"),
    ("lwf_temperature", -0.1),
    ("lwf_top_p", 0.0),
    ("lwf_top_p", 1.01),
    ("lwf_fisher_decay", 1.0),
    ("lwf_fisher_decay", -0.1),
    ("lwf_mask_ratio", 0.0),
    ("lwf_mask_ratio", 1.5),
    ("lwf_forget_ratio", 0.0),
    ("lwf_forget_ratio", 1.2),
    ("lwf_forget_top_k", 0),
    ("lwf_forget_top_k", 2.5),
    ("lwf_forget_top_k", True),
    ("lwf_temperature", float("nan")),
    ("lwf_top_p", float("nan")),
    ("lwf_fisher_decay", float("nan")),
    ("lwf_mask_ratio", float("nan")),
    ("lwf_forget_ratio", float("nan")),
    ("lwf_confidence_threshold", float("nan")),
    ("lwf_confidence_threshold", float("inf")),
    ("lwf_unlearn_coef", float("inf")),
    ("lwf_forget_loss_cap", float("inf")),
    ("lwf_unlearn_coef", 0.0),
    ("lwf_unlearn_coef", -1.0),
    ("lwf_forget_loss_cap", 0.0),
    ("lwf_forget_loss_cap", -3.0),
    ("lwf_rescore_every", -1),
    ("lwf_forget_prompts", 5),
    ("lwf_forget_prompts", ["a", 3]),
    ("lwf_forget_prompts", {"task": 3}),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_every_bad_value_is_rejected_naming_its_field(name, value):
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        LWFConfig(**{name: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("name,value", [("lwf_unlearn_lr", 0.0), ("lwf_unlearn_lr", -0.1)])
def test_bad_unlearn_lr_rejected(name, value):
    with pytest.raises(ValueError, match="`lwf_unlearn_lr`"):
        LWFConfig(lwf_unlearn_optimizer="sgd", **{name: value})


def test_sgd_unlearning_needs_its_own_learning_rate():
    with pytest.raises(ValueError, match="`lwf_unlearn_lr` must be set with lwf_unlearn_optimizer='sgd'"):
        LWFConfig(lwf_unlearn_optimizer="sgd")


def test_unlearn_lr_without_sgd_optimizer_is_rejected():
    with pytest.raises(ValueError, match="`lwf_unlearn_lr`.*lwf_unlearn_optimizer='preconditioned'"):
        LWFConfig(lwf_unlearn_lr=0.1)
    assert LWFConfig(lwf_unlearn_lr=0.1, lwf_unlearn_optimizer="sgd").lwf_unlearn_lr == 0.1


def test_ratio_and_top_k_contradict():
    with pytest.raises(ValueError, match="`lwf_forget_ratio` and `lwf_forget_top_k` are contradictory") as info:
        LWFConfig(lwf_forget_ratio=0.5, lwf_forget_top_k=3)
    assert "0.5" in str(info.value) and "3" in str(info.value)


def test_training_arguments_validate_too(tmp_path):
    with pytest.raises(ValueError, match="`lwf_top_p`"):
        LWFTrainingArguments(str(tmp_path), lwf_top_p=2.0, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="contradictory"):
        LWFTrainingArguments(str(tmp_path), lwf_forget_ratio=0.1, lwf_forget_top_k=1, report_to=[], use_cpu=True)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(lwf_temperature=0.0),
        dict(lwf_top_p=1.0),
        dict(lwf_fisher_decay=0.0),
        dict(lwf_mask_ratio=1.0),
        dict(lwf_forget_ratio=1.0),
        dict(lwf_forget_top_k=1),
        dict(lwf_rescore_every=0),
        dict(lwf_forget_prompts="some/hub-id"),
        dict(lwf_forget_prompts={"a": ["x"], "b": "b.txt"}),
        dict(lwf_forget_prompts=("x", "y")),
    ],
)
def test_boundary_values_are_accepted(overrides):
    config = LWFConfig(**overrides)
    for name, value in overrides.items():
        assert getattr(config, name) == value


def test_defaults():
    config = LWFConfig()
    expected = dict(
        lwf_forget_prompts=None, lwf_forget_prompt_column=None, lwf_samples_per_prompt=2, lwf_max_new_tokens=64,
        lwf_temperature=1.0, lwf_top_p=0.95, lwf_generation_batch_size=8, lwf_fisher="online",
        lwf_fisher_decay=0.95, lwf_fisher_samples=32, lwf_mask_ratio=1.0, lwf_confidence="deviation",
        lwf_confidence_threshold=0.0, lwf_forget_ratio=None, lwf_forget_top_k=None, lwf_selection="top",
        lwf_per_task_selection=False, lwf_unlearn_every=50, lwf_unlearn_steps=1, lwf_unlearn_batch_size=4,
        lwf_unlearn_coef=1.0, lwf_forget_loss_cap=5.0, lwf_unlearn_optimizer="preconditioned", lwf_unlearn_lr=None,
        lwf_rescore_every=0, lwf_schedule="periodic", lwf_score_batch_size=8, lwf_fisher_batch_size=8,
        lwf_score_chunk_size=1 << 25,
        lwf_fisher_dtype="float32", lwf_state_device="auto", lwf_seed=42,
    )
    assert {f.name for f in lwf_fields()} == set(expected)
    assert {f.name: getattr(config, f.name) for f in lwf_fields()} == expected
    assert all(f.metadata.get("help") for f in lwf_fields())


def test_forget_amount_default_and_overrides():
    assert LWFConfig().forget_amount == ("ratio", 0.25)
    assert LWFConfig(lwf_forget_ratio=0.1).forget_amount == ("ratio", 0.1)
    assert LWFConfig(lwf_forget_top_k=7).forget_amount == ("top_k", 7)


def _parser():
    return HfArgumentParser(LWFTrainingArguments)


def test_parser_round_trip_with_flags(tmp_path):
    (args,) = _parser().parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu",
            "--lwf-selection", "random",
            "--lwf_forget_prompts", '{"dental": ["Why floss?"], "psych": ["What is fear?", "Why dream?"]}',
            "--lwf_forget_ratio", "0.5",
            "--lwf_fisher", "empirical",
            "--lwf_temperature", "0",
            "--lwf_per_task_selection",
            "--lwf_unlearn_optimizer", "sgd", "--lwf_unlearn_lr", "0.01",
            "--lwf_seed", "7",
        ]
    )
    assert isinstance(args, LWFTrainingArguments)
    assert args.output_dir == str(tmp_path)
    assert args.lwf_selection == "random"
    assert args.lwf_forget_ratio == 0.5 and args.lwf_forget_top_k is None
    assert args.lwf_fisher == "empirical"
    assert args.lwf_temperature == 0.0
    assert args.lwf_per_task_selection is True
    assert args.lwf_unlearn_optimizer == "sgd" and args.lwf_unlearn_lr == 0.01
    assert args.lwf_seed == 7
    assert load_forget_prompts(args.lwf_forget_prompts) == {
        "dental": ["Why floss?"], "psych": ["What is fear?", "Why dream?"]
    }


def test_parser_rejects_bad_choice_and_contradiction(tmp_path):
    with pytest.raises(SystemExit):
        _parser().parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--lwf_selection", "best"])
    with pytest.raises(ValueError, match="contradictory"):
        _parser().parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--report_to", "none", "--lwf_forget_ratio", "0.3", "--lwf_forget_top_k", "2"]
        )


def test_help_lists_every_lwf_field():
    text = _parser().format_help()
    for f in lwf_fields():
        assert f"--{f.name}" in text


def test_to_dict_and_json_contain_lwf_fields(tmp_path):
    args = LWFTrainingArguments(
        str(tmp_path), report_to=[], use_cpu=True, lwf_forget_prompts=["a", "b"], lwf_forget_top_k=3, lwf_seed=5
    )
    d = args.to_dict()
    for f in lwf_fields():
        assert f.name in d
    assert d["lwf_forget_prompts"] == ["a", "b"]
    assert d["lwf_forget_top_k"] == 3 and d["lwf_seed"] == 5
    assert d["output_dir"] == str(tmp_path)
    loaded = json.loads(args.to_json_string())
    assert {k: v for k, v in loaded.items() if k.startswith("lwf_")} == args.lwf_dict()


def test_parse_dict_round_trip_of_lwf_values(tmp_path):
    args = LWFTrainingArguments(
        str(tmp_path), report_to=[], use_cpu=True, lwf_forget_prompts='{"t": ["p"]}', lwf_selection="bottom",
        lwf_mask_ratio=0.2, lwf_forget_top_k=4, lwf_confidence="alignment",
    )
    values = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, **args.lwf_dict()}
    (again,) = _parser().parse_dict(values)
    assert again.lwf_dict() == args.lwf_dict()
    assert again.lwf_hash() == args.lwf_hash()


def test_positional_output_dir(tmp_path):
    args = LWFTrainingArguments(str(tmp_path / "out"), lwf_seed=3, report_to=[], use_cpu=True)
    assert args.output_dir == str(tmp_path / "out")
    assert args.lwf_seed == 3


def test_config_from_args_copies_every_lwf_value(tmp_path):
    args = LWFTrainingArguments(str(tmp_path), report_to=[], use_cpu=True, lwf_seed=9, lwf_mask_ratio=0.3)
    config = config_from_args(args)
    assert type(config) is LWFConfig
    assert config.lwf_dict() == args.lwf_dict()
    assert config.lwf_hash() == args.lwf_hash()


def test_lwf_hash_stable_and_sensitive():
    base = LWFConfig(lwf_forget_prompts=["a", "b"], lwf_seed=1)
    same = LWFConfig(lwf_forget_prompts=["a", "b"], lwf_seed=1)
    h = base.lwf_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == same.lwf_hash() == base.lwf_hash()
    assert LWFConfig(lwf_forget_prompts=["a", "b"], lwf_seed=2).lwf_hash() != h
    assert LWFConfig(lwf_forget_prompts=["a", "c"], lwf_seed=1).lwf_hash() != h
    # Only generation fields: a change of an unlearning field keeps the generation hash.
    gen = base.lwf_hash(GENERATION_FIELDS)
    assert gen != h
    assert dataclasses.replace(base, lwf_unlearn_coef=3.0).lwf_hash(GENERATION_FIELDS) == gen
    assert dataclasses.replace(base, lwf_unlearn_coef=3.0).lwf_hash() != h
    assert dataclasses.replace(base, lwf_temperature=0.5).lwf_hash(GENERATION_FIELDS) != gen


def test_lwf_dict_is_json_serialisable_with_dataset_source():
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["x", "y"]})
    config = LWFConfig(lwf_forget_prompts=ds)
    dumped = json.dumps(config.lwf_dict())
    assert "Dataset" in json.loads(dumped)["lwf_forget_prompts"]
    assert config.lwf_hash() == config.lwf_hash()


def test_markdown_table_lists_every_field():
    table = fields_markdown_table()
    assert table.count("\n") == len(lwf_fields()) + 1
    for f in lwf_fields():
        assert f"`{f.name}`" in table


def test_every_field_declares_what_a_changed_value_does_on_resume():
    from hf_lwf.config import ON_RESUME, RUNTIME_FIELDS, SCORING_FIELDS, SELECTION_FIELDS, fields_where

    for f in lwf_fields():
        assert f.metadata.get("on_resume") in ON_RESUME, f.name
    # the name lists are derived from the metadata, and together they cover every field exactly once
    groups = [fields_where("on_resume", kind) for kind in ON_RESUME]
    assert sorted(n for g in groups for n in g) == sorted(f.name for f in lwf_fields())
    assert GENERATION_FIELDS == fields_where("on_resume", "regenerate")
    assert {"lwf_confidence", "lwf_mask_ratio"} <= set(SCORING_FIELDS)
    assert {"lwf_forget_ratio", "lwf_selection"} <= set(SELECTION_FIELDS)
    assert "lwf_score_batch_size" in RUNTIME_FIELDS


def test_hf_argument_parser_sees_only_argparse_keywords_in_the_metadata():
    """``on_resume`` and ``min`` are read with ``metadata.get``; HfArgumentParser's ``dict(metadata)`` omits them."""
    from transformers import HfArgumentParser

    from hf_lwf import LWFConfig

    for f in lwf_fields():
        assert "on_resume" not in dict(f.metadata) and "help" in dict(f.metadata)
    parser = HfArgumentParser(LWFConfig)
    (config,) = parser.parse_args_into_dataclasses(["--lwf_unlearn_steps", "3", "--lwf_selection", "random"])
    assert config.lwf_unlearn_steps == 3 and config.lwf_selection == "random"
