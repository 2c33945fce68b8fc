from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation import ParamSlice, aggregate_blocks, assign_blocks, block_bounds, plan_blocks


def test_aggregate_blocks_hand_computed() -> None:
    updates = {
        "a": {0: np.array([1.0, 2.0], dtype=np.float32), 1: np.array([10.0], dtype=np.float32)},
        "b": {0: np.array([3.0, 6.0], dtype=np.float32)},
        "c": {1: np.array([20.0], dtype=np.float32), 2: np.array([-1.0, 1.0, 5.0], dtype=np.float32)},
    }
    out = aggregate_blocks(updates=updates, weights={"a": 1, "b": 3, "c": 4})
    # block 0 from a and b: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5
    assert out[0].tolist() == [2.5, 5.0] and out[0].dtype == np.float32
    # block 1 from a and c: (1*10 + 4*20)/5 = 18
    assert out[1].tolist() == [18.0]
    # block 2 from c alone
    assert out[2].tolist() == [-1.0, 1.0, 5.0]
    assert sorted(out) == [0, 1, 2]


def test_aggregate_blocks_zero_weight_site_does_not_count() -> None:
    updates = {"a": {0: np.array([4.0])}, "b": {0: np.array([100.0])}}
    assert aggregate_blocks(updates=updates, weights={"a": 2.0, "b": 0.0})[0].tolist() == [4.0]


@pytest.mark.parametrize(
    ("updates", "weights", "needle"),
    [
        ({"a": {0: np.zeros(2)}}, {}, "site 'a' sent blocks but has no weight"),
        ({"a": {0: np.zeros(2)}}, {"a": -1.0}, "finite and non-negative"),
        ({"a": {0: np.zeros(2)}}, {"a": float("inf")}, "finite and non-negative"),
        ({"a": {0: np.zeros(2)}, "b": {0: np.zeros(3)}}, {"a": 1, "b": 1}, "block 0: site 'b' sent shape"),
        ({"a": {0: np.zeros(2)}, "b": {0: np.zeros(2)}}, {"a": 0, "b": 0}, "sum to zero"),
    ],
)
def test_aggregate_blocks_rejects_bad_input(updates, weights, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        aggregate_blocks(updates=updates, weights=weights)


def test_aggregate_blocks_checks_updates_against_the_plan() -> None:
    plan = plan_blocks(parameters={"w": (2, 3)}, capacities={"a": 1, "b": 1}, block_count=2)
    assert plan.assignment == {"a": (0,), "b": (1,)}
    with pytest.raises(ValueError, match="site 'a' sent block 1, which it was not assigned"):
        aggregate_blocks(updates={"a": {1: np.zeros(3)}}, weights={"a": 1}, plan=plan)
    with pytest.raises(ValueError, match="block 7, which the plan does not have"):
        aggregate_blocks(updates={"a": {7: np.zeros(3)}}, weights={"a": 1}, plan=plan)
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        aggregate_blocks(updates={"a": {0: np.zeros(2)}}, weights={"a": 1}, plan=plan)
    keys: dict[str, dict[Any, np.ndarray]] = {"a": {np.int64(0): np.ones(3)}, "b": {1: np.zeros(3)}}  # numpy ids too
    out = aggregate_blocks(updates=keys, weights={"a": 1, "b": 1}, plan=plan)
    assert plan.merge(base=np.full(6, 9.0), values=out).tolist() == [1, 1, 1, 0, 0, 0]


def test_blocks_cross_layer_boundaries_and_record_their_slices() -> None:
    plan = plan_blocks(
        parameters={"0.weight": (3, 4), "0.bias": (3,), "2.weight": (2, 3), "2.bias": (2,)},
        capacities={"cpu": 1.0},
        block_size=10,
    )
    assert plan.total == 23
    assert [(b.offset, b.length) for b in plan.blocks] == [(0, 10), (10, 10), (20, 3)]
    assert plan.blocks[0].slices == (ParamSlice("0.weight", 0, 10),)
    assert plan.blocks[1].slices == (
        ParamSlice("0.weight", 10, 12),
        ParamSlice("0.bias", 0, 3),
        ParamSlice("2.weight", 0, 5),
    )
    assert plan.blocks[2].slices == (ParamSlice("2.weight", 5, 6), ParamSlice("2.bias", 0, 2))
    flat = np.arange(23.0)
    parts = plan.split(flat=flat)
    assert parts[1].tolist() == list(range(10, 20))
    assert plan.merge(base=np.zeros(23), values=parts).tolist() == flat.tolist()


def test_block_count_gives_near_equal_blocks() -> None:
    assert block_bounds(total=10, block_count=3) == [(0, 4), (4, 3), (7, 3)]
    assert block_bounds(total=10, block_size=4) == [(0, 4), (4, 4), (8, 2)]


def test_gpu_sites_take_proportionally_more() -> None:
    # 12 blocks, r = 2: 24 slots over capacities 1, 1, 4 -> 4, 4, 16 but a site holds each block once: 12 max
    out = assign_blocks(num_blocks=12, capacities={"cpu-a": 1, "cpu-b": 1, "gpu": 4}, replication=2)
    assert [len(v) for v in out.values()] == [6, 6, 12]
    out = assign_blocks(num_blocks=12, capacities={"cpu-a": 1, "cpu-b": 1, "gpu": 4}, replication=1)
    assert [len(v) for v in out.values()] == [2, 2, 8]
    assert out == {"cpu-a": (0, 1), "cpu-b": (2, 3), "gpu": (4, 5, 6, 7, 8, 9, 10, 11)}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"replication": 3}, "replication = 3 is more than the 2 site"),
        ({"replication": 0}, "replication must be at least 1"),
        ({"capacities": {"a": 1.0, "b": 0.0}}, "capacities must be positive"),
        ({"capacities": {}}, "at least one site"),
        ({"block_count": 99}, "block_count = 99 must be between 1 and the model's 6 parameters"),
        ({"block_size": None}, "exactly one of block_size or block_count"),
        ({"block_size": 0, "block_count": None}, "block_size must be at least 1"),
        ({"parameters": {"w": (0, 3)}}, "the model has 0 parameters"),
        ({"parameters": {"w": (-1, 3)}}, "negative dimension"),
    ],
)
def test_bad_block_plans_are_config_errors(kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {
        "parameters": {"w": (2, 3)},
        "capacities": {"a": 1.0, "b": 2.0},
        "block_size": 2,
        "block_count": None,
    }
    args.update(kwargs)
    if "block_count" in kwargs and kwargs["block_count"] is not None:
        args["block_size"] = None
    with pytest.raises(ConfigError, match=needle):
        plan_blocks(**args)


@st.composite
def _setups(draw):
    shapes = draw(st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3), min_size=1, max_size=5))
    params = {f"p{i}.weight": tuple(s) for i, s in enumerate(shapes)}
    total = sum(int(np.prod(s)) for s in params.values())
    if total == 0:
        params["bias"] = (draw(st.integers(1, 5)),)
        total = sum(int(np.prod(s)) for s in params.values())
    n_sites = draw(st.integers(1, 7))
    caps = draw(st.lists(st.floats(0.05, 20.0), min_size=n_sites, max_size=n_sites))
    capacities = {f"site-{i}": c for i, c in enumerate(caps)}
    replication = draw(st.integers(1, n_sites))
    if draw(st.booleans()):
        sizing = {"block_size": draw(st.integers(1, total + 3))}
    else:
        sizing = {"block_count": draw(st.integers(1, total))}
    return params, capacities, replication, sizing, total


