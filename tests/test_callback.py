"""LWFCallback wired into a real Trainer: schedule, parity with LWFTrainer, accumulation, faults."""

import json
import math

import pytest
import torch
from conftest import FORGET_PROMPTS, learning_dataset, lm_collator, lwf_args, tiny_gpt2, tiny_llama
from transformers import Trainer, TrainingArguments

from hf_lwf import LWFCallback, LWFConfig, LWFRun, LWFTrainer
from hf_lwf.backends import detect_backend
from hf_lwf.callback import LWFUnlearningError
from hf_lwf.config import config_from_args
from hf_lwf.state import LWFState
from hf_lwf.method.common import batch_losses
from hf_lwf.method.selfgen import collate_self_data


def _trainer(tokenizer, args, model=None, cls=LWFTrainer, **kwargs):
    model = model if model is not None else tiny_llama(len(tokenizer))
    return cls(model=model, args=args, train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
               data_collator=lm_collator(tokenizer), **kwargs)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_unlearning_fires_exactly_at_multiples(tokenizer, tmp_path, monkeypatch):
    calls = []
    original = LWFRun.unlearning_point

    def spy(self, **kwargs):
        calls.append(kwargs["step"])
        return original(self, **kwargs)

    monkeypatch.setattr(LWFRun, "unlearning_point", spy)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=7, lwf_unlearn_every=3))
    trainer.train()
    assert calls == [3, 6]
    assert [h["step"] for h in trainer.lwf_callback.lwf_state.history] == [3, 6]
    assert trainer.lwf_callback.lwf_state.unlearn_points == 2
    assert trainer.lwf_callback.lwf_state.unlearn_steps == 4


def test_callback_on_plain_trainer_equals_lwf_trainer(tokenizer, tmp_path):
    config = LWFConfig(lwf_forget_prompts=FORGET_PROMPTS, lwf_unlearn_every=2, lwf_max_new_tokens=8,
                       lwf_unlearn_steps=2, lwf_forget_loss_cap=50.0)
    plain_args = TrainingArguments(str(tmp_path / "plain"), max_steps=6, per_device_train_batch_size=4,
                                   learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                                   use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    plain = _trainer(tokenizer, plain_args, cls=Trainer, callbacks=[LWFCallback(config)])
    plain.train()
    subclass = _trainer(tokenizer, lwf_args(tmp_path / "sub"))
    subclass.train()
    assert torch.equal(_flat(plain.model), _flat(subclass.model))
    plain_lwf = [h for h in plain.state.log_history if "lwf/forget_loss" in h]
    sub_lwf = [h for h in subclass.state.log_history if "lwf/forget_loss" in h]
    assert [h["step"] for h in plain_lwf] == [h["step"] for h in sub_lwf] == [2, 4, 6]
    assert [h["lwf/forget_loss"] for h in plain_lwf] == [h["lwf/forget_loss"] for h in sub_lwf]


def test_callback_reads_lwf_training_arguments(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=2), cls=Trainer, callbacks=[LWFCallback()])
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LWFCallback))
    assert callback.config.lwf_unlearn_every == 2 and callback.prompts == {"forget": FORGET_PROMPTS}


def test_callback_without_config_on_plain_args_fails_at_construction(tokenizer, tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="LWFTrainingArguments"):
        _trainer(tokenizer, args, cls=Trainer, callbacks=[LWFCallback()])


def test_missing_prompts_fail_at_construction(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="lwf_forget_prompts"):
        _trainer(tokenizer, lwf_args(tmp_path, lwf_forget_prompts=None))


def test_model_that_cannot_generate_fails_at_construction(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="generate"):
        _trainer(tokenizer, lwf_args(tmp_path), model=model)


def test_tokenizer_without_pad_fails_at_construction(tokenizer, tmp_path):
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        LWFTrainer(model=tiny_llama(len(tokenizer)), args=lwf_args(tmp_path), processing_class=tokenizer)


def test_gradient_accumulation_matches_full_batch(tokenizer, tmp_path):
    full = _trainer(tokenizer, lwf_args(tmp_path / "full", per_device_train_batch_size=4))
    full.train()
    accumulated = _trainer(tokenizer, lwf_args(tmp_path / "ga", per_device_train_batch_size=2,
                                               gradient_accumulation_steps=2))
    accumulated.train()
    torch.testing.assert_close(_flat(full.model), _flat(accumulated.model), rtol=1e-4, atol=1e-5)
    fisher_full = full.lwf_callback.lwf_state.fisher
    fisher_ga = accumulated.lwf_callback.lwf_state.fisher
    for name in fisher_full:
        torch.testing.assert_close(fisher_full[name], fisher_ga[name], rtol=1e-3, atol=1e-9)


