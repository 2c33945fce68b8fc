"""API tokens and rate limiting of the control API (the API gateway).

Draft: draft-yang-dmsc-distributed-model-03, section 6.1.2 (API gateway: one entry for
users with authentication, rate limiting and monitoring) and section 6.4.1 (access
control).

Tokens
    A token is a random secret (``secrets.token_urlsafe(32)``, 256 bits) with a name
    saying who holds it (``"coordinator"``, ``"ci"``). Only its sha256 hash is stored,
    in a JSON file readable by its owner alone (mode 0600)::

        {"format": "dmsc-fed/api-tokens/v1",
         "tokens": {"ci": {"sha256": "<64 hex digits>", "created_at": "2025-01-01T12:00:00+00:00"}}}

    :func:`create_token` returns the secret once; nobody can read it back from the
    file. :meth:`TokenSet.verify` compares hashes in constant time
    (:func:`hmac.compare_digest`) and checks every stored hash, so its timing says
    nothing about which token (if any) matched. The file is rewritten atomically;
    it is not meant for several concurrent writers.

Rate limiting
    :class:`RateLimiter` is a token bucket per key: a bucket holds at most
    ``capacity`` tokens, gains ``refill_per_s`` tokens per second, and a request takes
    one. The control API keys buckets by token name (``"token:ci"``), and requests
    without a valid token by client address (``"addr:10.0.0.7"``), so guessing tokens
    is throttled too. The clock is injectable; tests never sleep.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from dmsc_fed.errors import ConfigError

__all__ = [
    "TOKEN_FILE_FORMAT",
    "TOKEN_NAME_PATTERN",
    "RateLimiter",
    "RateSpec",
    "TokenSet",
    "create_token",
    "hash_token",
    "load_tokens",
    "revoke_token",
]

_log = logging.getLogger(__name__)

TOKEN_FILE_FORMAT: Final = "dmsc-fed/api-tokens/v1"
"""The ``format`` field of a token file."""

TOKEN_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""What a token name looks like (it appears in logs and as the submitter of tasks)."""

_NAME = re.compile(TOKEN_NAME_PATTERN)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FILE_MODE: Final = 0o600


# --------------------------------------------------------------------------- tokens


