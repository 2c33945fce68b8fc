"""Persistent store of the control plane: schema, migrations and the :class:`Store` facade.

Draft: draft-yang-dmsc-distributed-model-03, section 6.4.2 (database: consistent storage,
backups, failover) for the store itself, and the sections each table serves:

========================  =====================================================
table                     draft section
========================  =====================================================
``pools``, ``sites``      6.1.3 service registration, 6.3.8 resource pools
``tasks``                 6.2.1 task management
``task_failures``         6.2.2 exception task queue
``events``                6.2.3 log management
``model_blobs``,          6.2.4 model storage, 6.3.2 "latest version"
``model_versions``
========================  =====================================================

A SQLite file is the default (WAL journal, foreign keys on); PostgreSQL works by URL
(``postgresql+psycopg2://user:password@host/db``; ``pip install psycopg2-binary``).
:meth:`Store.open` upgrades the schema to the newest Alembic revision shipped in
``dmsc_fed/control/migrations`` (no ``alembic.ini`` needed), inside one transaction, after
copying a SQLite file aside, so nothing already stored is lost when it fails.

Model weights are stored *in the database* (table ``model_blobs``, content-addressed by
their sha256 hash), not in files next to it, because then (a) a version row and its bytes
are written in one transaction, so a crash never leaves a version without weights or
weights without a version; (b) one backup of the database (a copy of the SQLite file, a
``pg_dump``) is a complete backup, and PostgreSQL failover carries the models along
(6.4.2); (c) a rollback re-uses the same blob instead of copying it. The models this
project trains are small (kilobytes to a few megabytes), well within what SQLite and
PostgreSQL ``bytea`` handle; a file or object store could replace the blob table later
without changing the :mod:`dmsc_fed.control.models` API.

Times are timezone-aware UTC datetimes everywhere in the API (stored as naive UTC); they
come from an injectable clock so that tests never sleep.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from dmsc_fed.control.errors import MigrationError, SchemaTooNewError, StoreError, StoreUnreachableError

if TYPE_CHECKING:
    from dmsc_fed.control.events import EventLog
    from dmsc_fed.control.models import ModelStore
    from dmsc_fed.control.queue import TaskQueue
    from dmsc_fed.control.registry import HealthPolicy, Registry

__all__ = [
    "DEFAULT_URL",
    "MIGRATIONS_DIR",
    "Backend",
    "Base",
    "Clock",
    "EventRow",
    "ModelBlobRow",
    "ModelVersionRow",
    "PoolRow",
    "SiteRow",
    "Store",
    "TaskFailureRow",
    "TaskRow",
    "as_utc",
    "current_revision",
    "head_revision",
    "mask_url",
    "migrate",
    "sqlite_url",
    "utc_now",
]

_log = logging.getLogger(__name__)

DEFAULT_URL: Final = "sqlite:///dmsc-fed-control.db"
"""The store used when no URL is given: a SQLite file in the working directory."""

MIGRATIONS_DIR: Final = Path(__file__).resolve().with_name("migrations")
"""Alembic script directory shipped inside the package (a regular package, so wheels carry it)."""

Clock = Callable[[], datetime]
"""A callable returning the current time as a timezone-aware datetime."""


def utc_now() -> datetime:
    """The default clock: the current time in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime, *, name: str = "now") -> datetime:
    """Return ``value`` converted to UTC; reject a naive datetime.

    Parameters
    ----------
    value
        A timezone-aware datetime.
    name
        The parameter name, for the error message.

    Raises
    ------
    ValueError
        If ``value`` is naive (no timezone): the store cannot tell what time it means.

    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def sqlite_url(path: Path | str) -> str:
    """The SQLAlchemy URL of a SQLite file at ``path`` (made absolute)."""
    return f"sqlite:///{Path(path).resolve()}"


_PASSWORD_IN_URL = re.compile(r"^([^:/?#]+://[^:/@?#]*):.*@", re.DOTALL)
_PASSWORD_IN_QUERY = re.compile(r"(?i)([?&]password=)[^&]*")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs.

    Everything between ``user:`` and the last ``@`` is masked, so a password holding an
    unescaped ``@`` does not leak either; a ``password=`` query parameter is masked too.

    Examples
    --------
    >>> mask_url("postgresql://fed:s3cret@db.example:5432/control")
    'postgresql://fed:***@db.example:5432/control'

    """
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1:***@", url))


