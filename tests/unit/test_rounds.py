"""The fault-tolerant round loop over a fake grid: quorum and retries, late replies, rollback, snapshots and resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from dmsc_fed.config import FaultSpec
from dmsc_fed.sites import SiteInfo
from dmsc_fed.snapshots import SnapshotStore
from server.rounds import RoundFailed, RoundLoop
from strategies import WeightedFedAvg

pytestmark = pytest.mark.usefixtures("flwr_identity")

SITES = {
    i: SiteInfo(name=n, node_id=i, num_train=10, num_test=10, device="cpu", version="t")
    for i, n in [(1, "a"), (2, "b"), (3, "c")]
}
#: What each site adds to the global model when it trains (hand-chosen; the mean of all three is [2, 2]).
STEP = {1: 1.0, 2: 2.0, 3: 3.0}

#: ``(node, round, attempt, message) -> reply content``, or None for no reply by the deadline.
Behaviour = Callable[[int, int, int, Message], RecordDict | None]


def honest(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
    """Train: add the site's step; evaluate: loss = mean |w| (grows as the model moves away from 0)."""
    w = msg.content["arrays"]["w"].numpy()  # type: ignore[index, union-attr]
    if msg.metadata.message_type == MessageType.TRAIN:
        return RecordDict(
            {
                "arrays": ArrayRecord({"w": Array((w + STEP[node]).astype(np.float32))}),
                "metrics": MetricRecord({"num-examples": 10, "loss": 1.0}),
            }
        )
    return RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": float(np.abs(w).mean()) + 1.0})})


