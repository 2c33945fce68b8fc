from __future__ import annotations

import fcntl
import json
import socket
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli


def _no_traceback(res) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout


def test_config_validate_prints_resolved_config() -> None:
    res = cli("config", "validate", str(ROOT / "examples/hospital/config.toml"))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["name"] == "hospital" and len(data["sites"]) == 3
    assert data["strategy"]["round_timeout_s"] > 0  # defaults are resolved


def test_config_validate_reports_each_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = -1\ncolor = "x"\n[[sites]]\nname = "a b"\n')
    res = cli("config", "validate", str(bad))
    assert res.returncode == 2
    _no_traceback(res)
    for needle in ("rounds = -1", "color: unknown key", "sites.0.name = 'a b'"):
        assert needle in res.stderr


def test_run_with_missing_site_data_fails_before_starting_anything(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'rounds = 1\n[dataset]\nname = "csv"\nlabel_column = "y"\nfeature_columns = ["x"]\nnum_classes = 2\n'
        '[[sites]]\nname = "s1"\ndata_path = "missing.csv"\n'
    )
    res = cli("run", str(cfg), "--out", str(tmp_path / "out"), env={"DMSC_FED_HOME": str(tmp_path)})
    assert res.returncode == 3
    _no_traceback(res)
    assert "data file not found" in res.stderr and "missing.csv" in res.stderr
    assert not (tmp_path / "out" / "flower").exists()


def test_second_run_at_the_same_time_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.lock").touch()
    with (tmp_path / "run.lock").open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("pid 1, writing to elsewhere")
        fh.flush()
        res = cli(
            "run",
            str(ROOT / "examples/hospital/config.toml"),
            "--out",
            str(tmp_path / "out"),
            env={"DMSC_FED_HOME": str(tmp_path)},
        )
    assert res.returncode == 7
    _no_traceback(res)
    assert "another dmsc-fed run is in progress" in res.stderr


def test_server_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = cli("server", "--port", str(port), "--insecure")
    assert res.returncode == 6
    _no_traceback(res)
    assert f"127.0.0.1:{port} is already in use" in res.stderr


def test_server_needs_keys_unless_insecure(tmp_path: Path) -> None:
    res = cli("server", "--port", "0", "--state", str(tmp_path))
    assert res.returncode == 2 and "--keys is required" in res.stderr


def test_server_refuses_a_keys_folder_holding_the_ckks_secret(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    assert cli("keys", "init", "--out", str(out), "--sites", "h1").returncode == 0
    (out / "server" / "he-secret.ctx").write_bytes((out / "he-secret.ctx").read_bytes())
    res = cli("server", "--port", "0", "--keys", str(out / "server"), "--state", str(tmp_path / "s"))
    assert res.returncode == 9
    assert "must never hold it" in res.stderr


def test_client_that_cannot_reach_the_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        res = cli(
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--site",
            "a",
            "--insecure",
            "--port",
            "0",
            "--state",
            str(tmp_path),
        )
    assert res.returncode == 5
    _no_traceback(res)
    assert "cannot reach the SuperLink" in res.stderr


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["--server", "nohost", "--site", "a", "--insecure"], "must be HOST:PORT", 2),
        (["--server", "127.0.0.1:1", "--site", "a b", "--insecure"], "--site 'a b'", 2),
        (["--server", "127.0.0.1:1", "--site", "a"], "--keys is required", 2),
        (["--server", "127.0.0.1:1", "--site", "a", "--keys", "/nonexistent"], "CA certificate not found", 2),
        (
            ["--server", "127.0.0.1:1", "--site", "a", "--insecure", "--policy", "/nonexistent.toml"],
            "site policy file not found",
            9,
        ),
    ],
)
def test_client_bad_flags(args: list[str], needle: str, code: int, tmp_path: Path) -> None:
    res = cli("client", *args, "--state", str(tmp_path))
    assert res.returncode == code, res.stderr
    assert needle in res.stderr