# --------------------------------------------------------------------------- schema


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime, stored as a naive UTC ``TIMESTAMP`` on every backend."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to naive UTC for storage."""
        if value is None:
            return None
        return as_utc(value, name="timestamp").replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to the stored naive value."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


NAMING_CONVENTION: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every control-plane table (constraint names are deterministic)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PoolRow(Base):
    """A computing resource pool, e.g. a GPU pool and a CPU pool (draft 6.3.8)."""

    __tablename__ = "pools"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    device: Mapped[str] = mapped_column(String(20))
    capacity: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SiteRow(Base):
    """A registered site (a Flower SuperNode) with its capabilities and liveness (draft 6.1.3).

    ``node_id`` is the Flower node id as decimal text: Flower node ids are unsigned 64-bit
    integers, which do not fit a signed ``BIGINT`` (and SQLite would silently turn them
    into floats).
    """

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    node_id: Mapped[str | None] = mapped_column(String(20), index=True)
    software_version: Mapped[str] = mapped_column(String(100))
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id"), index=True)
    device: Mapped[str] = mapped_column(String(20))
    gpu_memory_mb: Mapped[int | None] = mapped_column(Integer)
    cpu_cores: Mapped[int | None] = mapped_column(Integer)
    dataset_size: Mapped[int | None] = mapped_column(BigInteger)
    key_fingerprint: Mapped[str | None] = mapped_column(String(200))
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    missed_replies: Mapped[int] = mapped_column(Integer, default=0)


class TaskRow(Base):
    """A training or evaluation task in the persistent queue (draft 6.2.1)."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_state_not_before", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    config_json: Mapped[str] = mapped_column(Text)
    segmentation_json: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float)
    submitter: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[float | None] = mapped_column(Float)
    pools_needed: Mapped[list[str]] = mapped_column(JSON)
    min_sites: Mapped[int] = mapped_column(Integer)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TaskFailureRow(Base):
    """One failed or hung attempt of a task: an exception-queue entry (draft 6.2.2)."""

    __tablename__ = "task_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    exc_type: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)
    log_tail: Mapped[str] = mapped_column(Text)
    hung: Mapped[bool] = mapped_column(Boolean)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class ModelBlobRow(Base):
    """The content of one or more model versions, addressed by its sha256 hash (draft 6.2.4).

    ``format`` is ``"safetensors"`` (named numpy arrays) or ``"bytes"`` (an opaque payload,
    e.g. a serialized ciphertext the server cannot read).
    """

    __tablename__ = "model_blobs"

    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(20))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ModelVersionRow(Base):
    """One aggregated global model with its lineage (draft 6.2.4, 6.3.2, 6.3.7)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(200), index=True)
    round: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(ForeignKey("model_blobs.content_hash"), index=True)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    sites: Mapped[list[str]] = mapped_column(JSON)
    epsilon: Mapped[dict[str, float]] = mapped_column(JSON)
    he_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    rolled_back_from: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))


