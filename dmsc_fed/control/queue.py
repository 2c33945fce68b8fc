"""Persistent task queue and exception queue of the control plane.

Draft: draft-yang-dmsc-distributed-model-03, section 6.2.1 (task management: a queue
of training and evaluation tasks, dispatched first-come-first-served or by weight-based
priority, using node health and capacity) and section 6.2.2 (exception task queue: a
failed or hung task leaves the main queue with its id, exception type and log).

States and transitions (every one is persisted and logged as a ``"task"`` event)::

    queued ──mark_running──► running ──mark_succeeded──► succeeded
      ▲                        │
      │                   mark_failed (or hung past its timeout)
      │                        ▼
      │   attempts < max:   failed  (exception queue; eligible again after backoff)
      │   attempts = max:   dead_lettered
      └──replay── failed / dead_lettered          cancel: any state but succeeded/cancelled

A ``failed`` task waits in the exception queue until its ``not_before`` time
(exponential backoff, :func:`backoff_s`), then the dispatcher may start it again like
a queued one. Every failed attempt is kept as a :class:`FailureRecord` (exception type,
message, log tail), also across :meth:`TaskQueue.replay`.

The dispatch policy is a pure function, :func:`pick_next`; readiness (enough healthy
sites in the pools a task needs) is another, :func:`is_ready`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar, cast, get_args

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dmsc_fed.control.db import Backend, PoolRow, TaskFailureRow, TaskRow
from dmsc_fed.control.errors import IllegalTransitionError, UnknownPoolError, UnknownTaskError
from dmsc_fed.control.events import record_event

__all__ = [
    "POLICIES",
    "TASK_KINDS",
    "TASK_STATES",
    "Candidate",
    "FailureRecord",
    "Policy",
    "TaskKind",
    "TaskQueue",
    "TaskRecord",
    "TaskState",
    "backoff_s",
    "is_ready",
    "pick_next",
]

TaskKind = Literal["train", "evaluate"]
TaskState = Literal["queued", "running", "succeeded", "failed", "dead_lettered", "cancelled"]
Policy = Literal["fcfs", "priority", "weighted"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
TASK_STATES: tuple[str, ...] = get_args(TaskState)
POLICIES: tuple[str, ...] = get_args(Policy)

LOG_TAIL_MAX_CHARS = 64 * 1024
"""Longest log tail kept per failure; a longer one keeps its last characters."""

_FROM: dict[str, frozenset[str]] = {
    "start": frozenset({"queued", "failed"}),
    "succeed": frozenset({"running"}),
    "fail": frozenset({"running"}),
    "replay": frozenset({"failed", "dead_lettered"}),
    "cancel": frozenset({"queued", "running", "failed", "dead_lettered"}),
}


# --------------------------------------------------------------------------- pure functions


class Candidate(Protocol):
    """What :func:`pick_next` needs of a task."""

    @property
    def id(self) -> int: ...  # noqa: D102

    @property
    def submitted_at(self) -> datetime: ...  # noqa: D102

    @property
    def priority(self) -> int: ...  # noqa: D102

    @property
    def weight(self) -> float: ...  # noqa: D102


class RandomSource(Protocol):
    """Anything with ``random() -> float`` in [0, 1), e.g. :class:`random.Random`."""

    def random(self) -> float: ...


C = TypeVar("C", bound=Candidate)


def _submit_order(task: Candidate) -> tuple[datetime, int]:
    return (task.submitted_at, task.id)


def pick_next(candidates: Sequence[C], *, policy: Policy, rng: RandomSource) -> C | None:
    """Choose the task to dispatch next among ready ``candidates`` (draft 6.2.1).

    Parameters
    ----------
    candidates
        Tasks that could start now (order does not matter).
    policy
        ``"fcfs"``: the earliest submitted (ties: lowest id). ``"priority"``: the highest
        ``priority``, ties by submit order. ``"weighted"``: a random draw with
        probability ``weight / sum(weights)``; ``u = rng.random() * sum(weights)`` is
        located on the cumulative weights of the candidates in submit order.
    rng
        Random source of the weighted draw (seed it for reproducible dispatch).

    Returns
    -------
    The chosen candidate, or None when there is none.

    Raises
    ------
    ValueError
        On an unknown policy (the message lists the known ones), or, for
        ``"weighted"``, a weight that is not finite and positive.

    Examples
    --------
    With weights 1 and 3 and ``rng.random() == 0.3``: ``u = 1.2`` lies past the first
    task's cumulative weight 1, so the second is chosen.

    """
    if policy not in POLICIES:
        raise ValueError(f"unknown dispatch policy {policy!r}; known policies: {', '.join(POLICIES)}")
    if not candidates:
        return None
    ordered = sorted(candidates, key=_submit_order)
    if policy == "fcfs":
        return ordered[0]
    if policy == "priority":
        return min(ordered, key=lambda t: (-t.priority, *_submit_order(t)))
    for task in ordered:
        if not (math.isfinite(task.weight) and task.weight > 0):
            raise ValueError(f"task {task.id} has weight {task.weight!r}; weights must be finite and > 0")
    total = math.fsum(t.weight for t in ordered)
    u = rng.random() * total
    cumulative = 0.0
    for task in ordered:
        cumulative += task.weight
        if u < cumulative:
            return task
    return ordered[-1]  # u == total up to rounding


def backoff_s(*, attempt: int, base_s: float, cap_s: float) -> float:
    """Delay before retrying after failed attempt number ``attempt`` (draft 6.2.2).

    ``min(cap_s, base_s * 2 ** (attempt - 1))``: with ``base_s=10, cap_s=60`` the
    delays after attempts 1, 2, 3, 4 are 10, 20, 40, 60 seconds.

    Raises
    ------
    ValueError
        If ``attempt < 1`` or ``0 <= base_s <= cap_s`` does not hold (both finite).

    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
    if not (math.isfinite(base_s) and math.isfinite(cap_s) and 0 <= base_s <= cap_s):
        raise ValueError(f"need finite 0 <= base_s <= cap_s, got base_s={base_s}, cap_s={cap_s}")
    if attempt > 64:
        return float(cap_s)
    return float(min(cap_s, base_s * 2 ** (attempt - 1)))


