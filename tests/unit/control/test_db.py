"""Opening, migrating and reopening the store; bad URLs and schemas (draft 6.4.2)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from dmsc_fed.control import (
    DEFAULT_URL,
    MigrationError,
    SchemaTooNewError,
    Store,
    StoreError,
    StoreUnreachableError,
    current_revision,
    head_revision,
    migrate,
    sqlite_url,
)
from dmsc_fed.control.db import MIGRATIONS_DIR, Base
from dmsc_fed.errors import DmscError

from .conftest import FakeClock


def test_store_error_has_its_own_exit_code() -> None:
    from dmsc_fed import errors
    from dmsc_fed.control import errors as control_errors

    assert issubclass(StoreError, DmscError)
    assert StoreError.exit_code == 10
    codes = {
        c.exit_code
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, DmscError) and c is not StoreError
    }
    assert 10 not in codes
    for name in control_errors.__all__:
        cls = getattr(control_errors, name)
        assert issubclass(cls, StoreError)
        assert cls.exit_code == 10


def test_open_creates_the_schema_at_head(db_url: str, clock: FakeClock) -> None:
    assert current_revision(url=db_url) is None
    with Store.open(db_url, clock=clock) as store:
        assert store.revision() == head_revision() == "0002"
    assert current_revision(url=db_url) == "0002"


def test_migrations_and_models_agree(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    with Store.open(sqlite_url(tmp_path / "c.db")) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_default_url_is_a_sqlite_file_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert DEFAULT_URL.startswith("sqlite:///")
    with Store.open() as store:
        assert store.url == DEFAULT_URL
    assert (tmp_path / DEFAULT_URL.removeprefix("sqlite:///")).is_file()


def test_a_restart_keeps_every_task_and_model_version(db_url: str, clock: FakeClock) -> None:
    with Store.open(db_url, clock=clock, seed=1) as store:
        store.registry.define_pool(name="gpu", device="cuda", capacity=2)
        store.registry.register_site(name="a", node_id=11, software_version="0.1", pool="gpu", key_fingerprint="k")
        ids = [
            store.queue.submit(
                kind="train", config_json=f'{{"n": {i}}}', submitter="alice", priority=i, pools_needed=["gpu"]
            )
            for i in range(4)
        ]
        store.queue.mark_running(task_id=ids[1])
        store.queue.mark_running(task_id=ids[2])
        store.queue.mark_failed(task_id=ids[2], exc_type="OSError", message="disk", log_tail="...")
        versions = [
            store.models.add_version(
                task_id=ids[1],
                round=r,
                arrays={"w": np.full((2, 2), r, dtype=np.float32)},
                metrics={"accuracy": r / 10},
                sites=["a"],
                epsilon={"a": 0.1 * r},
            )
            for r in (1, 2, 3)
        ]
        versions.append(store.models.rollback(task_id=ids[1], version_id=versions[0].id))
        tasks, sites, events = store.queue.tasks(), store.registry.sites(), store.events.events()
        failures = store.queue.failures(task_id=ids[2])

    with Store.open(db_url, clock=clock, seed=1) as again:  # a new engine and sessions on the same database
        assert again.queue.tasks() == tasks
        assert [t.state for t in tasks] == ["queued", "running", "failed", "queued"]
        assert again.queue.failures(task_id=ids[2]) == failures
        assert again.registry.sites() == sites
        assert again.models.versions(task_id=ids[1]) == versions
        assert again.models.latest(task_id=ids[1]) == versions[-1]
        content = again.models.load(version_id=versions[-1].id)
        assert isinstance(content, dict)
        np.testing.assert_array_equal(content["w"], np.full((2, 2), 1))
        assert again.events.events() == events
        assert again.queue.next_ready(policy="priority", healthy_by_pool={"gpu": 1}).id == ids[3]  # type: ignore[union-attr]


def test_two_stores_on_one_sqlite_file_see_each_other(tmp_path: Path, clock: FakeClock) -> None:
    url = sqlite_url(tmp_path / "shared.db")
    with Store.open(url, clock=clock) as writer, Store.open(url, clock=clock) as reader:
        writer.registry.define_pool(name="cpu", device="cpu", capacity=1)
        task_id = writer.queue.submit(kind="evaluate", config_json="{}", submitter="x")
        assert reader.queue.get(task_id=task_id).kind == "evaluate"


# --------------------------------------------------------------------------- unreachable


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("sqlite:////nonexistent-dir-dmsc/sub/c.db", "directory /nonexistent-dir-dmsc/sub does not exist"),
        ("postgresql+psycopg2://fed:s3cret@127.0.0.1:1/control", r"fed:\*\*\*@127.0.0.1:1/control"),
        ("not a url", "invalid database URL"),
        ("nosuchdb://fed:s3cret@host/db", r"nosuchdb://fed:\*\*\*@host/db"),
    ],
)
def test_an_unusable_url_is_a_clear_error_with_the_password_masked(url: str, match: str) -> None:
    with pytest.raises(StoreUnreachableError, match=match) as info:
        Store.open(url)
    assert "s3cret" not in str(info.value)
    assert info.value.exit_code == 10


def test_a_sqlite_path_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreUnreachableError, match="cannot reach the store"):
        Store.open(sqlite_url(tmp_path))


# --------------------------------------------------------------------------- schema versions


_OLD_HASH = "e8ff7601d0f09b7309e882542b3e035bdd77f51ea5ea5ec1b3c86d4af66c0edc"  # content_hash(b"abc")


def _rows_at_0001(url: str) -> None:
    """Fill a revision-0001 database the way an older dmsc-fed would have."""
    engine = create_engine(url)
    ts = "2024-06-01 10:00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO pools (id, name, device, capacity, description, created_at)"
                " VALUES (1, 'gpu', 'cuda', 2, '', :ts)"
            ),
            {"ts": ts},
        )
        conn.execute(
            text(
                "INSERT INTO sites (id, name, node_id, software_version, pool_id, device,"
                " registered_at, last_seen, missed_replies) VALUES (1, 'a', '42', '0.0.9', 1, 'cuda', :ts, :ts, 0)"
            ),
            {"ts": ts},
        )
        conn.execute(
            text(
                "INSERT INTO tasks (id, kind, state, config_json, priority, weight, submitter, attempts, max_attempts,"
                " pools_needed, min_sites, submitted_at, updated_at)"
                " VALUES (1, 'train', 'queued', '{}', 0, 1.0, 'old', 0, 3, '[\"gpu\"]', 1, :ts, :ts)"
            ),
            {"ts": ts},
        )
        conn.execute(
            text(
                "INSERT INTO model_blobs (content_hash, format, size_bytes, data, created_at)"
                " VALUES (:h, 'bytes', 3, :d, :ts)"
            ),
            {"h": _OLD_HASH, "d": b"abc", "ts": ts},
        )
        conn.execute(
            text(
                "INSERT INTO model_versions (id, task_id, round, content_hash, metrics, sites, epsilon, created_at)"
                " VALUES (1, '1', 4, :h, '{\"accuracy\": 0.9}', '[\"a\"]', '{}', :ts)"
            ),
            {"h": _OLD_HASH, "ts": ts},
        )
    engine.dispose()


def _count(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def test_an_older_database_is_upgraded_in_place_and_keeps_its_rows(
    db_url: str, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert migrate(url=db_url, revision="0001") == "0001"
    _rows_at_0001(db_url)
    with Store.open(db_url, clock=clock) as store:
        assert store.revision() == "0002"
        task = store.queue.get(task_id=1)
        assert (task.state, task.submitter, task.pools_needed) == ("queued", "old", ("gpu",))
        site = store.registry.site(name="a")
        assert (site.node_id, site.software_version, site.pool) == (42, "0.0.9", "gpu")
        [version] = store.models.versions(task_id=1)
        assert (version.round, version.metrics) == (4, {"accuracy": 0.9})
        assert store.models.load(version_id=1) == b"abc"
        store.events.log_event(kind="task", task_id=1, note="the new table works")
    backups = sorted(tmp_path.glob("*.bak"))
    if db_url.startswith("sqlite"):  # the file was copied aside first, at its old revision
        assert [b.name for b in backups] == ["control.db.rev0001-20250101T120000000000.bak"]
        with sqlite3.connect(backups[0]) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
            assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone() == (1,)
    else:  # PostgreSQL is backed up with its own tools; nothing is written locally
        assert backups == []


def test_a_failed_upgrade_is_rolled_back_and_loses_nothing(db_url: str) -> None:
    migrate(url=db_url, revision="0001")
    _rows_at_0001(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:  # something in the way of revision 0002
        conn.exec_driver_sql("CREATE TABLE events (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO events (x) VALUES (7)")
    engine.dispose()
    with pytest.raises(MigrationError, match="from revision '0001' to '0002' failed and was rolled back") as info:
        Store.open(db_url)
    assert info.value.exit_code == 10
    assert current_revision(url=db_url) == "0001"
    for table in ("pools", "sites", "tasks", "model_blobs", "model_versions", "events"):
        assert _count(db_url, table) == 1, table
    engine = create_engine(db_url)
    with engine.connect() as conn:  # 0002's index on tasks was rolled back with the rest
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("tasks")}
    engine.dispose()
    assert "ix_tasks_state_not_before" not in indexes


def test_a_newer_schema_is_refused_and_left_untouched(db_url: str, clock: FakeClock) -> None:
    with Store.open(db_url, clock=clock) as store:
        store.registry.define_pool(name="gpu", device="cuda", capacity=1)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(SchemaTooNewError, match=r"revision '0099'.*newer dmsc-fed") as info:
        Store.open(db_url, clock=clock)
    assert info.value.exit_code == 10
    assert current_revision(url=db_url) == "0099"
    assert _count(db_url, "pools") == 1


def test_migrating_backwards_or_to_an_unknown_revision_is_refused(db_url: str) -> None:
    migrate(url=db_url)
    with pytest.raises(MigrationError, match="downgrades are not supported"):
        migrate(url=db_url, revision="0001")
    with pytest.raises(MigrationError, match="unknown schema revision 'zzz'"):
        migrate(url=db_url, revision="zzz")
    assert current_revision(url=db_url) == "0002"


def test_migrations_ship_as_packages() -> None:
    import importlib.util

    from setuptools import find_packages

    root = MIGRATIONS_DIR.parents[2]
    packages = find_packages(where=str(root), include=["dmsc_fed*"])
    assert {"dmsc_fed.control", "dmsc_fed.control.migrations", "dmsc_fed.control.migrations.versions"} <= set(packages)
    assert importlib.util.find_spec("dmsc_fed.control.migrations.versions") is not None
    assert sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("0*.py")) == [
        "0001_initial.py",
        "0002_events_and_queue_index.py",
    ]