class EventRow(Base):
    """One structured event of the log (draft 6.2.3). Added in revision 0002."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    task_id: Mapped[str | None] = mapped_column(String(200), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


# --------------------------------------------------------------------------- engine


def _reason(exc: BaseException) -> str:
    """The driver's own message of a database error, on one line."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return " ".join(text.split()) or type(exc).__name__


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL, or None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _create_engine(url: str) -> Engine:
    """Create the engine for ``url``; SQLite gets WAL, foreign keys and real transactions."""
    masked = mask_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StoreUnreachableError(f"invalid database URL {masked!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        db_file = _sqlite_file(parsed)
        if db_file is not None and not db_file.parent.is_dir():
            raise StoreUnreachableError(
                f"cannot reach the store at {masked}: directory {db_file.parent} does not exist"
            )
    elif backend == "postgresql" and parsed.get_driver_name() == "psycopg2" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise StoreUnreachableError(f"cannot use the database URL {masked}: {exc}") from exc
    except ImportError as exc:
        hint = " (for PostgreSQL: pip install psycopg2-binary)" if backend == "postgresql" else ""
        raise StoreUnreachableError(f"cannot use the database URL {masked}: {exc}{hint}") from exc
    if backend == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    """WAL journal, foreign keys, and SQLAlchemy-emitted BEGIN (transactional DDL).

    The sqlite3 driver of Python < 3.12 does not begin a transaction before DDL or
    SELECT; SQLAlchemy's documented recipe takes over BEGIN so that a migration and every
    store operation is atomic.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def _ping(engine: Engine, masked: str) -> None:
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        raise StoreUnreachableError(f"cannot reach the store at {masked}: {_reason(exc)}") from exc


# --------------------------------------------------------------------------- migrations


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest schema revision this version of dmsc-fed knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise MigrationError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def _current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def current_revision(*, url: str) -> str | None:
    """The schema revision of the database at ``url`` (None when it has no schema yet).

    Raises
    ------
    StoreError
        If the database cannot be reached.

    """
    engine = _create_engine(url)
    try:
        _ping(engine, mask_url(url))
        return _current_revision(engine)
    finally:
        engine.dispose()


def _backup_sqlite(engine: Engine, *, revision: str, now: datetime) -> Path | None:
    """Copy a SQLite file aside (online backup API, safe with WAL) before an upgrade.

    Other backends have their own backup tools (``pg_dump``); nothing is written for them.
    """
    if engine.dialect.name != "sqlite":
        return None
    db_file = _sqlite_file(engine.url)
    if db_file is None:
        return None
    dest = db_file.with_name(f"{db_file.name}.rev{revision}-{now.strftime('%Y%m%dT%H%M%S%f')}.bak")
    with engine.connect() as connection:
        source = connection.connection.driver_connection
        if not isinstance(source, sqlite3.Connection):  # pragma: no cover - other SQLite drivers
            return None
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
        finally:
            target.close()
    return dest


def _migrate(engine: Engine, *, masked: str, revision: str, backup: bool, now: datetime) -> str:
    """Upgrade ``engine``'s database to ``revision`` in one transaction; return the new revision."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    config = _alembic_config()
    script = ScriptDirectory.from_config(config)
    head = head_revision()
    current = _current_revision(engine)
    if current is not None:
        try:
            script.get_revision(current)
        except CommandError as exc:
            raise SchemaTooNewError(
                f"the store at {masked} has schema revision {current!r}, which this dmsc-fed does not know "
                f"(it knows up to {head!r}); it was written by a newer dmsc-fed: upgrade dmsc-fed. "
                "Nothing was changed."
            ) from exc
    try:
        target = head if revision == "head" else script.get_revision(revision).revision
    except (CommandError, AttributeError) as exc:
        raise MigrationError(f"unknown schema revision {revision!r} (known up to {head!r})") from exc
    if current == target:
        return target
    if current is not None and target in {r.revision for r in script.iterate_revisions(current, "base")}:
        raise MigrationError(
            f"the store at {masked} is at schema revision {current!r}, newer than {target!r}; "
            "downgrades are not supported (restore a backup instead). Nothing was changed."
        )
    if current is not None and backup:
        _backup_sqlite(engine, revision=current, now=now)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, target)
    except (SQLAlchemyError, CommandError) as exc:
        raise MigrationError(
            f"upgrading the store at {masked} from revision {current!r} to {target!r} failed and was rolled "
            f"back, nothing stored was lost: {_reason(exc)}"
        ) from exc
    return target


