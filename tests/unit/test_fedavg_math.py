from __future__ import annotations

import numpy as np
import pytest

from strategies import weighted_average, weighted_metrics


def test_weighted_average_hand_computed() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    out = weighted_average([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5.0, (0 + 12)/4 = 3.0
    assert out["w"].tolist() == [2.5, 5.0]
    assert out["b"].tolist() == [3.0]
    assert out["w"].dtype == np.float32


def test_single_update_is_returned_unchanged() -> None:
    u = {"w": np.array([[1.5, -2.0]], dtype=np.float32)}
    assert weighted_average([u], [7])["w"].tolist() == [[1.5, -2.0]]


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        ([], [], "at least one"),
        ([{"w": np.zeros(1)}], [1, 2], "1 updates but 2 weights"),
        ([{"w": np.zeros(1)}], [-1], "non-negative"),
        ([{"w": np.zeros(1)}], [0], "sum to zero"),
        ([{"w": np.zeros(1)}], [float("nan")], "finite"),
    ],
)
def test_weighted_average_rejects_bad_input(updates, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(updates, weights)


def test_weighted_metrics_sums_counts_and_averages_the_rest() -> None:
    m = weighted_metrics(
        [{"num-examples": 10, "accuracy": 0.5, "loss": 1.0}, {"num-examples": 30, "accuracy": 0.9, "extra": 1.0}],
        [10, 30],
    )
    assert m == {"num-examples": 40.0, "accuracy": pytest.approx((5 + 27) / 40)}


def test_weighted_means_of_huge_metrics_stay_finite() -> None:
    m = weighted_metrics(
        [{"num-examples": 500, "loss": 1e306, "acc": 0.5}, {"num-examples": 500, "loss": 1e306, "acc": 1.0}], [500, 500]
    )
    assert m == {"num-examples": 1000.0, "loss": pytest.approx(1e306), "acc": 0.75}
    huge = weighted_metrics([{"num-examples": 1, "x": 1.7e308}, {"num-examples": 1, "x": 1.7e308}], [1e308, 1e308])
    assert "x" in huge and np.isfinite(huge["x"])  # scaling each weight first keeps it finite
