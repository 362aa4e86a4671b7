"""LWF state in checkpoints: exact resume, rotation, changed config, corrupted files."""

import json
import os

import pytest
import torch
from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lwf import LWFCallback, LWFTrainer
from hf_lwf.config import config_from_args
from hf_lwf.state import CONFIG_NAME, SELF_DATA_DIR, STATE_JSON, STATE_TENSORS, LWFState


class Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated crash")


def _args(path, **overrides):
    values = dict(max_steps=8, lwf_unlearn_every=3, save_strategy="steps", save_steps=4, lwf_mask_ratio=0.5,
                  lwf_unlearn_batch_size=1, lwf_unlearn_steps=3, lwf_forget_ratio=0.5,
                  lwf_unlearn_optimizer="shared", lwf_unlearn_lr=None)
    values.update(overrides)
    return lwf_args(path, **values)


def _trainer(tokenizer, args, cls=LWFTrainer, **kwargs):
    return cls(model=tiny_llama(len(tokenizer), seed=1), args=args, train_dataset=learning_dataset(tokenizer),
               processing_class=tokenizer, data_collator=lm_collator(tokenizer), **kwargs)


def _lwf_logs(trainer):
    return [{k: v for k, v in h.items() if k.startswith("lwf/") and "seconds" not in k} | {"step": h["step"]}
            for h in trainer.state.log_history if any(k.startswith("lwf/") and "seconds" not in k for k in h)]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_callback_only", [False, True])
def test_interrupted_run_resumes_exactly(tokenizer, tmp_path, use_callback_only):
    reference = _trainer(tokenizer, _args(tmp_path / "full"))
    reference.train()

    run_dir = tmp_path / "interrupted"
    if use_callback_only:
        base = _args(run_dir)
        plain = TrainingArguments(str(run_dir), **{k: getattr(base, k) for k in (
            "max_steps", "per_device_train_batch_size", "learning_rate", "logging_steps", "save_strategy",
            "save_steps", "report_to", "use_cpu", "disable_tqdm", "seed", "data_seed")})
        config = config_from_args(base)

        def make(crash=None):
            callbacks = [LWFCallback(config)] + ([crash] if crash else [])
            return _trainer(tokenizer, plain, cls=Trainer, callbacks=callbacks)
    else:
        def make(crash=None):
            return _trainer(tokenizer, _args(run_dir), callbacks=[crash] if crash else None)

    with pytest.raises(KeyboardInterrupt):
        make(Crash(at_step=5)).train()
    checkpoint = run_dir / "checkpoint-4"
    assert (checkpoint / STATE_JSON).is_file() and (checkpoint / STATE_TENSORS).is_file()

    resumed = make()
    import hf_lwf.callback as callback_module

    def no_regeneration(*args, **kwargs):
        raise AssertionError("D_self must be reused on resume, not regenerated")

    original = callback_module.generate_self_data
    callback_module.generate_self_data = no_regeneration
    try:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    finally:
        callback_module.generate_self_data = original

    expected, actual = _params(reference.model), _params(resumed.model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7)
    reference_logs = [h for h in _lwf_logs(reference) if h["step"] > 4]
    resumed_logs = [h for h in _lwf_logs(resumed) if h["step"] > 4]
    assert reference_logs and len(reference_logs) == len(resumed_logs)
    for ref, res in zip(reference_logs, resumed_logs):
        assert ref.keys() == res.keys()
        for key in ref:
            assert res[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7)


def test_checkpoint_contents_and_rotation(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, _args(tmp_path, save_steps=2, save_total_limit=1))
    trainer.train()
    checkpoints = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-8"]
    folder = tmp_path / "checkpoint-8"
    for name in (STATE_JSON, STATE_TENSORS, CONFIG_NAME, "training_args.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "training_args.bin").exists()
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temporary files left
    state = LWFState.load(str(folder))
    assert state.unlearn_points == 2 and state.fisher_updates == 8
    assert state.self_data_path == SELF_DATA_DIR and (tmp_path / SELF_DATA_DIR).is_dir()
    assert set(state.reference) == set(state.fisher) == {n for n, p in trainer.model.named_parameters()}
    assert json.loads((folder / CONFIG_NAME).read_text())["lwf_unlearn_every"] == 3


def test_resume_with_changed_config_warns_and_continues(tokenizer, tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path), callbacks=[Crash(at_step=5)]).train()
    resumed = _trainer(tokenizer, _args(tmp_path, lwf_unlearn_coef=2.0))
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "lwf_unlearn_coef" in caplog.text
    assert resumed.state.global_step == 8
    assert resumed.lwf_callback.lwf_state.config["lwf_unlearn_coef"] == 2.0


def test_resume_from_corrupted_state_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path), callbacks=[Crash(at_step=5)]).train()
    (tmp_path / "checkpoint-4" / STATE_TENSORS).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a valid hf_lwf state file"):
        _trainer(tokenizer, _args(tmp_path)).train(resume_from_checkpoint=True)


def test_resume_from_checkpoint_without_lwf_state_starts_lwf_afresh(tokenizer, tmp_path, caplog):
    plain = Trainer(model=tiny_llama(len(tokenizer)), args=TrainingArguments(
        str(tmp_path), max_steps=4, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True,
        per_device_train_batch_size=4, disable_tqdm=True), train_dataset=learning_dataset(tokenizer),
        processing_class=tokenizer, data_collator=lm_collator(tokenizer))
    plain.train()
    resumed = _trainer(tokenizer, _args(tmp_path))
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "no LWF state" in caplog.text
    assert resumed.lwf_callback.lwf_state.unlearn_points == 1  # step 6 only
