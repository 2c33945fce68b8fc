"""Submit a run to a SuperLink, follow it round by round, and collect its results.

Shared by ``dmsc-fed run`` (local deployment) and ``dmsc-fed submit`` (a
SuperLink started with ``dmsc-fed server``). Progress comes from the
``metrics.jsonl`` the ServerApp appends to in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmsc_fed.config import FederationConfig
from dmsc_fed.errors import Interrupted, RunFailedError
from dmsc_fed.launcher.flower import FlowerCli, tail

STATUS_EVERY_S = 10.0


@dataclass
class RunEvents:
    """Callbacks the CLI uses to show progress."""

    on_stage: Callable[[str], None] = lambda msg: None
    on_round: Callable[[dict[str, Any]], None] = lambda row: None


def _follow(cli: FlowerCli, run_id: int, out: Path, events: RunEvents, check_alive: Callable[[], None]) -> str:
    metrics = out / "metrics.jsonl"
    seen = 0
    status = "pending"
    last_asked = -math.inf
    while True:
        if metrics.exists():
            rows = metrics.read_text().splitlines()
            for line in rows[seen:]:
                if line.strip():
                    events.on_round(json.loads(line))
            seen = len(rows)
        if status.startswith("finished"):
            return status
        check_alive()
        # Each `flwr ls` is a new process (about a second of CPU): ask rarely, and at once when the
        # ServerApp has written its result.
        if time.monotonic() - last_asked >= STATUS_EVERY_S or (out / "result.json").exists():
            status = cli.status(run_id)
            last_asked = time.monotonic()
        time.sleep(0.5)


def submit_and_follow(
    *,
    cli: FlowerCli,
    cfg: FederationConfig,
    out: Path,
    app: Path,
    events: RunEvents,
    check_alive: Callable[[], None] = lambda: None,
    keys_dir: Path | None = None,
) -> dict[str, Any]:
    """Submit ``cfg`` as a run of the Flower App ``app`` and wait for it to finish.

    The ServerApp writes the run directory ``out`` (a path on the SuperLink's
    machine); the run's logs are saved to ``out/logs/run.log``. ``keys_dir`` is
    the server's key material on the SuperLink's machine. On failure or
    interruption the run is stopped on the SuperLink.
    """
    out.mkdir(parents=True, exist_ok=True)
    overrides = out / "run-config.toml"
    values = {
        "dmsc-config": cfg.to_json(),
        "out-dir": str(out.resolve()),
        "keys-dir": str(keys_dir or ""),
        # Submitting the same config to the same run directory again resumes after its last snapshot.
        "snapshot-dir": str((out / "snapshots").resolve()),
    }
    overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    events.on_stage("submitting the run")
    run_id = cli.submit(app_dir=app, run_config=overrides)
    events.on_stage(f"run {run_id}: training {cfg.rounds} rounds")
    finished = False
    try:
        status = _follow(cli, run_id, out, events, check_alive)
        finished = True
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted (Ctrl-C); run {run_id} was stopped") from None
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                cli.stop_run(run_id)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "run.log").write_text(cli.logs(run_id))
    if status != "finished:completed":
        raise RunFailedError(f"run {run_id} ended as {status}:\n{tail(logs / 'run.log', 25)}")
    result_path = out / "result.json"
    if not result_path.exists():
        raise RunFailedError(f"run {run_id} finished but wrote no {result_path}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result
