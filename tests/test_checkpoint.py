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
from hf_lwf.checkpoint import (
    MARKER_NAME,
    SET_ASIDE_DIR,
    SET_ASIDE_NOTE,
    IncompleteCheckpointError,
    incomplete_reason,
    last_complete_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    weights_sha256,
    write_marker,
)
from hf_lwf.backends import LocalBackend
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
    trainer = _trainer(tokenizer, _args(tmp_path))
    with pytest.raises(ValueError, match="checkpoint-4: lwf_state.safetensors has 8 bytes where"):
        trainer.train(resume_from_checkpoint=True)  # the completion marker's sizes and checksums
    assert trainer.state.global_step == 0
    aside = tmp_path / SET_ASIDE_DIR / "checkpoint-4"
    assert (aside / STATE_TENSORS).read_bytes() == b"\x00garbage"  # moved aside, not deleted
    # without the marker (as an hf_lwf that wrote none left it) the LWF state's own checksum refuses the file
    shutil.move(aside, tmp_path / "checkpoint-4")
    os.remove(tmp_path / "checkpoint-4" / MARKER_NAME)
    with pytest.raises(ValueError, match="lwf_state.safetensors is not the tensor file .*lwf_state.json was saved"):
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
    folder = tmp_path / "checkpoint-4"
    os.remove(folder / STATE_JSON)
    with pytest.raises(IncompleteCheckpointError, match="lwf_state.json is missing"):
        _trainer(tokenizer, _args(tmp_path)).train(resume_from_checkpoint=str(folder))
    os.remove(folder / MARKER_NAME)  # a checkpoint without a marker is checked for the LWF state files too
    with pytest.raises(IncompleteCheckpointError, match="an LWF checkpoint without lwf_state.json"):
        _trainer(tokenizer, _args(tmp_path)).train(resume_from_checkpoint=str(folder))
    assert folder.is_dir()  # a folder named explicitly is refused, not moved


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
    restored = {}
    original = LWFRun.start

    def spy(self, **kwargs):  # the state as restored, before any further step
        original(self, **kwargs)
        restored.update(fisher={n: t.clone() for n, t in self.state.fisher.items()}, d_u=list(self.state.forget_indices),
                        sampler=dict(self.state.sampler), points=self.state.unlearn_points)

    LWFRun.start = spy
    try:
        trainer.train(resume_from_checkpoint=True)
    finally:
        LWFRun.start = original
    saved = LWFState.load(str(fixture / "checkpoint-4"))
    assert restored["points"] == saved.unlearn_points == 2 and restored["d_u"] == saved.forget_indices
    assert restored["sampler"] == saved.sampler
    assert all(torch.equal(restored["fisher"][n], saved.fisher[n]) for n in saved.fisher)
    assert trainer.lwf_callback.lwf_state.unlearn_points == 3
    # The rest of the run is recomputed by today's code, whose loss over the response tokens is computed in vocabulary
    # chunks: the same numbers up to float rounding.
    expected = load_file(fixture / "final_weights.safetensors")
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------ hf_lwf.checkpoint, unit by unit
def _fake_checkpoint(root, step, marked=True, **files):
    """A checkpoint folder with a trainer state of ``step``, a model file and ``files``; marked complete."""
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "sub" / ".metadata").write_bytes(b"hidden files count too")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if marked:
        write_marker(str(folder), step)
    return folder


def test_marker_lists_every_file_with_its_size_and_sha256(tmp_path):
    import hashlib

    folder = _fake_checkpoint(tmp_path, 4)
    data = json.loads((folder / MARKER_NAME).read_text())
    assert data["step"] == 4 and set(data["files"]) == {"trainer_state.json", "model.safetensors", "sub/.metadata"}
    for rel, entry in data["files"].items():
        raw = (folder / rel).read_bytes()
        assert entry == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert incomplete_reason(str(folder)) is None
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("damage,reason", [
    (lambda f: (f / "model.safetensors").write_bytes(b"\x01" + (f / "model.safetensors").read_bytes()[1:]),
     "model.safetensors differs from the file that was written"),  # same size, one byte changed
    (lambda f: (f / "model.safetensors").write_bytes(b"short"), "model.safetensors has 5 bytes where 1024"),
    (lambda f: os.remove(f / "sub" / ".metadata"), "sub/.metadata is missing"),
    (lambda f: (f / MARKER_NAME).write_text("{"), "cannot be read"),
    (lambda f: os.remove(f / MARKER_NAME), "no checkpoint_complete.json: its save was interrupted"),
    (lambda f: os.rename(f, f.parent / "checkpoint-8"), "was written for step 4"),
])
def test_incomplete_reason_names_what_is_wrong(tmp_path, damage, reason):
    folder = _fake_checkpoint(tmp_path, 4)
    damage(folder)
    folder = folder if folder.exists() else tmp_path / "checkpoint-8"
    assert reason in incomplete_reason(str(folder))


