"""LWF on a PEFT LoRA model: the Fisher, D, mask and confidence cover exactly the adapters; save, resume, Hub."""

import json

import pytest
import torch
from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lwf import LWFCallback, LWFTrainer
from hf_lwf.config import config_from_args
from hf_lwf.method.common import batch_losses
from hf_lwf.method.selfgen import collate_self_data
from hf_lwf.state import CONFIG_NAME, STATE_JSON, STATE_TENSORS, LWFState


peft = pytest.importorskip("peft")

PLAIN_FIELDS = ("max_steps", "per_device_train_batch_size", "learning_rate", "logging_steps", "save_strategy",
                "save_steps", "report_to", "use_cpu", "disable_tqdm", "seed", "data_seed", "activation_checkpointing")


def lora_llama(tokenizer, seed=0):
    model = tiny_llama(len(tokenizer), seed=seed)  # seeds the LoRA initialisation too
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def adapter_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _split(model):
    adapters = adapter_names(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return ({n: t for n, t in params.items() if n in adapters}, {n: t for n, t in params.items() if n not in adapters})


class CheckpointingProbe(TrainerCallback):
    """Records, at every step, whether activation checkpointing is switched on in the model being trained."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))


def make_trainer(tokenizer, args, kind, model=None, callbacks=(), plain_fields=PLAIN_FIELDS):
    """``LWFTrainer`` on LWFTrainingArguments, or ``LWFCallback`` on a plain Trainer with the same settings."""
    model = model if model is not None else lora_llama(tokenizer)
    common = dict(model=model, train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
                  data_collator=lm_collator(tokenizer))
    if kind == "trainer":
        return LWFTrainer(args=args, callbacks=list(callbacks) or None, **common)
    plain = TrainingArguments(args.output_dir, **{k: getattr(args, k) for k in plain_fields})
    return Trainer(args=plain, callbacks=[LWFCallback(config_from_args(args)), *callbacks], **common)


def lwf_callback(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LWFCallback))


def lwf_logs(trainer):
    return [{k: v for k, v in h.items() if k.startswith("lwf/") and "seconds" not in k} | {"step": h["step"]}
            for h in trainer.state.log_history if "lwf/forget_loss" in h or "lwf/num_selected" in h]


@pytest.mark.parametrize("confidence", ["alignment", "deviation"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("kind", ["trainer", "callback"])
def test_lora_unlearning_points_run_on_the_adapters_only(tokenizer, tmp_path, kind, checkpointing, confidence):
    model = lora_llama(tokenizer)
    expected = adapter_names(model)
    assert len(expected) == 8 and all(".lora_A." in n or ".lora_B." in n for n in expected)
    adapters_before, base_before = _split(model)
    probe = CheckpointingProbe()
    args = lwf_args(tmp_path, lwf_confidence=confidence, activation_checkpointing=checkpointing)
    trainer = make_trainer(tokenizer, args, kind, model=model, callbacks=[probe])
    trainer.train()

    assert probe.seen == [checkpointing] * 6
    history = trainer.state.log_history
    assert [h["step"] for h in history if "lwf/forget_loss" in h] == [2, 4, 6]
    assert not any("lwf/failed_points" in h for h in history)
    callback = lwf_callback(trainer)
    state = callback.lwf_state
    assert state.forget_indices and state.unlearn_steps == 6 and state.idle_points == 0
    assert len(state.scores) == len(callback.self_data)
    # Fisher and the reference of D cover exactly the LoRA parameters, with their shapes.
    assert set(state.fisher) == set(state.reference) == expected
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert all(state.fisher[n].shape == shapes[n] for n in expected)
    adapters_after, base_after = _split(model)
    for name, tensor in base_before.items():
        assert torch.equal(base_after[name], tensor), name
    assert any(not torch.equal(adapters_after[n], adapters_before[n]) for n in expected)


def test_ascent_moves_the_adapters_and_raises_the_forget_loss(tokenizer, tmp_path):
    values = dict(max_steps=8, lwf_unlearn_steps=3, lwf_forget_ratio=0.5, learning_rate=3e-3)
    lwf = make_trainer(tokenizer, lwf_args(tmp_path / "lwf", lwf_unlearn_every=2, **values), "trainer")
    lwf.train()
    never = make_trainer(tokenizer, lwf_args(tmp_path / "never", lwf_unlearn_every=1000, **values), "trainer")
    never.train()
    assert never.lwf_callback.lwf_state.unlearn_points == 0
    lwf_adapters, lwf_base = _split(lwf.model)
    never_adapters, never_base = _split(never.model)
    assert lwf_base.keys() == never_base.keys()
    assert all(torch.equal(lwf_base[n], never_base[n]) for n in lwf_base)
    moved = max((lwf_adapters[n] - never_adapters[n]).abs().max().item() for n in lwf_adapters)
    assert moved > 1e-4
    callback = lwf.lwf_callback
    rows = [callback.self_data[i] for i in callback.lwf_state.forget_indices]
    batch = collate_self_data(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        forget_lwf = batch_losses(lwf.model.eval(), batch).mean().item()
        forget_never = batch_losses(never.model.eval(), batch).mean().item()
    assert forget_lwf > forget_never + 0.01


class Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated crash")


def _resume_args(path):
    return lwf_args(path, max_steps=8, lwf_unlearn_every=3, save_strategy="steps", save_steps=4, lwf_mask_ratio=0.5,
                    lwf_unlearn_batch_size=1, lwf_unlearn_steps=3, lwf_forget_ratio=0.5,
                    lwf_unlearn_optimizer="shared", lwf_unlearn_lr=None, activation_checkpointing=True)


@pytest.mark.parametrize("kind", ["trainer", "callback"])
def test_lora_checkpoint_holds_adapter_and_lwf_state_and_resumes_exactly(tokenizer, tmp_path, kind):
    reference = make_trainer(tokenizer, _resume_args(tmp_path / "full"), kind)
    reference.train()

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tokenizer, _resume_args(run_dir), kind, callbacks=[Crash()]).train()
    checkpoint = run_dir / "checkpoint-4"
    for name in ("adapter_model.safetensors", "adapter_config.json", STATE_JSON, STATE_TENSORS, CONFIG_NAME):
        assert (checkpoint / name).is_file(), name
    assert not (checkpoint / "model.safetensors").exists()
    saved = LWFState.load(str(checkpoint))
    expected = adapter_names(reference.model)
    assert set(saved.fisher) == set(saved.reference) == expected and saved.fisher_updates == 4
    assert json.loads((checkpoint / CONFIG_NAME).read_text())["lwf_run"] == saved.run_summary()

    resumed = make_trainer(tokenizer, _resume_args(run_dir), kind)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert lwf_callback(resumed).lwf_state.unlearn_points == 2
    final, reference_final = _split(resumed.model)[0], _split(reference.model)[0]
    for name in expected:
        torch.testing.assert_close(final[name], reference_final[name], rtol=1e-6, atol=1e-7)
    reference_logs = [h for h in lwf_logs(reference) if h["step"] > 4]
    resumed_logs = [h for h in lwf_logs(resumed) if h["step"] > 4]
    assert [h["step"] for h in reference_logs] == [h["step"] for h in resumed_logs] == [6]
    for ref, res in zip(reference_logs, resumed_logs):
        assert ref.keys() == res.keys()
        for key in ref:
            assert res[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["trainer", "callback"])
def test_adapter_push_carries_lwf_config_state_and_card(tokenizer, tmp_path, fake_hub, kind):
    args = lwf_args(tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny-lora-lwf", hub_strategy="checkpoint",
                    save_strategy="steps", save_steps=3)
    trainer = make_trainer(tokenizer, args, kind,
                           plain_fields=PLAIN_FIELDS + ("push_to_hub", "hub_model_id", "hub_strategy"))
    trainer.train()
    trainer.push_to_hub()

    checkpoint_uploads = [u for u in fake_hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert checkpoint_uploads
    for upload in checkpoint_uploads:
        for name in ("adapter_model.safetensors", "adapter_config.json", STATE_JSON, STATE_TENSORS):
            assert name in upload["files"], (name, upload["files"])
    final = fake_hub.uploads[-1]
    assert final["path_in_repo"] == ""
    for name in ("adapter_model.safetensors", "adapter_config.json", CONFIG_NAME, "README.md"):
        assert name in final["files"], (name, final["files"])
    assert "model.safetensors" not in final["files"]
    state = lwf_callback(trainer).lwf_state
    config = json.loads((final["snapshot"] / CONFIG_NAME).read_text())
    assert config["lwf_unlearn_every"] == 2 and config["lwf_run"] == state.run_summary()
    card = (final["snapshot"] / "README.md").read_text()
    header = card.split("---")[1]
    assert "- lwf" in header and "- hf-lwf" in header
    assert card.count("## Learning With Forgetting") == 1 and "Loading this adapter needs `transformers` and `peft`" in card
    assert f"{state.unlearn_steps} ascent step(s) applied" in card and state.unlearn_steps == 6


def _input_grad_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_scoring_leaves_the_input_require_grads_hooks_as_it_found_them(tokenizer):
    """TRL and PEFT call ``enable_input_require_grads`` twice (two hooks, only the last remembered); scoring must
    lift both for the forward-mode pass and put back exactly those, round after round."""
    from hf_lwf.method.confidence import alignment_scores
    from hf_lwf.method.common import without_input_require_grads
    from hf_lwf.method.selfgen import collate_self_data

    model = lora_llama(tokenizer)
    model.enable_input_require_grads()
    model.enable_input_require_grads()
    hooks = {id(m): dict(m._forward_hooks) for m in model.modules() if m._forward_hooks}
    assert _input_grad_hooks(model) == 2
    ids = tokenizer("How often should you visit the dentist? Twice a year.")["input_ids"]
    batch = collate_self_data([{"prompt_ids": ids[:5], "response_ids": ids[5:]}], tokenizer.pad_token_id)
    direction = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        with without_input_require_grads(model):
            assert _input_grad_hooks(model) == 0
            assert torch.isfinite(alignment_scores(model, batch, direction)).all()
        assert {id(m): dict(m._forward_hooks) for m in model.modules() if m._forward_hooks} == hooks


def test_lora_rescoring_under_activation_checkpointing(tokenizer, tmp_path):
    args = lwf_args(tmp_path, activation_checkpointing=True, lwf_rescore_every=1, max_steps=6)
    trainer = make_trainer(tokenizer, args, "trainer")
    trainer.train()
    assert lwf_steps(trainer, "lwf/num_selected") == [2, 4, 6]  # scored at every point
    assert trainer.lwf_callback.lwf_state.unlearn_steps == 6
    assert _input_grad_hooks(trainer.model) == 1


def lwf_steps(trainer, key="lwf/forget_loss"):
    return [h["step"] for h in trainer.state.log_history if key in h]
