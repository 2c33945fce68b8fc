"""The long-lived coordinator: a SuperLink, the control API and the dispatcher in one process.

``dmsc-fed coordinator`` starts the federation's SuperLink (as ``dmsc-fed server``
does), opens the control store, serves the control API (FastAPI over uvicorn, on
127.0.0.1 by default) and runs the dispatcher, which starts queued tasks as Flower
runs of the ServerApp (draft sections 6.1.2, 6.2.1, 6.2.2). Each run's ServerApp
reports rounds, model versions, site health and events into the same store
(``control-db`` in the run config). Ctrl-C or SIGTERM stops everything it started.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmsc_fed.control.dispatcher import Dispatcher, RunState
from dmsc_fed.control.queue import Policy, TaskRecord
from dmsc_fed.launcher.flower import FlowerCli

Say = Callable[[str], None]

#: Resource pools every coordinator defines (draft 6.3.8), with their relative capacity.
POOLS = {"cpu": 1, "gpu": 4}


class FlowerRunner:
    """Starts and follows tasks as runs of the dmsc-fed ServerApp on a SuperLink (the dispatcher's runner)."""

    def __init__(
        self, *, cli: FlowerCli, app: Path, state: Path, runs_dir: Path, keys_dir: Path | None, db_url: str
    ) -> None:
        self.cli = cli
        self.state = state
        self.app = app
        self.runs_dir = runs_dir
        self.keys_dir = keys_dir
        self.db_url = db_url

    def run_dir(self, task: TaskRecord) -> Path:
        """Where the ServerApp writes this attempt's run directory."""
        return self.runs_dir / f"task-{task.id}" / f"attempt-{task.attempts}"

    def start(self, *, task: TaskRecord) -> str:
        """Submit the task's config as a run; returns the Flower run id."""
        out = self.run_dir(task)
        out.mkdir(parents=True, exist_ok=True)
        values = {
            "dmsc-config": task.config_json,
            "out-dir": str(out.resolve()),
            "keys-dir": str(self.keys_dir.resolve()) if self.keys_dir else "",
            "control-db": self.db_url,
            "control-task": str(task.id),
            # Every attempt of a task shares its snapshots and its id: a retried or recovered task resumes.
            "snapshot-dir": str((self.runs_dir / f"task-{task.id}" / "snapshots").resolve()),
            "task-id": f"task-{task.id}",
        }
        overrides = out / "run-config.toml"
        overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return str(self.cli.submit(app_dir=self.app, run_config=overrides))

    def poll(self, *, handle: str) -> tuple[RunState, str]:
        """``finished:completed`` -> succeeded; any other ``finished:*`` -> failed; else running."""
        status = self.cli.status(int(handle))
        if status == "finished:completed":
            return "succeeded", status
        if status.startswith("finished"):
            return "failed", status
        return "running", status

    def stop(self, *, handle: str) -> None:
        """Ask the SuperLink to stop the run."""
        self.cli.stop_run(int(handle))

    def log_tail(self, *, handle: str) -> str:
        """The last 60 lines of the run's ServerApp log."""
        return "\n".join(self.cli.logs(int(handle)).splitlines()[-60:])

    def online_sites(self) -> list[tuple[str, int]]:
        """The SuperNodes the SuperLink reports online, by the site names they were registered under."""
        names = {node_id: name for name, node_id in self.node_ids().items()}
        out = []
        for node in self.cli.nodes():
            node_id = int(node["node-id"])
            if str(node.get("status", "")).lower() == "online" and node_id in names:
                out.append((names[node_id], node_id))
        return out

    def node_ids(self) -> dict[str, int]:
        """Site name -> node id, as registered by this coordinator."""
        from dmsc_fed.launcher.remote import site_node_ids

        return site_node_ids(self.state)


def start_dispatcher(
    *, store: Any, runner: FlowerRunner, policy: Policy, every_s: float = 5.0
) -> tuple[threading.Thread, threading.Event]:
    """Run a :class:`~dmsc_fed.control.dispatcher.Dispatcher` in a daemon thread; set the event to stop it."""
    for name, capacity in POOLS.items():
        if name not in {p.name for p in store.registry.pools()}:
            store.registry.define_pool(name=name, device=name, capacity=capacity)
    stop = threading.Event()
    dispatcher = Dispatcher(store=store, runner=runner, policy=policy)
    thread = threading.Thread(target=dispatcher.run, kwargs={"stop": stop, "every_s": every_s}, daemon=True)
    thread.start()
    return thread, stop


def coordinate(
    *,
    host: str,
    port: int,
    keys: Path | None,
    state: Path,
    insecure: bool,
    db_url: str | None,
    api_host: str,
    api_port: int,
    policy: Policy,
    say: Say,
    every_s: float = 5.0,
) -> None:
    """Run the coordinator until interrupted: SuperLink, control store, control API and dispatcher.

    ``state`` holds the SuperLink's database, the control store (``control.db`` unless
    ``db_url`` names another), the API token file (``api-tokens.json``, hashes only), a
    token for the local CLI (``cli-token``, 0600, written on first start) and the
    runs' directories (``runs/task-<id>/attempt-<n>``).
    """
    import uvicorn

    from dmsc_fed.control import Store, sqlite_url
    from dmsc_fed.control.api import create_app
    from dmsc_fed.control.auth import RateSpec, create_token, load_tokens
    from dmsc_fed.launcher.local import app_dir, sigterm_as_interrupt
    from dmsc_fed.launcher.ports import ensure_free
    from dmsc_fed.launcher.processes import ProcessGroup
    from dmsc_fed.launcher.remote import _hold, start_superlink

    state.mkdir(parents=True, exist_ok=True)
    ensure_free(api_port, host=api_host, what="control API port")
    url = db_url or sqlite_url(state / "control.db")
    store = Store.open(url)
    token_file = state / "api-tokens.json"
    if not token_file.exists():
        secret = create_token(path=token_file, name="coordinator")
        cli_token = state / "cli-token"
        cli_token.write_text(secret + "\n")
        cli_token.chmod(0o600)
        say(f"created the API token 'coordinator'; its secret is in {cli_token} (mode 0600)")
    app = create_app(store=store, tokens=load_tokens(path=token_file), rate=RateSpec(capacity=60.0, refill_per_s=10.0))
    server = uvicorn.Server(uvicorn.Config(app, host=api_host, port=api_port, log_level="warning"))
    api = threading.Thread(target=server.run, daemon=True)
    stop: threading.Event | None = None
    try:
        with sigterm_as_interrupt(), ProcessGroup() as group:
            link, cli, server_keys = start_superlink(
                group, host=host, port=port, keys=keys, state=state, insecure=insecure, say=say
            )
            runner = FlowerRunner(
                cli=cli,
                app=app_dir(state / "flower"),
                state=state,
                runs_dir=state / "runs",
                keys_dir=server_keys.directory if server_keys else None,
                db_url=url,
            )
            _, stop = start_dispatcher(store=store, runner=runner, policy=policy, every_s=every_s)
            api.start()
            say(f"control API on http://{api_host}:{api_port}/v1 (OpenAPI at /docs), store {store.url}")
            _hold(group, link, say)
    finally:
        if stop is not None:
            stop.set()
        server.should_exit = True
        if api.is_alive():
            api.join(timeout=10)
        store.close()
