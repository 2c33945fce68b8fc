"""The dispatcher: moves tasks from the persistent queue onto the federation, one at a time.

Draft-yang-dmsc-distributed-model-03, sections 6.2.1 (task management: dispatch by the
configured policy, using node health and capacity), 6.2.2 (exception queue: failed or
hung tasks leave the main queue, are retried with backoff, then dead-lettered) and
6.1.3 (registration and discovery: nodes are online while they keep answering).

Each :meth:`Dispatcher.step`:

1. **Discovery.** The runner lists the SuperNodes the SuperLink sees online
   (``flwr supernode list``); each known site gets a heartbeat, an unknown one is
   registered in the default pool (its capabilities arrive when it joins a task).
2. **Follow.** The running task's Flower run is polled: finished -> succeeded or
   failed (with the run's log tail); past its timeout -> the run is stopped and the
   task recorded as hung. Failed tasks go to the exception queue
   (:meth:`~dmsc_fed.control.queue.TaskQueue.mark_failed`).
3. **Dispatch.** With nothing running, the next ready task (policy ``fcfs``,
   ``priority`` or ``weighted``; enough healthy sites in the pools it needs) is
   marked running and started as a Flower run of the ServerApp.

Only one task runs at a time: every site runs one ClientApp process per message, and
two tasks would compete for the same hospitals' machines. The store is the only
state: after a restart, :meth:`Dispatcher.recover` records the tasks that were
running as failed ("the coordinator restarted") so they are retried, and nothing
queued is lost.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Literal, Protocol

from dmsc_fed.control.db import Store
from dmsc_fed.control.errors import StoreError
from dmsc_fed.control.queue import Policy, TaskRecord

log = logging.getLogger("dmsc_fed.control")

RunState = Literal["running", "succeeded", "failed"]


class Runner(Protocol):
    """What the dispatcher needs from the federation (a SuperLink, or a fake in tests)."""

    def start(self, *, task: TaskRecord) -> str:
        """Start ``task`` as a run; return a handle to follow it."""
        ...

    def poll(self, *, handle: str) -> tuple[RunState, str]:
        """The run's state and a short detail (e.g. Flower's status string)."""
        ...

    def stop(self, *, handle: str) -> None:
        """Stop the run (best effort)."""
        ...

    def log_tail(self, *, handle: str) -> str:
        """The last lines of the run's log, for the exception queue."""
        ...

    def online_sites(self) -> list[tuple[str, int]]:
        """``(site name, node id)`` of every SuperNode online now."""
        ...


@dataclass
class Dispatcher:
    """One coordinator's dispatch loop over a :class:`~dmsc_fed.control.db.Store`.

    Attributes
    ----------
    store
        The control-plane store (tasks, registry, events).
    runner
        Starts and follows runs on the federation.
    policy
        ``fcfs``, ``priority`` or ``weighted``.
    default_pool
        Pool of a site first seen online before it declared itself.
    seed
        Seeds the ``weighted`` policy's draws.

    """

    store: Store
    runner: Runner
    policy: Policy = "priority"
    default_pool: str = "cpu"
    seed: int = 0
    running: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def recover(self) -> list[int]:
        """Tasks left ``running`` by a previous coordinator: recorded as failed so they are retried."""
        lost = []
        for task in self.store.queue.tasks(state="running"):
            if task.id in self.running:
                continue
            self.store.queue.mark_failed(
                task_id=task.id,
                exc_type="CoordinatorRestarted",
                message="the coordinator stopped while the task was running; its run was lost",
            )
            lost.append(task.id)
        return lost

    def discover(self) -> None:
        """Heartbeats for the sites online now; register the ones never seen."""
        try:
            online = self.runner.online_sites()
        except Exception as err:  # the SuperLink may be restarting: try again next step
            log.warning("cannot list the SuperNodes: %s", err)
            return
        known = {s.name for s in self.store.registry.sites()}
        for name, node_id in online:
            if name in known:
                self.store.registry.heartbeat(site=name)
            else:
                self.store.registry.register_site(
                    name=name, node_id=node_id, software_version="unknown", pool=self.default_pool
                )
                log.info("site %s (node %d) is online; registered in pool %s", name, node_id, self.default_pool)

    def follow(self) -> None:
        """Poll the running tasks; finish, fail or stop (hung) them."""
        hung = {t.id for t in self.store.queue.find_hung()}
        for task_id, handle in list(self.running.items()):
            if task_id in hung:
                self.runner.stop(handle=handle)
                self.store.queue.mark_failed(
                    task_id=task_id,
                    exc_type="TaskTimeout",
                    message=f"run {handle} ran past the task's timeout and was stopped",
                    log_tail=self._tail(handle),
                    hung=True,
                )
                del self.running[task_id]
                continue
            state, detail = self.runner.poll(handle=handle)
            if state == "running":
                continue
            del self.running[task_id]
            if state == "succeeded":
                self.store.queue.mark_succeeded(task_id=task_id)
                log.info("task %d succeeded (run %s)", task_id, handle)
            else:
                self.store.queue.mark_failed(
                    task_id=task_id,
                    exc_type="RunFailed",
                    message=f"run {handle} ended as {detail}",
                    log_tail=self._tail(handle),
                )
                log.warning("task %d failed (run %s: %s)", task_id, handle, detail)

    def _tail(self, handle: str) -> str:
        try:
            return self.runner.log_tail(handle=handle)
        except Exception as err:
            return f"(no log: {err})"

    def dispatch(self) -> TaskRecord | None:
        """Start the next ready task when nothing runs; None if nothing started."""
        if self.running:
            return None
        task = self.store.queue.next_ready(
            policy=self.policy, healthy_by_pool=self.store.registry.healthy_by_pool(), rng=self.rng
        )
        if task is None:
            return None
        task = self.store.queue.mark_running(task_id=task.id)
        try:
            handle = self.runner.start(task=task)
        except Exception as err:
            self.store.queue.mark_failed(
                task_id=task.id, exc_type=type(err).__name__, message=f"the run could not start: {err}"
            )
            log.warning("task %d could not start: %s", task.id, err)
            return None
        self.running[task.id] = handle
        log.info("task %d started as run %s (priority %d)", task.id, handle, task.priority)
        return task

    def step(self) -> None:
        """One round of discovery, follow-up and dispatch."""
        self.discover()
        self.follow()
        self.dispatch()

    def run(self, *, stop: threading.Event, every_s: float = 5.0) -> None:
        """Step every ``every_s`` seconds until ``stop`` is set; a failing step is logged, never fatal."""
        self.recover()
        while not stop.is_set():
            try:
                self.step()
            except StoreError as err:
                log.error("store error in the dispatcher (retrying): %s", err)
            except Exception as err:  # e.g. the flwr CLI failing while the SuperLink restarts: keep dispatching
                log.error("dispatcher step failed (retrying): %s: %s", type(err).__name__, err)
            stop.wait(every_s)
