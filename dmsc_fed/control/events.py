"""Structured JSON event log of the control plane.

Draft: draft-yang-dmsc-distributed-model-03, section 6.2.3 (log management: every
segmentation, allocation and synchronisation event with its timestamp; anomalies pushed
to the exception queue, 6.2.2). Events go to the ``events`` table and, when the store was
opened with ``event_sink=...``, also to a JSON-lines file, one object per line::

    {"id": 7, "kind": "fault", "payload": {...}, "task_id": "3", "ts": "2025-01-01T00:00:00+00:00"}

File lines are written after the transaction that recorded the event commits, so the
file never shows an event the database does not hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dmsc_fed.control.db import Backend, EventRow, as_utc

__all__ = ["EVENT_KINDS", "EventKind", "EventLog", "EventRecord", "record_event"]

EventKind = Literal["segmentation", "allocation", "round", "aggregation", "fault", "privacy", "task", "recovery"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


@dataclass(frozen=True)
class EventRecord:
    """One stored event (draft 6.2.3)."""

    id: int
    ts: datetime
    kind: EventKind
    task_id: str | None
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The event as the JSON object written to the sink."""
        return {
            "id": self.id,
            "ts": self.ts.isoformat(),
            "kind": self.kind,
            "task_id": self.task_id,
            "payload": self.payload,
        }


def _check_kind(kind: str) -> EventKind:
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}; known kinds: {', '.join(EVENT_KINDS)}")
    return cast(EventKind, kind)


def _normalize_payload(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(payload, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event payload must be finite JSON (str, int, float, bool, None, list, dict): {exc}") from exc
    normalized: dict[str, Any] = json.loads(text)
    return normalized


def _task_key(task_id: str | int | None) -> str | None:
    return None if task_id is None else str(task_id)


def _record(row: EventRow) -> EventRecord:
    return EventRecord(id=row.id, ts=row.ts, kind=_check_kind(row.kind), task_id=row.task_id, payload=dict(row.payload))


def record_event(
    session: Session, *, kind: str, task_id: str | int | None, ts: datetime, payload: dict[str, Any]
) -> EventRecord:
    """Add an event inside an open store transaction (used by the registry, queue and model store).

    Parameters
    ----------
    session
        A session from :meth:`dmsc_fed.control.db.Backend.tx`.
    kind
        One of :data:`EVENT_KINDS`.
    task_id
        The task the event belongs to, if any (stored as text).
    ts
        Timezone-aware time of the event.
    payload
        JSON-serialisable details.

    Raises
    ------
    ValueError
        If ``kind`` is unknown or ``payload`` is not finite JSON.

    """
    row = EventRow(
        ts=as_utc(ts, name="ts"),
        kind=_check_kind(kind),
        task_id=_task_key(task_id),
        payload=_normalize_payload(payload),
    )
    session.add(row)
    session.flush()
    record = _record(row)
    pending = session.info.get("pending_events")
    if pending is not None:
        pending.append(record.to_json())
    return record


class EventLog:
    """The event log of a :class:`~dmsc_fed.control.db.Store` (``store.events``)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def log_event(
        self, *, kind: EventKind, task_id: str | int | None = None, now: datetime | None = None, **payload: Any
    ) -> EventRecord:
        """Record one event.

        Parameters
        ----------
        kind
            ``"segmentation"``, ``"allocation"``, ``"round"``, ``"aggregation"``,
            ``"fault"``, ``"privacy"`` or ``"task"``.
        task_id
            The task the event belongs to, if any.
        now
            Event time; default: the store's clock.
        **payload
            Details; must be JSON-serialisable and finite.

        Returns
        -------
        EventRecord
            The stored event.

        Raises
        ------
        ValueError
            If ``kind`` is unknown (the message lists the known kinds) or the payload is
            not JSON.

        """
        _check_kind(kind)
        _normalize_payload(payload)
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            return record_event(session, kind=kind, task_id=task_id, ts=ts, payload=payload)

    def events(
        self,
        *,
        kind: EventKind | None = None,
        task_id: str | int | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[EventRecord]:
        """Stored events in the order they were recorded, optionally filtered.

        Parameters
        ----------
        kind
            Only events of this kind.
        task_id
            Only events of this task.
        since
            Only events at or after this time.
        limit
            At most this many (the oldest first).

        """
        stmt = select(EventRow).order_by(EventRow.id)
        if kind is not None:
            stmt = stmt.where(EventRow.kind == _check_kind(kind))
        if task_id is not None:
            stmt = stmt.where(EventRow.task_id == str(task_id))
        if since is not None:
            stmt = stmt.where(EventRow.ts >= as_utc(since, name="since"))
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            stmt = stmt.limit(limit)
        with self._backend.tx() as session:
            return [_record(row) for row in session.scalars(stmt)]

    def latest_per_task(self, *, kind: EventKind) -> dict[str, EventRecord]:
        """The newest event of ``kind`` of every task that has one, by task id.

        Events without a task are left out. One query (the highest event id per task),
        so a metrics scrape does not read the whole log.

        Raises
        ------
        ValueError
            If ``kind`` is unknown.

        """
        newest = (
            select(func.max(EventRow.id))
            .where(EventRow.kind == _check_kind(kind), EventRow.task_id.is_not(None))
            .group_by(EventRow.task_id)
        )
        stmt = select(EventRow).where(EventRow.id.in_(newest)).order_by(EventRow.task_id)
        with self._backend.tx() as session:
            return {row.task_id: _record(row) for row in session.scalars(stmt) if row.task_id is not None}
