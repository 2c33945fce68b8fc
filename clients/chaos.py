"""Fault injection at a site, for chaos tests with real Flower processes (opt-in only).

A site misbehaves only when its SuperNode's node config has a ``chaos`` key
*and* its process runs with ``DMSC_FED_ALLOW_CHAOS=1``. A ``chaos`` key without
that variable is an error (:class:`~dmsc_fed.errors.PrivacyError`) when the site
is asked to train: it fails closed and sends no update (join and evaluation replies,
which carry no update, are unaffected). Without the key nothing changes at all.

Node config key ``chaos``
-------------------------
A schedule of comma-separated ``ROUND:MODE`` items; ``*:MODE`` applies to every
round not named on its own, e.g.
``"2:nan,3:shape,4:oversized,5:stale,6:replay,7:slow=45,8:scale=1e4"``.

Modes (each applies to the training reply of its round only):

``nan``
    Some values of the first floating array of the update become NaN.
``shape``
    The first floating array loses one element in its first dimension.
``oversized``
    An extra float32 array of 4 MiB (``chaos.padding``) is added to the update.
``scale=F``
    Every floating array of the update is multiplied by ``F`` (finite: it passes
    validation and is meant to blow up the loss and provoke a rollback).
``stale``
    The reply is signed with the previous round's binding (it claims round N-1).
``replay``
    An exact copy of the signed reply this site sent in the latest earlier round
    of the same task is sent instead (``stale`` if none is stored).
``slow=S``
    The site sleeps ``S`` seconds before it returns the reply.

The content faults (``nan``, ``shape``, ``oversized``, ``scale``) are applied
before signing, so the signature is valid and the server rejects the update for
the real reason. Every signed training reply of a chaos site is kept under
``<state-dir>/chaos/`` (Flower's own RecordDict protobuf) so that ``replay`` can
send it again byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from dmsc_fed.errors import ConfigError, PrivacyError
from dmsc_fed.privacy.signing import Binding
from dmsc_fed.wire import ARRAYS_KEY

#: Node config key of the schedule.
CHAOS_KEY: Final = "chaos"
#: The environment variable that must be ``1`` in the site's process for the schedule to be honoured.
ALLOW_ENV: Final = "DMSC_FED_ALLOW_CHAOS"
#: Name of the extra array an ``oversized`` fault adds, and its size.
PADDING_KEY: Final = "chaos.padding"
PADDING_BYTES: Final = 4 * 1024 * 1024
#: Folder under the site's state directory where signed training replies are kept for ``replay``.
STORE_DIR: Final = "chaos"

FaultKind = Literal["nan", "shape", "oversized", "scale", "stale", "replay", "slow"]
_KINDS: Final[tuple[str, ...]] = get_args(FaultKind)
_WITH_VALUE: Final = frozenset({"scale", "slow"})
_CONTENT: Final = frozenset({"nan", "shape", "oversized", "scale"})

logger = logging.getLogger("dmsc_fed.site")


@dataclass(frozen=True)
class Fault:
    """One injected fault: its kind and, for ``scale`` and ``slow``, its factor or seconds."""

    kind: FaultKind
    value: float | None = None

    @property
    def label(self) -> str:
        """The fault as written in a schedule (``nan``, ``slow=45``, ``scale=10000``)."""
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


def parse_fault(text: str) -> Fault:
    """Parse one MODE of a schedule (ConfigError naming it if unknown or malformed)."""
    name, sep, raw = (p.strip() for p in text.partition("="))
    if name not in _KINDS:
        raise ConfigError(f"chaos: unknown mode {text.strip()!r} (expected one of {', '.join(_KINDS)})")
    kind = cast(FaultKind, name)
    if kind not in _WITH_VALUE:
        if sep:
            raise ConfigError(f"chaos: mode {text.strip()!r} takes no value (write {kind!r})")
        return Fault(kind)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"chaos: mode {text.strip()!r} needs a number (e.g. {kind}=2)") from None
    if not math.isfinite(value) or (kind == "slow" and value < 0):
        raise ConfigError(
            f"chaos: mode {text.strip()!r} needs a finite{' non-negative' if kind == 'slow' else ''} value"
        )
    return Fault(kind, value)


@dataclass(frozen=True)
class Chaos:
    """A site's fault schedule: a fault per round, and optionally one for every other round (``*``)."""

    rounds: Mapping[int, Fault]
    every: Fault | None = None

    @classmethod
    def parse(cls, schedule: str) -> Chaos:
        """Parse ``ROUND:MODE[,ROUND:MODE...]`` (ConfigError naming the bad item)."""
        rounds: dict[int, Fault] = {}
        every: Fault | None = None
        items = schedule.split(",")
        for item in items:
            text = item.strip()
            if not text:
                raise ConfigError(f"chaos: empty item in schedule {schedule!r}")
            head, sep, mode = text.partition(":")
            head = head.strip()
            if not sep or not mode.strip():
                raise ConfigError(f"chaos: item {text!r} is not ROUND:MODE")
            fault = parse_fault(mode)
            if head == "*":
                if every is not None:
                    raise ConfigError(f"chaos: item {text!r} repeats '*'")
                every = fault
                continue
            if not re.fullmatch(r"[0-9]+", head) or int(head) < 1:
                raise ConfigError(f"chaos: item {text!r} has no round number >= 1 (or '*')")
            if int(head) in rounds:
                raise ConfigError(f"chaos: item {text!r} repeats round {int(head)}")
            rounds[int(head)] = fault
        return cls(rounds=rounds, every=every)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Chaos | None:
        """The schedule of the node config's ``chaos`` key, or None without one.

        Raises PrivacyError if the key is set but ``DMSC_FED_ALLOW_CHAOS=1`` is not
        (nothing may leave the site then), and ConfigError for a malformed schedule.
        """
        raw = node_config.get(CHAOS_KEY)
        if raw is None or str(raw).strip() == "":
            return None
        if os.environ.get(ALLOW_ENV) != "1":
            raise PrivacyError(f"chaos injection requested by node config but {ALLOW_ENV} is not set")
        return cls.parse(str(raw))

    def mode_for(self, server_round: int) -> Fault | None:
        """The fault to inject in ``server_round``, or None for an honest reply."""
        return self.rounds.get(server_round, self.every)