def test_ascent_raises_forget_loss_while_learning_loss_falls(tokenizer, tmp_path):
    args = lwf_args(tmp_path, max_steps=12, lwf_unlearn_every=3, lwf_unlearn_steps=3,
                    lwf_forget_ratio=0.5, learning_rate=3e-3)
    trainer = _trainer(tokenizer, args)
    trainer.train()
    callback = trainer.lwf_callback
    rows = [callback.self_data[i] for i in callback.lwf_state.forget_indices]
    batch = collate_self_data(rows, tokenizer.pad_token_id)
    baseline = _trainer(tokenizer, lwf_args(tmp_path / "vanilla", max_steps=12, learning_rate=3e-3,
                                            lwf_unlearn_every=1000))
    baseline.train()
    with torch.no_grad():
        forget_lwf = batch_losses(trainer.model.eval(), batch).mean().item()
        forget_vanilla = batch_losses(baseline.model.eval(), batch).mean().item()
    history = [h["lwf/forget_loss"] for h in callback.lwf_state.history]
    assert forget_lwf > forget_vanilla + 0.05
    assert history[-1] > history[0]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_non_finite_ascent_loss_is_skipped_and_weights_stay_finite(tokenizer, tmp_path, monkeypatch):
    import hf_lwf.method.unlearn as unlearn

    original = unlearn.response_losses
    monkeypatch.setattr(unlearn, "response_losses", lambda model, batch: original(model, batch) * float("nan"))
    trainer = _trainer(tokenizer, lwf_args(tmp_path))
    before = _flat(trainer.model).clone()
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.skipped_steps == 6 and state.unlearn_steps == 0
    assert torch.isfinite(_flat(trainer.model)).all()
    assert not torch.equal(before, _flat(trainer.model))
    logged = [h for h in trainer.state.log_history if "lwf/skipped_steps" in h]
    assert logged[-1]["lwf/skipped_steps"] == 6


def test_empty_selection_is_logged_and_training_continues(tokenizer, tmp_path, caplog):
    trainer = _trainer(tokenizer, lwf_args(tmp_path, lwf_confidence_threshold=1e9))
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.forget_indices == [] and state.empty_selections == 3 and state.unlearn_steps == 0
    assert trainer.state.global_step == 6


def test_metrics_reach_the_trainer_log(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, lwf_args(tmp_path))
    trainer.train()
    first_point = next(h for h in trainer.state.log_history if "lwf/num_selected" in h)
    for key in ("lwf/forget_loss", "lwf/confidence_mean", "lwf/confidence_max", "lwf/confidence_min",
                "lwf/skipped_steps", "lwf/score_seconds", "lwf/unlearn_seconds"):
        assert key in first_point and math.isfinite(first_point[key])
    assert any("lwf/generate_seconds" in h for h in trainer.state.log_history)


def test_lwf_trainer_log_feeds_report_integrations(tokenizer, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = _trainer(tokenizer, lwf_args(tmp_path))
    trainer.callback_handler.callbacks.insert(1, Recorder())  # where report_to integrations sit
    trainer.train()
    assert any("lwf/forget_loss" in logs for logs in seen)


@pytest.mark.parametrize("fisher,confidence", [("empirical", "deviation"), ("online", "alignment")])
def test_other_fisher_and_confidence_modes_run(tokenizer, tmp_path, fisher, confidence):
    trainer = _trainer(tokenizer, lwf_args(tmp_path, lwf_fisher=fisher, lwf_confidence=confidence,
                                           lwf_fisher_samples=4, lwf_mask_ratio=0.5))
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert len(state.scores) == len(trainer.lwf_callback.self_data) and state.unlearn_steps == 6


def test_early_schedule_unlearns_everything_before_training(tokenizer, tmp_path, monkeypatch):
    steps_at_unlearning = []
    original = LWFRun.unlearn

    def spy(self, model, optimizer, steps, max_grad_norm):
        steps_at_unlearning.append(steps)
        return original(self, model, optimizer, steps, max_grad_norm)

    monkeypatch.setattr(LWFRun, "unlearn", spy)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, lwf_schedule="early", lwf_fisher_samples=4))
    trainer.train()
    assert steps_at_unlearning == [2 * 3]
    assert [h["step"] for h in trainer.lwf_callback.lwf_state.history] == [0]