def hash_token(*, secret: str) -> str:
    """The sha256 hash (hex) of a token secret, as stored in the token file."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"token name {name!r} must match {TOKEN_NAME_PATTERN} (letters, digits, '_', '.', '-')")
    return name


@dataclass(frozen=True)
class TokenSet:
    """The API tokens the control API accepts, as sha256 hashes by token name (draft 6.1.2).

    Parameters
    ----------
    hashes
        Token name to the hex sha256 of its secret (see :func:`hash_token`).

    Raises
    ------
    ConfigError
        On a malformed name or hash.

    Examples
    --------
    >>> tokens = TokenSet.from_secrets(secrets={"ci": "s3cret"})
    >>> tokens.verify(secret="s3cret"), tokens.verify(secret="guess")
    ('ci', None)

    """

    hashes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked: dict[str, str] = {}
        for name, digest in dict(self.hashes).items():
            _check_name(name)
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise ConfigError(f"token {name!r}: its hash must be 64 lowercase hex digits (sha256)")
            checked[name] = digest
        object.__setattr__(self, "hashes", MappingProxyType(checked))

    @classmethod
    def from_secrets(cls, *, secrets: Mapping[str, str]) -> TokenSet:
        """A token set from plain secrets by name (for tests and embedding; files hold hashes)."""
        return cls(hashes={name: hash_token(secret=secret) for name, secret in secrets.items()})

    @property
    def names(self) -> tuple[str, ...]:
        """The token names, sorted."""
        return tuple(sorted(self.hashes))

    def verify(self, *, secret: str) -> str | None:
        """The name of the token whose secret this is, or None.

        Every stored hash is compared with :func:`hmac.compare_digest`, matched or not,
        so the time taken does not depend on where (or whether) a match is.
        """
        presented = hash_token(secret=secret).encode("ascii")
        found: str | None = None
        for name, digest in self.hashes.items():
            if hmac.compare_digest(presented, digest.encode("ascii")) and found is None:
                found = name
        return found


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"token file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != TOKEN_FILE_FORMAT:
        raise ConfigError(f"{path} is not a dmsc-fed token file (format {TOKEN_FILE_FORMAT!r})")
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or not all(isinstance(v, dict) for v in tokens.values()):
        raise ConfigError(f"token file {path}: 'tokens' must map names to objects with a 'sha256' hash")
    return tokens


def _write_file(path: Path, tokens: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the token file atomically with mode 0600 (written aside, then renamed)."""
    data = {"format": TOKEN_FILE_FORMAT, "tokens": {name: dict(tokens[name]) for name in sorted(tokens)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.chmod(tmp, _FILE_MODE)  # whatever the umask did
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_token(
    *, path: Path | str, name: str, replace: bool = False, clock: Callable[[], datetime] | None = None
) -> str:
    """Create a token named ``name``, store its hash in the token file, and return the secret.

    The secret is shown this once: only its sha256 hash is written. The file (created if
    missing) gets mode 0600.

    Parameters
    ----------
    path
        The token file.
    name
        Who holds the token, e.g. ``"coordinator"`` or ``"ci"``.
    replace
        Replace an existing token of that name (rotation); without it a taken name is
        refused.
    clock
        Time source of ``created_at`` (default: now, UTC).

    Returns
    -------
    str
        The secret (``secrets.token_urlsafe(32)``), to send as ``Authorization: Bearer <secret>``.

    Raises
    ------
    ConfigError
        On a malformed name or token file, or a taken name without ``replace``.

    """
    file = Path(path)
    _check_name(name)
    tokens = _read_file(file)
    if name in tokens and not replace:
        raise ConfigError(f"token {name!r} already exists in {file}; pass replace=True to rotate it")
    secret = secrets.token_urlsafe(32)
    now = (clock or (lambda: datetime.now(UTC)))()
    tokens[name] = {"sha256": hash_token(secret=secret), "created_at": now.isoformat()}
    _write_file(file, tokens)
    return secret


def revoke_token(*, path: Path | str, name: str) -> None:
    """Remove the token ``name`` from the token file (a running API keeps its loaded set until restarted).

    Raises
    ------
    ConfigError
        If there is no such token, or the file is malformed.

    """
    file = Path(path)
    tokens = _read_file(file)
    if name not in tokens:
        raise ConfigError(f"no token named {name!r} in {file} (tokens: {', '.join(sorted(tokens)) or 'none'})")
    del tokens[name]
    _write_file(file, tokens)


def load_tokens(*, path: Path | str) -> TokenSet:
    """Load the token hashes of a token file.

    A file readable by others than its owner is accepted (it holds hashes, not secrets)
    with a warning.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or malformed.

    """
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"token file {file} not found; create a token first")
    tokens = _read_file(file)
    mode = file.stat().st_mode & 0o777
    if mode & 0o077:
        _log.warning("token file %s has mode %o; it should be 600 (owner only)", file, mode)
    hashes: dict[str, str] = {}
    for name, entry in tokens.items():
        digest = entry.get("sha256")
        if not isinstance(digest, str):
            raise ConfigError(f"token file {file}: token {name!r} has no 'sha256' hash")
        hashes[name] = digest
    return TokenSet(hashes=hashes)


# --------------------------------------------------------------------------- rate limiting


@dataclass(frozen=True)
class RateSpec:
    """A token-bucket rate: bursts of ``capacity`` requests, ``refill_per_s`` more per second (draft 6.1.2).

    Raises
    ------
    ValueError
        Unless ``capacity >= 1`` and ``refill_per_s > 0``, both finite.

    """

    capacity: float = 60.0
    refill_per_s: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.capacity) and self.capacity >= 1):
            raise ValueError(f"rate capacity must be finite and >= 1, got {self.capacity!r}")
        if not (math.isfinite(self.refill_per_s) and self.refill_per_s > 0):
            raise ValueError(f"rate refill_per_s must be finite and > 0, got {self.refill_per_s!r}")


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets by key (draft 6.1.2 rate limiting).

    A new key starts with a full bucket. A request is allowed when its bucket holds at
    least one token, and then takes one; a refused request takes nothing.

    Parameters
    ----------
    spec
        Capacity and refill rate, the same for every key.
    clock
        Monotonic seconds (default :func:`time.monotonic`).
    max_keys
        Buckets kept at most. Beyond it, full buckets are dropped first (a full bucket
        is the same as a new one), then the least recently used: such a key gets a full
        bucket again, which only errs towards allowing.

    Examples
    --------
    Capacity 2, one token every 2 s, all at t = 0: allowed, allowed, then refused with
    2 s to wait; at t = 1 half a token has come back, so 1 s is left to wait.

    """

    def __init__(self, *, spec: RateSpec, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.spec = spec
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, *, key: str) -> float:
        """Take one token from ``key``'s bucket.

        Returns
        -------
        float
            0.0 when the request is allowed; otherwise the seconds until it would be.

        """
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                self._make_room(now)
                bucket = _Bucket(tokens=self.spec.capacity, at=now)
                self._buckets[key] = bucket
            else:
                self._buckets.move_to_end(key)
                elapsed = max(0.0, now - bucket.at)  # a clock going backwards refills nothing
                bucket.tokens = min(self.spec.capacity, bucket.tokens + elapsed * self.spec.refill_per_s)
                bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.spec.refill_per_s

    def tokens(self, *, key: str) -> float:
        """Tokens ``key``'s bucket holds now (capacity for an unseen key); takes nothing."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return self.spec.capacity
            return min(self.spec.capacity, bucket.tokens + max(0.0, now - bucket.at) * self.spec.refill_per_s)

    def __len__(self) -> int:
        return len(self._buckets)

    def _make_room(self, now: float) -> None:
        """Drop buckets until a new one fits within ``max_keys``."""
        if len(self._buckets) < self._max_keys:
            return
        cap, rate = self.spec.capacity, self.spec.refill_per_s
        full = [k for k, b in self._buckets.items() if b.tokens + max(0.0, now - b.at) * rate >= cap]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)