def test_size_only_check_skips_the_checksums(tmp_path):
    folder = _fake_checkpoint(tmp_path, 4)
    (folder / "model.safetensors").write_bytes(b"\x01" + (folder / "model.safetensors").read_bytes()[1:])
    assert incomplete_reason(str(folder), verify=False) is None
    assert "sha256" in incomplete_reason(str(folder))


def test_last_complete_checkpoint_sets_aside_newer_incomplete_folders_and_keeps_older_ones(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2, marked=False)  # older and unmarked: never examined, never moved
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, marked=False)
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / SET_ASIDE_DIR / "checkpoint-8").mkdir(parents=True)  # an earlier one of the same name
    assert last_complete_checkpoint(tmp_path, set_aside=False) == str(tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-6").is_dir()  # only reported
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert sorted(os.listdir(tmp_path / SET_ASIDE_DIR)) == ["checkpoint-6", "checkpoint-8", "checkpoint-8.1"]
    assert (tmp_path / SET_ASIDE_DIR / "checkpoint-6" / "model.safetensors").is_file()  # moved whole
    assert "interrupted" in (tmp_path / SET_ASIDE_DIR / "checkpoint-6" / SET_ASIDE_NOTE).read_text()
    assert f"{tmp_path / 'checkpoint-6'} is not a complete checkpoint" in caplog.text and "Nothing was deleted" in caplog.text
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]


def test_without_any_marker_folders_are_checked_as_plain_trainer_checkpoints(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2, marked=False)
    _fake_checkpoint(tmp_path, 4, marked=False, **{CONFIG_NAME: b"{}"})  # an LWF checkpoint without its state
    no_state = _fake_checkpoint(tmp_path, 6, marked=False)
    os.remove(no_state / "trainer_state.json")
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "has no checkpoint_complete.json (written by a plain Trainer or an older hf_lwf)" in caplog.text
    reasons = {n: (tmp_path / SET_ASIDE_DIR / n / SET_ASIDE_NOTE).read_text() for n in ("checkpoint-4", "checkpoint-6")}
    assert "an LWF checkpoint without lwf_state.json" in reasons["checkpoint-4"]
    assert "no trainer_state.json" in reasons["checkpoint-6"]
    torn = _fake_checkpoint(tmp_path, 8, marked=False)
    (torn / "trainer_state.json").write_text('{"global_st')
    assert "cannot be read" in incomplete_reason(str(torn), legacy=True)
    os.remove(torn / "model.safetensors")
    (torn / "trainer_state.json").write_text('{"global_step": 8}')
    assert incomplete_reason(str(torn), legacy=True) == "it holds no model weights"


