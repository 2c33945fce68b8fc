"""Pure functions of the control plane, on tiny inputs with hand-computed results."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pytest

from dmsc_fed.control import backoff_s, content_hash, health, is_ready, mask_url, pick_next
from dmsc_fed.control.db import as_utc

from .conftest import T0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --------------------------------------------------------------------------- health


@pytest.mark.parametrize(
    ("silence", "missed", "expected"),
    [
        (0, 0, "online"),
        (29.999, 0, "online"),
        (30, 0, "suspect"),  # the boundary belongs to the worse state
        (89.9, 0, "suspect"),
        (90, 0, "offline"),
        (1000, 0, "offline"),
        (-5, 0, "online"),  # last_seen in the future (clock skew): just seen
        (0, 1, "suspect"),
        (0, 2, "suspect"),
        (0, 3, "offline"),
        (45, 1, "suspect"),
        (95, 1, "offline"),  # the worse verdict wins
        (10, 4, "offline"),
    ],
)
def test_health_from_silence_and_missed_replies(silence: float, missed: int, expected: str) -> None:
    got = health(
        last_seen=T0,
        now=at(silence),
        suspect_after_s=30,
        offline_after_s=90,
        missed_replies=missed,
        suspect_after_missed=1,
        offline_after_missed=3,
    )
    assert got == expected


def test_health_never_seen_is_offline() -> None:
    assert health(last_seen=None, now=T0, suspect_after_s=30, offline_after_s=90) == "offline"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"suspect_after_s": 0, "offline_after_s": 90},
        {"suspect_after_s": 100, "offline_after_s": 90},
        {"suspect_after_s": 30, "offline_after_s": float("inf")},
        {"suspect_after_s": float("nan"), "offline_after_s": 90},
        {"suspect_after_s": 30, "offline_after_s": 90, "suspect_after_missed": 0},
        {"suspect_after_s": 30, "offline_after_s": 90, "suspect_after_missed": 4, "offline_after_missed": 3},
        {"suspect_after_s": 30, "offline_after_s": 90, "missed_replies": -1},
    ],
)
def test_health_rejects_bad_thresholds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        health(last_seen=T0, now=T0, **kwargs)  # type: ignore[arg-type]


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        health(last_seen=datetime(2025, 1, 1), now=T0, suspect_after_s=30, offline_after_s=90)
    with pytest.raises(ValueError, match="timezone-aware"):
        as_utc(datetime(2025, 1, 1))


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0), (5, 60.0), (1000, 60.0)],
)
def test_backoff_doubles_up_to_the_cap(attempt: int, expected: float) -> None:
    assert backoff_s(attempt=attempt, base_s=10, cap_s=60) == expected


def test_backoff_zero_base_is_immediate_retry() -> None:
    assert backoff_s(attempt=3, base_s=0, cap_s=0) == 0.0


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s"),
    [(0, 10, 60), (-1, 10, 60), (1, 70, 60), (1, -1, 60), (1, float("nan"), 60), (1, 10, float("inf"))],
)
def test_backoff_rejects_bad_input(attempt: int, base_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError):
        backoff_s(attempt=attempt, base_s=base_s, cap_s=cap_s)


# --------------------------------------------------------------------------- pick_next


@dataclass(frozen=True)
class Cand:
    id: int
    submitted_at: datetime
    priority: int
    weight: float


A = Cand(1, at(2), priority=0, weight=1.0)
B = Cand(2, at(0), priority=1, weight=1.0)
C = Cand(3, at(1), priority=5, weight=2.0)
D = Cand(4, at(1), priority=5, weight=1.0)
ALL = [A, B, C, D]  # submit order: B, C, D (same time as C, higher id), A


class FixedRng:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_fcfs_picks_the_earliest_submitted() -> None:
    assert pick_next(ALL, policy="fcfs", rng=FixedRng(0)) is B
    assert pick_next([A, C, D], policy="fcfs", rng=FixedRng(0)) is C  # C and D tie on time: lower id
    assert pick_next([D, C], policy="fcfs", rng=FixedRng(0)) is C


def test_priority_picks_the_highest_then_the_earliest() -> None:
    assert pick_next(ALL, policy="priority", rng=FixedRng(0)) is C  # C and D both 5; C is earlier by id
    assert pick_next([A, B], policy="priority", rng=FixedRng(0)) is B
    assert pick_next([A, D], policy="priority", rng=FixedRng(0)) is D


@pytest.mark.parametrize(
    # weights in submit order B=1, C=2, D=1, A=1: cumulative 1, 3, 4, 5; u = r * 5
    ("r", "expected"),
    [(0.0, B), (0.19, B), (0.2, C), (0.59, C), (0.6, D), (0.79, D), (0.8, A), (0.9999, A)],
)
def test_weighted_locates_the_draw_on_cumulative_weights(r: float, expected: Cand) -> None:
    assert pick_next(ALL, policy="weighted", rng=FixedRng(r)) is expected
    assert pick_next(list(reversed(ALL)), policy="weighted", rng=FixedRng(r)) is expected  # input order irrelevant


def test_weighted_frequencies_follow_weights_with_a_seeded_rng() -> None:
    light = Cand(1, at(0), priority=0, weight=1.0)
    heavy = Cand(2, at(1), priority=0, weight=3.0)
    rng = random.Random(42)
    draws = [pick_next([light, heavy], policy="weighted", rng=rng) for _ in range(4000)]
    share = sum(d is heavy for d in draws) / len(draws)
    assert abs(share - 0.75) < 0.03  # binomial sd ~ 0.007
    again = random.Random(42)
    assert [pick_next([light, heavy], policy="weighted", rng=again) for _ in range(4000)] == draws


@pytest.mark.parametrize("policy", ["fcfs", "priority", "weighted"])
def test_no_candidates_no_pick(policy: str) -> None:
    assert pick_next([], policy=policy, rng=FixedRng(0.5)) is None  # type: ignore[arg-type]


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="fcfs, priority, weighted"):
        pick_next(ALL, policy="lifo", rng=FixedRng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_weighted_rejects_bad_weights(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        pick_next([A, Cand(9, at(0), 0, weight)], policy="weighted", rng=FixedRng(0))


# --------------------------------------------------------------------------- is_ready


@pytest.mark.parametrize(
    ("pools", "min_sites", "healthy", "expected"),
    [
        (["gpu"], 2, {"gpu": 2, "cpu": 0}, True),
        (["gpu"], 2, {"gpu": 1, "cpu": 5}, False),  # other pools do not count
        (["gpu", "cpu"], 3, {"gpu": 1, "cpu": 2}, True),  # summed over the needed pools
        (["gpu", "cpu"], 4, {"gpu": 1, "cpu": 2}, False),
        ([], 3, {"gpu": 1, "cpu": 2}, True),  # no pools named: any pool
        ([], 4, {"gpu": 1, "cpu": 2}, False),
        (["tpu"], 1, {"gpu": 3}, False),  # a pool nobody reported: zero
    ],
)
def test_is_ready(pools: list[str], min_sites: int, healthy: dict[str, int], expected: bool) -> None:
    assert is_ready(pools_needed=pools, min_sites=min_sites, healthy_by_pool=healthy) is expected


# --------------------------------------------------------------------------- content hash


def test_content_hash_of_arrays_by_hand() -> None:
    header = b'{"dtype":"<u2","name":"w","shape":[2]}'
    expected = hashlib.sha256(
        b"dmsc-fed/arrays/v1\n"
        + len(header).to_bytes(8, "little")
        + header
        + (4).to_bytes(8, "little")
        + b"\x01\x00\x02\x00"
    ).hexdigest()
    assert content_hash({"w": np.array([1, 2], dtype="<u2")}) == expected


def test_content_hash_of_two_arrays_is_in_name_order() -> None:
    def part(name: str, data: bytes) -> bytes:
        header = f'{{"dtype":"|u1","name":"{name}","shape":[1]}}'.encode()
        return len(header).to_bytes(8, "little") + header + (1).to_bytes(8, "little") + data

    expected = hashlib.sha256(b"dmsc-fed/arrays/v1\n" + part("a", b"\x07") + part("b", b"\x09")).hexdigest()
    b, a = np.array([9], dtype=np.uint8), np.array([7], dtype=np.uint8)
    assert content_hash({"b": b, "a": a}) == expected
    assert content_hash({"a": a, "b": b}) == expected


def test_content_hash_of_bytes_by_hand() -> None:
    assert content_hash(b"abc") == hashlib.sha256(b"dmsc-fed/bytes/v1\nabc").hexdigest()


def test_content_hash_ignores_layout_and_byte_order() -> None:
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    assert content_hash({"x": x}) == content_hash({"x": x.astype(">f4")})
    t = np.arange(6, dtype=np.float64).reshape(3, 2).T  # not C-contiguous
    assert content_hash({"x": t}) == content_hash({"x": np.ascontiguousarray(t)})


def test_content_hash_depends_on_name_dtype_shape_and_kind() -> None:
    x = np.array([1.0, 2.0], dtype=np.float32)
    base = content_hash({"x": x})
    assert content_hash({"y": x}) != base
    assert content_hash({"x": x.reshape(1, 2)}) != base
    assert content_hash({"x": np.asarray(np.float32(1))}) != content_hash({"x": np.array([1], dtype=np.float32)})
    assert content_hash({"x": x.view(np.int32)}) != base  # same bytes, other dtype
    assert content_hash(x.tobytes()) != base  # same bytes as an opaque payload


@pytest.mark.parametrize(
    "arrays",
    [{}, {"": np.zeros(1)}, {"x": np.array([1 + 2j])}, {"x": np.array(["s"])}, {"x": np.array([object()])}],
)
def test_content_hash_rejects_what_cannot_be_stored(arrays: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError):
        content_hash(arrays)


# --------------------------------------------------------------------------- URL masking


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg2://fed:s3cret@db:5432/ctl", "postgresql+psycopg2://fed:***@db:5432/ctl"),
        ("postgresql://fed@db/ctl", "postgresql://fed@db/ctl"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("weird://u:p@ss@host", "weird://u:***@host"),  # an unescaped @ in the password does not leak
        ("postgresql://db/ctl?password=s3cret&sslmode=require", "postgresql://db/ctl?password=***&sslmode=require"),
    ],
)
def test_mask_url(url: str, expected: str) -> None:
    assert mask_url(url) == expected
    if "s3cret" in url:
        assert "s3cret" not in mask_url(url)
