"""Registry of sites and resource pools, with health from heartbeats and replies.

Draft: draft-yang-dmsc-distributed-model-03, section 6.1.3 (service registration and
discovery: every node's address, version and health; nodes register themselves; a node
that stops answering goes offline) and section 6.3.8 (computing resource pools: a GPU
pool, a CPU pool, their capacities).

Health is not stored: it is computed from the last time a site was seen (heartbeat,
reply or registration) and from how many replies in a row it missed, by the pure
function :func:`health`, so a restart never leaves stale "online" flags behind.

Every site belongs to exactly one pool; define pools first with
:meth:`Registry.define_pool`. A pool's ``capacity`` is informational (the number of
sites it is sized for); the registry reports it next to the pool's membership and does
not refuse sites beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from dmsc_fed.control.db import Backend, PoolRow, SiteRow, as_utc
from dmsc_fed.control.errors import SiteKeyMismatchError, UnknownPoolError, UnknownSiteError

__all__ = [
    "HEALTH_STATES",
    "Health",
    "HealthPolicy",
    "PoolRecord",
    "Registry",
    "SiteRecord",
    "health",
]

Health = Literal["online", "suspect", "offline"]
HEALTH_STATES: tuple[Health, ...] = ("online", "suspect", "offline")
_RANK: dict[Health, int] = {"online": 0, "suspect": 1, "offline": 2}
_MAX_NODE_ID = 2**64 - 1


def health(
    *,
    last_seen: datetime | None,
    now: datetime,
    suspect_after_s: float,
    offline_after_s: float,
    missed_replies: int = 0,
    suspect_after_missed: int = 1,
    offline_after_missed: int = 3,
) -> Health:
    """Health of a site from its silence and its missed replies (draft 6.1.3).

    A site is ``"suspect"`` once it has been silent for ``suspect_after_s`` seconds or
    has missed ``suspect_after_missed`` replies in a row, and ``"offline"`` once silent
    for ``offline_after_s`` seconds or ``offline_after_missed`` missed replies; the worse
    of the two verdicts wins. Boundaries belong to the worse state (silent for exactly
    ``suspect_after_s`` is suspect). A ``last_seen`` in the future (clock skew) counts
    as just seen; never seen is offline.

    Parameters
    ----------
    last_seen
        Last heartbeat, reply or registration (timezone-aware), or None.
    now
        The current time (timezone-aware).
    suspect_after_s, offline_after_s
        Silence thresholds, ``0 < suspect_after_s <= offline_after_s``.
    missed_replies
        Replies missed in a row since the last one received.
    suspect_after_missed, offline_after_missed
        Missed-reply thresholds, ``1 <= suspect_after_missed <= offline_after_missed``.

    Raises
    ------
    ValueError
        On thresholds out of order, non-finite or non-positive, or negative ``missed_replies``.

    Examples
    --------
    >>> from datetime import datetime, timedelta, UTC
    >>> t0 = datetime(2025, 1, 1, tzinfo=UTC)
    >>> health(last_seen=t0, now=t0 + timedelta(seconds=45), suspect_after_s=30, offline_after_s=90)
    'suspect'

    """
    if not (math.isfinite(suspect_after_s) and math.isfinite(offline_after_s)):
        raise ValueError("health thresholds must be finite")
    if not 0 < suspect_after_s <= offline_after_s:
        raise ValueError(f"need 0 < suspect_after_s <= offline_after_s, got {suspect_after_s} and {offline_after_s}")
    if not 1 <= suspect_after_missed <= offline_after_missed:
        raise ValueError(
            "need 1 <= suspect_after_missed <= offline_after_missed, "
            f"got {suspect_after_missed} and {offline_after_missed}"
        )
    if missed_replies < 0:
        raise ValueError(f"missed_replies must be >= 0, got {missed_replies}")
    if last_seen is None:
        return "offline"
    silence = (as_utc(now) - as_utc(last_seen, name="last_seen")).total_seconds()
    by_time: Health = "offline" if silence >= offline_after_s else "suspect" if silence >= suspect_after_s else "online"
    by_replies: Health = (
        "offline"
        if missed_replies >= offline_after_missed
        else "suspect"
        if missed_replies >= suspect_after_missed
        else "online"
    )
    return by_time if _RANK[by_time] >= _RANK[by_replies] else by_replies


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds of :func:`health` used by a :class:`Registry` (draft 6.1.3, 6.3.7)."""

    suspect_after_s: float = 30.0
    offline_after_s: float = 120.0
    suspect_after_missed: int = 1
    offline_after_missed: int = 3

    def __post_init__(self) -> None:
        # Validate once, with a fixed time, so a bad policy fails when it is built.
        from dmsc_fed.control.db import utc_now

        t = utc_now()
        health(
            last_seen=t,
            now=t,
            suspect_after_s=self.suspect_after_s,
            offline_after_s=self.offline_after_s,
            suspect_after_missed=self.suspect_after_missed,
            offline_after_missed=self.offline_after_missed,
        )


