"""Reassignment: a segment no valid reply carried is trained by a site that replied, within the round."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from clients import segments
from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.block import ParamSlice
from dmsc_fed.segmentation.layout import RunSegment, SegmentLayout
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ROUND_KEY, SEGMENT_NAMES, SEGMENT_WEIGHT_TOTALS, SEGMENTS_KEY, STATUS_KEY, segment_key
from strategies.segmented import SegmentedFedAvg

pytestmark = pytest.mark.usefixtures("flwr_identity")


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _sites(names: str) -> dict[int, SiteInfo]:
    """Node i is site ``names[i - 1]`` with 10 * i training samples."""
    return {
        i: SiteInfo(name=n, node_id=i, num_train=10 * i, num_test=5, device="cpu", version="t")
        for i, n in enumerate(names, start=1)
    }


SITES = _sites("abc")


def _seg(name: str, start: int, stop: int, sites: str) -> RunSegment:
    return RunSegment(
        name=name, pieces=(ParamSlice(name="w", start=start, stop=stop),), sites=tuple(sites), dp=False,
        encrypted=False, rule="mean",
    )  # fmt: skip


def _blocks(owners: list[str], *, mode: str = "block") -> SegmentLayout:
    """block-i is w[2i:2i+2], trained by the sites named in ``owners[i]``."""
    segs = tuple(_seg(f"block-{i}", 2 * i, 2 * i + 2, sites) for i, sites in enumerate(owners))
    return SegmentLayout(mode=mode, segments=segs, shapes=(("w", (2 * len(owners),)),))


def _round1(
    layout: SegmentLayout, sites: dict[int, SiteInfo] = SITES, **kwargs
) -> tuple[SegmentedFedAvg, ConfigRecord, Grid, dict[int, Message]]:
    size = layout.shapes[0][1][0]
    initial = ArrayRecord({"w": Array(np.zeros(size, dtype=np.float32))})
    strat = SegmentedFedAvg.for_layout(initial=initial, layout=layout, sites=sites, **kwargs)
    config, grid = ConfigRecord({SEGMENTS_KEY: layout.to_json()}), Grid(sorted(sites))
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, config, grid)}
    return strat, config, grid, msgs


def _reply(msg: Message, values: dict[str, list[float]], n: int) -> Message:
    arrays = ArrayRecord({segment_key(k): Array(np.array(v, dtype=np.float32)) for k, v in values.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=msg)


def _own(msg: Message, strat: SegmentedFedAvg, value: float) -> Message:
    """The site's reply with every one of its blocks at ``value``, and all its samples."""
    site = strat.sites[msg.metadata.dst_node_id]
    return _reply(msg, {s.name: [value, value] for s in strat.layout.of_site(site.name)}, site.num_train)


def test_a_failed_sites_block_goes_to_a_site_of_its_pool_and_is_aggregated_from_the_substitute() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]), pools={"a": "cpu", "b": "gpu", "c": "gpu"})
    assert config[ROUND_KEY] == 1
    replies = [
        _reply(msgs[1], {"block-0": [1.5, -1.0]}, 10),
        _reply(msgs[2], {"block-1": [2.0, 3.0]}, 20),
    ]  # c (node 3) never replied

    extra = strat.reassign(1, replies, config, grid)
    assert len(extra) == 1
    (msg,) = extra
    assert msg.metadata.message_type == MessageType.TRAIN
    assert msg.metadata.dst_node_id == 2  # b: a replied too, but b shares c's pool
    sent = msg.content["config"]
    assert list(sent[SEGMENT_NAMES]) == ["block-2"]
    assert list(sent[SEGMENT_WEIGHT_TOTALS]) == [20.0]  # b's samples only
    assert sent[ROUND_KEY] == 1
    moved = SegmentLayout.from_json(str(sent[SEGMENTS_KEY]))
    assert moved.segment("block-2").sites == ("c", "b")
    assert moved.segment("block-0").sites == ("a",) and moved.segment("block-1").sites == ("b",)
    np.testing.assert_array_equal(msg.content["arrays"]["w"].numpy(), np.zeros(6))  # the round's model

    plan = segments.assignment(sent, site="b")  # what b reads from the message
    assert plan is not None
    assert [s.name for s in plan.segments] == ["block-2"] and plan.weight_totals == {"block-2": 20.0}
    with pytest.raises(ConfigError, match="gives to others"):
        segments.assignment(sent, site="a")

    assert strat.reports[-1].reassigned == [{"segment": "block-2", "from": "c", "to": "b"}]
    assert strat.reports[-1].to_dict()["reassigned"] == [{"segment": "block-2", "from": "c", "to": "b"}]

    # b answers the reassignment with c's block only; everything is aggregated together.
    second = _reply(msg, {"block-2": [7.0, 8.0]}, 20)
    assert second.metadata.src_node_id == 2
    arrays, _ = strat.aggregate_train(1, [*replies, second])
    assert strat.reports[-1].rejected == []
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), [1.5, -1.0, 2.0, 3.0, 7.0, 8.0])


