"""A strategy's snapshot state: what restore() brings back, and what it forgets on purpose."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from dmsc_fed.segmentation.block import ParamSlice
from dmsc_fed.segmentation.layout import RunSegment, SegmentLayout
from dmsc_fed.sites import SiteInfo
from strategies import WeightedFedAvg
from strategies.fedavg import REPLAY_WINDOW, RoundReport
from strategies.segmented import SegmentedFedAvg

SITES = {
    i: SiteInfo(name=n, node_id=i, num_train=10, num_test=5, device="cpu", version="t") for i, n in [(1, "a"), (2, "b")]
}
INITIAL = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})


def _layout(*sites: str) -> SegmentLayout:
    segs = tuple(
        RunSegment(
            name=f"block-{i}",
            pieces=(ParamSlice(name="w", start=2 * i, stop=2 * i + 2),),
            sites=(site,),
            dp=False,
            encrypted=False,
            rule="mean",
        )
        for i, site in enumerate(sites)
    )
    return SegmentLayout(mode="block", segments=segs, shapes=(("w", (4,)),))


def test_state_round_trips_through_json_and_restores_history_retired_sites_rng_and_model() -> None:
    old = WeightedFedAvg.for_model(initial=INITIAL, sites=SITES, seed=3)
    old.reports = [RoundReport(round=1, aggregated=True, train_sites=["a", "b"], evaluate={"loss": 0.5})]
    old.retired = {2: "privacy budget spent"}
    old.seen_signatures = {"ab": 1}
    old.current = ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))})
    old.rng.random()
    state, arrays = old.state()
    state = json.loads(json.dumps(state, allow_nan=False))  # a snapshot stores it as JSON

    new = WeightedFedAvg.for_model(initial=INITIAL, sites=SITES, seed=3)
    new.restore(state, arrays)
    assert [(r.round, r.aggregated, r.evaluate, r.restored) for r in new.reports] == [(1, True, {"loss": 0.5}, True)]
    assert new.retired == {2: "privacy budget spent"} and new.seen_signatures == {"ab": 1}
    assert new.current is not None and new.current["w"].numpy().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert new.rng.random() == old.rng.random()


def test_signatures_older_than_the_replay_window_are_forgotten_when_a_round_closes() -> None:
    strategy = WeightedFedAvg.for_model(initial=INITIAL, sites=SITES)
    strategy.seen_signatures = {"old": 1, "edge": 10 - REPLAY_WINDOW, "recent": 10 - REPLAY_WINDOW + 1, "now": 10}
    strategy.close_round(RoundReport(round=10))
    assert set(strategy.seen_signatures) == {"recent", "now"}


@pytest.mark.parametrize("same", [True, False])
def test_a_segmented_strategy_resumes_with_the_snapshots_layout(same: bool) -> None:
    planned_then = _layout("a", "b")
    old = SegmentedFedAvg.for_layout(initial=INITIAL, layout=planned_then, sites=SITES)
    old.noise_rng.random()  # the generator has moved on since the start
    state, arrays = old.state()
    expected = old.noise_rng.random()
    planned_now = planned_then if same else _layout("a", "a")  # b did not rejoin: another plan
    new = SegmentedFedAvg.for_layout(initial=INITIAL, layout=planned_now, sites=SITES)
    new.restore(json.loads(json.dumps(state)), arrays)
    assert new.layout == planned_then
    assert new.noise_rng.random() == expected