def test_rotation_deletes_the_oldest_complete_checkpoints_only(tmp_path):
    import time

    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
        time.sleep(0.01)  # marker times order them
    _fake_checkpoint(tmp_path, 8, marked=False)  # incomplete: never deleted by rotation, never counted
    (tmp_path / "_rotated-checkpoint-1").mkdir()  # a deletion a kill interrupted: finished now
    deleted = rotate_checkpoints(str(tmp_path), 1, best=str(tmp_path / "checkpoint-2"), keep=str(tmp_path / "checkpoint-6"))
    assert deleted == [str(tmp_path / "checkpoint-4")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert rotate_checkpoints(str(tmp_path), None) == [] and rotate_checkpoints(str(tmp_path), 5) == []


def test_resolve_resume_true(tmp_path, caplog):
    args = TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
        resolve_resume(args, True)  # nothing there: the Trainer's own error
    out = tmp_path / "out"
    out.mkdir()
    _fake_checkpoint(out, 2, marked=False)
    _fake_checkpoint(out, 4)
    assert resolve_resume(args, True) == str(out / "checkpoint-4")
    assert resolve_resume(args, None) is None and resolve_resume(args, False) is None
    damaged = _fake_checkpoint(out, 6)  # complete once, changed since: passed over for the complete checkpoint-4
    (damaged / "model.safetensors").write_bytes(b"\x01" + (damaged / "model.safetensors").read_bytes()[1:])
    assert resolve_resume(args, True) == str(out / "checkpoint-4") and (out / SET_ASIDE_DIR / "checkpoint-6").is_dir()
    only = tmp_path / "only-damaged"  # nothing complete left, and not an interrupted run: an error, no fresh start
    shutil.move(out / SET_ASIDE_DIR / "checkpoint-6", only / "checkpoint-6")
    with pytest.raises(ValueError, match="checkpoint-6: model.safetensors differs"):
        resolve_resume(TrainingArguments(str(only), use_cpu=True, report_to=[]), True)
    first = tmp_path / "first"  # the first save of a run was killed: nothing complete, every folder interrupted
    os.remove(_fake_checkpoint(first, 2, marked=False) / "trainer_state.json")
    with caplog.at_level("WARNING"):
        assert resolve_resume(TrainingArguments(str(first), use_cpu=True, report_to=[]), True) is None
    assert "training starts from step 0" in caplog.text and (first / SET_ASIDE_DIR / "checkpoint-2").is_dir()


def test_resolve_resume_path_refuses_an_incomplete_folder(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, marked=False)
    assert resolve_resume(args, str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    with pytest.raises(IncompleteCheckpointError, match="checkpoint-4: it is not a complete checkpoint .*The last "
                                                        "complete checkpoint next to it is .*checkpoint-2"):
        resolve_resume(args, str(tmp_path / "checkpoint-4"))
    assert (tmp_path / "checkpoint-4").is_dir()  # refused, not moved


def test_weights_sha256_is_the_sha256_of_the_trainable_tensors_in_name_order():
    import hashlib

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    expected = hashlib.sha256()
    for name in ("0.bias", "0.weight", "1.weight"):
        tensor = dict(model.named_parameters())[name].detach()
        expected.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        expected.update(tensor.numpy().tobytes())
    assert weights_sha256(LocalBackend().whole_weights(model)) == expected.hexdigest()
    with torch.no_grad():
        model[0].weight[0, 0] = torch.nextafter(model[0].weight[0, 0], torch.tensor(1.0))  # one ulp
    assert weights_sha256(LocalBackend().whole_weights(model)) != expected.hexdigest()
    assert weights_sha256(LocalBackend().whole_weights(model), keep=False) is None


def test_lwf_state_of_another_step_is_refused_naming_its_file(tokenizer, tmp_path):
    """Both LWF files of checkpoint-2 copied into checkpoint-4 (a consistent pair, from other weights), markers gone
    (as an hf_lwf without markers left them): the weights checksum in lwf_state.json refuses the mix."""
    with pytest.raises(KeyboardInterrupt):
        _trainer(tokenizer, _args(tmp_path, save_steps=2), callbacks=[Crash(at_step=5)]).train()
    for name in (STATE_JSON, STATE_TENSORS):
        shutil.copy(tmp_path / "checkpoint-2" / name, tmp_path / "checkpoint-4" / name)
    for step in (2, 4):
        os.remove(tmp_path / f"checkpoint-{step}" / MARKER_NAME)
    with pytest.raises(IncompleteCheckpointError, match=f"{tmp_path / 'checkpoint-4' / STATE_JSON} was saved with "
                                                        "other model weights"):
        _trainer(tokenizer, _args(tmp_path, save_steps=2)).train(resume_from_checkpoint=True)


def test_lwf_trainer_marks_each_checkpoint_after_its_last_file(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, _args(tmp_path, save_steps=4))
    trainer.train()
    for step in (4, 8):
        folder = tmp_path / f"checkpoint-{step}"
        listed = set(json.loads((folder / MARKER_NAME).read_text())["files"])
        on_disk = {os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs}
        assert listed == on_disk - {MARKER_NAME}
        assert {STATE_JSON, STATE_TENSORS, "trainer_state.json", "optimizer.pt", "model.safetensors"} <= listed
        saved = LWFState.load(str(folder))
        assert len(saved.checksums["model_weights"]) == 64
    # the final weights: checkpoint-8's
    assert saved.checksums["model_weights"] == weights_sha256(LocalBackend().whole_weights(trainer.model))