def test_the_pool_decides_which_site_substitutes() -> None:
    # The same failure as above with a and b swapping pools: now a takes c's block.
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]), pools={"a": "gpu", "b": "cpu", "c": "gpu"})
    extra = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    assert [m.metadata.dst_node_id for m in extra] == [1]
    assert list(extra[0].content["config"][SEGMENT_WEIGHT_TOTALS]) == [10.0]
    assert strat.reports[-1].reassigned == [{"segment": "block-2", "from": "c", "to": "a"}]


def test_without_a_same_pool_site_the_least_loaded_site_substitutes() -> None:
    # c is alone in its pool; a trains two blocks and b one, so b takes c's block although a sorts first.
    strat, config, grid, msgs = _round1(_blocks(["a", "a", "b", "c"]), pools={"c": "gpu"})
    extra = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    assert [m.metadata.dst_node_id for m in extra] == [2]
    assert list(extra[0].content["config"][SEGMENT_NAMES]) == ["block-3"]


def test_the_substitutes_own_reply_and_its_reassignment_reply_both_pass_the_checks() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]), pools={"a": "cpu", "b": "gpu", "c": "gpu"})
    first = _reply(msgs[2], {"block-1": [2.0, 3.0]}, 20)
    (msg,) = strat.reassign(1, [_own(msgs[1], strat, 1.0), first], config, grid)
    b = SITES[2]
    assert strat.check_train(b, first.content, 1) is None  # recognised as b's own block
    assert strat.check_train(b, _reply(msg, {"block-2": [7.0, 8.0]}, 20).content, 1) is None
    # The reassignment reply must hold exactly the moved block, and no more samples than b has.
    both = _reply(msg, {"block-1": [2.0, 3.0], "block-2": [7.0, 8.0]}, 20)
    assert "exactly the site's segments" in str(strat.check_train(b, both.content, 1))
    assert strat.check_train(b, _reply(msg, {"block-2": [7.0, 8.0]}, 21).content, 1) is not None
    # a was given nothing: a reply from a with c's block is still foreign.
    assert "exactly the site's segments" in str(
        strat.check_train(SITES[1], _reply(msgs[1], {"block-2": [0, 0]}, 10).content, 1)
    )


def test_a_replicated_block_survives_one_failure_without_reassignment() -> None:
    strat, config, grid, msgs = _round1(_blocks(["ab", "bc", "ca"]))
    extra = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    assert extra == [] and strat.reports[-1].reassigned == []


def test_business_heads_are_not_moved() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"], mode="business"))
    assert strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid) == []
    assert strat.reports[-1].reassigned == []


def test_layer_segments_are_moved() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"], mode="layer"))
    extra = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    assert [list(m.content["config"][SEGMENT_NAMES]) for m in extra] == [["block-2"]]


def test_no_healthy_site_means_no_reassignment() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]))
    nan = [_own(msgs[1], strat, float("nan")), _own(msgs[2], strat, float("nan"))]
    assert strat.reassign(1, nan, config, grid) == []
    assert strat.reassign(1, [], config, grid) == []
    assert strat.reports[-1].reassigned == []