def test_keys_init_and_add_site(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    res = cli("keys", "init", "--out", str(out), "--sites", "h1,h2", "--host", "10.1.2.3")
    assert res.returncode == 0, res.stderr
    for name in (
        "ca.crt",
        "server/server.pem",
        "server/he-public.ctx",
        "server/signing/h1.pub",
        "server/supernodes/h2.pub",
        "sites/h1/signing.key",
        "sites/h1/he-secret.ctx",
        "sites/h2/supernode.key",
    ):
        assert (out / name).is_file(), name
    before = {p: p.read_bytes() for p in (out / "sites").rglob("*") if p.is_file()}
    again = cli("keys", "init", "--out", str(out), "--sites", "h3")
    assert again.returncode == 2 and "already holds key material" in again.stderr
    added = cli("keys", "add-site", "--out", str(out), "--site", "h3")
    assert added.returncode == 0, added.stderr
    assert (out / "sites/h3/signing.key").is_file() and (out / "server/signing/h3.pub").is_file()
    assert all(p.read_bytes() == data for p, data in before.items())  # the others' material is untouched
    dup = cli("keys", "add-site", "--out", str(out), "--site", "h3")
    assert dup.returncode == 2 and "already has key material" in dup.stderr


def test_unreachable_target_epsilon_fails_before_any_process_starts(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'rounds = 50\nlocal_epochs = 5\n[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n'
        '[privacy]\ndp = "on"\ntarget_epsilon = 0.000001\ndelta = 1e-12\n'
    )
    res = cli("run", str(cfg), "--out", str(tmp_path / "out"), env={"DMSC_FED_HOME": str(tmp_path)})
    assert res.returncode == 9
    _no_traceback(res)
    assert "no noise multiplier reaches epsilon" in res.stderr
    assert not (tmp_path / "out" / "flower").exists()


def test_config_validate_checks_the_strategy(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[[sites]]\nname = "a"\n[strategy]\nname = "no_such_pkg.mod:Strategy"\n')
    res = cli("config", "validate", str(bad))
    assert res.returncode == 2 and "cannot be imported" in res.stderr
    res = cli("config", "validate", str(ROOT / "examples/custom_strategy/config.toml"))
    assert res.returncode == 0, res.stderr


SEGMENTED = '[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n[segmentation]\nmode = "block"\n[segmentation.block]\n'


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ("block_count = 4\nreplication = 3\n", "replication"),
        ("block_count = 4\nblock_size = 10\n", "block_size"),
    ],
)
def test_segmentation_spec_errors_before_anything_starts(tmp_path: Path, block: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(SEGMENTED + block)
    res = cli("config", "validate", str(cfg))
    assert res.returncode == 2, res.stdout
    _no_traceback(res)
    assert needle in res.stderr


def test_layer_mode_needs_as_many_layers_as_stages(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    layer = '[segmentation]\nmode = "layer"\n[segmentation.layer]\nstages = 2\n'
    cfg.write_text('[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n' + layer)  # logreg: one layer
    res = cli("config", "validate", str(cfg))
    assert res.returncode == 2 and "needs at least 2 layers" in res.stderr
    _no_traceback(res)
    cfg.write_text('[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n[model]\nname = "mlp"\nhidden = [8]\n' + layer)
    assert cli("config", "validate", str(cfg)).returncode == 0


def test_an_encrypted_segment_with_a_plaintext_rule_fails_before_anything_starts(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        SEGMENTED + "block_count = 4\nreplication = 2\n[segmentation.aggregation]\ndefault = 'median'\n"
        "[privacy]\nencryption = 'ckks'\n"
    )
    res = cli("run", str(cfg), "--out", str(tmp_path / "out"), env={"DMSC_FED_HOME": str(tmp_path)})
    assert res.returncode == 2 and "can only add them" in res.stderr
    assert not (tmp_path / "out").exists()
