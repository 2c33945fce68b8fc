"""A chaos rig for tests and benchmarks: real dmsc-fed processes on loopback, killed by PID.

Sites inject faults through ``dmsc-fed client --chaos`` (honoured only with
``DMSC_FED_ALLOW_CHAOS=1`` in their environment, which :meth:`Federation.start_site`
sets for them alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, cli, free_port, processes_under, stop

CHAOS_ENV = {"DMSC_FED_ALLOW_CHAOS": "1"}


def start(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "dmsc_fed.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ) | (env or {}),
        )


def wait(what: str, check: Callable[[], bool], timeout: float, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def kill_9(wrapper: subprocess.Popen[bytes], home: Path) -> list[int]:
    """SIGKILL a ``dmsc-fed`` command and every Flower process it started (by FLWR_HOME under ``home``)."""
    pids = [wrapper.pid, *processes_under(home)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wrapper.wait(timeout=30)
    return pids


class Federation:
    """``dmsc-fed server`` and one ``dmsc-fed client`` per site, on loopback ports."""

    def __init__(self, tmp: Path, sites: list[str]) -> None:
        self.tmp = tmp
        self.sites = sites
        self.keys = tmp / "keys"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        assert cli("keys", "init", "--out", str(self.keys), "--sites", ",".join(sites)).returncode == 0

    def start_server(self) -> None:
        log = self.tmp / "server.out"
        self.procs["server"] = start(
            "server", "--port", str(self.port), "--keys", str(self.keys / "server"),
            "--state", str(self.tmp / "link"), log=log,
        )  # fmt: skip
        wait("the server", lambda: f"registered site {self.sites[-1]}" in text(log), 90, 0.5)

    def start_site(self, site: str, chaos: str | None = None) -> None:
        args = [
            "client", "--server", f"127.0.0.1:{self.port}", "--site", site,
            "--keys", str(self.keys / "sites" / site), "--port", str(free_port()), "--state", str(self.tmp / site),
        ]  # fmt: skip
        if chaos:
            args += ["--chaos", chaos]
        self.procs[site] = start(*args, log=self.tmp / f"{site}.out", env=CHAOS_ENV if chaos else None)

    def submit(self, config: str, out: Path) -> subprocess.Popen[str]:
        """``dmsc-fed submit`` the config into the run directory ``out``; returns the running command."""
        cfg = self.tmp / "config.toml"
        cfg.write_text(config)
        argv = [
            sys.executable, "-m", "dmsc_fed.cli", "submit", str(cfg), "--server", f"127.0.0.1:{self.port}",
            "--keys", str(self.keys / "server"), "--out", str(out),
        ]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def stop(self) -> None:
        stop(list(self.procs.values()))
        time.sleep(1)
        for pid in processes_under(self.tmp):  # a killed wrapper's orphans, if any
            os.kill(pid, signal.SIGKILL)


class Coordinated(Federation):
    """``dmsc-fed coordinator`` (SuperLink, control API, dispatcher) as the server, with the same sites."""

    def __init__(self, tmp: Path, sites: list[str]) -> None:
        super().__init__(tmp, sites)
        self.state = tmp / "coord"
        self.api_port = free_port()
        self.env = {
            "DMSC_FED_API": f"http://127.0.0.1:{self.api_port}",
            "DMSC_FED_TOKEN_FILE": str(self.state / "cli-token"),
        }
        self.starts = 0

    def start_server(self) -> None:
        """Start (or restart) the coordinator and wait for its control API."""
        self.starts += 1
        log = self.tmp / f"coordinator-{self.starts}.out"
        self.procs["server"] = start(
            "coordinator", "--keys", str(self.keys / "server"), "--state", str(self.state),
            "--port", str(self.port), "--api-port", str(self.api_port), log=log,
        )  # fmt: skip
        wait("the control API", lambda: "control API on" in text(log), 90)

    def kill_server(self) -> list[int]:
        """SIGKILL the coordinator, its SuperLink and the ServerApp."""
        return kill_9(self.procs["server"], self.state)

    def submit_task(self, config: str, *, timeout_s: int = 800) -> int:
        """Queue the config as a task through the API; returns its id."""
        cfg = self.tmp / "task.toml"
        cfg.write_text(config)
        res = cli("tasks", "submit", str(cfg), "--timeout", str(timeout_s), env=self.env, timeout=120)
        assert res.returncode == 0, res.stderr
        return int(res.stdout.split("queued task ")[1].split()[0])

    def task_state(self, task: int) -> str:
        """The task's state from the control API ("" while the API does not answer)."""
        import httpx

        token = text(self.state / "cli-token").strip()
        try:
            res = httpx.get(
                f"http://127.0.0.1:{self.api_port}/v1/tasks/{task}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
        except httpx.HTTPError:
            return ""
        return str(res.json().get("state", "")) if res.status_code == 200 else ""


def metrics_rows(out: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl by round."""
    return {r["round"]: r for r in (json.loads(line) for line in text(out / "metrics.jsonl").splitlines())}
