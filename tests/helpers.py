"""Helpers for tests that run the CLI and real Flower processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``dmsc-fed ARGS`` in a subprocess (bounded in time)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dmsc_fed.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
        check=False,
    )


def run_job(
    config: Path, tmp_path: Path, *flags: str, timeout: float = 840
) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    """``dmsc-fed run CONFIG`` into ``tmp_path/run`` with its own run lock; asserts success.

    Returns the finished process, the run directory and its ``summary.json``.
    """
    out = tmp_path / "run"
    res = cli("run", str(config), "--out", str(out), *flags, timeout=timeout, env={"DMSC_FED_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, out, json.loads((out / "summary.json").read_text())


def processes_under(path: Path) -> list[int]:
    """PIDs of live processes whose FLWR_HOME lies under ``path`` (our Flower processes)."""
    found = []
    needle = f"FLWR_HOME={path}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.append(int(entry.name))
    return found


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, wait up to 40 s, then SIGKILL it."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
