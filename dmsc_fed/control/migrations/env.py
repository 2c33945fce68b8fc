"""Alembic environment: run migrations on the connection :func:`dmsc_fed.control.db.migrate` passes.

Draft section 6.4.2 (database). Only online mode is supported: the caller opens the
connection and its transaction, so the whole upgrade commits or rolls back as one.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from dmsc_fed.control.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; autogenerate batch ops
        transactional_ddl=True,  # SQLite too: our engine emits BEGIN, so DDL rolls back
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    """Run the migrations on the caller's connection (or on ``sqlalchemy.url`` if none)."""
    if context.is_offline_mode():
        raise RuntimeError("offline (SQL script) migrations are not supported; run them on a database")
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from dmsc_fed.control.db import _create_engine

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migration environment")
    engine = _create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


run_migrations()
