"""A federation's key material, made once by the coordinator (``dmsc-fed keys init``).

Layout of the output directory::

    OUT/ca.crt  OUT/ca.key  OUT/he-secret.ctx     provisioner only: keep offline (needed to add sites)
    OUT/server/                                   give to the coordinator's server, nothing secret of a site
        ca.crt server.pem server.key              TLS
        he-public.ctx                             CKKS context without the secret key
        signing/<site>.pub                        each site's Ed25519 verify key
        supernodes/<site>.pub                     each site's SuperNode authentication key
    OUT/sites/<site>/                             give to that site only
        ca.crt                                    to trust the server
        supernode.key supernode.pub               SuperNode authentication (EC P-384, OpenSSH)
        signing.key signing.pub                   Ed25519 key that signs the site's updates
        he-secret.ctx                             CKKS context with the secret key shared by all sites

Every private file is written with mode 0600. Adding a site later
(:func:`add_site`) creates only that site's files and its public keys in
``server/``; nothing the other sites hold changes.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmsc_fed.config import SITE_NAME_PATTERN
from dmsc_fed.errors import ConfigError, PrivacyError
from dmsc_fed.security.pki import create_node_keys, create_tls, require_file, write_public, write_secret

HE_SECRET = "he-secret.ctx"
HE_PUBLIC = "he-public.ctx"
HE_PROFILE = "he-profile"


def _check_site(site: str) -> None:
    if not re.match(SITE_NAME_PATTERN, site):
        raise ConfigError(f"site name {site!r} must match {SITE_NAME_PATTERN}")


def provision(*, out: Path, sites: list[str], hosts: list[str] | None = None, he_profile: str = "add-128") -> Path:
    """Create all key material for a new federation under ``out``; returns ``out``."""
    from dmsc_fed.privacy.he import create_contexts, get_profile

    if not sites:
        raise ConfigError("at least one site name is needed")
    for site in sites:
        _check_site(site)
    if len(set(sites)) != len(sites):
        raise ConfigError(f"site names must be unique: {sites}")
    if (out / "ca.crt").exists():
        raise ConfigError(f"{out} already holds key material (ca.crt); use a new directory or 'keys add-site'")
    server = out / "server"
    tls = create_tls(directory=server, hosts=hosts or [], ca_key_dir=out)
    shutil.copyfile(tls.ca_cert, out / "ca.crt")
    secret, public = create_contexts(profile=get_profile(he_profile))
    write_secret(out / HE_SECRET, secret)
    write_public(server / HE_PUBLIC, public)
    write_public(out / HE_PROFILE, he_profile.encode())
    write_public(server / HE_PROFILE, he_profile.encode())
    for site in sites:
        add_site(out=out, site=site)
    return out


def add_site(*, out: Path, site: str) -> Path:
    """Create one site's material under ``out/sites/<site>`` and register its public keys with the server."""
    from dmsc_fed.privacy.signing import create_signing_key

    _check_site(site)
    ca = require_file(out / "ca.crt", "federation CA certificate")
    he_secret = require_file(out / HE_SECRET, "CKKS secret context")
    site_dir = out / "sites" / site
    if site_dir.exists():
        raise ConfigError(f"site {site!r} already has key material in {site_dir}")
    site_dir.mkdir(parents=True)
    shutil.copyfile(ca, site_dir / "ca.crt")
    node = create_node_keys(directory=site_dir, site="supernode")
    node.private.rename(site_dir / "supernode.key")
    node.public.rename(site_dir / "supernode.pub")
    create_signing_key(private=site_dir / "signing.key", public=site_dir / "signing.pub")
    write_secret(site_dir / HE_SECRET, he_secret.read_bytes())
    write_public(site_dir / HE_PROFILE, (out / HE_PROFILE).read_bytes())
    write_public(out / "server" / "signing" / f"{site}.pub", (site_dir / "signing.pub").read_bytes())
    write_public(out / "server" / "supernodes" / f"{site}.pub", (site_dir / "supernode.pub").read_bytes())
    return site_dir


@dataclass(frozen=True)
class ServerKeys:
    """The coordinator's material (``OUT/server``), checked on load."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    he_public: Path

    @classmethod
    def load(cls, directory: Path) -> ServerKeys:
        """Check the directory; a CKKS secret key found here is an error (the server must never hold it)."""
        if (directory / HE_SECRET).exists():
            raise PrivacyError(f"{directory} holds a CKKS secret context ({HE_SECRET}); the server must never hold it")
        return cls(
            directory=directory,
            ca_cert=require_file(directory / "ca.crt", "CA certificate"),
            server_cert=require_file(directory / "server.pem", "server certificate"),
            server_key=require_file(directory / "server.key", "server key"),
            he_public=require_file(directory / HE_PUBLIC, "CKKS public context"),
        )

    @property
    def he_profile(self) -> str:
        """Name of the CKKS profile the contexts were made with."""
        return (self.directory / HE_PROFILE).read_text().strip()

    def supernode_keys(self) -> dict[str, Path]:
        """Site name -> SuperNode public key to register."""
        return {p.stem: p for p in sorted((self.directory / "supernodes").glob("*.pub"))}

    def verify_keys(self) -> dict[str, Any]:
        """Site name -> Ed25519 public key that verifies its updates."""
        from dmsc_fed.privacy.signing import load_verify_key

        return {p.stem: load_verify_key(p) for p in sorted((self.directory / "signing").glob("*.pub"))}


@dataclass(frozen=True)
class SiteKeys:
    """One site's material (``OUT/sites/<site>``), checked on load."""

    directory: Path
    ca_cert: Path
    supernode_key: Path
    signing_key: Path
    he_secret: Path

    @classmethod
    def load(cls, directory: Path) -> SiteKeys:
        """Check that every file a site needs is present and readable."""
        return cls(
            directory=directory,
            ca_cert=require_file(directory / "ca.crt", "CA certificate"),
            supernode_key=require_file(directory / "supernode.key", "SuperNode private key"),
            signing_key=require_file(directory / "signing.key", "signing key"),
            he_secret=require_file(directory / HE_SECRET, "CKKS secret context"),
        )
