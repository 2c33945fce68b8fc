"""Structured event log: kinds, payloads, filters, JSON-lines sink (draft 6.2.3)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dmsc_fed.control import EVENT_KINDS, IllegalTransitionError, Store

from .conftest import FakeClock


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_every_kind_is_accepted(store: Store, clock: FakeClock, kind: str) -> None:
    record = store.events.log_event(kind=kind, task_id=5, detail="x")  # type: ignore[arg-type]
    assert (record.kind, record.task_id, record.ts, record.payload) == (kind, "5", clock.now, {"detail": "x"})
    assert store.events.events() == [record]


def test_kinds_are_exactly_the_documented_set() -> None:
    assert set(EVENT_KINDS) == {
        "segmentation",
        "allocation",
        "round",
        "aggregation",
        "fault",
        "privacy",
        "task",
        "recovery",
    }


def test_unknown_kind_lists_the_known_ones(store: Store) -> None:
    with pytest.raises(ValueError, match="segmentation, allocation, round"):
        store.events.log_event(kind="gossip")  # type: ignore[arg-type]
    assert store.events.events() == []


@pytest.mark.parametrize("payload", [{"x": object()}, {"x": float("nan")}, {"x": {1, 2}}])
def test_payload_must_be_finite_json(store: Store, payload: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="JSON"):
        store.events.log_event(kind="round", **payload)
    assert store.events.events() == []


def test_payload_is_stored_as_json(store: Store) -> None:
    record = store.events.log_event(
        kind="privacy", site="a", epsilon=1.25, delta=1e-5, spent=[0.5, 0.75], nested={"ok": True, "none": None}
    )
    assert record.payload == {
        "site": "a",
        "epsilon": 1.25,
        "delta": 1e-5,
        "spent": [0.5, 0.75],
        "nested": {"ok": True, "none": None},
    }
    assert store.events.events(kind="privacy")[0].payload == record.payload


def test_filters(store: Store, clock: FakeClock) -> None:
    a = store.events.log_event(kind="round", task_id="t/1", round=1)
    clock.advance(10)
    b = store.events.log_event(kind="allocation", task_id="t/1", site="a", segment=0)
    clock.advance(10)
    c = store.events.log_event(kind="round", task_id="t/2", round=1)
    assert store.events.events() == [a, b, c]
    assert store.events.events(kind="round") == [a, c]
    assert store.events.events(task_id="t/1") == [a, b]
    assert store.events.events(since=clock.now - timedelta(seconds=10)) == [b, c]
    assert store.events.events(limit=2) == [a, b]
    with pytest.raises(ValueError):
        store.events.events(limit=-1)


def test_json_lines_sink_gets_committed_events_only(db_url: str, clock: FakeClock, tmp_path: Path) -> None:
    sink = tmp_path / "events.jsonl"
    with Store.open(db_url, clock=clock, event_sink=sink) as store:
        store.registry.define_pool(name="cpu", device="cpu", capacity=1)
        task_id = store.queue.submit(kind="train", config_json="{}", submitter="bob")
        store.events.log_event(kind="segmentation", task_id=task_id, mode="block", blocks=4)
        with pytest.raises(IllegalTransitionError):
            store.queue.mark_succeeded(task_id=task_id)  # rolled back: no line
        stored = [e.to_json() for e in store.events.events()]
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert lines == stored
    assert [(line["kind"], line["payload"].get("action")) for line in lines] == [
        ("task", "submitted"),
        ("segmentation", None),
    ]
    assert lines[1] == {
        "id": lines[1]["id"],
        "ts": clock.now.isoformat(),
        "kind": "segmentation",
        "task_id": str(task_id),
        "payload": {"mode": "block", "blocks": 4},
    }


def test_a_failing_sink_does_not_fail_the_committed_operation(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    from dmsc_fed.control import sqlite_url

    with Store.open(sqlite_url(tmp_path / "c.db"), clock=clock, event_sink=tmp_path) as store:  # a directory
        record = store.events.log_event(kind="round", round=1)
        assert store.events.events() == [record]
    assert "could not append 1 event(s)" in caplog.text