def test_rescoring_and_mixed_per_task_selection(tokenizer, tmp_path, monkeypatch):
    import hf_lwf.run as callback_module

    scored = []
    original = callback_module.score_self_data
    monkeypatch.setattr(callback_module, "score_self_data", lambda *a, **k: scored.append(1) or original(*a, **k))
    prompts = {"geo": FORGET_PROMPTS[:2], "bio": FORGET_PROMPTS[2:]}
    trainer = _trainer(tokenizer, lwf_args(tmp_path, lwf_forget_prompts=prompts, lwf_rescore_every=2,
                                           lwf_per_task_selection=True, lwf_forget_ratio=0.5, max_steps=8))
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert len(scored) == 2  # points 1 and 3
    assert set(state.self_data_sizes) == {"geo", "bio"}
    for task, size in state.self_data_sizes.items():
        assert state.forget_sizes[task] <= math.ceil(0.5 * size)


def test_gpt2_runs(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, lwf_args(tmp_path), model=tiny_gpt2(len(tokenizer)))
    trainer.train()
    assert trainer.lwf_callback.lwf_state.unlearn_points == 3


def test_failing_unlearning_point_stops_the_run_with_the_cause(tokenizer, tmp_path, monkeypatch):
    import hf_lwf.run as callback_module

    def broken(*args, **kwargs):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(callback_module, "score_self_data", broken)
    trainer = _trainer(tokenizer, lwf_args(tmp_path))
    with pytest.raises(LWFUnlearningError, match="step 2 failed with RuntimeError: scoring exploded") as info:
        trainer.train()
    assert "resume_from_checkpoint" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    assert trainer.state.global_step == 2


def test_bf16_mixed_precision_runs_and_stays_finite(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, lwf_args(tmp_path, bf16=True))
    trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.unlearn_steps == 6 and state.idle_points == 0
    assert all(torch.isfinite(torch.tensor(state.scores)))
    assert torch.isfinite(_flat(trainer.model)).all()


def _forget_steps(trainer):
    return [h["step"] for h in trainer.state.log_history if h.get("lwf/forget_loss") is not None]


@pytest.mark.parametrize("mode", ["alignment", "deviation"])
@pytest.mark.parametrize("use_callback", [False, True], ids=["LWFTrainer", "callback"])
def test_unlearning_runs_under_gradient_checkpointing(tokenizer, tmp_path, mode, use_callback):
    args = lwf_args(tmp_path, gradient_checkpointing=True, lwf_confidence=mode)
    if use_callback:
        trainer = _trainer(tokenizer, args, cls=Trainer, callbacks=[LWFCallback()])
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LWFCallback))
    else:
        trainer = _trainer(tokenizer, args)
        callback = trainer.lwf_callback
    trainer.train()
    state = callback.lwf_state
    assert _forget_steps(trainer) == [2, 4, 6]
    assert state.unlearn_points == 3 and state.unlearn_steps == 6 and state.idle_points == 0 and state.forget_indices
    # The setup that broke scoring is in place, and the hooks lifted for scoring are back.
    assert trainer.model.is_gradient_checkpointing and trainer.model._require_grads_hooks


def test_eta_is_the_rate_of_the_step_that_produced_d(tokenizer, tmp_path, monkeypatch):
    """A point at the last step of a linear schedule: the scheduler's next rate is 0, the step's rate is not."""
    import hf_lwf.run as callback_module

    seen = []
    real = callback_module.score_self_data
    monkeypatch.setattr(callback_module, "score_self_data",
                        lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=4, lwf_unlearn_every=4, lr_scheduler_type="linear"))
    trainer.train()
    assert seen == [pytest.approx(1e-3 * 1 / 4)]
    state = trainer.lwf_callback.lwf_state
    assert any(s != 0 for s in state.scores) and state.forget_indices and state.unlearn_steps == 2


