"""End-to-end: the long-lived coordinator (SuperLink + control API + dispatcher) with real sites.

Three queued tasks go through one coordinator: a high-priority task submitted after two
low-priority ones overtakes the second; every task's rounds land in the model store;
the registry shows the sites online with what they declared; the CLI talks only to
the API; a restart of the coordinator keeps every task and model version.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_deployment import _start
from tests.helpers import cli, free_port, processes_under, stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CONFIG = """
name = "{name}"
rounds = 1
local_epochs = 1
learning_rate = 0.05
[[sites]]
name = "east"
[[sites]]
name = "west"
[dataset]
name = "breast_cancer"
"""


def _api(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env=env, timeout=120)


def _wait(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def _tasks(state: Path) -> dict[int, dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(state / "control.db") as db:
        rows = db.execute("SELECT id, state, started_at FROM tasks ORDER BY id").fetchall()
    return {r[0]: {"state": r[1], "started_at": r[2]} for r in rows}


def test_queued_tasks_run_through_one_coordinator(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert cli("keys", "init", "--out", str(keys), "--sites", "east,west").returncode == 0
    state = tmp_path / "coord"
    port, api_port = free_port(), free_port()
    env = {"DMSC_FED_API": f"http://127.0.0.1:{api_port}", "DMSC_FED_TOKEN_FILE": str(state / "cli-token")}
    coordinator = [
        "coordinator", "--keys", str(keys / "server"), "--state", str(state),
        "--port", str(port), "--api-port", str(api_port),
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_start(*coordinator, log=tmp_path / "coordinator.out"))
        _wait("the control API", lambda: "control API on" in (tmp_path / "coordinator.out").read_text(), 90)
        for site in ("east", "west"):
            client = [
                "client", "--server", f"127.0.0.1:{port}", "--site", site, "--keys", str(keys / "sites" / site),
                "--port", str(free_port()), "--state", str(tmp_path / site),
            ]  # fmt: skip
            procs.append(_start(*client, log=tmp_path / f"{site}.out"))
        ids = []
        for name, priority in (("low-1", 0), ("low-2", 0), ("high", 10)):
            cfg = tmp_path / f"{name}.toml"
            cfg.write_text(CONFIG.format(name=name))
            res = _api(env, "tasks", "submit", str(cfg), "--priority", str(priority), "--timeout", "600")
            assert res.returncode == 0, res.stderr
            ids.append(int(res.stdout.split("queued task ")[1].split()[0]))
        _wait("three tasks to succeed", lambda: all(t["state"] == "succeeded" for t in _tasks(state).values()), 600)
        tasks = _tasks(state)
        order = sorted(ids, key=lambda i: tasks[i]["started_at"])
        low1, low2, high = ids
        assert order.index(high) < order.index(low2), f"the high-priority task should overtake low-2: {order}"
        assert order.index(low1) < order.index(low2), f"equal priorities run first come, first served: {order}"

        res = _api(env, "sites")
        assert res.returncode == 0 and "east" in res.stdout and "west" in res.stdout and "online" in res.stdout
        res = _api(env, "models", "list", "--task", str(ids[2]))
        assert res.returncode == 0 and "accuracy" in res.stdout, res.stdout + res.stderr
        (tmp_path / "wrong-token").write_text("not-the-token\n")
        bad = _api(env | {"DMSC_FED_TOKEN_FILE": str(tmp_path / "wrong-token")}, "tasks", "list")
        assert bad.returncode != 0 and "refused the token" in bad.stderr
        missing = _api(env, "tasks", "replay", "999")
        assert missing.returncode == 10 and "999" in missing.stderr

        import httpx

        token = (state / "cli-token").read_text().strip()
        metrics = httpx.get(f"http://127.0.0.1:{api_port}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert metrics.status_code == 200 and 'dmsc_fed_tasks{state="succeeded"} 3.0' in metrics.text

        stop(procs[:1])  # restart the coordinator: the store keeps every task and model version
        procs[0] = _start(*coordinator, log=tmp_path / "coordinator-2.out")
        _wait("the control API again", lambda: "control API on" in (tmp_path / "coordinator-2.out").read_text(), 90)
        res = _api(env, "tasks", "list")
        assert res.returncode == 0 and res.stdout.count("succeeded") == 3
        versions = json.loads(
            httpx.get(
                f"http://127.0.0.1:{api_port}/v1/models",
                params={"task_id": str(ids[0])},
                headers={"Authorization": f"Bearer {token}"},
            ).text
        )
        assert len(versions) == 1
    finally:
        stop(procs)
    time.sleep(1)
    assert processes_under(tmp_path) == [], "Flower processes were left running"
    assert os.path.exists(state / "control.db")
