"""End-to-end: the multi-machine commands (`keys init`, `server`, `client`, `submit`) and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli, free_port, processes_under, stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CONFIG = """
name = "deploy"
rounds = 1
local_epochs = 2
learning_rate = 0.05
[[sites]]
name = "east"
[[sites]]
name = "west"
[dataset]
name = "breast_cancer"
"""


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "dmsc_fed.cli", *args], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT
        )


def test_server_clients_and_submit_on_separate_commands(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert cli("keys", "init", "--out", str(keys), "--sites", "east,west").returncode == 0
    server_keys = keys / "server"
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _start(
                "server",
                "--port",
                str(port),
                "--keys",
                str(server_keys),
                "--state",
                str(tmp_path / "link"),
                log=tmp_path / "server.out",
            )
        )
        deadline = time.monotonic() + 60
        while "registered site west" not in (tmp_path / "server.out").read_text():
            assert procs[0].poll() is None, (tmp_path / "server.out").read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        for site in ("east", "west"):
            procs.append(
                _start(
                    "client",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--site",
                    site,
                    "--keys",
                    str(keys / "sites" / site),
                    "--port",
                    str(free_port()),
                    "--state",
                    str(tmp_path / site),
                    log=tmp_path / f"{site}.out",
                )
            )
        cfg = tmp_path / "config.toml"
        cfg.write_text(CONFIG)
        out = tmp_path / "run"
        res = cli(
            "submit",
            str(cfg),
            "--server",
            f"127.0.0.1:{port}",
            "--keys",
            str(server_keys),
            "--out",
            str(out),
            timeout=420,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds_completed"] == 1
        assert set(summary["sites"]) == {"east", "west"}
        assert summary["final_metrics"]["accuracy"] > 0.8
    finally:
        stop(procs)
    assert all(p.returncode is not None for p in procs)
    time.sleep(1)
    assert processes_under(tmp_path) == [], "Flower processes were left running"


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.replace("rounds = 1", "rounds = 50"))
    env = dict(os.environ, DMSC_FED_HOME=str(tmp_path))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmsc_fed.cli", "run", str(cfg), "--out", str(out), "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    deadline = time.monotonic() + 240
    while not (out / "sites.json").exists():  # wait until the federation is up and the sites joined
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    assert processes_under(tmp_path), "expected running Flower processes"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    time.sleep(1)
    assert processes_under(tmp_path) == []
