from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies import check_reply, specs_of

EXPECTED = specs_of(
    ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32)), "b": Array(np.zeros(2, dtype=np.float32))})
)


def reply(arrays=None, metrics=None, drop=()):
    arrays = arrays if arrays is not None else {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}
    metrics = metrics if metrics is not None else {"num-examples": 10, "loss": 0.5}
    content = {}
    if "arrays" not in drop:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if "metrics" not in drop:
        content["metrics"] = MetricRecord(metrics)
    return RecordDict(content)


def test_good_reply_passes() -> None:
    assert check_reply(reply(), max_examples=10, expected_arrays=EXPECTED) is None
    assert check_reply(reply(drop=("arrays",)), max_examples=10) is None  # evaluation reply


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (reply(drop=("metrics",)), "no MetricRecord"),
        (reply(metrics={"loss": 0.1}), "lack 'num-examples'"),
        (reply(metrics={"num-examples": 10.0}), "must be an integer"),
        (reply(metrics={"num-examples": 0}), "must be positive"),
        (reply(metrics={"num-examples": -3}), "must be positive"),
        (reply(metrics={"num-examples": 11}), "exceeds the 10 samples"),
        (reply(metrics={"num-examples": 5, "loss": float("nan")}), "metric 'loss' is not finite"),
        (reply(drop=("arrays",)), "no ArrayRecord"),
        (reply(arrays={"w": np.ones((2, 3), np.float32)}), "missing parameter(s) ['b']"),
        (
            reply(arrays={"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32), "x": np.ones(1, np.float32)}),
            "unexpected parameter(s) ['x']",
        ),
        (reply(arrays={"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}), "has shape (3, 2)"),
        (reply(arrays={"w": np.ones((2, 3), np.float64), "b": np.ones(2, np.float32)}), "dtype float64"),
        (reply(arrays={"w": np.full((2, 3), np.nan, np.float32), "b": np.ones(2, np.float32)}), "non-finite"),
        (reply(arrays={"w": np.full((2, 3), np.inf, np.float32), "b": np.ones(2, np.float32)}), "non-finite"),
    ],
)
def test_bad_replies_are_named(content: RecordDict, needle: str) -> None:
    reason = check_reply(content, max_examples=10, expected_arrays=EXPECTED)
    assert reason is not None and needle in reason


def test_wrong_record_type_under_arrays_key() -> None:
    content = RecordDict({"arrays": ConfigRecord({"w": 1}), "metrics": MetricRecord({"num-examples": 1})})
    assert "no ArrayRecord" in (check_reply(content, max_examples=10, expected_arrays=EXPECTED) or "")
