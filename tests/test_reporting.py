"""``report_to="tensorboard"``: which setups deliver the ``lwf/*`` scalars to the event file, read back from disk."""

import glob

import pytest
from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama
from transformers import Trainer, TrainingArguments

from hf_lwf import LWFCallback, LWFConfig, LWFTrainer
from hf_lwf.config import config_from_args


pytest.importorskip("tensorboard")

POINT_METRICS = ("lwf/forget_loss", "lwf/capped_samples", "lwf/skipped_steps", "lwf/unlearn_seconds")
SCORING_METRICS = ("lwf/num_selected", "lwf/confidence_mean", "lwf/confidence_max", "lwf/confidence_min",
                   "lwf/score_seconds")


@pytest.fixture
def logdir(tmp_path, monkeypatch):
    path = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(path))  # transformers 5 reads the TensorBoard dir from here
    return path


def read_scalars(logdir):
    """``{tag: [(step, value), ...]}`` from the one event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = glob.glob(str(logdir / "events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(files[0], size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def log_history_values(trainer, key):
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h]


def assert_lwf_scalars_reported(trainer, logdir):
    scalars = read_scalars(logdir)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    for key in POINT_METRICS:
        logged = log_history_values(trainer, key)
        assert [step for step, _ in logged] == [2, 4, 6], key
        assert [step for step, _ in scalars[f"train/{key}"]] == [2, 4, 6], key
        for (_, reported), (_, kept) in zip(scalars[f"train/{key}"], logged):
            assert reported == pytest.approx(kept, rel=1e-6), key
    for key in SCORING_METRICS:
        assert [step for step, _ in scalars[f"train/{key}"]] == [step for step, _ in log_history_values(trainer, key)]
        assert [step for step, _ in scalars[f"train/{key}"]] == [2], key
    assert "train/lwf/generate_seconds" in scalars


def test_lwf_trainer_reports_lwf_scalars_to_tensorboard(tokenizer, tmp_path, logdir):
    trainer = LWFTrainer(model=tiny_llama(len(tokenizer)), args=lwf_args(tmp_path, report_to=["tensorboard"]),
                         train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
                         data_collator=lm_collator(tokenizer))
    trainer.train()
    assert_lwf_scalars_reported(trainer, logdir)


def test_mixin_on_sft_trainer_reports_lwf_scalars_to_tensorboard(chat_tokenizer, tmp_path, logdir):
    trl = pytest.importorskip("trl")
    from test_trl import LWF_VALUES, LWFSFTTrainer, chat_dataset

    args = trl.SFTConfig(str(tmp_path), max_steps=6, logging_steps=1, use_cpu=True, report_to=["tensorboard"],
                         disable_tqdm=True)
    trainer = LWFSFTTrainer(model=tiny_llama(len(chat_tokenizer)), args=args, train_dataset=chat_dataset(),
                            processing_class=chat_tokenizer, lwf_config=LWFConfig(**LWF_VALUES))
    trainer.train()
    assert_lwf_scalars_reported(trainer, logdir)
    assert "train/mean_token_accuracy" in read_scalars(logdir)  # TRL's own metrics still arrive


def test_callback_on_plain_trainer_keeps_lwf_metrics_in_log_history_but_not_in_tensorboard(tokenizer, tmp_path,
                                                                                             logdir):
    """The documented limitation: transformers calls the report_to integrations' ``on_log`` before user callbacks,
    so a callback's metrics reach ``log_history`` (and the console) but not TensorBoard. Use the mixin for that."""
    config = config_from_args(lwf_args(tmp_path))
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to=["tensorboard"], use_cpu=True,
                             disable_tqdm=True, seed=0, data_seed=0)
    trainer = Trainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                      processing_class=tokenizer, data_collator=lm_collator(tokenizer), callbacks=[LWFCallback(config)])
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("TensorBoardCallback") < names.index("LWFCallback")
    trainer.train()
    assert [step for step, _ in log_history_values(trainer, "lwf/forget_loss")] == [2, 4, 6]
    scalars = read_scalars(logdir)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert not [tag for tag in scalars if "lwf/" in tag]