def is_ready(*, pools_needed: Collection[str], min_sites: int, healthy_by_pool: Mapping[str, int]) -> bool:
    """Whether a task can start: enough healthy sites in the pools it needs (draft 6.2.1).

    The healthy sites of the needed pools are added up (of every pool in
    ``healthy_by_pool`` when ``pools_needed`` is empty) and compared with ``min_sites``.

    Examples
    --------
    >>> is_ready(pools_needed=["gpu", "cpu"], min_sites=3, healthy_by_pool={"gpu": 1, "cpu": 2, "x": 9})
    True
    >>> is_ready(pools_needed=["gpu"], min_sites=2, healthy_by_pool={"gpu": 1, "cpu": 5})
    False

    """
    needed = set(pools_needed) if pools_needed else set(healthy_by_pool)
    return sum(healthy_by_pool.get(pool, 0) for pool in needed) >= min_sites


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored (draft 6.2.1)."""

    id: int
    kind: TaskKind
    state: TaskState
    config_json: str
    segmentation_json: str | None
    priority: int
    weight: float
    submitter: str
    attempts: int
    max_attempts: int
    timeout_s: float | None
    pools_needed: tuple[str, ...]
    min_sites: int
    submitted_at: datetime
    started_at: datetime | None
    deadline_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None


@dataclass(frozen=True)
class FailureRecord:
    """One failed or hung attempt of a task: an exception-queue entry (draft 6.2.2)."""

    task_id: int
    attempt: int
    exc_type: str
    message: str
    log_tail: str
    hung: bool
    at: datetime


def _task_record(row: TaskRow) -> TaskRecord:
    return TaskRecord(
        id=row.id,
        kind=cast(TaskKind, row.kind),
        state=cast(TaskState, row.state),
        config_json=row.config_json,
        segmentation_json=row.segmentation_json,
        priority=row.priority,
        weight=row.weight,
        submitter=row.submitter,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        timeout_s=row.timeout_s,
        pools_needed=tuple(row.pools_needed),
        min_sites=row.min_sites,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        deadline_at=row.deadline_at,
        finished_at=row.finished_at,
        not_before=row.not_before,
    )


def _failure_record(row: TaskFailureRow) -> FailureRecord:
    return FailureRecord(
        task_id=row.task_id,
        attempt=row.attempt,
        exc_type=row.exc_type,
        message=row.message,
        log_tail=row.log_tail,
        hung=row.hung,
        at=row.at,
    )


def _json_object(text: str | None, *, name: str) -> None:
    if text is None:
        return
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")


# --------------------------------------------------------------------------- the queue


class TaskQueue:
    """Task queue and exception queue of a :class:`~dmsc_fed.control.db.Store` (``store.queue``).

    Parameters
    ----------
    backend
        The store's backend.
    rng
        Random source of the ``"weighted"`` policy.
    backoff_base_s, backoff_cap_s
        Retry delays, see :func:`backoff_s`.

    """

    def __init__(
        self,
        backend: Backend,
        *,
        rng: RandomSource | None = None,
        backoff_base_s: float = 10.0,
        backoff_cap_s: float = 600.0,
    ) -> None:
        backoff_s(attempt=1, base_s=backoff_base_s, cap_s=backoff_cap_s)  # validate
        self._backend = backend
        self.rng: RandomSource = rng if rng is not None else random.Random()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s

    # ----------------------------------------------------------------- submit and read

    def submit(
        self,
        *,
        kind: TaskKind,
        config_json: str,
        submitter: str,
        segmentation_json: str | None = None,
        priority: int = 0,
        weight: float = 1.0,
        max_attempts: int = 3,
        timeout_s: float | None = None,
        pools_needed: Collection[str] = (),
        min_sites: int = 1,
        now: datetime | None = None,
    ) -> int:
        """Put a task in the queue and return its id.

        Parameters
        ----------
        kind
            ``"train"`` or ``"evaluate"``.
        config_json
            The task's federation config, a JSON object (validated by the server).
        submitter
            Who submitted it.
        segmentation_json
            Its segmentation spec (draft 6.2.4), a JSON object, or None.
        priority
            Higher runs first under the ``"priority"`` policy.
        weight
            Share under the ``"weighted"`` policy (finite, > 0).
        max_attempts
            Attempts before the task is dead-lettered (>= 1).
        timeout_s
            A running attempt older than this is hung (None: no timeout).
        pools_needed
            Pools whose healthy sites the task needs (empty: any pool).
        min_sites
            Healthy sites, summed over ``pools_needed``, needed to start (>= 1).
        now
            Submit time; default: the store's clock.

        Raises
        ------
        ValueError
            On a bad kind, JSON, weight, attempts, timeout or ``min_sites``.
        UnknownPoolError
            If a pool in ``pools_needed`` is not defined (the task could never start).

        """
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(TASK_KINDS)}")
        _json_object(config_json, name="config_json")
        _json_object(segmentation_json, name="segmentation_json")
        if not isinstance(submitter, str) or not submitter.strip():
            raise ValueError(f"submitter must be a non-empty string, got {submitter!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, got {weight!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be finite and > 0 (or None), got {timeout_s!r}")
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            raise ValueError(f"min_sites must be an integer >= 1, got {min_sites!r}")
        if isinstance(pools_needed, str):
            raise TypeError("pools_needed must be a collection of pool names, not a single string")
        pools = sorted(set(pools_needed))
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            known = set(session.scalars(select(PoolRow.name)))
            missing = [p for p in pools if p not in known]
            if missing:
                raise UnknownPoolError(
                    f"task needs unknown pool(s) {', '.join(map(repr, missing))}; "
                    f"known pools: {', '.join(sorted(known)) or 'none defined'}"
                )
            row = TaskRow(
                kind=kind,
                state="queued",
                config_json=config_json,
                segmentation_json=segmentation_json,
                priority=priority,
                weight=float(weight),
                submitter=submitter,
                attempts=0,
                max_attempts=max_attempts,
                timeout_s=None if timeout_s is None else float(timeout_s),
                pools_needed=pools,
                min_sites=min_sites,
                submitted_at=ts,
                updated_at=ts,
            )
            session.add(row)
            session.flush()
            self._event(session, row, ts, "submitted", submitter=submitter, priority=priority, weight=weight)
            return row.id

    def get(self, *, task_id: int) -> TaskRecord:
        """One task.

        Raises
        ------
        UnknownTaskError
            If no task has this id.

        """
        with self._backend.tx() as session:
            return _task_record(self._task(session, task_id))

    def tasks(self, *, state: TaskState | None = None) -> list[TaskRecord]:
        """Every task (in ``state``, if given), in submit order."""
        if state is not None and state not in TASK_STATES:
            raise ValueError(f"unknown task state {state!r}; known states: {', '.join(TASK_STATES)}")
        stmt = select(TaskRow).order_by(TaskRow.submitted_at, TaskRow.id)
        if state is not None:
            stmt = stmt.where(TaskRow.state == state)
        with self._backend.tx() as session:
            return [_task_record(row) for row in session.scalars(stmt)]

    def failures(self, *, task_id: int) -> list[FailureRecord]:
        """Every failed attempt of a task, oldest first (kept across replays).

        Raises
        ------
        UnknownTaskError
            If no task has this id.

        """
        with self._backend.tx() as session:
            self._task(session, task_id)
            stmt = select(TaskFailureRow).where(TaskFailureRow.task_id == task_id).order_by(TaskFailureRow.id)
            return [_failure_record(row) for row in session.scalars(stmt)]

    def counts_by_state(self) -> dict[str, int]:
        """Number of tasks in every state (0 for an empty one): the queue lengths (draft 6.2.1, 6.2.2).

        One ``GROUP BY`` query, cheap enough for every metrics scrape.
        """
        stmt = select(TaskRow.state, func.count(TaskRow.id)).group_by(TaskRow.state)
        counts = dict.fromkeys(TASK_STATES, 0)
        with self._backend.tx() as session:
            for state, count in session.execute(stmt):
                counts[state] = int(count)
        return counts

    def retrying(self) -> list[TaskRecord]:
        """Tasks in the exception queue waiting for a retry (state ``"failed"``)."""
        return self.tasks(state="failed")

    def dead_letters(self) -> list[TaskRecord]:
        """Tasks that used up their attempts (state ``"dead_lettered"``)."""
        return self.tasks(state="dead_lettered")

    # ----------------------------------------------------------------- dispatch

    def next_ready(
        self,
        *,
        policy: Policy,
        healthy_by_pool: Mapping[str, int],
        now: datetime | None = None,
        rng: RandomSource | None = None,
    ) -> TaskRecord | None:
        """The task to start next, or None when no task can start now.

        Candidates are queued tasks and failed tasks whose backoff has passed, that are
        :func:`is_ready` with ``healthy_by_pool`` (e.g. from
        :meth:`~dmsc_fed.control.registry.Registry.healthy_by_pool`); :func:`pick_next`
        chooses among them. Nothing changes in the store; call :meth:`mark_running`.

        Parameters
        ----------
        policy
            ``"fcfs"``, ``"priority"`` or ``"weighted"``.
        healthy_by_pool
            Healthy (online) sites per pool.
        now
            Current time; default: the store's clock.
        rng
            Random source for ``"weighted"``; default: the queue's own (seeded by ``Store.open(seed=...)``).

        """
        if policy not in POLICIES:
            raise ValueError(f"unknown dispatch policy {policy!r}; known policies: {', '.join(POLICIES)}")
        ts = self._backend.now(now)
        stmt = select(TaskRow).where(
            TaskRow.state.in_(("queued", "failed")),
            or_(TaskRow.not_before.is_(None), TaskRow.not_before <= ts),
        )
        with self._backend.tx() as session:
            candidates = [_task_record(row) for row in session.scalars(stmt)]
        ready = [
            t
            for t in candidates
            if is_ready(pools_needed=t.pools_needed, min_sites=t.min_sites, healthy_by_pool=healthy_by_pool)
        ]
        return pick_next(ready, policy=policy, rng=rng if rng is not None else self.rng)

    def mark_running(self, *, task_id: int, now: datetime | None = None) -> TaskRecord:
        """Start an attempt: ``queued`` (or ``failed`` past its backoff) to ``running``.

        The attempt counter grows by one; with a timeout, the attempt's deadline is set.

        Raises
        ------
        UnknownTaskError
            If no task has this id.
        IllegalTransitionError
            If the task is in another state, or still in its backoff.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._transition(session, task_id, "start")
            if row.not_before is not None and row.not_before > ts:
                raise IllegalTransitionError(
                    f"task {task_id} waits for its retry backoff until {row.not_before.isoformat()}"
                )
            row.state = "running"
            row.attempts += 1
            row.started_at = ts
            row.deadline_at = ts + timedelta(seconds=row.timeout_s) if row.timeout_s is not None else None
            row.finished_at = None
            row.not_before = None
            row.updated_at = ts
            self._event(session, row, ts, "running", attempt=row.attempts)
            return _task_record(row)

    def mark_succeeded(self, *, task_id: int, now: datetime | None = None) -> TaskRecord:
        """Finish a running task successfully.

        Raises
        ------
        UnknownTaskError, IllegalTransitionError
            If the task does not exist or is not running.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._transition(session, task_id, "succeed")
            row.state = "succeeded"
            row.finished_at = ts
            row.deadline_at = None
            row.updated_at = ts
            self._event(session, row, ts, "succeeded", attempt=row.attempts)
            return _task_record(row)

    def mark_failed(
        self,
        *,
        task_id: int,
        exc_type: str,
        message: str,
        log_tail: str = "",
        hung: bool = False,
        now: datetime | None = None,
    ) -> TaskRecord:
        """Record a failed (or hung) attempt and move the task to the exception queue.

        The failure is kept with its exception type, message and log tail (the last
        :data:`LOG_TAIL_MAX_CHARS` characters). With attempts left the task becomes
        ``"failed"`` and may start again after :func:`backoff_s`; otherwise it is
        ``"dead_lettered"``. A ``"fault"`` event is logged.

        Raises
        ------
        UnknownTaskError, IllegalTransitionError
            If the task does not exist or is not running.

        """
        if not isinstance(exc_type, str) or not exc_type.strip():
            raise ValueError(f"exc_type must be a non-empty string, got {exc_type!r}")
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._transition(session, task_id, "fail")
            session.add(
                TaskFailureRow(
                    task_id=row.id,
                    attempt=row.attempts,
                    exc_type=exc_type[:200],
                    message=message,
                    log_tail=log_tail[-LOG_TAIL_MAX_CHARS:],
                    hung=hung,
                    at=ts,
                )
            )
            row.deadline_at = None
            row.updated_at = ts
            if row.attempts >= row.max_attempts:
                row.state = "dead_lettered"
                row.finished_at = ts
                row.not_before = None
            else:
                row.state = "failed"
                delay = backoff_s(attempt=row.attempts, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s)
                row.not_before = ts + timedelta(seconds=delay)
            record_event(
                session,
                kind="fault",
                task_id=row.id,
                ts=ts,
                payload={
                    "action": "hung" if hung else "failed",
                    "attempt": row.attempts,
                    "exc_type": exc_type,
                    "message": message,
                    "state": row.state,
                    "retry_at": row.not_before.isoformat() if row.not_before is not None else None,
                },
            )
            return _task_record(row)

    def find_hung(self, *, now: datetime | None = None) -> list[TaskRecord]:
        """Running tasks past their deadline (``started_at + timeout_s``), in submit order."""
        ts = self._backend.now(now)
        stmt = (
            select(TaskRow)
            .where(TaskRow.state == "running", TaskRow.deadline_at.is_not(None), TaskRow.deadline_at < ts)
            .order_by(TaskRow.submitted_at, TaskRow.id)
        )
        with self._backend.tx() as session:
            return [_task_record(row) for row in session.scalars(stmt)]

    def fail_hung(self, *, now: datetime | None = None) -> list[TaskRecord]:
        """:meth:`mark_failed` every hung task (exception type ``"TaskTimeout"``); return them after."""
        ts = self._backend.now(now)
        return [
            self.mark_failed(
                task_id=task.id,
                exc_type="TaskTimeout",
                message=f"attempt {task.attempts} ran past its timeout of {task.timeout_s} s",
                hung=True,
                now=ts,
            )
            for task in self.find_hung(now=ts)
        ]

    def replay(self, *, task_id: int, now: datetime | None = None) -> TaskRecord:
        """Requeue a failed or dead-lettered task now, with its attempts reset to zero.

        Its failure history is kept.

        Raises
        ------
        UnknownTaskError, IllegalTransitionError
            If the task does not exist or is not in the exception queue.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._transition(session, task_id, "replay")
            previous = row.state
            row.state = "queued"
            row.attempts = 0
            row.not_before = None
            row.finished_at = None
            row.updated_at = ts
            self._event(session, row, ts, "replayed", previous=previous)
            return _task_record(row)

    def cancel(self, *, task_id: int, now: datetime | None = None) -> TaskRecord:
        """Cancel a task that has not finished (a running one must then be stopped by its runner).

        Raises
        ------
        UnknownTaskError, IllegalTransitionError
            If the task does not exist or already succeeded or was cancelled.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._transition(session, task_id, "cancel")
            previous = row.state
            row.state = "cancelled"
            row.finished_at = ts
            row.deadline_at = None
            row.not_before = None
            row.updated_at = ts
            self._event(session, row, ts, "cancelled", previous=previous)
            return _task_record(row)

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _task(session: Session, task_id: int, *, lock: bool = False) -> TaskRow:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise UnknownTaskError(f"unknown task id {task_id!r}: task ids are integers")
        # A transition locks the row (SELECT ... FOR UPDATE on PostgreSQL; SQLite locks the
        # whole file on write), so two dispatchers cannot both start the same task.
        row = session.get(TaskRow, task_id, with_for_update=lock)
        if row is None:
            raise UnknownTaskError(f"unknown task id {task_id}")
        return row

    def _transition(self, session: Session, task_id: int, action: str) -> TaskRow:
        row = self._task(session, task_id, lock=True)
        allowed = _FROM[action]
        if row.state not in allowed:
            raise IllegalTransitionError(
                f"cannot {action} task {task_id}: it is {row.state!r} (allowed from: {', '.join(sorted(allowed))})"
            )
        return row

    @staticmethod
    def _event(session: Session, row: TaskRow, ts: datetime, action: str, **extra: Any) -> None:
        record_event(
            session, kind="task", task_id=row.id, ts=ts, payload={"action": action, "state": row.state, **extra}
        )
