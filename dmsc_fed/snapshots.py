"""Crash-safe round snapshots: the global model and strategy state after every round.

Layout of a snapshot directory::

    DIR/round-000003.npz    the arrays of round 3 (``np.savez``, never pickled)
    DIR/round-000003.json   its manifest: format, round, fingerprint, created, npz, bytes, sha256, state, state_sha256

The manifest is the commit marker: it is written last, and a round without a
readable manifest whose checksum matches its arrays file does not exist for
:meth:`SnapshotStore.latest`. Every file is written to a temporary file in the
same directory, flushed and fsynced, renamed onto its final name with
:func:`os.replace`, and the directory is fsynced; a crash at any point leaves
either the previous snapshots intact or the new one complete.

Overwriting a round that already has a good snapshot writes the new arrays next
to the old ones (``round-000003-b.npz``, alternating with ``round-000003.npz``),
so the old snapshot stays loadable until the new manifest replaces its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import SnapshotError

__all__ = ["FORMAT", "Snapshot", "SnapshotStore", "fingerprint_of"]

_log = logging.getLogger(__name__)

FORMAT: Final = 1
"""The ``format`` field of a manifest; a manifest of another format is not loaded."""

_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700
_MANIFEST = re.compile(r"^round-(\d{6,})\.json$")
_NPZ = re.compile(r"^round-(\d{6,})(?:-b)?\.npz$")
_TEMP = re.compile(r"^\.round-\d{6,}(?:-b)?\.(?:npz|json)\..*\.tmp$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_NAMES: Final = frozenset({"file", "allow_pickle"})  # keyword parameters of np.savez
_MANIFEST_FIELDS: Final = ("format", "round", "fingerprint", "created", "npz", "bytes", "sha256", "state")


def fingerprint_of(*, config_json: str, extra: str = "") -> str:
    """The fingerprint that ties snapshots to a task config.

    Parameters
    ----------
    config_json
        The task config as JSON text (the exact text: any change gives another fingerprint).
    extra
        Anything else a snapshot must match (e.g. the model architecture); empty by default.

    Returns
    -------
    str
        The sha256 hex digest of ``config_json`` (UTF-8), followed by a NUL byte and
        ``extra`` when ``extra`` is not empty.

    Examples
    --------
    >>> fingerprint_of(config_json="{}") == hashlib.sha256(b"{}").hexdigest()
    True
    >>> fingerprint_of(config_json="{}", extra="v2") == fingerprint_of(config_json="{}")
    False

    """
    digest = hashlib.sha256(config_json.encode("utf-8"))
    if extra:
        digest.update(b"\0" + extra.encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """One good snapshot, as loaded by :meth:`SnapshotStore.latest`.

    Parameters
    ----------
    round
        The federated round the snapshot was taken after (1 or more).
    fingerprint
        The fingerprint of the task config the snapshot belongs to (see :func:`fingerprint_of`).
    arrays
        The global model (plain float arrays or uint8 ciphertext chunks) and any strategy arrays.
    state
        The JSON strategy state (round reports, rng state, privacy accounting, ...). Tuples
        saved in it come back as lists.
    path
        The manifest file.
    created
        When the snapshot was written (seconds since the epoch).

    """

    round: int
    fingerprint: str
    arrays: dict[str, NDArray[Any]]
    state: dict[str, Any]
    path: Path
    created: float


class _Unusable(Exception):
    """A snapshot that must not be loaded; the message says why."""


class SnapshotStore:
    """Round snapshots of one task in one directory.

    Parameters
    ----------
    directory
        Where the snapshots live; created (with its parents) on the first save.
    fingerprint
        The fingerprint of this task's config (see :func:`fingerprint_of`). A snapshot
        with another fingerprint is never resumed from.
    keep
        How many good snapshots to keep (1 or more); older ones are deleted after a save.

    Raises
    ------
    SnapshotError
        If ``fingerprint`` is empty or ``keep`` is less than 1.

    Examples
    --------
    >>> import tempfile
    >>> store = SnapshotStore(Path(tempfile.mkdtemp()) / "snap", fingerprint="f" * 64, keep=2)
    >>> store.latest() is None
    True
    >>> _ = store.save(round=1, arrays={"fc.weight": np.zeros(3, np.float32)}, state={"seen": [1]})
    >>> snap = store.latest()
    >>> snap.round, snap.state, store.rounds()
    (1, {'seen': [1]}, [1])

    """

    def __init__(self, directory: Path, *, fingerprint: str, keep: int = 3) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise SnapshotError("a snapshot store needs a non-empty task fingerprint (see fingerprint_of)")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise SnapshotError(f"keep must be an integer of 1 or more, got {keep!r}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.keep = keep

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.directory)!r}, fingerprint={self.fingerprint[:12]!r}..., keep={self.keep})"

    # ------------------------------------------------------------------ names

    def manifest_path(self, round: int) -> Path:
        """The manifest file of ``round`` (whether or not it exists)."""
        return self.directory / f"round-{round:06d}.json"

    @staticmethod
    def _npz_names(round: int) -> tuple[str, str]:
        return f"round-{round:06d}.npz", f"round-{round:06d}-b.npz"

    # ------------------------------------------------------------------ save

    def save(self, *, round: int, arrays: Mapping[str, NDArray[Any]], state: Mapping[str, Any]) -> Path:
        """Write the snapshot of ``round`` and prune older ones.

        The arrays file is written first and the manifest last, each atomically; a
        round that already exists is replaced atomically. After the manifest is
        committed, only the newest ``keep`` good snapshots (and always this one) stay,
        and leftover temporary files of a crashed writer are removed.

        Parameters
        ----------
        round
            The round just finished (1 or more).
        arrays
            Array name to array: the global model and any strategy arrays. Names must be
            non-empty strings without control characters; object arrays are refused.
        state
            JSON strategy state: ``None``, booleans, integers, finite floats, strings,
            lists/tuples and mappings with string keys.

        Returns
        -------
        Path
            The manifest file of the new snapshot.

        Raises
        ------
        SnapshotError
            If the round, an array or the state cannot be saved (nothing is written), or
            writing fails (the previous snapshots are left as they were).

        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 1:
            raise SnapshotError(f"cannot save a snapshot of round {round!r}: rounds start at 1")
        plain = _check_arrays(round, arrays)
        _check_state(round, state)

        try:
            self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as err:
            raise SnapshotError(f"cannot create the snapshot directory {self.directory}: {err}") from err

        manifest_path = self.manifest_path(round)
        canonical, alternate = self._npz_names(round)
        npz_name = alternate if _referenced_npz(manifest_path) == canonical else canonical
        npz_path = self.directory / npz_name
        try:
            tmp = _temp_file(self.directory, npz_name)
            try:
                with tmp.open("r+b") as fh:
                    np.savez(fh, **plain)  # type: ignore[arg-type]
                    fh.flush()
                    os.fsync(fh.fileno())
                data = tmp.read_bytes()
                _check_names_round_trip(round, plain, data)
                os.replace(tmp, npz_path)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.directory)

            manifest = {
                "format": FORMAT,
                "round": round,
                "fingerprint": self.fingerprint,
                "created": time.time(),
                "npz": npz_name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "state": state,
                "state_sha256": _state_digest(state),
            }
            text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
            _write_atomic(self.directory, manifest_path, text.encode("utf-8"))
        except OSError as err:
            raise SnapshotError(
                f"cannot write the snapshot of round {round} to {self.directory}: {err}; "
                "the previous snapshots are left as they were"
            ) from err

        _log.info("saved snapshot round %d (%s, %d bytes)", round, manifest_path, len(data))
        self._prune(just_written=round)
        return manifest_path

    # ------------------------------------------------------------------ read

    def rounds(self) -> list[int]:
        """Rounds that have a manifest on disk (good or not), ascending.

        Raises
        ------
        SnapshotError
            If the directory exists but cannot be listed.

        """
        return sorted(self._manifests())

    def latest(self) -> Snapshot | None:
        """The newest good snapshot, or ``None`` when there is none.

        Manifests are tried newest round first. One that is unreadable, of another
        format or incomplete, or whose arrays file is missing, has the wrong size,
        fails its sha256 checksum or cannot be loaded, is never loaded: a warning on
        logger ``dmsc_fed.snapshots`` names it and why, and the previous one is tried.

        Returns
        -------
        Snapshot or None
            The newest good snapshot; ``None`` if there is no manifest or none is good
            (the run then starts from round 1).

        Raises
        ------
        SnapshotError
            If the newest good snapshot belongs to another task config (fingerprint),
            or the directory exists but cannot be listed.

        """
        manifests = self._manifests()
        order = sorted(manifests, reverse=True)
        for i, rnd in enumerate(order):
            path = manifests[rnd]
            try:
                snap = self._load(rnd, path)
            except _Unusable as why:
                then = "falling back to an earlier snapshot" if i + 1 < len(order) else "there is no earlier snapshot"
                _log.warning("snapshot round %d (%s) is not usable: %s; %s", rnd, path, why, then)
                continue
            if snap.fingerprint != self.fingerprint:
                raise SnapshotError(
                    f"snapshot round {rnd} ({path}) belongs to another task config "
                    f"(fingerprint {snap.fingerprint[:12]}..., this task {self.fingerprint[:12]}...); "
                    f"move {self.directory} away or use another snapshot directory"
                )
            return snap
        if order:
            _log.warning("no usable snapshot in %s (%d not usable); starting from round 1", self.directory, len(order))
        return None

    # ------------------------------------------------------------------ internals

    def _listdir(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise SnapshotError(f"cannot list the snapshot directory {self.directory}: {err}") from err

    def _manifests(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for name in self._listdir():
            m = _MANIFEST.match(name)
            if m:
                found[int(m.group(1))] = self.directory / name
        return found

    def _read_manifest(self, rnd: int, path: Path) -> dict[str, Any]:
        """The validated manifest of ``rnd`` (checksum not checked yet)."""
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise _Unusable(f"manifest unreadable ({err.strerror or err})") from err
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise _Unusable(f"manifest is not valid JSON (truncated?): {err}") from err
        if not isinstance(doc, dict):
            raise _Unusable("manifest is not a JSON object")
        missing = [f for f in _MANIFEST_FIELDS if f not in doc]
        if "format" not in missing and doc["format"] != FORMAT:
            raise _Unusable(f"manifest format {doc['format']!r} is not the supported format {FORMAT}")
        if missing:
            raise _Unusable(f"manifest lacks field(s) {', '.join(missing)}")
        if not _is_int(doc["round"]) or doc["round"] != rnd:
            raise _Unusable(f"manifest holds round {doc['round']!r}, not {rnd}")
        if not isinstance(doc["fingerprint"], str) or not doc["fingerprint"]:
            raise _Unusable("manifest fingerprint is not a non-empty string")
        if isinstance(doc["created"], bool) or not isinstance(doc["created"], int | float):
            raise _Unusable("manifest created time is not a number")
        if doc["npz"] not in self._npz_names(rnd):
            raise _Unusable(f"manifest names arrays file {doc['npz']!r}, not one of round {rnd}")
        if not _is_int(doc["bytes"]) or doc["bytes"] < 0:
            raise _Unusable("manifest size is not a non-negative integer")
        if not isinstance(doc["sha256"], str) or not _HEX64.match(doc["sha256"]):
            raise _Unusable("manifest sha256 is not 64 lowercase hex digits")
        if not isinstance(doc["state"], dict):
            raise _Unusable("manifest state is not a JSON object")
        if doc.get("state_sha256") != _state_digest(doc["state"]):
            raise _Unusable("checksum mismatch: the manifest's state differs from its state_sha256")
        return doc

    def _verified_npz(self, doc: Mapping[str, Any]) -> tuple[Path, bytes]:
        """The bytes of the arrays file ``doc`` names, after size and checksum checks."""
        npz = self.directory / str(doc["npz"])
        try:
            data = npz.read_bytes()
        except FileNotFoundError as err:
            raise _Unusable(f"arrays file {npz} is missing") from err
        except OSError as err:
            raise _Unusable(f"arrays file {npz} is unreadable ({err.strerror or err})") from err
        if len(data) != doc["bytes"]:
            raise _Unusable(f"arrays file {npz} has {len(data)} bytes, the manifest says {doc['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != doc["sha256"]:
            raise _Unusable(f"checksum mismatch: the sha256 of {npz} differs from the manifest's")
        return npz, data

    def _load(self, rnd: int, path: Path) -> Snapshot:
        doc = self._read_manifest(rnd, path)
        npz, data = self._verified_npz(doc)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {name: np.asarray(z[name]) for name in z.files}
        except Exception as err:  # a corrupt zip raises many kinds of errors
            raise _Unusable(f"arrays file {npz} cannot be loaded: {type(err).__name__}: {err}") from err
        return Snapshot(
            round=rnd,
            fingerprint=doc["fingerprint"],
            arrays=arrays,
            state=doc["state"],
            path=path,
            created=float(doc["created"]),
        )

    def _is_good(self, rnd: int, path: Path) -> bool:
        try:
            self._verified_npz(self._read_manifest(rnd, path))
        except _Unusable:
            return False
        return True

    @staticmethod
    def _stale(name: str, *, oldest: int, manifests: Mapping[int, Path]) -> bool:
        """Whether the file ``name`` may be deleted when ``oldest`` is the oldest round kept."""
        if _TEMP.match(name):
            return True  # a temporary file of a crashed writer
        m = _MANIFEST.match(name) or _NPZ.match(name)
        if m is None:
            return False  # not ours
        rnd = int(m.group(1))
        if rnd < oldest:
            return True
        if name.endswith(".json"):
            return False
        if rnd not in manifests:
            return True  # arrays of a writer that crashed before its manifest
        ref = _referenced_npz(manifests[rnd])
        return ref is not None and ref != name  # the replaced side of an overwritten round

    def _prune(self, *, just_written: int) -> None:
        """Keep the newest ``keep`` good snapshots (and ``just_written``); delete older files."""
        try:
            names = self._listdir()
            manifests = self._manifests()
            kept: list[int] = []
            for rnd in sorted(manifests, reverse=True):
                if len(kept) >= self.keep:
                    break
                if rnd == just_written or self._is_good(rnd, manifests[rnd]):
                    kept.append(rnd)
            if just_written not in kept:
                kept.append(just_written)
            oldest = min(kept)

            doomed = [name for name in names if self._stale(name, oldest=oldest, manifests=manifests)]
            for name in sorted(doomed):
                (self.directory / name).unlink(missing_ok=True)
                _log.debug("pruned %s", self.directory / name)
            if doomed:
                _fsync_dir(self.directory)
        except (OSError, SnapshotError) as err:
            _log.warning("could not prune old snapshots in %s: %s", self.directory, err)


# ---------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arrays(round: int, arrays: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    if not isinstance(arrays, Mapping):
        raise SnapshotError(f"cannot save round {round}: arrays must be a mapping of name to array")
    plain: dict[str, NDArray[Any]] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise SnapshotError(f"cannot save round {round}: array name {name!r} is not a non-empty string")
        if name in _RESERVED_NAMES:
            raise SnapshotError(f"cannot save round {round}: array name {name!r} is reserved by np.savez")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise SnapshotError(f"cannot save round {round}: array name {name!r} contains a control character")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as err:
            raise SnapshotError(f"cannot save round {round}: array name {name!r} is not valid UTF-8") from err
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise SnapshotError(
                f"cannot save round {round}: array {name!r} has dtype {arr.dtype}, which needs pickle (refused)"
            )
        plain[name] = arr
    return plain


def _check_names_round_trip(round: int, arrays: Mapping[str, NDArray[Any]], data: bytes) -> None:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        stored = set(z.files)
    if stored != set(arrays):
        changed = sorted(set(arrays) ^ stored)
        raise SnapshotError(f"cannot save round {round}: array name(s) {changed} do not survive np.savez")


def _state_problem(value: Any, where: str) -> str | None:
    """Why ``value`` cannot be stored exactly as JSON, or ``None``."""
    if value is None or isinstance(value, bool | int | str):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value!r}, which JSON cannot hold"
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _state_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has key {key!r} of type {type(key).__name__}; JSON keys must be strings"
            problem = _state_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{where} has type {type(value).__name__}, which JSON cannot hold"


def _check_state(round: int, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping):
        raise SnapshotError(f"cannot save round {round}: state must be a mapping, got {type(state).__name__}")
    problem = _state_problem(state, "state")
    if problem:
        raise SnapshotError(f"cannot save round {round}: {problem}")
    try:
        json.dumps(state, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:  # e.g. a circular reference
        raise SnapshotError(f"cannot save round {round}: state is not JSON-able: {err}") from err


def _referenced_npz(manifest: Path) -> str | None:
    """The arrays file name a manifest names, or ``None`` if it cannot be read."""
    try:
        doc = json.loads(manifest.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    npz = doc.get("npz") if isinstance(doc, dict) else None
    return npz if isinstance(npz, str) else None


def _temp_file(directory: Path, final_name: str) -> Path:
    """A new empty mode-0600 file in ``directory``, named after ``final_name``."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)
    return Path(name)


def _write_atomic(directory: Path, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600): temp file, fsync, rename, fsync the directory."""
    tmp = _temp_file(directory, path.name)
    try:
        with tmp.open("r+b") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of the state's canonical JSON (sorted keys, no whitespace): what the manifest's state must hash to."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