def test_second_train_does_not_write_the_previous_runs_state(tokenizer, tmp_path):
    callback = LWFCallback(config_from_args(lwf_args(tmp_path)))
    args = lwf_args(tmp_path / "out", max_steps=4, save_strategy="steps", save_steps=4)
    first = _trainer(tokenizer, args, model=tiny_llama(len(tokenizer), seed=1), cls=Trainer, callbacks=[callback])
    first.train()
    first_fisher = {n: t.clone() for n, t in callback.lwf_state.fisher.items()}
    second = _trainer(tokenizer, args, model=tiny_llama(len(tokenizer), seed=2), cls=Trainer, callbacks=[callback])
    second.train()
    saved = LWFState.load(str(tmp_path / "out" / "checkpoint-4"))
    name = next(iter(first_fisher))
    assert not torch.equal(first_fisher[name], callback.lwf_state.fisher[name])
    for n, tensor in callback.lwf_state.fisher.items():
        assert torch.equal(saved.fisher[n], tensor), n
    assert saved.history == callback.lwf_state.history


def test_lwf_trainer_builds_the_online_fisher_before_clipping(tokenizer, tmp_path):
    def fisher(max_grad_norm, cls=LWFTrainer):
        args = lwf_args(tmp_path / f"{cls.__name__}{max_grad_norm}", max_steps=1, lwf_unlearn_every=100,
                        max_grad_norm=max_grad_norm)
        kwargs = {"callbacks": [LWFCallback()]} if cls is Trainer else {}
        trainer = _trainer(tokenizer, args, cls=cls, **kwargs)
        trainer.train()
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LWFCallback))
        return torch.cat([f.reshape(-1) for _, f in sorted(callback.lwf_state.fisher.items())])

    unclipped = fisher(0.0)
    torch.testing.assert_close(fisher(1e-3), unclipped)  # LWFTrainer: the gradients before clipping
    callback_only = fisher(1e-3, cls=Trainer)  # a callback sees them only after clipping (documented)
    assert float(callback_only.sum()) < 1e-3 * float(unclipped.sum())


def test_no_unlearning_step_is_said_loudly_and_on_the_card(tokenizer, tmp_path, caplog):
    trainer = _trainer(tokenizer, lwf_args(tmp_path, lwf_confidence_threshold=1e9, save_strategy="steps",
                                           save_steps=6))
    with caplog.at_level("WARNING"):
        trainer.train()
    state = trainer.lwf_callback.lwf_state
    assert state.unlearn_points == 3 and state.idle_points == 3 and state.empty_selections == 3
    assert state.unlearn_steps == 0
    assert "NOTHING WAS FORGOTTEN" in caplog.text and "3 of 3 unlearning points applied no ascent step" in caplog.text
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "**no unlearning step was applied**" in card and "it unlearned" not in card
    run = json.loads((tmp_path / "checkpoint-6" / "lwf_config.json").read_text())["lwf_run"]
    assert run["unlearn_steps"] == 0 and run["idle_points"] == 3


def test_a_run_that_reaches_no_point_warns_before_training(tokenizer, tmp_path, caplog):
    args = lwf_args(tmp_path, max_steps=-1, num_train_epochs=1, lwf_unlearn_every=100)
    trainer = _trainer(tokenizer, args)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "8 optimizer steps < lwf_unlearn_every=100" in caplog.text
    assert "NOTHING WAS FORGOTTEN" in caplog.text and "no unlearning point was reached" in caplog.text


