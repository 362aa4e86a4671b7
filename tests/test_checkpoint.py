"""LWF state in checkpoints: exact resume, rotation, changed config, corrupted files."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lwf import LWFCallback, LWFRun, LWFTrainer
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
                  lwf_unlearn_batch_size=1, lwf_unlearn_steps=3, lwf_forget_ratio=0.5)
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
    import hf_lwf.run as callback_module

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
    assert "a checkpoint of a run without LWF" in caplog.text
    assert resumed.lwf_callback.lwf_state.unlearn_points == 1  # step 6 only


def _plain_run(tokenizer, run_dir, config, crash=None, resume_from=None):
    """A plain ``Trainer`` with an ``LWFCallback`` (no LWFTrainer: the callback is not told the resume path)."""
    base = _args(run_dir)
    plain = TrainingArguments(str(run_dir), **{k: getattr(base, k) for k in (
        "max_steps", "per_device_train_batch_size", "learning_rate", "logging_steps", "save_strategy",
        "save_steps", "report_to", "use_cpu", "disable_tqdm", "seed", "data_seed")})
    callbacks = [LWFCallback(config, resume_from=resume_from)] + ([crash] if crash else [])
    return _trainer(tokenizer, plain, cls=Trainer, callbacks=callbacks)


def _no_regeneration(monkeypatch):
    import hf_lwf.run as callback_module

    def fail(*args, **kwargs):
        raise AssertionError("D_self must be reused on resume, not regenerated")

    monkeypatch.setattr(callback_module, "generate_self_data", fail)


def _moved_checkpoint(tokenizer, tmp_path, config):
    """Crash a plain-callback run at step 5 and move its checkpoint-4 to a folder of another name elsewhere."""
    with pytest.raises(KeyboardInterrupt):
        _plain_run(tokenizer, tmp_path / "crashed", config, crash=Crash(at_step=5)).train()
    moved = tmp_path / "elsewhere" / "saved-at-step-4"
    shutil.copytree(tmp_path / "crashed" / "checkpoint-4", moved)
    shutil.copytree(tmp_path / "crashed" / SELF_DATA_DIR, tmp_path / "elsewhere" / SELF_DATA_DIR)
    shutil.rmtree(tmp_path / "crashed")
    return moved


def test_plain_callback_resumed_from_another_folder_continues_exactly(tokenizer, tmp_path, monkeypatch):
    """The Trainer resumes from a folder that is not output_dir/checkpoint-N: LWF continues from that folder."""
    config = config_from_args(_args(tmp_path))
    reference = _plain_run(tokenizer, tmp_path / "full", config)
    reference.train()
    moved = _moved_checkpoint(tokenizer, tmp_path, config)
    resumed = _plain_run(tokenizer, tmp_path / "new_output", config)
    _no_regeneration(monkeypatch)
    resumed.train(resume_from_checkpoint=str(moved))
    expected, actual = _params(reference.model), _params(resumed.model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7)
    full, cont = reference.callback_handler.callbacks, resumed.callback_handler.callbacks
    full_state = next(c for c in full if isinstance(c, LWFCallback)).lwf_state
    cont_state = next(c for c in cont if isinstance(c, LWFCallback)).lwf_state
    assert cont_state.run_summary() == full_state.run_summary() and cont_state.unlearn_points == 2
    assert cont_state.forget_indices == full_state.forget_indices


def test_resume_path_unknown_is_refused_or_taken_from_resume_from(tokenizer, tmp_path, monkeypatch):
    """When the callback cannot see where the Trainer resumed, it refuses; ``resume_from=`` continues exactly."""
    import hf_lwf.resume as resume_module

    config = config_from_args(_args(tmp_path))
    reference = _plain_run(tokenizer, tmp_path / "full", config)
    reference.train()
    moved = _moved_checkpoint(tokenizer, tmp_path, config)
    monkeypatch.setattr(resume_module, "trainer_resume_path", lambda: None)
    with pytest.raises(ValueError, match="resume_from="):
        _plain_run(tokenizer, tmp_path / "new_output", config).train(resume_from_checkpoint=str(moved))
    resumed = _plain_run(tokenizer, tmp_path / "explicit", config, resume_from=str(moved))
    _no_regeneration(monkeypatch)
    resumed.train(resume_from_checkpoint=str(moved))
    expected, actual = _params(reference.model), _params(resumed.model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7)


def _stored_scores(checkpoint):
    scores = torch.tensor(LWFState.load(str(checkpoint)).scores, dtype=torch.float64)
    scores[scores <= -1e29] = float("nan")
    return scores


@pytest.mark.parametrize("change", [
    {"lwf_forget_ratio": 1.0},
    {"lwf_forget_ratio": None, "lwf_forget_top_k": 1},
    {"lwf_confidence_threshold": "second highest"},
    {"lwf_selection": "bottom"},
    {"lwf_selection": "random"},
    {"lwf_per_task_selection": True, "lwf_forget_prompts": "two tasks"},
])
def test_changed_selection_on_resume_reselects_d_u_from_the_stored_scores(tokenizer, tmp_path, change, monkeypatch):
    """The new selection is applied to the stored scores at once (D_U is what a fresh selection would give)."""
    from conftest import FORGET_PROMPTS

    from hf_lwf.method.unlearn import select_forget_set

    base = {"lwf_forget_ratio": 0.25}
    if "lwf_forget_prompts" in change:
        base["lwf_forget_prompts"] = {"a": FORGET_PROMPTS[:2], "b": FORGET_PROMPTS[2:]}
    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path, **base), callbacks=[Crash(at_step=5)]).train()
    checkpoint = tmp_path / "checkpoint-4"
    saved = LWFState.load(str(checkpoint))
    scores = _stored_scores(checkpoint)
    change = {k: v for k, v in change.items() if k != "lwf_forget_prompts"}
    if change.get("lwf_confidence_threshold") == "second highest":
        change["lwf_confidence_threshold"] = float(scores.nan_to_num(-1e30).sort(descending=True).values[1])
    resumed = _trainer(tokenizer, _args(tmp_path, **{**base, **change}))
    selected = {}
    original = LWFRun.start

    def spy(self, **kwargs):
        out = original(self, **kwargs)
        selected["indices"] = list(self.state.forget_indices)
        selected["sampler"] = dict(self.state.sampler)
        return out

    monkeypatch.setattr(LWFRun, "start", spy)
    resumed.train(resume_from_checkpoint=True)
    config = resumed.lwf_callback.config
    expected = select_forget_set(scores, resumed.lwf_callback.self_data["task"], config.forget_amount,
                                 threshold=config.lwf_confidence_threshold, selection=config.lwf_selection,
                                 per_task=config.lwf_per_task_selection, seed=saved.selection_seed)
    assert saved.selection_seed == config.lwf_seed + 1  # the first unlearning point selected D_U
    assert selected["indices"] == expected
    assert selected["sampler"]["size"] == len(expected)
    if change != {"lwf_per_task_selection": True}:
        assert expected != saved.forget_indices  # the change matters here, so keeping the old D_U would fail
    assert resumed.lwf_callback.lwf_state.forget_indices == expected  # no rescoring at step 6 (rescore_every=0)
    written = json.loads((tmp_path / "checkpoint-8" / CONFIG_NAME).read_text())
    for key, value in change.items():
        assert written[key] == value


@pytest.mark.parametrize("change", [{"lwf_confidence": "alignment"}, {"lwf_mask_ratio": 1.0}])
def test_changed_scoring_on_resume_scores_again_at_the_next_point(tokenizer, tmp_path, change, monkeypatch, caplog):
    import hf_lwf.run as callback_module

    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path), callbacks=[Crash(at_step=5)]).train()
    calls = []
    original = callback_module.score_self_data

    def spy(*args, **kwargs):
        calls.append(kwargs["mode"])
        return original(*args, **kwargs)

    monkeypatch.setattr(callback_module, "score_self_data", spy)
    resumed = _trainer(tokenizer, _args(tmp_path, **change))
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert calls == [resumed.lwf_callback.config.lwf_confidence]  # step 6 scored again, with the new mode
    assert "scored and D_U selected again at the next unlearning point" in caplog.text
    assert resumed.lwf_callback.lwf_state.history[-1]["lwf/num_selected"] == len(
        resumed.lwf_callback.lwf_state.forget_indices)


@pytest.mark.parametrize("change", [{"lwf_fisher_decay": 0.9}, {"lwf_fisher": "empirical"},
                                    {"lwf_fisher_dtype": "bfloat16"}])
def test_changed_fisher_setting_on_resume_is_refused(tokenizer, tmp_path, change):
    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path), callbacks=[Crash(at_step=5)]).train()
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"changed LWF settings that cannot apply.*{name}"):
        _trainer(tokenizer, _args(tmp_path, **change)).train(resume_from_checkpoint=True)


def test_lwf_checkpoint_without_its_state_file_is_refused(tokenizer, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path), callbacks=[Crash(at_step=5)]).train()
    os.remove(tmp_path / "checkpoint-4" / STATE_JSON)
    with pytest.raises(FileNotFoundError, match="saved by an LWF run but has no lwf_state.json"):
        _trainer(tokenizer, _args(tmp_path)).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("cls", [Trainer, LWFTrainer])
def test_resume_true_without_a_checkpoint_is_an_error_as_in_the_trainer(tokenizer, tmp_path, cls):
    # `True` with nothing to resume must not quietly train from scratch (the plain Trainer raises; so must LWF).
    args = _args(tmp_path / "out")
    os.makedirs(args.output_dir)
    callbacks = [LWFCallback()] if cls is Trainer else None
    trainer = _trainer(tokenizer, args, cls=cls, callbacks=callbacks)
    with pytest.raises(ValueError, match="No valid checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_a_checkpoint_of_hf_lwf_0_1_0_resumes_exactly(tokenizer, tmp_path):
    """tests/fixtures/legacy_checkpoint holds checkpoint-4 of a 6-step run written by hf_lwf 0.1.0 and that run's
    final weights (tests/fixtures/make_legacy_checkpoint.py): today's code resumes it to the same weights."""

    from safetensors.torch import load_file

    fixture = Path(__file__).parent / "fixtures" / "legacy_checkpoint"
    sys.path.insert(0, str(fixture.parent))
    try:
        from make_legacy_checkpoint import LEGACY_ARGS
    finally:
        sys.path.remove(str(fixture.parent))
    out = tmp_path / "run"
    shutil.copytree(fixture / "checkpoint-4", out / "checkpoint-4")
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=lwf_args(out, **LEGACY_ARGS),
                         train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
                         data_collator=lm_collator(tokenizer))
    trainer.train(resume_from_checkpoint=True)
    expected = load_file(fixture / "final_weights.safetensors")
    assert trainer.lwf_callback.lwf_state.unlearn_points == 3
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name
