"""The dispatcher over a real store file, with a fake federation (runs that succeed, fail or hang on demand)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dmsc_fed.control import Store, sqlite_url
from dmsc_fed.control.dispatcher import Dispatcher, RunState
from dmsc_fed.control.queue import TaskRecord
from tests.unit.control.conftest import FakeClock


class FakeRunner:
    def __init__(self) -> None:
        self.online: list[tuple[str, int]] = [("a", 1), ("b", 2)]
        self.started: list[int] = []
        self.outcome: dict[str, tuple[RunState, str]] = {}
        self.stopped: list[str] = []

    def start(self, *, task: TaskRecord) -> str:
        self.started.append(task.id)
        handle = f"run-{len(self.started)}"
        self.outcome[handle] = ("running", "running")
        return handle

    def poll(self, *, handle: str) -> tuple[RunState, str]:
        return self.outcome[handle]

    def stop(self, *, handle: str) -> None:
        self.stopped.append(handle)

    def log_tail(self, *, handle: str) -> str:
        return f"log of {handle}"

    def online_sites(self) -> list[tuple[str, int]]:
        return self.online


@pytest.fixture
def setup(tmp_path: Path, clock: FakeClock) -> tuple[Store, FakeRunner, Dispatcher]:
    store = Store.open(sqlite_url(tmp_path / "c.db"), clock=clock, seed=0)
    store.registry.define_pool(name="cpu", device="cpu", capacity=1)
    runner = FakeRunner()
    return store, runner, Dispatcher(store=store, runner=runner, policy="priority")


def _submit(store: Store, priority: int = 0, **kw: object) -> int:
    return store.queue.submit(kind="train", config_json="{}", submitter="t", priority=priority, **kw)  # type: ignore[arg-type]


def test_a_high_priority_task_overtakes_queued_low_priority_ones(setup) -> None:
    store, runner, disp = setup
    low1, low2 = _submit(store, 0), _submit(store, 0)
    disp.step()  # low1 starts: nothing else was queued yet
    high = _submit(store, 10)
    runner.outcome["run-1"] = ("succeeded", "finished:completed")
    disp.step()
    disp.step()
    runner.outcome["run-2"] = ("succeeded", "finished:completed")
    disp.step()
    runner.outcome["run-3"] = ("succeeded", "finished:completed")
    disp.step()
    assert runner.started == [low1, high, low2]
    assert [store.queue.get(task_id=t).state for t in (low1, high, low2)] == ["succeeded"] * 3


def test_failures_retry_with_backoff_then_dead_letter_then_replay(setup, clock: FakeClock) -> None:
    store, runner, disp = setup
    task = _submit(store, max_attempts=2)
    disp.step()
    runner.outcome["run-1"] = ("failed", "finished:failed")
    disp.step()
    assert store.queue.get(task_id=task).state == "failed"
    assert runner.started == [task]  # backoff: not yet again
    clock.advance(3600)
    disp.step()
    assert runner.started == [task, task]
    runner.outcome["run-2"] = ("failed", "finished:failed")
    disp.step()
    assert store.queue.get(task_id=task).state == "dead_lettered"
    failures = store.queue.failures(task_id=task)
    assert [f.exc_type for f in failures] == ["RunFailed", "RunFailed"] and failures[0].log_tail == "log of run-1"
    store.queue.replay(task_id=task)
    disp.step()
    assert runner.started == [task, task, task]


def test_a_hung_run_is_stopped_and_recorded(setup, clock: FakeClock) -> None:
    store, runner, disp = setup
    task = _submit(store, timeout_s=60.0, max_attempts=3)
    disp.step()
    clock.advance(61)
    disp.step()
    assert runner.stopped == ["run-1"]
    (failure,) = store.queue.failures(task_id=task)
    assert failure.hung and failure.exc_type == "TaskTimeout"


def test_sites_online_are_registered_and_tasks_wait_for_enough_of_them(setup, clock: FakeClock) -> None:
    store, runner, disp = setup
    runner.online = []
    task = _submit(store, min_sites=2)
    disp.step()
    assert runner.started == []
    runner.online = [("a", 1)]
    disp.step()
    assert runner.started == [] and [s.name for s in store.registry.sites()] == ["a"]
    runner.online = [("a", 1), ("b", 2)]
    disp.step()
    assert runner.started == [task]
    runner.online = []
    clock.advance(3600)  # nobody heard from since: offline
    assert {s.health for s in store.registry.sites()} == {"offline"}


def test_a_restarted_coordinator_keeps_the_queue_and_retries_what_was_running(tmp_path: Path, clock: FakeClock) -> None:
    url = sqlite_url(tmp_path / "c.db")
    store = Store.open(url, clock=clock, seed=0)
    store.registry.define_pool(name="cpu", device="cpu", capacity=1)
    running, queued = _submit(store), _submit(store)
    Dispatcher(store=store, runner=FakeRunner()).step()
    store.close()
    again = Store.open(url, clock=clock, seed=0)
    disp = Dispatcher(store=again, runner=FakeRunner())
    assert disp.recover() == [running]
    assert again.queue.get(task_id=running).state == "failed"
    assert again.queue.get(task_id=queued).state == "queued"
    assert again.queue.failures(task_id=running)[0].exc_type == "CoordinatorRestarted"


def test_a_failing_step_does_not_stop_the_dispatcher(setup) -> None:
    import threading

    store, runner, disp = setup
    task = _submit(store)
    failures = ["SuperLink restarting"]
    original = disp.discover

    def discover_once_failing() -> None:
        if failures:
            raise RuntimeError(failures.pop())
        original()

    disp.discover = discover_once_failing  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=disp.run, kwargs={"stop": stop, "every_s": 0.05})
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    assert not failures and runner.started == [task]