@pytest.mark.parametrize("overrides", [{"lwf_fisher": "empirical"}, {"lwf_schedule": "early"}])
def test_iterable_train_set_with_index_based_fisher_fails_at_construction(tokenizer, tmp_path, overrides):
    iterable = learning_dataset(tokenizer).to_iterable_dataset()
    with pytest.raises(ValueError, match="streaming/iterable train set"):
        LWFTrainer(model=tiny_llama(len(tokenizer)), args=lwf_args(tmp_path, **overrides), train_dataset=iterable,
                   processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    plain = Trainer(model=tiny_llama(len(tokenizer)), args=lwf_args(tmp_path, **overrides), train_dataset=iterable,
                    processing_class=tokenizer, data_collator=lm_collator(tokenizer), callbacks=[LWFCallback()])
    with pytest.raises(ValueError, match="streaming/iterable train set"):
        plain.train()  # a callback first sees the train set when training starts: before any step
    assert plain.state.global_step == 0


def _engine_check(args: dict, via_trainer: bool, **fields) -> object:
    """``detect_backend(args).check(config, via_trainer=...)``: the backend it accepted, or the error it raised."""
    from types import SimpleNamespace

    backend = detect_backend(SimpleNamespace(**args))
    backend.check(LWFConfig(lwf_forget_prompts=FORGET_PROMPTS, **fields), via_trainer=via_trainer)
    return backend


SGD = dict(lwf_unlearn_optimizer="sgd", lwf_unlearn_lr=0.05)


@pytest.mark.parametrize("args,env", [
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, {}),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
])
def test_deepspeed_needs_the_trainer_and_a_supported_stage(monkeypatch, args, env):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="Under DeepSpeed, LWF must run through `LWFTrainer`"):
        _engine_check(args, via_trainer=False, **SGD)
    assert _engine_check(args, via_trainer=True, **SGD).name == "zero2"  # ZeRO-2 through the trainer: accepted
    assert _engine_check(args, via_trainer=True).name == "zero2"  # the default (preconditioned) ascent too
    with pytest.raises(ValueError, match="`lwf_unlearn_optimizer='shared'` is not supported"):
        _engine_check(args, via_trainer=True, lwf_unlearn_optimizer="shared")
    with pytest.raises(ValueError, match="fp16=True"):
        _engine_check({**args, "fp16": True}, via_trainer=True)
    for stage in (0, 1):  # no partitioned gradients to read, untested: refused
        if args:
            other = {"deepspeed": {"zero_optimization": {"stage": stage}}}
        else:
            monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
            other = {}
        with pytest.raises(ValueError, match=f"supports DeepSpeed ZeRO stage .*asks for stage {stage}"):
            _engine_check(other, via_trainer=True)
    if args:
        zero3 = {"deepspeed": {"zero_optimization": {"stage": 3}}}
    else:
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
        zero3 = {}
    assert _engine_check(zero3, via_trainer=True).name == "zero3"  # ZeRO-3: accepted, online or empirical Fisher
    _engine_check(zero3, via_trainer=True, lwf_fisher="empirical")
    for fields, message in (({"lwf_schedule": "early"}, "ZeRO-3 LWF supports the periodic schedule only"),
                            ({"lwf_state_device": "cpu"}, "`lwf_state_device='cpu'` is not supported under ZeRO-3")):
        with pytest.raises(ValueError, match=message):
            _engine_check(zero3, via_trainer=True, **fields)


@pytest.mark.parametrize("args,env", [({"fsdp": True}, {}), ({}, {"ACCELERATE_USE_FSDP": "true"})])
def test_fsdp_needs_the_trainer_fsdp2_and_state_on_the_parameters_device(monkeypatch, args, env):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="must run through `LWFTrainer`"):
        _engine_check(args, via_trainer=False)
    assert _engine_check(args, via_trainer=True).name == "fsdp2"  # FSDP2 (the default version) through the trainer
    with pytest.raises(ValueError, match="FSDP2 .* only; this run asks for FSDP version 1"):
        _engine_check({**args, "fsdp_config": {"version": 1}}, via_trainer=True)
    with pytest.raises(ValueError, match="lwf_state_device='cpu'` is not supported under FSDP"):
        _engine_check(args, via_trainer=True, lwf_state_device="cpu")