def _floating(arr: Array) -> bool:
    return bool(np.issubdtype(np.dtype(arr.dtype), np.floating)) if arr.stype == "numpy.ndarray" else False


def _corrupt(reply: RecordDict, fault: Fault) -> None:
    """Apply a content fault to the reply's ArrayRecord, in place."""
    arrays = reply.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        logger.warning("chaos: the reply carries no %r ArrayRecord, %s has nothing to change", ARRAYS_KEY, fault.label)
        return
    if fault.kind == "oversized":
        arrays[PADDING_KEY] = Array(np.zeros(PADDING_BYTES // 4, dtype=np.float32))
        return
    floating = [k for k, a in arrays.items() if _floating(a)]
    if not floating:
        logger.warning("chaos: the update has no floating array (encrypted?), %s has nothing to change", fault.label)
        return
    if fault.kind == "scale":
        factor = cast(float, fault.value)
        for key in floating:
            values = arrays[key].numpy()
            arrays[key] = Array(np.ascontiguousarray((values * factor).astype(values.dtype)))
        return
    key = floating[0]
    values = arrays[key].numpy()
    if fault.kind == "nan":
        bad = values.astype(values.dtype, copy=True).reshape(-1)
        if bad.size:
            bad[:: max(1, bad.size // 4)] = np.nan
        arrays[key] = Array(np.ascontiguousarray(bad.reshape(values.shape)))
    else:  # shape: one fewer element in the first dimension (a 0-d array becomes an empty vector)
        short = values[:-1] if values.ndim else np.empty((0,), dtype=values.dtype)
        arrays[key] = Array(np.ascontiguousarray(short))


def _task_dir(state_dir: Path, task: str) -> Path:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", task)[:64] or "task"
    return state_dir / STORE_DIR / f"{readable}-{hashlib.sha256(task.encode()).hexdigest()[:12]}"


def _round_file(server_round: int) -> str:
    return f"round-{server_round:06d}.pb"


def store_reply(reply: RecordDict, *, state_dir: Path, binding: Binding) -> Path:
    """Keep a signed training reply of ``binding``'s task and round (Flower's RecordDict protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    folder = _task_dir(state_dir, binding.task)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _round_file(binding.round)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(recorddict_to_proto(reply).SerializeToString())
    os.replace(tmp, path)
    return path


def load_earlier_reply(*, state_dir: Path, binding: Binding) -> tuple[int, RecordDict] | None:
    """The latest stored reply of ``binding``'s task from a round before ``binding.round``, with its round."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    folder = _task_dir(state_dir, binding.task)
    earlier: list[tuple[int, Path]] = []
    for path in folder.glob("round-*.pb") if folder.is_dir() else ():
        match = re.fullmatch(r"round-([0-9]+)\.pb", path.name)
        if match and int(match.group(1)) < binding.round:
            earlier.append((int(match.group(1)), path))
    if not earlier:
        return None
    server_round, path = max(earlier)
    try:
        proto = ProtoRecordDict.FromString(path.read_bytes())
    except Exception as err:  # a protobuf DecodeError or an unreadable file
        raise ConfigError(f"chaos: cannot read the stored reply {path}: {err}") from None
    return server_round, recorddict_from_proto(proto)


def finish_train(
    reply: RecordDict,
    *,
    chaos: Chaos | None,
    binding: Binding,
    sign: Callable[[RecordDict, Binding], RecordDict],
    state_dir: Path,
) -> RecordDict:
    """Sign a training reply, injecting this round's fault if ``chaos`` schedules one.

    Without ``chaos`` this is exactly ``sign(reply, binding)``. Otherwise content
    faults are applied before signing, ``stale`` signs with round N-1's binding,
    the signed reply is kept under ``state_dir`` for a later ``replay`` (which
    sends a kept one instead), and ``slow`` sleeps before returning.
    """
    if chaos is None:
        return sign(reply, binding)
    fault = chaos.mode_for(binding.round)
    if fault is not None:
        logger.warning("chaos: injecting %s in round %d", fault.label, binding.round)
    kind = fault.kind if fault is not None else None
    if kind == "replay":
        found = load_earlier_reply(state_dir=state_dir, binding=binding)
        if found is not None:
            logger.warning("chaos: replaying the signed reply of round %d in round %d", found[0], binding.round)
            return found[1]
        logger.warning("chaos: no earlier reply of task %r is stored, replay falls back to stale", binding.task)
        kind = "stale"
    if fault is not None and kind in _CONTENT:
        _corrupt(reply, fault)
    signed = sign(reply, dataclasses.replace(binding, round=binding.round - 1) if kind == "stale" else binding)
    store_reply(signed, state_dir=state_dir, binding=binding)
    if fault is not None and kind == "slow":
        time.sleep(cast(float, fault.value))
    return signed