@dataclass(frozen=True)
class PoolRecord:
    """A resource pool and how many sites it holds (draft 6.3.8)."""

    name: str
    device: str
    capacity: int
    description: str
    sites: int


@dataclass(frozen=True)
class SiteRecord:
    """A registered site with its capabilities and computed health (draft 6.1.3)."""

    name: str
    node_id: int | None
    software_version: str
    pool: str
    device: str
    gpu_memory_mb: int | None
    cpu_cores: int | None
    dataset_size: int | None
    key_fingerprint: str | None
    registered_at: datetime
    last_seen: datetime
    missed_replies: int
    health: Health


def _nonempty(value: str, *, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _nonneg(value: int | None, *, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    return value


class Registry:
    """Sites and pools of a :class:`~dmsc_fed.control.db.Store` (``store.registry``)."""

    def __init__(self, backend: Backend, *, policy: HealthPolicy) -> None:
        self._backend = backend
        self.policy = policy

    # ----------------------------------------------------------------- pools

    def define_pool(
        self, *, name: str, device: str, capacity: int, description: str = "", now: datetime | None = None
    ) -> PoolRecord:
        """Create a pool, or update the device, capacity and description of an existing one.

        Parameters
        ----------
        name
            Pool name, e.g. ``"gpu"``.
        device
            The kind of hardware, e.g. ``"cuda"`` or ``"cpu"``.
        capacity
            Number of sites the pool is sized for (>= 0).
        description
            Free text.
        now
            Creation time; default: the store's clock.

        """
        _nonempty(name, name="pool name")
        _nonempty(device, name="device")
        _nonneg(capacity, name="capacity")
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = session.scalar(select(PoolRow).where(PoolRow.name == name))
            if row is None:
                row = PoolRow(name=name, device=device, capacity=capacity, description=description, created_at=ts)
                session.add(row)
            else:
                row.device, row.capacity, row.description = device, capacity, description
            session.flush()
            return self._pool_record(session, row)

    def pools(self) -> list[PoolRecord]:
        """Every pool, by name."""
        with self._backend.tx() as session:
            rows = session.scalars(select(PoolRow).order_by(PoolRow.name)).all()
            return [self._pool_record(session, row) for row in rows]

    @staticmethod
    def _pool_record(session: Session, row: PoolRow) -> PoolRecord:
        count = len(session.scalars(select(SiteRow.id).where(SiteRow.pool_id == row.id)).all())
        return PoolRecord(
            name=row.name, device=row.device, capacity=row.capacity, description=row.description, sites=count
        )

    @staticmethod
    def _pool(session: Session, name: str) -> PoolRow:
        row = session.scalar(select(PoolRow).where(PoolRow.name == name))
        if row is None:
            known = ", ".join(session.scalars(select(PoolRow.name).order_by(PoolRow.name))) or "none defined"
            raise UnknownPoolError(f"unknown pool {name!r}; known pools: {known}")
        return row

    # ----------------------------------------------------------------- sites

    def register_site(
        self,
        *,
        name: str,
        node_id: int,
        software_version: str,
        pool: str,
        device: str = "cpu",
        gpu_memory_mb: int | None = None,
        cpu_cores: int | None = None,
        dataset_size: int | None = None,
        key_fingerprint: str | None = None,
        allow_key_change: bool = False,
        now: datetime | None = None,
    ) -> SiteRecord:
        """Register a site, or update it when it reconnects (upsert by name).

        A reconnecting site usually has a new Flower node id; the id moves to it, and any
        other site still holding that id loses it. Registering counts as being seen and
        clears missed replies.

        Parameters
        ----------
        name
            The site's stable name (its identity in the registry).
        node_id
            The Flower node id of its SuperNode (unsigned 64-bit).
        software_version
            The dmsc-fed version the site runs.
        pool
            Name of a defined pool.
        device, gpu_memory_mb, cpu_cores, dataset_size
            Capabilities the site declares.
        key_fingerprint
            Fingerprint of the site's public signing key.
        allow_key_change
            Accept a fingerprint different from the stored one (key rotation). Without it
            a changed key is refused: it may be another party claiming the site's name.
        now
            Time of registration; default: the store's clock.

        Raises
        ------
        UnknownPoolError
            If ``pool`` is not defined.
        SiteKeyMismatchError
            If the site is known with another key fingerprint and ``allow_key_change`` is off.
        ValueError
            On an empty name, a node id outside 0..2**64-1, or negative capabilities.

        """
        _nonempty(name, name="site name")
        _nonempty(software_version, name="software_version")
        _nonempty(device, name="device")
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id <= _MAX_NODE_ID:
            raise ValueError(f"node_id must be an integer in 0..2**64-1, got {node_id!r}")
        for value, label in (
            (gpu_memory_mb, "gpu_memory_mb"),
            (cpu_cores, "cpu_cores"),
            (dataset_size, "dataset_size"),
        ):
            _nonneg(value, name=label)
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            pool_row = self._pool(session, pool)
            row = session.scalar(select(SiteRow).where(SiteRow.name == name))
            key_changed = row is not None and row.key_fingerprint not in (None, key_fingerprint)
            if key_changed and not allow_key_change:
                assert row is not None
                raise SiteKeyMismatchError(
                    f"site {name!r} is registered with key fingerprint {row.key_fingerprint!r} but reconnected "
                    f"with {key_fingerprint!r}; refusing (pass allow_key_change=True after a key rotation)"
                )
            for other in session.scalars(select(SiteRow).where(SiteRow.node_id == str(node_id), SiteRow.name != name)):
                other.node_id = None
            if row is None:
                row = SiteRow(name=name, registered_at=ts)
                session.add(row)
            row.node_id = str(node_id)
            row.software_version = software_version
            row.pool_id = pool_row.id
            row.device = device
            row.gpu_memory_mb = gpu_memory_mb
            row.cpu_cores = cpu_cores
            row.dataset_size = dataset_size
            row.key_fingerprint = key_fingerprint
            row.last_seen = ts
            row.missed_replies = 0
            session.flush()
            return self._site_record(row, pool_row.name, ts)

    def heartbeat(self, *, site: str, now: datetime | None = None) -> SiteRecord:
        """Record a heartbeat of ``site``: it was seen now (draft 6.3.7 heartbeats).

        Raises
        ------
        UnknownSiteError
            If no site of that name is registered.

        """
        return self._observe(site, now, seen=True, missed=None)

    def reply_received(self, *, site: str, now: datetime | None = None) -> SiteRecord:
        """Record a reply of ``site``: it was seen now and its missed-reply count resets."""
        return self._observe(site, now, seen=True, missed=False)

    def reply_missed(self, *, site: str, now: datetime | None = None) -> SiteRecord:
        """Record that ``site`` did not reply in time (its missed-reply count grows by one)."""
        return self._observe(site, now, seen=False, missed=True)

    def _observe(self, site: str, now: datetime | None, *, seen: bool, missed: bool | None) -> SiteRecord:
        """Update ``site``: seen now (``seen``), and its missed replies reset (False) or grown by one (True)."""
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._site(session, site)
            if seen:
                row.last_seen = max(row.last_seen, ts)
            if missed is not None:
                row.missed_replies = row.missed_replies + 1 if missed else 0
            return self._site_record(row, self._pool_name(session, row), ts)

    def site(self, *, name: str, now: datetime | None = None) -> SiteRecord:
        """One site with its health at ``now``.

        Raises
        ------
        UnknownSiteError
            If no site of that name is registered.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = self._site(session, name)
            return self._site_record(row, self._pool_name(session, row), ts)

    def site_by_node(self, *, node_id: int, now: datetime | None = None) -> SiteRecord:
        """The site currently connected as Flower node ``node_id``.

        Raises
        ------
        UnknownSiteError
            If no site holds that node id.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            row = session.scalar(select(SiteRow).where(SiteRow.node_id == str(node_id)))
            if row is None:
                raise UnknownSiteError(f"no registered site is connected as Flower node {node_id}")
            return self._site_record(row, self._pool_name(session, row), ts)

    def sites(self, *, pool: str | None = None, now: datetime | None = None) -> list[SiteRecord]:
        """Every site (of ``pool``, if given) by name, with health computed at ``now``.

        Raises
        ------
        UnknownPoolError
            If ``pool`` is given and not defined.

        """
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            stmt = select(SiteRow, PoolRow.name).join(PoolRow, SiteRow.pool_id == PoolRow.id).order_by(SiteRow.name)
            if pool is not None:
                stmt = stmt.where(SiteRow.pool_id == self._pool(session, pool).id)
            return [self._site_record(row, pool_name, ts) for row, pool_name in session.execute(stmt)]

    def healthy_by_pool(self, *, now: datetime | None = None) -> dict[str, int]:
        """Number of ``"online"`` sites in every defined pool (0 for an empty pool)."""
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            counts = dict.fromkeys(session.scalars(select(PoolRow.name).order_by(PoolRow.name)), 0)
        for record in self.sites(now=ts):
            if record.health == "online":
                counts[record.pool] += 1
        return counts

    def healthy_count(self, *, pools: Collection[str] | None = None, now: datetime | None = None) -> int:
        """Number of ``"online"`` sites in ``pools`` (all pools when None).

        Raises
        ------
        UnknownPoolError
            If a pool in ``pools`` is not defined.

        """
        by_pool = self.healthy_by_pool(now=now)
        if pools is None:
            return sum(by_pool.values())
        if isinstance(pools, str):
            raise TypeError("pools must be a collection of pool names, not a single string")
        for name in pools:
            if name not in by_pool:
                raise UnknownPoolError(f"unknown pool {name!r}; known pools: {', '.join(by_pool) or 'none defined'}")
        return sum(by_pool[name] for name in set(pools))

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _site(session: Session, name: str) -> SiteRow:
        row = session.scalar(select(SiteRow).where(SiteRow.name == name))
        if row is None:
            raise UnknownSiteError(f"unknown site {name!r}; register it first")
        return row

    @staticmethod
    def _pool_name(session: Session, row: SiteRow) -> str:
        pool = session.get(PoolRow, row.pool_id)
        assert pool is not None  # foreign key
        return pool.name

    def _site_record(self, row: SiteRow, pool_name: str, now: datetime) -> SiteRecord:
        p = self.policy
        return SiteRecord(
            name=row.name,
            node_id=int(row.node_id) if row.node_id is not None else None,
            software_version=row.software_version,
            pool=pool_name,
            device=row.device,
            gpu_memory_mb=row.gpu_memory_mb,
            cpu_cores=row.cpu_cores,
            dataset_size=row.dataset_size,
            key_fingerprint=row.key_fingerprint,
            registered_at=row.registered_at,
            last_seen=row.last_seen,
            missed_replies=row.missed_replies,
            health=health(
                last_seen=row.last_seen,
                now=as_utc(now),
                suspect_after_s=p.suspect_after_s,
                offline_after_s=p.offline_after_s,
                missed_replies=row.missed_replies,
                suspect_after_missed=p.suspect_after_missed,
                offline_after_missed=p.offline_after_missed,
            ),
        )
