"""Fixtures of the control-plane store tests: a fake clock and a fresh database per test.

Store tests run on a SQLite file under ``tmp_path``, and also on PostgreSQL when
``DMSC_FED_TEST_PG_URL`` names a server (an admin URL, e.g.
``postgresql+psycopg2://dmsc@127.0.0.1:55432/postgres``): each test then gets its own
schema, created before and dropped after it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dmsc_fed.control import Store, sqlite_url

PG_ENV = "DMSC_FED_TEST_PG_URL"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "control.db")
        return
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against")
    from sqlalchemy import create_engine, make_url

    # A fresh schema per test (much faster than a database per test); the URL puts it
    # first on the search path, so the store, its tables and alembic_version live there.
    name = f"dmsc_test_{uuid.uuid4().hex[:16]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        url = make_url(admin).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        engine.dispose()


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[Store]:
    s = Store.open(db_url, clock=clock, seed=0)
    try:
        yield s
    finally:
        s.close()