class FakeGrid:
    """Answers each message at once through ``behave``; counts attempts per (node, round)."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.sent: dict[tuple[int, int, str], int] = {}

    def get_node_ids(self) -> list[int]:
        return list(SITES)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grid does when it pushes
            rnd = int(msg.content["config"]["server-round"])  # type: ignore[index, arg-type]
            key = (msg.metadata.dst_node_id, rnd, msg.metadata.message_type)
            self.sent[key] = self.sent.get(key, 0) + 1
            content = self.behave(msg.metadata.dst_node_id, rnd, self.sent[key], msg)
            if content is not None:
                out.append(Message(content=content, reply_to=msg))
        return out


def _strategy(**kwargs) -> WeightedFedAvg:
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    return WeightedFedAvg.for_model(initial=initial, sites=SITES, **kwargs)


def _loop(
    strategy: WeightedFedAvg, behave: Behaviour, fault: FaultSpec, store: SnapshotStore | None = None
) -> RoundLoop:
    from flwr.app import ConfigRecord

    return RoundLoop(
        strategy=strategy,
        grid=FakeGrid(behave),  # type: ignore[arg-type]
        fault=fault,
        deadline_s=5.0,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        snapshots=store,
        task_state={"task_id": "t/1"},
    )


def _initial() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})


def _w(strategy: WeightedFedAvg) -> list[float]:
    assert strategy.current is not None
    return strategy.current["w"].numpy().tolist()


def test_a_missing_site_is_recorded_late_and_the_round_aggregates_the_others() -> None:
    def c_is_gone(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        return None if node == 3 else honest(node, rnd, attempt, msg)

    closed = []
    strategy = _strategy(on_round=closed.append)
    _loop(strategy, c_is_gone, FaultSpec(quorum=2)).run(initial=_initial(), rounds=1)
    assert _w(strategy) == [1.5, 1.5]  # (1 + 2) / 2: c left out
    report = closed[0]
    assert report.aggregated and report.train_sites == ["a", "b"] and report.attempts == 1
    late = [r for r in report.rejected if r["kind"] == "late"]
    assert {(r["site"], r["stage"]) for r in late} == {("c", "train"), ("c", "evaluate")}
    assert "no reply by the round deadline (5 s)" in late[0]["reason"]


def test_below_quorum_the_round_is_retried_and_the_earlier_attempt_stays_on_record() -> None:
    def c_late_once(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        first_train = msg.metadata.message_type == MessageType.TRAIN and attempt == 1
        return None if node == 3 and first_train else honest(node, rnd, attempt, msg)

    strategy = _strategy()
    _loop(strategy, c_late_once, FaultSpec(quorum=3)).run(initial=_initial(), rounds=1)
    assert _w(strategy) == [2.0, 2.0]  # all three in the second attempt
    assert len(strategy.reports) == 1
    report = strategy.reports[0]
    assert report.attempts == 2 and report.aggregated
    assert [r["site"] for r in report.rejected if r["kind"] == "late"] == ["c"]


def test_a_round_that_never_reaches_quorum_fails_after_its_retries_and_keeps_the_model() -> None:
    def only_a(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        return honest(node, rnd, attempt, msg) if node == 1 or rnd == 1 else None

    strategy = _strategy()
    loop = _loop(strategy, only_a, FaultSpec(quorum=2, round_retries=2))
    with pytest.raises(RoundFailed, match=r"round 2 stayed below quorum after 3 attempt\(s\): 1 valid training reply"):
        loop.run(initial=_initial(), rounds=3)
    assert _w(strategy) == [2.0, 2.0]  # round 1's model; round 2 never counted
    assert loop.grid.sent[(2, 2, MessageType.TRAIN)] == 3  # type: ignore[attr-defined]
    assert [r.aggregated for r in strategy.reports] == [True, False]


def test_rejected_updates_leave_the_aggregate_exactly_as_without_them() -> None:
    def c_sends(bad: Callable[[np.ndarray], dict[str, np.ndarray]]) -> Behaviour:
        def behave(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
            content = honest(node, rnd, attempt, msg)
            if node == 3 and msg.metadata.message_type == MessageType.TRAIN:
                assert content is not None
                w = msg.content["arrays"]["w"].numpy()  # type: ignore[index, union-attr]
                content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad(w).items()})
            return content

        return behave

    def without_c(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        return None if node == 3 else honest(node, rnd, attempt, msg)

    reference = _strategy()
    _loop(reference, without_c, FaultSpec()).run(initial=_initial(), rounds=2)
    faults = {
        "non-finite": lambda w: {"w": np.full(2, np.nan, dtype=np.float32)},
        "malformed": lambda w: {"w": np.zeros(3, dtype=np.float32)},
        "oversized": lambda w: {"w": w.astype(np.float32), "pad": np.zeros(1 << 20, dtype=np.float32)},
    }
    for kind, bad in faults.items():
        strategy = _strategy()
        _loop(strategy, c_sends(bad), FaultSpec()).run(initial=_initial(), rounds=2)
        assert _w(strategy) == _w(reference), kind
        kinds = [r["kind"] for rep in strategy.reports for r in rep.rejected if r["site"] == "c"]
        assert kinds == [kind, kind], kind


def test_a_loss_blow_up_is_rolled_back_and_the_suspect_excluded() -> None:
    def c_poisons_round_2(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        content = honest(node, rnd, attempt, msg)
        if node == 3 and rnd == 2 and msg.metadata.message_type == MessageType.TRAIN:
            assert content is not None
            w = msg.content["arrays"]["w"].numpy()  # type: ignore[index, union-attr]
            content["arrays"] = ArrayRecord({"w": Array((w + 3000.0).astype(np.float32))})
        return content

    strategy = _strategy()
    _loop(strategy, c_poisons_round_2, FaultSpec(rollback_loss_factor=4.0, exclude_suspects=True)).run(
        initial=_initial(), rounds=3
    )
    r1, r2, r3 = strategy.reports
    assert r1.aggregated and not r2.aggregated and r3.aggregated
    assert r2.rolled_back is not None and "more than 4 times" in r2.rolled_back
    assert r2.suspects == ["c"]
    assert r3.train_sites == ["a", "b"]  # c retired after the rollback
    assert "suspected" in strategy.retired[3]
    # round 1: [2, 2]; round 2 rolled back to it; round 3: a and b add 1.5 on average
    assert _w(strategy) == [3.5, 3.5]


def test_snapshots_resume_a_restarted_task_where_an_uninterrupted_one_would_be(tmp_path: Path) -> None:
    fault = FaultSpec()
    reference = _strategy()
    _loop(reference, honest, fault).run(initial=_initial(), rounds=4)

    store = SnapshotStore(tmp_path / "snap", fingerprint="cfg")
    crashed = _strategy()
    _loop(crashed, honest, fault, store).run(initial=_initial(), rounds=2)  # the server dies after round 2
    snap = store.latest()
    assert snap is not None and snap.round == 2 and snap.state["task_id"] == "t/1"

    restarted = _strategy()
    restarted.restore(snap.state, snap.arrays)
    assert [r.round for r in restarted.reports] == [1, 2] and all(r.restored for r in restarted.reports)
    _loop(restarted, honest, fault, store).run(initial=_initial(), rounds=4, start_round=snap.round + 1)
    assert _w(restarted) == _w(reference)
    assert [r.round for r in restarted.reports] == [1, 2, 3, 4]
    assert restarted.rng.getstate() == reference.rng.getstate()
    assert store.latest().round == 4  # type: ignore[union-attr]


def test_a_truncated_snapshot_is_skipped_for_the_previous_good_one(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snap", fingerprint="cfg")
    strategy = _strategy()
    _loop(strategy, honest, FaultSpec(), store).run(initial=_initial(), rounds=2)
    npz = next((tmp_path / "snap").glob("round-000002*.npz"))
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    snap = store.latest()
    assert snap is not None and snap.round == 1
    assert snap.arrays["w"].tolist() == [2.0, 2.0]


def test_privacy_spend_is_in_the_snapshot(tmp_path: Path) -> None:
    def with_epsilon(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        content = honest(node, rnd, attempt, msg)
        if content is not None and msg.metadata.message_type == MessageType.TRAIN:
            content["metrics"]["epsilon"] = 0.5 * rnd  # type: ignore[index]
        return content

    store = SnapshotStore(tmp_path / "snap", fingerprint="cfg")
    _loop(_strategy(), with_epsilon, FaultSpec(), store).run(initial=_initial(), rounds=2)
    snap = store.latest()
    assert snap is not None
    assert snap.state["privacy"]["b"]["epsilon"] == 1.0


def test_the_superlinks_error_reply_for_a_dead_node_is_recorded_as_that_site_unavailable() -> None:
    from flwr.app import Error

    class DeadC(FakeGrid):
        def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
            alive = [m for m in messages if m.metadata.dst_node_id != 3]
            out = super().send_and_receive(alive, timeout)
            for msg in messages:
                if msg.metadata.dst_node_id == 3:
                    msg.metadata.__dict__["_message_id"] = msg.object_id
                    err = Message(
                        error=Error(code=5, reason="Error: Node Unavailable - missed heartbeats"), reply_to=msg
                    )
                    err.metadata.__dict__["_src_node_id"] = 1  # sent by the SuperLink, not by the node
                    out.append(err)
            return out

    strategy = _strategy()
    loop = _loop(strategy, honest, FaultSpec(quorum=2))
    loop.grid = DeadC(honest)  # type: ignore[assignment]
    loop.run(initial=_initial(), rounds=1)
    report = strategy.reports[0]
    assert report.aggregated and sorted(report.train_sites) == ["a", "b"]
    assert [(r["site"], r["kind"]) for r in report.rejected] == [("c", "unavailable"), ("c", "unavailable")]
    assert "Node Unavailable" in report.rejected[0]["reason"]


def test_a_retry_waits_for_a_restarting_site_and_keeps_the_rounds_clock_and_spend() -> None:
    class Rejoining(FakeGrid):
        """c is down for round 1's first attempt and reconnects a few polls later."""

        def __init__(self, behave: Behaviour) -> None:
            super().__init__(behave)
            self.polls = 0

        def get_node_ids(self) -> list[int]:
            self.polls += 1
            return [1, 2, 3] if self.polls > 4 else [1, 2]

    def with_epsilon(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        content = honest(node, rnd, attempt, msg)
        if content is not None and msg.metadata.message_type == MessageType.TRAIN:
            content["metrics"]["epsilon"] = 0.25 * attempt  # type: ignore[index]
        return content

    strategy = _strategy()
    loop = _loop(strategy, with_epsilon, FaultSpec(quorum=3))
    loop.grid = Rejoining(with_epsilon)  # type: ignore[assignment]
    loop.poll_s = 0.01
    loop.run(initial=_initial(), rounds=1)
    report = strategy.reports[0]
    assert report.aggregated and report.attempts == 2 and sorted(report.train_sites) == ["a", "b", "c"]
    assert loop.grid.polls > 4  # type: ignore[attr-defined]  # it waited for c before the second attempt
    assert report.per_site["a"]["train"]["epsilon"] == 0.5  # a's second training replaced its first


def test_a_retried_round_keeps_its_start_and_the_spend_of_sites_only_in_the_failed_attempt() -> None:
    def flaky(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        train = msg.metadata.message_type == MessageType.TRAIN
        if train and ((node == 1 and attempt == 1) or (node == 2 and attempt == 2) or (node == 3 and attempt == 1)):
            return None  # attempt 1: only b; attempt 2: a and c, b silent
        content = honest(node, rnd, attempt, msg)
        if content is not None and train:
            content["metrics"]["epsilon"] = 0.25 * attempt  # type: ignore[index]
        return content

    before = time.time()
    strategy = _strategy()
    _loop(strategy, flaky, FaultSpec(quorum=2)).run(initial=_initial(), rounds=1)
    report = strategy.reports[0]
    assert report.aggregated and report.attempts == 2 and sorted(report.train_sites) == ["a", "c"]
    assert report.per_site["b"]["train"]["epsilon"] == 0.25  # spent in the failed attempt, still on record
    assert before <= report.started <= before + 1.0  # the round's clock started with its first attempt


def test_an_honest_repeated_refusal_is_a_refusal_not_a_replay() -> None:
    from flwr.app import ConfigRecord

    def refuses(node: int, rnd: int, attempt: int, msg: Message) -> RecordDict | None:
        if node == 3 and msg.metadata.message_type == MessageType.TRAIN:
            return RecordDict({"status": ConfigRecord({"refused": "budget"})})
        return honest(node, rnd, attempt, msg)

    strategy = _strategy()
    strategy.retired = {}
    _loop(strategy, refuses, FaultSpec()).run(initial=_initial(), rounds=1)
    assert [r["site"] for r in strategy.reports[0].refused] == ["c"]
    assert not [r for r in strategy.reports[0].rejected if r["kind"] == "replayed"]
