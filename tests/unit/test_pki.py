from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from dmsc_fed.security.pki import create_node_keys, create_tls


def test_tls_material(tmp_path: Path) -> None:
    files = create_tls(directory=tmp_path, hosts=["coordinator.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.0.0.5") in san.get_values_for_type(x509.IPAddress)
    assert "coordinator.example.org" in san.get_values_for_type(x509.DNSName)
    for secret in (files.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_node_keys_are_p384_openssh(tmp_path: Path) -> None:
    keys = create_node_keys(directory=tmp_path, site="h1")
    priv = load_ssh_private_key(keys.private.read_bytes(), password=None)
    pub = load_ssh_public_key(keys.public.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert pub.public_numbers() == priv.public_key().public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    assert keys.public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_provisioned_server_folder_holds_no_site_secret(tmp_path: Path) -> None:
    from dmsc_fed.privacy.he import has_secret_key, load_public_context
    from dmsc_fed.security.provision import ServerKeys, SiteKeys, provision

    out = provision(out=tmp_path / "fed", sites=["a", "b"])
    server = ServerKeys.load(out / "server")
    assert not has_secret_key(load_public_context(server.he_public.read_bytes()))
    names = {p.name for p in (out / "server").rglob("*") if p.is_file()}
    assert not names & {"he-secret.ctx", "signing.key", "supernode.key", "ca.key"}
    for site in ("a", "b"):
        keys = SiteKeys.load(out / "sites" / site)
        for secret in (keys.signing_key, keys.supernode_key, keys.he_secret):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
