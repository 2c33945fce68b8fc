"""Model store: every aggregated global model as a version with lineage, export and rollback.

Draft: draft-yang-dmsc-distributed-model-03, section 6.2.4 (model storage, a model
warehouse), section 6.3.2 (sites fetch the latest version) and section 6.3.7 (roll back
to the last stable snapshot).

A version records its task, round, sha256 content hash, metrics, participating sites,
each site's privacy spend (epsilon) and the HE parameters in force. Content is either
named numpy arrays (stored as safetensors) or an opaque byte string (e.g. a serialized
CKKS ciphertext the server cannot read); identical content is stored once, addressed
by its hash. Nothing is ever deleted: a rollback adds a version that points at older
content (``rolled_back_from``) and at the version it replaces (``parent_id``).

The content hash (:func:`content_hash`) is sha256 over a canonical serialization, so it
does not depend on dict order, memory layout or byte order:

* arrays: the domain tag ``dmsc-fed/arrays/v1`` and a newline, then for each name in
  sorted order an 8-byte little-endian length and the compact JSON header
  ``{"dtype":<numpy dtype.str, little-endian>,"name":<name>,"shape":[...]}`` (keys
  sorted), then an 8-byte little-endian length and the C-order little-endian bytes;
* bytes: the domain tag ``dmsc-fed/bytes/v1``, a newline, then the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from dmsc_fed.control.db import Backend, ModelBlobRow, ModelVersionRow
from dmsc_fed.control.errors import ContentHashMismatchError, UnknownVersionError
from dmsc_fed.control.events import record_event

__all__ = [
    "Content",
    "ExportedModel",
    "ModelStore",
    "ModelVersionRecord",
    "canonical_arrays",
    "content_hash",
    "read_export",
]

Content = Mapping[str, NDArray[Any]] | bytes
"""What a model version holds: named arrays, or an opaque (e.g. encrypted) byte string."""

_ARRAYS_DOMAIN = b"dmsc-fed/arrays/v1\n"
_BYTES_DOMAIN = b"dmsc-fed/bytes/v1\n"
_EXPORT_FORMAT = "dmsc-fed/model-version/v1"
_BYTES_TENSOR = "payload"
_DTYPE_KINDS = frozenset("biuf")


def canonical_arrays(arrays: Mapping[str, Any]) -> dict[str, NDArray[Any]]:
    """Arrays in canonical form: sorted names, C-contiguous, little-endian.

    Raises
    ------
    ValueError
        If there are no arrays, a name is not a non-empty string, or a dtype is not
        bool, integer or floating point.

    """
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("a model needs at least one named array")
    out: dict[str, NDArray[Any]] = {}
    for name in sorted(arrays):
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings, got {name!r}")
        array = np.asarray(arrays[name])
        if array.dtype.kind not in _DTYPE_KINDS:
            raise ValueError(f"array {name!r} has dtype {array.dtype}; only bool, integer and float arrays are stored")
        out[name] = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    return out


def content_hash(content: Content) -> str:
    """The sha256 content hash (hex) of named arrays or of a byte string (see module docstring).

    Raises
    ------
    ValueError
        On content :func:`canonical_arrays` rejects, or neither arrays nor bytes.

    """
    if isinstance(content, bytes | bytearray | memoryview):
        return hashlib.sha256(_BYTES_DOMAIN + bytes(content)).hexdigest()
    h = hashlib.sha256(_ARRAYS_DOMAIN)
    for name, array in canonical_arrays(content).items():
        header = json.dumps(
            {"dtype": array.dtype.str, "name": name, "shape": list(array.shape)},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        data = array.tobytes(order="C")
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelVersionRecord:
    """One model version (draft 6.2.4); ``parent_id`` and ``rolled_back_from`` give its lineage."""

    id: int
    task_id: str
    round: int
    content_hash: str
    format: Literal["safetensors", "bytes"]
    size_bytes: int
    metrics: dict[str, float]
    sites: tuple[str, ...]
    epsilon: dict[str, float]
    he_params: dict[str, Any] | None
    created_at: datetime
    parent_id: int | None
    rolled_back_from: int | None


@dataclass(frozen=True)
class ExportedModel:
    """A model read back from an exported safetensors file, its hash verified."""

    content: dict[str, NDArray[Any]] | bytes
    content_hash: str
    task_id: str
    round: int
    version_id: int


def _serialize(content: Content) -> tuple[str, bytes]:
    if isinstance(content, bytes | bytearray | memoryview):
        return "bytes", bytes(content)
    from safetensors.numpy import save

    return "safetensors", save(canonical_arrays(content))


def _deserialize(fmt: str, data: bytes) -> dict[str, NDArray[Any]] | bytes:
    if fmt == "bytes":
        return data
    from safetensors.numpy import load

    return dict(load(data))


def _finite_map(values: Mapping[str, Any], *, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"{name}[{key!r}] must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name}[{key!r}] must be finite, got {value!r}")
        out[key] = float(value)
    return out


def _task_key(task_id: str | int) -> str:
    key = str(task_id)
    if not key or isinstance(task_id, bool):
        raise ValueError(f"task_id must be a non-empty string or an integer, got {task_id!r}")
    return key


class ModelStore:
    """Model versions of a :class:`~dmsc_fed.control.db.Store` (``store.models``)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def add_version(
        self,
        *,
        task_id: str | int,
        round: int,
        arrays: Content,
        metrics: Mapping[str, float],
        sites: Sequence[str],
        epsilon: Mapping[str, float] | None = None,
        he_params: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> ModelVersionRecord:
        """Store an aggregated global model as a new version of ``task_id``.

        Its ``parent_id`` is the task's latest version before it. An ``"aggregation"``
        event is logged.

        Parameters
        ----------
        task_id
            The task key: a queue task id, or the wire task id ``"<name>/<run id>"``.
        round
            Server round that produced it (>= 0).
        arrays
            Named numpy arrays, or bytes (e.g. an encrypted model).
        metrics
            Finite numbers, e.g. ``{"accuracy": 0.93, "loss": 0.2}``.
        sites
            Names of the sites that took part (unique).
        epsilon
            Each participating site's privacy spend; keys must be among ``sites``.
        he_params
            Homomorphic-encryption parameters in force (JSON), or None.
        now
            Creation time; default: the store's clock.

        Raises
        ------
        ValueError
            On a negative round, empty or duplicate sites, non-finite metrics or epsilon,
            epsilon for a site that did not take part, non-JSON ``he_params``, or arrays
            that cannot be stored.

        """
        key = _task_key(task_id)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        if isinstance(sites, str):
            raise TypeError("sites must be a sequence of site names, not a single string")
        site_list = list(sites)
        if any(not isinstance(s, str) or not s for s in site_list):
            raise ValueError(f"site names must be non-empty strings, got {site_list!r}")
        if len(set(site_list)) != len(site_list):
            raise ValueError(f"participating sites must be unique, got {site_list!r}")
        metric_map = _finite_map(metrics, name="metrics")
        eps_map = _finite_map(epsilon or {}, name="epsilon")
        strangers = sorted(set(eps_map) - set(site_list))
        if strangers:
            raise ValueError(f"epsilon given for site(s) that did not take part: {', '.join(strangers)}")
        if any(v < 0 for v in eps_map.values()):
            raise ValueError(f"epsilon values must be >= 0, got {eps_map}")
        he = None
        if he_params is not None:
            try:
                he = json.loads(json.dumps(dict(he_params), allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"he_params must be finite JSON: {exc}") from exc
        digest = content_hash(arrays)
        fmt, blob = _serialize(arrays)
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            if session.get(ModelBlobRow, digest) is None:
                session.add(
                    ModelBlobRow(content_hash=digest, format=fmt, size_bytes=len(blob), data=blob, created_at=ts)
                )
            parent = self._latest_row(session, key)
            row = ModelVersionRow(
                task_id=key,
                round=round,
                content_hash=digest,
                metrics=metric_map,
                sites=site_list,
                epsilon=eps_map,
                he_params=he,
                created_at=ts,
                parent_id=parent.id if parent is not None else None,
                rolled_back_from=None,
            )
            session.add(row)
            session.flush()
            record_event(
                session,
                kind="aggregation",
                task_id=key,
                ts=ts,
                payload={"action": "model_version", "version_id": row.id, "round": round, "content_hash": digest},
            )
            return self._record(session, row)

    def versions(self, *, task_id: str | int) -> list[ModelVersionRecord]:
        """Every version of a task, oldest first (empty for a task without versions)."""
        key = _task_key(task_id)
        with self._backend.tx() as session:
            rows = session.scalars(
                select(ModelVersionRow).where(ModelVersionRow.task_id == key).order_by(ModelVersionRow.id)
            ).all()
            return [self._record(session, row) for row in rows]

    def get(self, *, version_id: int) -> ModelVersionRecord:
        """One version.

        Raises
        ------
        UnknownVersionError
            If no version has this id.

        """
        with self._backend.tx() as session:
            return self._record(session, self._version(session, version_id))

    def latest(self, *, task_id: str | int) -> ModelVersionRecord | None:
        """The newest version of a task (after a rollback: the rollback), or None if it has none."""
        key = _task_key(task_id)
        with self._backend.tx() as session:
            row = self._latest_row(session, key)
            return self._record(session, row) if row is not None else None

    def best(
        self, *, task_id: str | int, metric: str = "accuracy", mode: Literal["max", "min"] = "max"
    ) -> ModelVersionRecord | None:
        """The version of a task with the highest (``"max"``) or lowest (``"min"``) ``metric``.

        Versions without the metric are skipped; ties go to the oldest version. None when
        no version has the metric.
        """
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        scored = [v for v in self.versions(task_id=task_id) if metric in v.metrics]
        if not scored:
            return None
        sign = -1.0 if mode == "max" else 1.0
        return min(scored, key=lambda v: (sign * v.metrics[metric], v.id))

    def load(self, *, version_id: int) -> dict[str, NDArray[Any]] | bytes:
        """The content of a version, its hash verified.

        Raises
        ------
        UnknownVersionError
            If no version has this id.
        ContentHashMismatchError
            If the stored bytes no longer match the recorded hash.

        """
        with self._backend.tx() as session:
            row = self._version(session, version_id)
            blob = session.get(ModelBlobRow, row.content_hash)
            assert blob is not None  # foreign key
            fmt, data, expected = blob.format, blob.data, row.content_hash
        content = _deserialize(fmt, data)
        actual = content_hash(content)
        if actual != expected:
            raise ContentHashMismatchError(
                f"model version {version_id}: stored content hashes to {actual}, recorded {expected}"
            )
        return content

    def export(self, *, version_id: int, path: Path | str) -> Path:
        """Write a version to a safetensors file and verify it by reading it back.

        Arrays are written under their names; a bytes payload as one ``uint8`` tensor
        named ``"payload"``. The file's metadata holds the format, content hash, task,
        round and version id. The file appears atomically (written aside, then renamed).

        Returns
        -------
        Path
            The written file.

        Raises
        ------
        UnknownVersionError
            If no version has this id.
        ContentHashMismatchError
            If the written file does not read back to the recorded hash (it is removed).

        """
        from safetensors.numpy import save_file

        record = self.get(version_id=version_id)
        content = self.load(version_id=version_id)
        target = Path(path)
        tensors = (
            {_BYTES_TENSOR: np.frombuffer(content, dtype=np.uint8).copy()}
            if isinstance(content, bytes)
            else canonical_arrays(content)
        )
        metadata = {
            "format": _EXPORT_FORMAT,
            "payload": record.format,
            "content_hash": record.content_hash,
            "task_id": record.task_id,
            "round": str(record.round),
            "version_id": str(record.id),
        }
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        try:
            read_export(path=tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
        return target

    def rollback(self, *, task_id: str | int, version_id: int, now: datetime | None = None) -> ModelVersionRecord:
        """Make an earlier version of a task current again, deleting nothing.

        A new version is added with the old version's content, round, metrics, sites,
        epsilon and HE parameters; its ``rolled_back_from`` is ``version_id`` and its
        ``parent_id`` the version that was latest. A ``"fault"`` event is logged (draft
        6.3.7: roll back to the last stable snapshot).

        Raises
        ------
        UnknownVersionError
            If no version has this id, or it belongs to another task.

        """
        key = _task_key(task_id)
        ts = self._backend.now(now)
        with self._backend.tx() as session:
            old = self._version(session, version_id)
            if old.task_id != key:
                raise UnknownVersionError(f"model version {version_id} belongs to task {old.task_id!r}, not {key!r}")
            latest = self._latest_row(session, key)
            row = ModelVersionRow(
                task_id=key,
                round=old.round,
                content_hash=old.content_hash,
                metrics=dict(old.metrics),
                sites=list(old.sites),
                epsilon=dict(old.epsilon),
                he_params=None if old.he_params is None else dict(old.he_params),
                created_at=ts,
                parent_id=latest.id if latest is not None else None,
                rolled_back_from=old.id,
            )
            session.add(row)
            session.flush()
            record_event(
                session,
                kind="fault",
                task_id=key,
                ts=ts,
                payload={
                    "action": "rollback",
                    "version_id": row.id,
                    "rolled_back_from": old.id,
                    "replaced": latest.id if latest is not None else None,
                    "content_hash": old.content_hash,
                },
            )
            return self._record(session, row)

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _latest_row(session: Session, key: str) -> ModelVersionRow | None:
        return session.scalar(
            select(ModelVersionRow).where(ModelVersionRow.task_id == key).order_by(ModelVersionRow.id.desc()).limit(1)
        )

    @staticmethod
    def _version(session: Session, version_id: int) -> ModelVersionRow:
        if isinstance(version_id, bool) or not isinstance(version_id, int):
            raise UnknownVersionError(f"unknown model version {version_id!r}: version ids are integers")
        row = session.get(ModelVersionRow, version_id)
        if row is None:
            raise UnknownVersionError(f"unknown model version {version_id}")
        return row

    @staticmethod
    def _record(session: Session, row: ModelVersionRow) -> ModelVersionRecord:
        blob = session.get(ModelBlobRow, row.content_hash)
        assert blob is not None  # foreign key
        return ModelVersionRecord(
            id=row.id,
            task_id=row.task_id,
            round=row.round,
            content_hash=row.content_hash,
            format="bytes" if blob.format == "bytes" else "safetensors",
            size_bytes=blob.size_bytes,
            metrics=dict(row.metrics),
            sites=tuple(row.sites),
            epsilon=dict(row.epsilon),
            he_params=None if row.he_params is None else dict(row.he_params),
            created_at=row.created_at,
            parent_id=row.parent_id,
            rolled_back_from=row.rolled_back_from,
        )


def read_export(*, path: Path | str) -> ExportedModel:
    """Read a file written by :meth:`ModelStore.export` and verify its content hash.

    Raises
    ------
    ContentHashMismatchError
        If the file's content does not hash to the hash in its metadata, or the file is
        not a dmsc-fed model export.

    """
    from safetensors import safe_open

    file = Path(path)
    try:
        with safe_open(str(file), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # OSError, or safetensors' own SafetensorError
        raise ContentHashMismatchError(f"{file}: not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != _EXPORT_FORMAT:
        raise ContentHashMismatchError(f"{file}: not a dmsc-fed model export (format {metadata.get('format')!r})")
    content: dict[str, NDArray[Any]] | bytes
    try:
        if metadata.get("payload") == "bytes":
            if set(tensors) != {_BYTES_TENSOR}:
                raise ValueError(f"a bytes export holds exactly one tensor {_BYTES_TENSOR!r}, found {sorted(tensors)}")
            content = np.ascontiguousarray(tensors[_BYTES_TENSOR], dtype=np.uint8).tobytes()
        else:
            content = tensors
        actual = content_hash(content)
    except ValueError as exc:
        raise ContentHashMismatchError(f"{file}: malformed model export: {exc}") from exc
    expected = metadata.get("content_hash", "")
    if actual != expected:
        raise ContentHashMismatchError(f"{file}: content hashes to {actual}, its metadata says {expected!r}")
    return ExportedModel(
        content=content,
        content_hash=actual,
        task_id=metadata.get("task_id", ""),
        round=int(metadata.get("round", "0")),
        version_id=int(metadata.get("version_id", "0")),
    )
