"""report.json writing and the PNG plots."""

import json
import math

import pytest
import torch

from hf_lwf.app.report import (
    CONFIDENCE_PNG,
    FORGET_LOSS_PNG,
    LEARNING_LOSS_PNG,
    final_loss,
    forget_curve,
    jsonable,
    loss_curve,
    write_plots,
    write_report,
)
from hf_lwf.state import LWFState


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

LOG_HISTORY = [
    {"loss": 2.0, "learning_rate": 1e-3, "step": 1},
    {"loss": 1.5, "step": 2, "lwf/forget_loss": 3.0},
    {"eval_loss": 1.7, "step": 2},
    {"loss": float("nan"), "step": 3},
    {"loss": 1.0, "step": 4},
    {"train_loss": 1.4, "train_runtime": 3.0, "step": 4},
]


def test_jsonable_makes_strict_json():
    value = {"a": float("nan"), "b": [float("inf"), 1.5], "t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3),
             "n": None, 1: (True, "x"), "o": object}
    data = jsonable(value)
    assert data["a"] is None and data["b"] == [None, 1.5] and data["t"] == [1.0, 2.0] and data["s"] == 3
    assert data["1"] == [True, "x"] and isinstance(data["o"], str)
    json.dumps(data, allow_nan=False)


def test_write_report_round_trips(tmp_path):
    path = write_report(str(tmp_path / "sub" / "report.json"), {"x": float("nan"), "y": [1, 2], "z": {"k": 0.5}})
    text = open(path).read()
    assert "NaN" not in text
    assert json.loads(text) == {"x": None, "y": [1, 2], "z": {"k": 0.5}}


def test_curves_from_log_history():
    assert loss_curve(LOG_HISTORY) == ([1, 2, 4], [2.0, 1.5, 1.0])
    assert final_loss(LOG_HISTORY) == 1.0
    assert final_loss([{"eval_loss": 1.0, "step": 1}]) is None
    history = [{"step": 10, "lwf/forget_loss": 2.5}, {"step": 20, "lwf/forget_loss": None}, {"step": 30, "lwf/forget_loss": 3.5}]
    assert forget_curve(history) == ([10, 30], [2.5, 3.5])


def _state(scores, selected, history):
    return LWFState(scores=scores, forget_indices=selected, history=history)


@pytest.mark.parametrize(
    "state",
    [
        _state([0.3, -0.1, 0.8, 0.05, math.nan], [2, 0], [{"step": 2, "lwf/forget_loss": 2.0}, {"step": 4, "lwf/forget_loss": 2.6}]),
        _state([1.0, 1.0], [0], []),  # one distinct score, no unlearning point logged
        _state([], [], []),  # nothing scored yet
    ],
)
def test_write_plots_writes_three_pngs(tmp_path, state):
    curves = {"fine-tuning": loss_curve(LOG_HISTORY), "LWF": ([1, 2, 3], [2.0, 1.4, 1.1]), "empty": ([], [])}
    paths = write_plots(str(tmp_path), curves, lwf_state=state, cap=5.0)
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert names == [LEARNING_LOSS_PNG, FORGET_LOSS_PNG, CONFIDENCE_PNG]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC


def test_write_plots_without_lwf_state_writes_only_the_loss(tmp_path):
    paths = write_plots(str(tmp_path), {"run": ([1, 2], [1.0, 0.5])})
    assert [p.rsplit("/", 1)[-1] for p in paths] == [LEARNING_LOSS_PNG]


def test_missing_matplotlib_skips_plots(tmp_path, monkeypatch):
    import hf_lwf.app.report as report

    def no_matplotlib():
        raise ImportError("Plots need matplotlib")

    monkeypatch.setattr(report, "_pyplot", no_matplotlib)
    assert report.write_plots(str(tmp_path), {"run": ([1], [1.0])}) == []
