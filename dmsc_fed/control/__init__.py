"""Control plane's persistent store: registry, task queue, exception queue, model store, event log.

Draft: draft-yang-dmsc-distributed-model-03, sections 6.1.3 (registry), 6.2.1 (task
management), 6.2.2 (exception task queue), 6.2.3 (log management), 6.2.4 and 6.3.2
(model storage), 6.3.8 (resource pools) and 6.4.2 (database); API tokens and rate
limits of the control API (6.1.2) are in :mod:`dmsc_fed.control.auth`, the API itself
in :mod:`dmsc_fed.control.api` (FastAPI, imported only there) and its Prometheus
collector in :mod:`dmsc_fed.control.metrics`.

Importing this package imports SQLAlchemy (not Alembic, numpy's safetensors or a
database driver, which load on first use); ``import dmsc_fed`` does not import it.

Examples
--------
>>> from dmsc_fed.control import Store, sqlite_url
>>> with Store.open(sqlite_url("control.db")) as store:  # doctest: +SKIP
...     store.registry.define_pool(name="gpu", device="cuda", capacity=4)
...     task_id = store.queue.submit(kind="train", config_json="{}", submitter="alice", pools_needed=["gpu"])

"""

from __future__ import annotations

from dmsc_fed.control.auth import RateLimiter, RateSpec, TokenSet, create_token, load_tokens, revoke_token
from dmsc_fed.control.db import DEFAULT_URL, Store, current_revision, head_revision, mask_url, migrate, sqlite_url
from dmsc_fed.control.errors import (
    ContentHashMismatchError,
    IllegalTransitionError,
    MigrationError,
    SchemaTooNewError,
    SiteKeyMismatchError,
    StoreError,
    StoreUnreachableError,
    UnknownPoolError,
    UnknownSiteError,
    UnknownTaskError,
    UnknownVersionError,
)
from dmsc_fed.control.events import EVENT_KINDS, EventKind, EventLog, EventRecord
from dmsc_fed.control.models import ExportedModel, ModelStore, ModelVersionRecord, content_hash, read_export
from dmsc_fed.control.queue import (
    POLICIES,
    FailureRecord,
    Policy,
    TaskQueue,
    TaskRecord,
    backoff_s,
    is_ready,
    pick_next,
)
from dmsc_fed.control.registry import Health, HealthPolicy, PoolRecord, Registry, SiteRecord, health

__all__ = [
    "DEFAULT_URL",
    "EVENT_KINDS",
    "POLICIES",
    "ContentHashMismatchError",
    "EventKind",
    "EventLog",
    "EventRecord",
    "ExportedModel",
    "FailureRecord",
    "Health",
    "HealthPolicy",
    "IllegalTransitionError",
    "MigrationError",
    "ModelStore",
    "ModelVersionRecord",
    "Policy",
    "PoolRecord",
    "RateLimiter",
    "RateSpec",
    "Registry",
    "SchemaTooNewError",
    "SiteKeyMismatchError",
    "SiteRecord",
    "Store",
    "StoreError",
    "StoreUnreachableError",
    "TaskQueue",
    "TaskRecord",
    "TokenSet",
    "UnknownPoolError",
    "UnknownSiteError",
    "UnknownTaskError",
    "UnknownVersionError",
    "backoff_s",
    "content_hash",
    "create_token",
    "current_revision",
    "head_revision",
    "health",
    "is_ready",
    "load_tokens",
    "mask_url",
    "migrate",
    "pick_next",
    "read_export",
    "revoke_token",
    "sqlite_url",
]