def test_max_steps_below_the_interval_warns_at_construction(tokenizer, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _trainer(tokenizer, lwf_args(tmp_path, max_steps=3, lwf_unlearn_every=5))
    assert "3 optimizer steps < lwf_unlearn_every=5" in caplog.text


def test_memory_options_store_f_in_bf16_and_the_state_on_the_cpu_with_close_scores(tokenizer, tmp_path, monkeypatch):
    import hf_lwf.method.confidence as confidence_module

    chunks = []
    real = confidence_module.per_sample_pass
    monkeypatch.setattr(confidence_module, "per_sample_pass",
                        lambda *a, **k: chunks.append(a[5]) or real(*a, **k))
    reference = _trainer(tokenizer, lwf_args(tmp_path / "fp32", max_steps=2))
    reference.train()
    assert set(chunks) == {1 << 25}
    chunks.clear()
    small = _trainer(tokenizer, lwf_args(tmp_path / "small", max_steps=2, lwf_fisher_dtype="bfloat16",
                                         lwf_state_device="cpu", lwf_score_chunk_size=64))
    small.train()
    assert set(chunks) == {64}
    state = small.lwf_callback.lwf_state
    assert {t.dtype for t in state.fisher.values()} == {torch.bfloat16}
    assert {t.dtype for t in state.reference.values()} == {torch.float32}
    assert {t.device.type for t in [*state.fisher.values(), *state.reference.values()]} == {"cpu"}
    expected = torch.tensor(reference.lwf_callback.lwf_state.scores)
    torch.testing.assert_close(torch.tensor(state.scores), expected, rtol=2e-2, atol=1e-3 * float(expected.abs().max()))
    assert state.forget_indices == reference.lwf_callback.lwf_state.forget_indices


@pytest.mark.parametrize("optimizer", ["preconditioned", "shared", "sgd"])
@pytest.mark.parametrize("schedule", ["periodic", "early"])
def test_every_counted_ascent_step_moves_the_weights(tokenizer, tmp_path, monkeypatch, optimizer, schedule):
    """Watch the trainable weights around every ascent step, including the last step of a linear schedule (whose
    next rate is 0) and, for the early schedule, before a warm-up from 0: each counted step moved them, at eta of the
    step just taken (the peak rate before any step), and the log, lwf_config.json and the card count exactly those."""
    import hf_lwf.backends.base as callback_module
    from hf_lwf.method.unlearn import PreconditionedAscent

    watched, trainer = [], None
    original = callback_module.ascent_step

    def watch(model, batch, step_optimizer, **kwargs):
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        if isinstance(step_optimizer, PreconditionedAscent):
            rate = step_optimizer.groups[0][1]
        else:
            rate = step_optimizer.param_groups[0]["lr"]
        result = original(model, batch, step_optimizer, **kwargs)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        moved = max(float((a - b).abs().max()) for a, b in zip(after, before))
        watched.append({"step": trainer.state.global_step, "applied": result["applied"], "moved": moved,
                        "rate": rate})
        return result

    monkeypatch.setattr(callback_module, "ascent_step", watch)
    extra = {"lwf_unlearn_lr": 0.05} if optimizer == "sgd" else {}
    if schedule == "early":
        extra.update(lwf_schedule="early", lwf_fisher_samples=4, warmup_steps=3)
    args = lwf_args(tmp_path, max_steps=6, lwf_unlearn_every=2, lwf_unlearn_steps=2, lr_scheduler_type="linear",
                    lwf_unlearn_optimizer=optimizer, **extra)
    trainer = _trainer(tokenizer, args)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()

    lwf = trainer.lwf_callback.lwf_state
    assert len(watched) == 6  # 3 points x 2 steps, or all 6 before training
    assert all(w["moved"] > 0 for w in watched if w["applied"]), watched
    assert all(w["moved"] == 0 for w in watched if not w["applied"]), watched
    moved = sum(w["applied"] for w in watched)
    assert moved == 6  # every step applied here (cap 50, finite), including the last point's and the warm-up's
    if schedule == "periodic":
        assert [w["step"] for w in watched] == [2, 2, 4, 4, 6, 6]
        step_rates = {2: 1e-3 * 5 / 6, 4: 1e-3 * 3 / 6, 6: 1e-3 * 1 / 6}  # linear decay: the rate of step k
        expected = [step_rates[w["step"]] for w in watched]
    else:
        assert {w["step"] for w in watched} == {0}
        expected = [1e-3] * 6  # the configured peak rate, not the warm-up's 0
    if optimizer != "sgd":
        assert [w["rate"] for w in watched] == pytest.approx(expected, rel=1e-6)
    logged = sum(h["lwf/ascent_steps"] for h in trainer.state.log_history if "lwf/ascent_steps" in h)
    written = json.loads((tmp_path / "lwf_config.json").read_text())["lwf_run"]
    card = (tmp_path / "README.md").read_text()
    assert lwf.unlearn_steps == written["unlearn_steps"] == logged == moved
    assert f"{moved} ascent step(s) applied" in card
    if optimizer == "shared":  # its rate was set only for the ascent: the scheduler's values are back afterwards
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])


def test_preconditioned_ascent_leaves_the_learning_optimizer_state_untouched(tokenizer, tmp_path, monkeypatch):
    """Around each unlearning point AdamW's moments and step counts are bitwise unchanged (the shared option's are
    not: it writes them, as documented)."""
    changed = {}
    original = LWFRun.unlearn

    def spy(self, model, optimizer, steps, max_grad_norm):
        raw = getattr(optimizer, "optimizer", optimizer)
        before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in raw.state.items()}
        original(self, model, optimizer, steps, max_grad_norm)
        changed[self.config.lwf_unlearn_optimizer] = any(
            not torch.equal(v, before[id(p)][k]) for p, s in raw.state.items() for k, v in s.items())

    monkeypatch.setattr(LWFRun, "unlearn", spy)
    for optimizer in ("preconditioned", "shared"):
        _trainer(tokenizer, lwf_args(tmp_path / optimizer, max_steps=4, lwf_unlearn_optimizer=optimizer)).train()
    assert changed == {"preconditioned": False, "shared": True}