def test_an_error_reply_or_a_refusal_is_not_healthy() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]))
    error = Message(error=Error(code=0, reason="boom"), reply_to=msgs[1])
    refusal = Message(content=RecordDict({STATUS_KEY: ConfigRecord({"refused": "budget spent"})}), reply_to=msgs[1])
    for broken in (error, refusal):
        extra = strat.reassign(1, [broken, _own(msgs[2], strat, 2.0)], config, grid)
        # a's and c's blocks are both lost and only b replied well: b takes both, in one message.
        assert [m.metadata.dst_node_id for m in extra] == [2]
        assert list(extra[0].content["config"][SEGMENT_NAMES]) == ["block-0", "block-2"]
        assert list(extra[0].content["config"][SEGMENT_WEIGHT_TOTALS]) == [20.0, 20.0]
    assert strat.reassign(1, [error], config, grid) == []


def test_a_reply_that_fails_validation_is_not_healthy() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]))
    wrong = _reply(msgs[1], {"block-1": [1.0, 1.0]}, 10)  # a sends b's block
    extra = strat.reassign(1, [wrong, _own(msgs[2], strat, 2.0)], config, grid)
    assert [list(m.content["config"][SEGMENT_NAMES]) for m in extra] == [["block-0", "block-2"]]


def test_lost_blocks_are_spread_over_the_healthy_sites_of_their_pool() -> None:
    sites = _sites("abcd")
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c", "d"]), sites, pools=dict.fromkeys("abcd", "gpu"))
    extra = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    got = {m.metadata.dst_node_id: list(m.content["config"][SEGMENT_NAMES]) for m in extra}
    assert got == {1: ["block-2"], 2: ["block-3"]}
    assert {(r["segment"], r["from"], r["to"]) for r in strat.reports[-1].reassigned} == {
        ("block-2", "c", "a"),
        ("block-3", "d", "b"),
    }
    # Both substitutes answer; every block comes from its one valid reply.
    answers = [_reply(m, {got[m.metadata.dst_node_id][0]: [5.0 + i, 6.0 + i]}, 5) for i, m in enumerate(extra)]
    arrays, _ = strat.aggregate_train(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0), *answers])
    assert arrays is not None and strat.reports[-1].rejected == []
    np.testing.assert_allclose(arrays["w"].numpy(), [1, 1, 2, 2, 5, 6, 6, 7])


def test_a_new_round_forgets_the_last_rounds_reassignments() -> None:
    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]))
    (msg,) = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    assert strat.reassigned_to
    strat.configure_train(2, strat.current, ConfigRecord(), grid)  # type: ignore[arg-type]
    assert strat.reassigned_to == {}
    stale = _reply(msg, {"block-2": [7.0, 8.0]}, 10)
    assert strat.check_train(strat.sites[msg.metadata.dst_node_id], stale.content, 2) is not None


def test_a_reply_the_reply_check_rejects_is_not_healthy() -> None:
    def unsigned_a(site: SiteInfo, content: RecordDict, stage: str, server_round: int) -> str | None:
        return "bad signature" if site.name == "a" else None

    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]), reply_check=unsigned_a)
    extra = strat.reassign(1, [_own(msgs[1], strat, 1.0), _own(msgs[2], strat, 2.0)], config, grid)
    assert [m.metadata.dst_node_id for m in extra] == [2]
    assert list(extra[0].content["config"][SEGMENT_NAMES]) == ["block-0", "block-2"]


def test_a_replayed_reply_is_not_healthy_so_its_block_is_reassigned() -> None:
    import hashlib

    strat, config, grid, msgs = _round1(_blocks(["a", "b", "c"]))
    replayed = _own(msgs[1], strat, 1.0)
    replayed.content["signature"] = ConfigRecord({"signature": b"sig-from-round-0"})
    strat.seen_signatures[hashlib.sha256(b"sig-from-round-0").hexdigest()] = 0
    extra = strat.reassign(1, [replayed, _own(msgs[2], strat, 2.0)], config, grid)
    assert [m.metadata.dst_node_id for m in extra] == [2]
    assert list(extra[0].content["config"][SEGMENT_NAMES]) == ["block-0", "block-2"]
