"""Signed updates: every reply a site sends is bound to its task, round, site and stage.

Each site holds an Ed25519 signing key; the server holds the sites' public keys.
The site signs a SHA-256 digest of every record of its reply (arrays or
ciphertexts, metrics, config) together with the binding ``(task, round, site,
stage)``. The server recomputes the digest and checks the signature against the
key of the site that node joined as, so a modified payload (a flipped ciphertext
bit), a forged sender or an update replayed from an earlier round is rejected.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dmsc_fed.errors import PrivacyError
from dmsc_fed.security.pki import write_public, write_secret

SIGNATURE_KEY = "signature"
_DOMAIN = b"dmsc-fed/signed-update/v1"


@dataclass(frozen=True)
class Binding:
    """What a signature binds an update to."""

    task: str
    round: int
    site: str
    stage: str


def create_signing_key(*, private: Path, public: Path) -> None:
    """Create an Ed25519 key pair; the private key is written with mode 0600."""
    key = Ed25519PrivateKey.generate()
    write_secret(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_public(
        public,
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load a site's private signing key (PrivacyError if missing, unreadable or not Ed25519)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PrivacyError(f"signing key not found: {path}") from None
    except (OSError, ValueError, TypeError) as err:
        raise PrivacyError(f"cannot read signing key {path}: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PrivacyError(f"signing key {path} is not an Ed25519 key")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """Load a site's public signing key (PrivacyError if missing, unreadable or not Ed25519)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise PrivacyError(f"site public signing key not found: {path}") from None
    except (OSError, ValueError, TypeError) as err:
        raise PrivacyError(f"cannot read site public signing key {path}: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PrivacyError(f"public signing key {path} is not an Ed25519 key")
    return key


def _feed(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack(">Q", len(data)))
    h.update(data)


def _scalar(value: object) -> bytes:
    if isinstance(value, bytes):
        return b"b" + value
    return b"j" + json.dumps(value, sort_keys=True).encode()


def digest(content: RecordDict, binding: Binding) -> bytes:
    """SHA-256 over the binding and every record of ``content`` except the signature."""
    h = hashlib.sha256()
    _feed(h, _DOMAIN)
    _feed(h, json.dumps([binding.task, binding.round, binding.site, binding.stage]).encode())
    for name in sorted(content):
        if name == SIGNATURE_KEY:
            continue
        record = content[name]
        _feed(h, name.encode())
        if isinstance(record, ArrayRecord):
            _feed(h, b"arrays")
            for key in sorted(record):
                arr = record[key]
                _feed(h, key.encode())
                _feed(h, json.dumps([arr.dtype, list(arr.shape), arr.stype]).encode())
                _feed(h, arr.data)
        elif isinstance(record, MetricRecord | ConfigRecord):
            _feed(h, b"metrics" if isinstance(record, MetricRecord) else b"config")
            for key in sorted(record):
                _feed(h, key.encode())
                value = record[key]
                items = value if isinstance(value, list) else [value]
                _feed(h, b"".join(_scalar(v) for v in items) + (b"L" if isinstance(value, list) else b"S"))
        else:  # pragma: no cover - RecordDict holds only the three record types
            raise PrivacyError(f"cannot sign record {name!r} of type {type(record).__name__}")
    return h.digest()


def sign(content: RecordDict, *, binding: Binding, key: Ed25519PrivateKey) -> None:
    """Add the signature record to ``content`` (in place)."""
    content[SIGNATURE_KEY] = ConfigRecord(
        {
            "task": binding.task,
            "round": binding.round,
            "site": binding.site,
            "stage": binding.stage,
            "signature": key.sign(digest(content, binding)),
        }
    )


def verify(content: RecordDict, *, expected: Binding, key: Ed25519PublicKey) -> str | None:
    """Why ``content`` is not a valid update for ``expected``, or None if it is."""
    rec = content.get(SIGNATURE_KEY)
    if not isinstance(rec, ConfigRecord) or "signature" not in rec:
        return "the update is not signed"
    claimed_round = rec.get("round", -1)
    if isinstance(claimed_round, bool) or not isinstance(claimed_round, int):
        return f"the signature's round is not an integer ({claimed_round!r})"
    claimed = Binding(
        task=str(rec.get("task")),
        round=claimed_round,
        site=str(rec.get("site")),
        stage=str(rec.get("stage")),
    )
    if claimed.site != expected.site:
        return f"signed as site {claimed.site!r} but sent by the node of site {expected.site!r}"
    if claimed.task != expected.task:
        return f"bound to task {claimed.task!r}, not {expected.task!r} (replayed?)"
    if claimed.round < expected.round:
        return f"stale update: bound to round {claimed.round}, this is round {expected.round}"
    if claimed.round != expected.round:
        return f"bound to round {claimed.round}, not {expected.round}"
    if claimed.stage != expected.stage:
        return f"bound to stage {claimed.stage!r}, not {expected.stage!r}"
    signature = rec["signature"]
    if not isinstance(signature, bytes):
        return "the signature is not bytes"
    try:
        key.verify(signature, digest(content, expected))
    except InvalidSignature:
        return f"invalid signature for site {expected.site!r} (payload modified or signed with another key)"
    return None