def test_preconditioned_ascent_refuses_an_optimizer_it_cannot_read(tokenizer, tmp_path):
    args = lwf_args(tmp_path, max_steps=4, optim="adafactor")
    with pytest.raises(ValueError, match="lwf_unlearn_optimizer='sgd'"):
        _trainer(tokenizer, args).train()


def test_ascent_rate_per_group_falls_back_to_the_group_peak_not_to_a_frozen_groups_zero(tmp_path):
    # eta of the ascent: the rate of the step just taken, per group; where that was 0 (warm-up from 0, or the early
    # schedule before any step), the group's configured peak (`initial_lr`): a group configured at 0 stays at 0.
    moving, frozen = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [moving], "lr": 3e-4}, {"params": [frozen], "lr": 0.0}])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # a warm-up from 0: both groups at rate 0 now
    run = LWFRun(config_from_args(lwf_args(tmp_path, learning_rate=1e-3)))
    assert run.ascent_rates(optimizer) == [3e-4, 0.0]  # before any step
    run.note_step_rates(optimizer)
    assert run.ascent_rates(optimizer) == [3e-4, 0.0]  # the first warm-up step
    optimizer.param_groups[0]["lr"] = 2e-4
    run.note_step_rates(optimizer)
    assert run.ascent_rates(optimizer) == [2e-4, 0.0]  # the step just taken
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=5e-4)  # no scheduler: the group's rate
    assert LWFRun(config_from_args(lwf_args(tmp_path))).ascent_rates(plain) == [5e-4]
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepspeed_zero2_online_fisher_folds_one_whole_gradient_at_a_time(dtype):
    """ZeRO-2 reads each whole gradient on demand (``fetch``): it is folded into F before the next one is fetched,
    every entry decays once per step, and F equals the all-gradients-at-once update (bf16 rounding bits too)."""
    import weakref

    model = tiny_llama(64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    steps = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(3)]
    for step in steps:  # one parameter without a gradient at every step: it decays with g = 0
        step[names[1]] = None
    config = dict(lwf_forget_prompts=FORGET_PROMPTS, lwf_fisher_dtype=dtype, lwf_fisher_decay=0.9)
    from hf_lwf.backends.zero import ZeroBackend

    at_once, streamed = LWFRun(LWFConfig(**config)), LWFRun(LWFConfig(**config))
    for run in (at_once, streamed):
        run.use_backend(ZeroBackend(2), via_trainer=True)
    for index, grads in enumerate(steps):
        at_once.update_fisher(model, index + 1, grads=grads)
        before = {n: f.clone() for n, f in streamed.state.fisher.items()}
        fetched, previous = [], []

        def fetch(name, param):
            if previous:
                assert previous[-1]() is None  # the last gradient was released before this one is fetched
            changed = [n for n in before if not torch.equal(before[n], streamed.state.fisher[n])]
            assert set(changed) <= set(fetched)  # only the parameters already fetched were updated
            fetched.append(name)
            g = grads[name]
            g = torch.zeros_like(param, dtype=torch.float32) if g is None else g.clone()
            previous.append(weakref.ref(g))
            return g

        streamed.update_fisher(model, index + 1, fetch=fetch)
        assert fetched == names  # every parameter once, in F's order
    assert at_once.state.fisher_updates == streamed.state.fisher_updates == 3
    for n in names:
        assert torch.equal(at_once.state.fisher[n], streamed.state.fisher[n]), n
    reference = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for grads in steps:  # the independent slow reference: F <- decay F + (1 - decay) g**2, g = 0 when absent
        for n in names:
            g = grads[n].double() if grads[n] is not None else torch.zeros_like(reference[n])
            reference[n] = 0.9 * reference[n] + 0.1 * g.square()
    tolerance = 1e-6 if dtype == "float32" else 2e-2
    for n in names:
        online = streamed.state.fisher[n].double() * streamed.state.fisher_factor  # fp32 F is stored as F / factor
        assert torch.allclose(online, reference[n], rtol=tolerance, atol=1e-12), n
    assert float(streamed.state.fisher[names[1]].abs().sum()) == 0.0