def migrate(*, url: str, revision: str = "head", backup: bool = True, clock: Clock = utc_now) -> str:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest) and return it.

    Parameters
    ----------
    url
        SQLAlchemy database URL.
    revision
        Target revision id, or ``"head"``.
    backup
        Copy a SQLite file aside (``<file>.rev<old>-<time>.bak``) before upgrading a
        database that already has a schema.
    clock
        Time source for the backup name.

    Raises
    ------
    StoreError
        :class:`~dmsc_fed.control.errors.StoreUnreachableError` if the URL cannot be used,
        :class:`~dmsc_fed.control.errors.SchemaTooNewError` if the database is newer than
        this code, :class:`~dmsc_fed.control.errors.MigrationError` if the upgrade fails or
        goes backwards (it is rolled back).

    """
    masked = mask_url(url)
    engine = _create_engine(url)
    try:
        _ping(engine, masked)
        return _migrate(engine, masked=masked, revision=revision, backup=backup, now=as_utc(clock()))
    except DBAPIError as exc:
        raise StoreError(f"store {masked}: {_reason(exc)}") from exc
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- backend


@dataclass
class Backend:
    """What every part of the store shares: engine, sessions, clock and event sink.

    Not part of the public API; use :class:`Store`.
    """

    engine: Engine
    url: str
    clock: Clock
    event_sink: Path | None = None
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def now(self, now: datetime | None = None) -> datetime:
        """``now`` in UTC if given, else the clock's time."""
        return as_utc(now if now is not None else self.clock())

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on any error.

        Database errors become :class:`StoreError` naming the (masked) URL. Events added
        in the transaction reach the JSON-lines sink only after the commit.
        """
        pending: list[dict[str, Any]] = []
        try:
            with self.sessions.begin() as session:
                session.info["pending_events"] = pending
                yield session
        except DBAPIError as exc:
            raise StoreError(f"store {self.url}: {_reason(exc)}") from exc
        if self.event_sink is not None and pending:
            from dmsc_fed.runfiles import append_jsonl

            try:
                for line in pending:
                    append_jsonl(self.event_sink, line)
            except OSError as exc:  # the database holds the events; the file is a copy
                _log.warning("could not append %d event(s) to %s: %s", len(pending), self.event_sink, exc)


# --------------------------------------------------------------------------- facade


class Store:
    """The control plane's persistent store: registry, task queue, model store and event log.

    Open one with :meth:`Store.open`; it is a context manager that disposes of its engine.

    Attributes
    ----------
    registry
        Sites, pools and health (draft 6.1.3, 6.3.8).
    queue
        Task queue and exception queue (draft 6.2.1, 6.2.2).
    models
        Model versions with lineage (draft 6.2.4, 6.3.2).
    events
        Structured event log (draft 6.2.3).

    """

    registry: Registry
    queue: TaskQueue
    models: ModelStore
    events: EventLog

    def __init__(self, backend: Backend, *, seed: int | None = None, health_policy: HealthPolicy | None = None) -> None:
        import random

        from dmsc_fed.control.events import EventLog
        from dmsc_fed.control.models import ModelStore
        from dmsc_fed.control.queue import TaskQueue
        from dmsc_fed.control.registry import HealthPolicy, Registry

        self._backend = backend
        self.registry = Registry(backend, policy=health_policy or HealthPolicy())
        self.queue = TaskQueue(backend, rng=random.Random(seed))
        self.models = ModelStore(backend)
        self.events = EventLog(backend)

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        clock: Clock | None = None,
        event_sink: Path | str | None = None,
        seed: int | None = None,
        health_policy: HealthPolicy | None = None,
        backup: bool = True,
    ) -> Store:
        """Open (creating or upgrading as needed) the store at ``url``.

        Parameters
        ----------
        url
            SQLAlchemy URL; default :data:`DEFAULT_URL` (a SQLite file in the working
            directory). ``postgresql+psycopg2://...`` for PostgreSQL.
        clock
            Time source (default: :func:`utc_now`); tests inject a fake one.
        event_sink
            Optional JSON-lines file every event is also appended to.
        seed
            Seed of the random draw of the ``"weighted"`` dispatch policy.
        health_policy
            Thresholds of site health (default :class:`~dmsc_fed.control.registry.HealthPolicy`).
        backup
            Copy a SQLite file aside before upgrading its schema.

        Raises
        ------
        StoreError
            If the URL cannot be used or reached, the schema is newer than this code, or
            the upgrade fails (then it is rolled back). Messages name the URL with its
            password masked.

        """
        url = url or DEFAULT_URL
        masked = mask_url(url)
        the_clock = clock or utc_now
        engine = _create_engine(url)
        try:
            _ping(engine, masked)
            _migrate(engine, masked=masked, revision="head", backup=backup, now=as_utc(the_clock()))
        except DBAPIError as exc:
            engine.dispose()
            raise StoreError(f"store {masked}: {_reason(exc)}") from exc
        except BaseException:
            engine.dispose()
            raise
        sink = Path(event_sink) if event_sink is not None else None
        backend = Backend(engine=engine, url=masked, clock=the_clock, event_sink=sink)
        return cls(backend, seed=seed, health_policy=health_policy)

    @property
    def url(self) -> str:
        """The store's URL, password masked."""
        return self._backend.url

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics; use the typed APIs for data)."""
        return self._backend.engine

    def revision(self) -> str | None:
        """The schema revision of the database."""
        return _current_revision(self._backend.engine)

    def close(self) -> None:
        """Release every connection; the store must not be used afterwards."""
        self._backend.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
