"""The local numeric exact-match metric, loaded through `evaluate.load` with the network cut off."""

import socket

import pytest

from hf_lwf.app.metrics import NUMERIC_EXACT_MATCH_PATH, load_numeric_exact_match


@pytest.fixture
def metric(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the metric tried to use the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return load_numeric_exact_match(keep_in_memory=True)


def test_loads_from_the_local_script(metric):
    import evaluate

    assert isinstance(metric, evaluate.Metric)
    assert metric.name == "numeric_exact_match"
    assert NUMERIC_EXACT_MATCH_PATH.endswith("numeric_exact_match.py")


@pytest.mark.parametrize(
    "predictions, references, expected",
    [
        (["The answer is 12."], ["12"], {"exact_match": 1.0, "parsed": 1.0}),
        (["The answer is 12.", "I think 7", "no idea"], ["12", "8", "3"], {"exact_match": 1 / 3, "parsed": 2 / 3}),
        (["12 apples, so the answer is 13."], ["The answer is 13."], {"exact_match": 1.0, "parsed": 1.0}),
        (["1,000", "12.0", "-5"], ["1000", "12", "5"], {"exact_match": 2 / 3, "parsed": 1.0}),
        (["", "none"], ["1", "2"], {"exact_match": 0.0, "parsed": 0.0}),
    ],
)
def test_exact_match_values(metric, predictions, references, expected):
    result = metric.compute(predictions=predictions, references=references)
    assert result == pytest.approx(expected)


def test_batches_accumulate(metric):
    metric.add_batch(predictions=["The answer is 4.", "5"], references=["4", "6"])
    metric.add(prediction="The answer is 9.", reference="9")
    assert metric.compute() == pytest.approx({"exact_match": 2 / 3, "parsed": 1.0})
