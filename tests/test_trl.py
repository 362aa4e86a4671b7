"""LWF with TRL: ``LWFCallback`` on ``SFTTrainer`` with its defaults, and ``LWFTrainerMixin`` on ``SFTTrainer``.

The ``SFTConfig`` values overridden for speed and isolation are only: ``output_dir``, ``max_steps=6``,
``use_cpu=True``, ``report_to=[]``, ``disable_tqdm=True`` (and the save settings where a test checks
checkpoints). Everything else is TRL's default, including ``gradient_checkpointing=True``, ``bf16=True`` (TRL's
default when fp16 is off), ``learning_rate=2e-5``, ``logging_steps=10`` and the batch size of 8.
"""

import os

import pytest
import torch
from conftest import FORGET_PROMPTS, tiny_llama
from datasets import Dataset
from transformers import TrainerCallback

from hf_lwf import LWFCallback, LWFConfig, LWFTrainer, LWFTrainerMixin, last_complete_checkpoint
from hf_lwf.checkpoint import incomplete_reason
from hf_lwf.state import CONFIG_NAME, STATE_JSON, STATE_TENSORS, LWFState


trl = pytest.importorskip("trl")


class LWFSFTTrainer(LWFTrainerMixin, trl.SFTTrainer):
    """What the README tells TRL users to write."""


LWF_VALUES = dict(lwf_forget_prompts=FORGET_PROMPTS, lwf_unlearn_every=2, lwf_max_new_tokens=8, lwf_unlearn_steps=2,
                  lwf_forget_loss_cap=50.0, lwf_unlearn_optimizer="sgd", lwf_unlearn_lr=0.05)


def chat_dataset(n=16):
    rows = [
        {"messages": [{"role": "user", "content": f"Tom has {a} apples and buys {b} more. How many apples?"},
                      {"role": "assistant", "content": f"The answer is {a + b}."}]}
        for a in range(1, 5) for b in range(1, 5)
    ]
    return Dataset.from_list(rows[:n])


def sft_config(output_dir, **overrides):
    values = dict(max_steps=6, use_cpu=True, report_to=[], disable_tqdm=True)
    values.update(overrides)
    return trl.SFTConfig(str(output_dir), **values)


class CheckpointingProbe(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))


def lwf_steps(trainer, key="lwf/forget_loss"):
    return [h["step"] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("confidence", ["alignment", "deviation"])
def test_callback_on_sft_trainer_with_trl_defaults(chat_tokenizer, tmp_path, confidence):
    args = sft_config(tmp_path)
    assert args.gradient_checkpointing and args.bf16 and args.logging_steps == 10 and args.learning_rate == 2e-5
    callback, probe = LWFCallback(LWFConfig(lwf_confidence=confidence, **LWF_VALUES)), CheckpointingProbe()
    trainer = trl.SFTTrainer(model=tiny_llama(len(chat_tokenizer)), args=args, train_dataset=chat_dataset(),
                             processing_class=chat_tokenizer, callbacks=[callback, probe])
    trainer.train()
    assert probe.seen == [True] * 6  # TRL's default gradient checkpointing was on at every step
    assert lwf_steps(trainer) == [2, 4, 6]  # logged at the unlearning points, not at logging_steps=10
    assert not any("lwf/failed_points" in h for h in trainer.state.log_history)
    state = callback.lwf_state
    assert state.forget_indices and state.unlearn_steps == 6 and state.idle_points == 0
    assert len(state.scores) == len(callback.self_data) == state.self_data_sizes["forget"]
    assert set(state.fisher) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    # D_self was elicited through the tokenizer's chat template, as SFT formats its own data.
    prompt = chat_tokenizer.decode(callback.self_data[0]["prompt_ids"])
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")


def test_lwf_trainer_is_built_on_the_mixin():
    assert issubclass(LWFTrainer, LWFTrainerMixin)
    assert LWFSFTTrainer.__mro__.index(LWFTrainerMixin) < LWFSFTTrainer.__mro__.index(trl.SFTTrainer)


def test_mixin_on_sft_trainer_logs_saves_and_writes_the_card(chat_tokenizer, tmp_path):
    args = sft_config(tmp_path, save_strategy="steps", save_steps=3)
    trainer = LWFSFTTrainer(model=tiny_llama(len(chat_tokenizer)), args=args, train_dataset=chat_dataset(),
                            processing_class=chat_tokenizer, lwf_config=LWFConfig(**LWF_VALUES))
    trainer.train()

    # lwf/* go through log(), next to TRL's own metrics, in the same record.
    logged = [h for h in trainer.state.log_history if "lwf/forget_loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    assert all("mean_token_accuracy" in h and "loss" in h for h in logged)
    assert "lwf/num_selected" in logged[0] and logged[0]["lwf/num_selected"] >= 1
    assert any("lwf/generate_seconds" in h for h in trainer.state.log_history)
    state = trainer.lwf_callback.lwf_state
    assert state.forget_indices and state.unlearn_steps == 6

    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        for name in (STATE_JSON, STATE_TENSORS, CONFIG_NAME, "training_args.json", "model.safetensors"):
            assert (folder / name).is_file(), (step, name)
        assert not (folder / "training_args.bin").exists()
        assert incomplete_reason(str(folder)) is None  # marked complete, every file matches the marker
    assert LWFState.load(str(tmp_path / "checkpoint-6")).unlearn_points == 3
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")

    trainer.create_model_card(model_name="tiny-sft-lwf")
    trainer.create_model_card(model_name="tiny-sft-lwf")
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    for tag in ("trl", "sft", "lwf", "hf-lwf"):
        assert f"- {tag}\n" in header, tag
    assert card.count("## Learning With Forgetting") == 1
    assert "TRL" in card  # TRL's own template is kept around the LWF section
    assert "6 ascent step(s) applied" in card


def test_mixin_on_sft_trainer_with_trl_peft_config_covers_the_adapters(chat_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = LWFSFTTrainer(model=tiny_llama(len(chat_tokenizer)), args=sft_config(tmp_path),
                            train_dataset=chat_dataset(), processing_class=chat_tokenizer, peft_config=config,
                            lwf_config=LWFConfig(**LWF_VALUES))
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    adapters = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    state = trainer.lwf_callback.lwf_state
    assert set(state.fisher) == set(state.reference) == adapters
    assert lwf_steps(trainer) == [2, 4, 6] and state.forget_indices and state.unlearn_steps == 6
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)
    assert not os.path.exists(tmp_path / "training_args.bin")
