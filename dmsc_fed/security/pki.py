"""TLS certificates and SuperNode authentication keys, made with ``cryptography``.

A federation's transport material is a CA, a server certificate signed by it
(with the SuperLink's addresses as subject alternative names; 127.0.0.1 is
always included because Flower's SuperExec connects back over loopback) and one
EC P-384 key pair per site in OpenSSH format, as Flower's SuperNode
authentication expects. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmsc_fed.errors import ConfigError

VALIDITY_DAYS = 365


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes) -> None:
    """Write non-secret material (certificates, public keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a CA certificate and a server certificate with its key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmsc-fed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "::1", "localhost", *hosts]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def create_tls(*, directory: Path, hosts: list[str] | None = None, ca_key_dir: Path | None = None) -> TlsFiles:
    """Create a CA and a server certificate for ``hosts`` under ``directory``.

    The CA's private key goes to ``ca_key_dir`` (default: ``directory``); keep it
    offline, it is needed only to issue new certificates.
    """
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("dmsc-fed CA"))
        .issuer_name(_name("dmsc-fed CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("dmsc-fed superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(_san(hosts or []), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(
        ca_cert=directory / "ca.crt", server_cert=directory / "server.pem", server_key=directory / "server.key"
    )
    pem = serialization.Encoding.PEM
    write_public(files.ca_cert, ca_cert.public_bytes(pem))
    write_secret(
        (ca_key_dir or directory) / "ca.key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_public(files.server_cert, srv_cert.public_bytes(pem))
    write_secret(
        files.server_key,
        srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return files


@dataclass(frozen=True)
class NodeKeys:
    """A site's SuperNode authentication key pair (OpenSSH format)."""

    private: Path
    public: Path


def create_node_keys(*, directory: Path, site: str) -> NodeKeys:
    """Create an EC P-384 key pair for site ``site`` (``<site>_key`` and ``<site>_key.pub``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(private=directory / f"{site}_key", public=directory / f"{site}_key.pub")
    write_secret(
        keys.private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    write_public(
        keys.public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
    )
    return keys


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a readable file, else raise a ConfigError naming ``what``."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} is not readable: {path}")
    return path
