"""Task queue and exception queue: ordering, readiness, retry, dead-letter, replay (draft 6.2.1, 6.2.2)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from dmsc_fed.control import (
    IllegalTransitionError,
    Store,
    StoreError,
    UnknownPoolError,
    UnknownTaskError,
)
from dmsc_fed.control.queue import LOG_TAIL_MAX_CHARS

from .conftest import FakeClock
from .test_pure import FixedRng

EVERYONE = {"gpu": 5, "cpu": 5}


def _submit(store: Store, clock: FakeClock, **kw: object) -> int:
    args: dict[str, object] = {"kind": "train", "config_json": '{"rounds": 2}', "submitter": "alice"}
    args.update(kw)
    task_id = store.queue.submit(**args)  # type: ignore[arg-type]
    clock.advance(1)
    return task_id


def _drain(store: Store, policy: str, healthy: dict[str, int] = EVERYONE) -> list[int]:
    order = []
    while (task := store.queue.next_ready(policy=policy, healthy_by_pool=healthy)) is not None:  # type: ignore[arg-type]
        store.queue.mark_running(task_id=task.id)
        store.queue.mark_succeeded(task_id=task.id)
        order.append(task.id)
    return order


@pytest.fixture
def pools(store: Store) -> Store:
    store.registry.define_pool(name="gpu", device="cuda", capacity=2)
    store.registry.define_pool(name="cpu", device="cpu", capacity=4)
    return store


def test_submit_persists_the_task(pools: Store, clock: FakeClock) -> None:
    t0 = clock.now
    task_id = _submit(
        pools,
        clock,
        kind="evaluate",
        segmentation_json='{"mode": "block"}',
        priority=3,
        weight=2.5,
        max_attempts=4,
        timeout_s=60,
        pools_needed=["gpu", "cpu", "gpu"],
        min_sites=2,
    )
    task = pools.queue.get(task_id=task_id)
    assert (task.kind, task.state, task.attempts) == ("evaluate", "queued", 0)
    assert task.config_json == '{"rounds": 2}'
    assert task.segmentation_json == '{"mode": "block"}'
    assert (task.priority, task.weight, task.submitter) == (3, 2.5, "alice")
    assert (task.max_attempts, task.timeout_s, task.min_sites) == (4, 60.0, 2)
    assert task.pools_needed == ("cpu", "gpu")
    assert task.submitted_at == t0
    assert pools.queue.tasks() == [task]


def test_fcfs_dispatches_in_submit_order(pools: Store, clock: FakeClock) -> None:
    ids = [_submit(pools, clock, priority=p) for p in (0, 9, 5)]
    assert _drain(pools, "fcfs") == ids


def test_priority_dispatches_highest_first_then_submit_order(pools: Store, clock: FakeClock) -> None:
    a, b, c, d = (_submit(pools, clock, priority=p) for p in (1, 5, 1, 5))
    assert _drain(pools, "priority") == [b, d, a, c]


def test_weighted_dispatch_follows_the_draw(pools: Store, clock: FakeClock) -> None:
    light = _submit(pools, clock, weight=1.0)
    heavy = _submit(pools, clock, weight=3.0)
    # cumulative weights 1, 4: u = r * 4
    assert pools.queue.next_ready(policy="weighted", healthy_by_pool=EVERYONE, rng=FixedRng(0.2)).id == light  # type: ignore[union-attr]
    assert pools.queue.next_ready(policy="weighted", healthy_by_pool=EVERYONE, rng=FixedRng(0.3)).id == heavy  # type: ignore[union-attr]


def test_weighted_dispatch_is_reproducible_with_a_seed(db_url: str, clock: FakeClock) -> None:
    picks = []
    for _ in range(2):
        with Store.open(db_url, clock=clock, seed=123) as store:
            if not store.queue.tasks():
                store.registry.define_pool(name="cpu", device="cpu", capacity=1)
                for w in (1.0, 1.0, 1.0):
                    _submit(store, clock, weight=w)
            picks.append([store.queue.next_ready(policy="weighted", healthy_by_pool={"cpu": 1}).id for _ in range(20)])  # type: ignore[union-attr]
    assert picks[0] == picks[1]
    assert len(set(picks[0])) == 3


def test_a_task_waits_for_enough_healthy_sites(pools: Store, clock: FakeClock) -> None:
    needs_gpus = _submit(pools, clock, pools_needed=["gpu"], min_sites=2)
    any_site = _submit(pools, clock)
    pools.registry.register_site(name="a", node_id=1, software_version="0.1", pool="gpu")
    healthy = pools.registry.healthy_by_pool()
    assert healthy == {"cpu": 0, "gpu": 1}
    # the GPU task is not ready; it does not block the one behind it
    assert pools.queue.next_ready(policy="fcfs", healthy_by_pool=healthy).id == any_site  # type: ignore[union-attr]
    pools.registry.register_site(name="b", node_id=2, software_version="0.1", pool="gpu")
    healthy = pools.registry.healthy_by_pool()
    assert pools.queue.next_ready(policy="fcfs", healthy_by_pool=healthy).id == needs_gpus  # type: ignore[union-attr]
    clock.advance(3600)  # both sites fall silent: offline
    healthy = pools.registry.healthy_by_pool()
    assert healthy == {"cpu": 0, "gpu": 0}
    assert pools.queue.next_ready(policy="fcfs", healthy_by_pool=healthy) is None


def test_retry_with_backoff_then_dead_letter_then_replay(pools: Store, clock: FakeClock) -> None:
    # default backoff: 10 s after attempt 1, 20 s after attempt 2
    task_id = _submit(pools, clock, max_attempts=3)
    q = pools.queue

    q.mark_running(task_id=task_id)
    t = clock.now
    failed = q.mark_failed(task_id=task_id, exc_type="RuntimeError", message="boom 1", log_tail="line\nboom 1")
    assert (failed.state, failed.attempts, failed.not_before) == ("failed", 1, t + timedelta(seconds=10))
    assert q.retrying() == [failed]
    clock.advance(9)
    assert q.next_ready(policy="fcfs", healthy_by_pool=EVERYONE) is None
    with pytest.raises(IllegalTransitionError, match="backoff"):
        q.mark_running(task_id=task_id)
    clock.advance(1)
    assert q.next_ready(policy="fcfs", healthy_by_pool=EVERYONE).id == task_id  # type: ignore[union-attr]

    assert q.mark_running(task_id=task_id).attempts == 2
    t = clock.now
    failed = q.mark_failed(task_id=task_id, exc_type="RuntimeError", message="boom 2")
    assert (failed.state, failed.not_before) == ("failed", t + timedelta(seconds=20))
    clock.advance(20)

    q.mark_running(task_id=task_id)
    dead = q.mark_failed(task_id=task_id, exc_type="ValueError", message="boom 3", log_tail="tail 3")
    assert (dead.state, dead.attempts, dead.not_before) == ("dead_lettered", 3, None)
    assert q.dead_letters() == [dead]
    assert q.retrying() == []
    clock.advance(10_000)
    assert q.next_ready(policy="fcfs", healthy_by_pool=EVERYONE) is None  # out of the main queue

    failures = q.failures(task_id=task_id)
    assert [(f.attempt, f.exc_type, f.message, f.hung) for f in failures] == [
        (1, "RuntimeError", "boom 1", False),
        (2, "RuntimeError", "boom 2", False),
        (3, "ValueError", "boom 3", False),
    ]
    assert failures[0].log_tail == "line\nboom 1"

    replayed = q.replay(task_id=task_id)
    assert (replayed.state, replayed.attempts, replayed.not_before) == ("queued", 0, None)
    assert q.dead_letters() == []
    assert len(q.failures(task_id=task_id)) == 3  # history kept
    assert q.next_ready(policy="fcfs", healthy_by_pool=EVERYONE).id == task_id  # type: ignore[union-attr]
    q.mark_running(task_id=task_id)
    assert q.mark_succeeded(task_id=task_id).state == "succeeded"

    actions = [(e.kind, e.payload["action"]) for e in pools.events.events(task_id=task_id)]
    assert actions == [
        ("task", "submitted"),
        ("task", "running"),
        ("fault", "failed"),
        ("task", "running"),
        ("fault", "failed"),
        ("task", "running"),
        ("fault", "failed"),
        ("task", "replayed"),
        ("task", "running"),
        ("task", "succeeded"),
    ]


def test_replay_of_a_failed_task_skips_its_backoff(pools: Store, clock: FakeClock) -> None:
    task_id = _submit(pools, clock, max_attempts=5)
    pools.queue.mark_running(task_id=task_id)
    pools.queue.mark_failed(task_id=task_id, exc_type="E", message="m")
    pools.queue.replay(task_id=task_id)
    assert pools.queue.mark_running(task_id=task_id).attempts == 1


def test_hung_tasks_are_found_and_failed(pools: Store, clock: FakeClock) -> None:
    hung = _submit(pools, clock, timeout_s=60)
    no_timeout = _submit(pools, clock)
    start = clock.now
    pools.queue.mark_running(task_id=hung, now=start)
    pools.queue.mark_running(task_id=no_timeout, now=start)
    assert pools.queue.get(task_id=hung).deadline_at == start + timedelta(seconds=60)
    assert pools.queue.find_hung(now=start + timedelta(seconds=60)) == []
    late = start + timedelta(seconds=61)
    assert [t.id for t in pools.queue.find_hung(now=late)] == [hung]
    [after] = pools.queue.fail_hung(now=late)
    assert (after.id, after.state, after.deadline_at) == (hung, "failed", None)
    [failure] = pools.queue.failures(task_id=hung)
    assert (failure.exc_type, failure.hung, failure.attempt) == ("TaskTimeout", True, 1)
    assert "60" in failure.message
    assert pools.queue.find_hung(now=late + timedelta(days=1)) == []


def test_cancel(pools: Store, clock: FakeClock) -> None:
    queued = _submit(pools, clock)
    running = _submit(pools, clock)
    pools.queue.mark_running(task_id=running)
    assert pools.queue.cancel(task_id=queued).state == "cancelled"
    assert pools.queue.cancel(task_id=running).state == "cancelled"
    assert pools.queue.next_ready(policy="fcfs", healthy_by_pool=EVERYONE) is None
    with pytest.raises(IllegalTransitionError, match="cancelled"):
        pools.queue.mark_succeeded(task_id=running)  # its runner learns it was cancelled


def test_long_log_tails_keep_their_end(pools: Store, clock: FakeClock) -> None:
    task_id = _submit(pools, clock)
    pools.queue.mark_running(task_id=task_id)
    log = "x" * LOG_TAIL_MAX_CHARS + "the end"
    pools.queue.mark_failed(task_id=task_id, exc_type="E", message="m", log_tail=log)
    [failure] = pools.queue.failures(task_id=task_id)
    assert len(failure.log_tail) == LOG_TAIL_MAX_CHARS
    assert failure.log_tail.endswith("the end")


Op = Callable[[Store, int], object]
OPS: dict[str, Op] = {
    "get": lambda s, i: s.queue.get(task_id=i),
    "mark_running": lambda s, i: s.queue.mark_running(task_id=i),
    "mark_succeeded": lambda s, i: s.queue.mark_succeeded(task_id=i),
    "mark_failed": lambda s, i: s.queue.mark_failed(task_id=i, exc_type="E", message="m"),
    "replay": lambda s, i: s.queue.replay(task_id=i),
    "cancel": lambda s, i: s.queue.cancel(task_id=i),
    "failures": lambda s, i: s.queue.failures(task_id=i),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_unknown_task_id_is_a_clear_error(pools: Store, clock: FakeClock, op: str) -> None:
    kept = _submit(pools, clock)
    before = pools.queue.tasks()
    with pytest.raises(UnknownTaskError, match="unknown task id 999") as info:
        OPS[op](pools, 999)
    assert isinstance(info.value, StoreError)
    assert info.value.exit_code == 10
    assert pools.queue.tasks() == before
    with pytest.raises(UnknownTaskError, match="integers"):
        OPS[op](pools, str(kept))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setup", "op"),
    [
        ("succeeded", "replay"),
        ("succeeded", "cancel"),
        ("succeeded", "mark_running"),
        ("succeeded", "mark_failed"),
        ("succeeded", "mark_succeeded"),
        ("cancelled", "cancel"),
        ("cancelled", "replay"),
        ("cancelled", "mark_running"),
        ("queued", "mark_succeeded"),
        ("queued", "mark_failed"),
        ("queued", "replay"),
        ("running", "mark_running"),
        ("running", "replay"),
        ("dead_lettered", "mark_running"),
        ("dead_lettered", "mark_failed"),
    ],
)
def test_illegal_transitions_are_refused_and_change_nothing(
    pools: Store, clock: FakeClock, setup: str, op: str
) -> None:
    task_id = _submit(pools, clock, max_attempts=1)
    q = pools.queue
    if setup in ("running", "succeeded", "dead_lettered"):
        q.mark_running(task_id=task_id)
    if setup == "succeeded":
        q.mark_succeeded(task_id=task_id)
    if setup == "dead_lettered":
        q.mark_failed(task_id=task_id, exc_type="E", message="m")
    if setup == "cancelled":
        q.cancel(task_id=task_id)
    before = q.get(task_id=task_id)
    assert before.state == setup
    events_before = pools.events.events()
    with pytest.raises(IllegalTransitionError, match=f"task {task_id}: it is '{setup}'"):
        OPS[op](pools, task_id)
    assert q.get(task_id=task_id) == before
    assert pools.events.events() == events_before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "predict"},
        {"config_json": "not json"},
        {"config_json": "[1, 2]"},
        {"segmentation_json": "{"},
        {"submitter": ""},
        {"priority": 1.5},
        {"weight": 0.0},
        {"weight": float("nan")},
        {"max_attempts": 0},
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"min_sites": 0},
    ],
)
def test_submit_rejects_bad_input(pools: Store, clock: FakeClock, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _submit(pools, clock, **kwargs)
    assert pools.queue.tasks() == []


def test_submit_rejects_unknown_pools(pools: Store, clock: FakeClock) -> None:
    with pytest.raises(UnknownPoolError, match=r"'tpu'.*known pools: cpu, gpu"):
        _submit(pools, clock, pools_needed=["gpu", "tpu"])
    with pytest.raises(TypeError):
        _submit(pools, clock, pools_needed="gpu")
    assert pools.queue.tasks() == []


def test_unknown_policy_and_state_are_refused(pools: Store) -> None:
    with pytest.raises(ValueError, match="fcfs, priority, weighted"):
        pools.queue.next_ready(policy="lifo", healthy_by_pool={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queued"):
        pools.queue.tasks(state="paused")  # type: ignore[arg-type]
