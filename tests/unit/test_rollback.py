"""When a round is rolled back and which sites are suspected (server.rollback), on hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from server.rollback import SUSPECT_FACTOR, rollback_reason, suspects


def _reason(**overrides: object) -> str | None:
    kwargs: dict[str, object] = {"finite": True, "loss": 0.6, "stable_loss": 0.5, "factor": 2.0}
    kwargs.update(overrides)
    return rollback_reason(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------ rollback_reason
def test_a_finite_model_whose_loss_stays_within_the_factor_is_kept() -> None:
    assert _reason() is None  # 0.6 <= 2 * 0.5
    assert _reason(loss=0.1) is None  # improving


def test_a_non_finite_model_is_rolled_back() -> None:
    reason = _reason(finite=False)
    assert reason is not None and "non-finite" in reason
    # Even when the loss looks perfect: the model check comes first.
    assert _reason(finite=False, loss=0.1) is not None


def test_every_evaluation_failing_rolls_back() -> None:
    reason = _reason(eval_failed=True, loss=None)
    assert reason is not None and "evaluation" in reason and "not finite" in reason


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_rolls_back(loss: float) -> None:
    reason = _reason(loss=loss)
    assert reason is not None and "loss is not finite" in reason and str(loss) in reason


def test_a_non_finite_loss_rolls_back_even_with_the_factor_check_off_and_no_stable_round() -> None:
    assert _reason(loss=math.nan, factor=None, stable_loss=None) is not None


def test_a_loss_above_factor_times_the_stable_loss_rolls_back_and_says_by_how_much() -> None:
    reason = _reason(loss=1.25, stable_loss=0.5, factor=2.0)  # 1.25 > 2 * 0.5 = 1.0
    assert reason is not None
    assert "0.5" in reason and "1.25" in reason and "2 times" in reason


def test_a_loss_of_exactly_factor_times_the_stable_loss_is_kept() -> None:
    assert _reason(loss=1.0, stable_loss=0.25, factor=4.0) is None  # 1.0 == 4 * 0.25 exactly
    assert _reason(loss=1.0 + 1e-9, stable_loss=0.25, factor=4.0) is not None


def test_no_factor_turns_the_loss_check_off() -> None:
    assert _reason(loss=100.0, stable_loss=0.5, factor=None) is None
    # ... but not the finiteness checks.
    assert _reason(loss=100.0, factor=None, finite=False) is not None


def test_the_first_round_has_no_stable_loss_to_compare_with() -> None:
    assert _reason(loss=100.0, stable_loss=None) is None
    assert _reason(loss=None, stable_loss=0.5) is None  # no site evaluated


def test_a_stable_loss_of_zero_does_not_divide_or_roll_back_every_round() -> None:
    assert _reason(loss=0.3, stable_loss=0.0, factor=2.0) is None
    assert _reason(loss=0.0, stable_loss=0.0, factor=2.0) is None


# ------------------------------------------------------------------- suspects
def test_the_site_far_from_the_others_is_suspected() -> None:
    # c: 10 > 3 * median(1, 1.2) = 3.3; a: 1 < 3 * median(1.2, 10) = 16.8; b: 1.2 < 3 * 5.5.
    assert suspects({"a": 1.0, "b": 1.2, "c": 10.0}) == ["c"]


def test_two_sites_are_too_few_to_tell_which_is_wrong() -> None:
    assert suspects({"a": 1.0, "b": 100.0}) == []
    assert suspects({"a": 1.0}) == []
    assert suspects({}) == []


def test_a_non_finite_distance_is_always_suspect() -> None:
    assert suspects({"a": 1.0, "b": 1.0, "c": math.inf}) == ["c"]
    assert suspects({"a": 1.0, "b": 1.0, "c": math.nan}) == ["c"]
    assert suspects({"a": 1.0, "b": math.inf}) == ["b"]  # even with only two sites
    # The non-finite site is not part of the others' median: a and b stay unsuspected.
    assert suspects({"a": 1.0, "b": 1.1, "c": math.inf, "d": 1.2}) == ["c"]


def test_equal_distances_suspect_nobody() -> None:
    assert suspects({"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0}) == []
    assert suspects({"a": 0.0, "b": 0.0, "c": 0.0}) == []  # a zero median does not make 0 > 0


def test_the_factor_boundary() -> None:
    assert SUSPECT_FACTOR == 3.0
    assert suspects({"a": 1.0, "b": 1.0, "c": 3.0}) == []  # exactly 3 * median: not more than
    assert suspects({"a": 1.0, "b": 1.0, "c": 3.01}) == ["c"]
    assert suspects({"a": 1.0, "b": 1.0, "c": 3.0}, factor=2.0) == ["c"]
    assert suspects({"a": 1.0, "b": 1.0, "c": 3.01}, factor=4.0) == []


def test_suspects_come_back_sorted() -> None:
    assert suspects({"z": 50.0, "a": 1.0, "b": 1.0, "c": 1.0, "m": 40.0}) == ["m", "z"]