@settings(max_examples=150, deadline=None)
@given(_setups())
def test_every_block_covered_and_replicated(setup) -> None:
    params, capacities, r, sizing, total = setup
    plan = plan_blocks(parameters=params, capacities=capacities, replication=r, **sizing)
    assert plan == plan_blocks(parameters=params, capacities=capacities, replication=r, **sizing)  # deterministic
    # blocks tile the flat vector, and their slices tile every parameter exactly once, in order
    assert plan.total == total
    assert [b.offset for b in plan.blocks] == [sum(b.length for b in plan.blocks[:i]) for i in range(len(plan.blocks))]
    assert sum(b.length for b in plan.blocks) == total and all(b.length > 0 for b in plan.blocks)
    covered = [(s.name, i) for b in plan.blocks for s in b.slices for i in range(s.start, s.stop)]
    expected = [(n, i) for n, shape in params.items() for i in range(int(np.prod(shape)))]
    assert covered == expected
    assert all(sum(s.stop - s.start for s in b.slices) == b.length for b in plan.blocks)
    # every block on exactly r distinct sites, consistent with the per-site lists
    for b in plan.blocks:
        assert len(b.sites) == r and len(set(b.sites)) == r
        assert all(b.index in plan.blocks_of(site=s) for s in b.sites)
    assert sum(len(v) for v in plan.assignment.values()) == r * len(plan.blocks)
    assert list(plan.assignment) == list(capacities)
    # shares follow capacity: a faster site never trains fewer blocks than a slower one
    for s, cs in capacities.items():
        for t, ct in capacities.items():
            if cs > ct:
                assert len(plan.assignment[s]) >= len(plan.assignment[t])
    # and stay within one block of the water-filled proportional share
    shares = _water_filled(len(plan.blocks), list(capacities.values()), r)
    for (site, ids), x in zip(plan.assignment.items(), shares, strict=True):
        assert abs(len(ids) - x) < 1 + 1e-9, site


def _water_filled(blocks: int, caps: list[float], r: int) -> list[float]:
    share = [0.0] * len(caps)
    active = list(range(len(caps)))
    remaining = float(r * blocks)
    while active:
        w = sum(caps[i] for i in active)
        over = [i for i in active if remaining * caps[i] / w > blocks]
        if not over:
            for i in active:
                share[i] = remaining * caps[i] / w
            return share
        for i in over:
            share[i] = float(blocks)
        remaining -= blocks * len(over)
        active = [i for i in active if i not in over]
    return share


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from("abcde"), st.dictionaries(st.integers(0, 4), st.floats(-1e3, 1e3), max_size=5), min_size=1
    ),
    st.lists(st.floats(0.1, 10.0), min_size=5, max_size=5),
)
def test_aggregate_blocks_is_the_weighted_mean_over_senders(raw, ws) -> None:
    weights = dict(zip("abcde", ws, strict=True))
    updates = {s: {k: np.array([v]) for k, v in blocks.items()} for s, blocks in raw.items()}
    out = aggregate_blocks(updates=updates, weights=weights)
    for key in {k for blocks in raw.values() for k in blocks}:
        senders = [s for s in raw if key in raw[s]]
        want = sum(weights[s] * raw[s][key] for s in senders) / sum(weights[s] for s in senders)
        assert out[key][0] == pytest.approx(want, rel=1e-9, abs=1e-9)
