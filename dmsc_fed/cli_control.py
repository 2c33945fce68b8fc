"""The control-plane commands: ``dmsc-fed coordinator``, ``tasks``, ``sites``, ``models``.

``coordinator`` runs the long-lived server (SuperLink, control API, dispatcher). The
others are clients of its control API (:mod:`dmsc_fed.control.client`): they need the
API's address (``--api``, ``$DMSC_FED_API``, default ``http://127.0.0.1:8470``) and a
token (``--token-file``, ``$DMSC_FED_TOKEN_FILE``, default the local coordinator's
``cli-token``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dmsc_fed.config import load_config

console = Console()
tasks_app = typer.Typer(no_args_is_help=True, help="Submit and manage queued tasks (through the control API).")
models_app = typer.Typer(no_args_is_help=True, help="List, export and roll back model versions.")

Api = Annotated[str | None, typer.Option("--api", help="Control API base URL (default $DMSC_FED_API or local).")]
TokenFile = Annotated[Path | None, typer.Option("--token-file", help="File holding an API token.")]


def _client(api: str | None, token_file: Path | None) -> Any:
    from dmsc_fed.control.client import ApiClient

    return ApiClient.connect(api=api, token_file=token_file)


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def coordinator(
    keys: Annotated[Path | None, typer.Option(help="The server/ folder of 'dmsc-fed keys init'.")] = None,
    state: Annotated[Path | None, typer.Option(help="State directory (default $DMSC_FED_HOME/coordinator).")] = None,
    port: Annotated[int, typer.Option(help="SuperLink port.")] = 9092,
    host: Annotated[str, typer.Option(help="SuperLink address; 0.0.0.0 for all interfaces.")] = "127.0.0.1",
    db: Annotated[str | None, typer.Option(help="Store URL (default: SQLite in the state directory).")] = None,
    api_port: Annotated[int, typer.Option(help="Control API port.")] = 8470,
    api_host: Annotated[str, typer.Option(help="Control API address.")] = "127.0.0.1",
    policy: Annotated[str, typer.Option(help="Dispatch policy: fcfs, priority or weighted.")] = "priority",
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no SuperNode auth (testing only).")] = False,
) -> None:
    """Run the long-lived coordinator: SuperLink, control API and task dispatcher."""
    from dmsc_fed.control.client import default_token_file
    from dmsc_fed.control.queue import POLICIES
    from dmsc_fed.errors import ConfigError
    from dmsc_fed.launcher.coordinator import coordinate

    if insecure or keys is None:
        raise ConfigError(
            "the coordinator knows sites by their registered SuperNode keys: run it with --keys "
            "(the server/ folder of 'dmsc-fed keys init'); --insecure is for 'dmsc-fed server' only"
        )
    if policy not in POLICIES:
        raise ConfigError(f"--policy must be one of {list(POLICIES)}, not {policy!r}")
    coordinate(
        host=host,
        port=port,
        keys=keys,
        state=state or default_token_file().parent,
        insecure=insecure,
        db_url=db,
        api_host=api_host,
        api_port=api_port,
        policy=policy,  # type: ignore[arg-type]
        say=console.print,
    )


@tasks_app.command("submit")
def tasks_submit(
    config: Annotated[Path, typer.Argument(help="Federation config (TOML).")],
    priority: Annotated[int, typer.Option(help="Higher runs first under the priority policy.")] = 0,
    weight: Annotated[float, typer.Option(help="Share under the weighted policy.")] = 1.0,
    max_attempts: Annotated[int, typer.Option(help="Attempts before the task is dead-lettered.")] = 3,
    timeout: Annotated[float | None, typer.Option(help="Seconds before a running task counts as hung.")] = None,
    min_sites: Annotated[int | None, typer.Option(help="Healthy sites needed to start (default: all).")] = None,
    api: Api = None,
    token_file: TokenFile = None,
) -> None:
    """Queue a training task."""
    cfg = load_config(path=config)
    body: dict[str, Any] = {
        "kind": "train",
        "config": cfg.model_dump(mode="json"),
        "priority": priority,
        "weight": weight,
        "max_attempts": max_attempts,
        "pools_needed": sorted({s.pool for s in cfg.sites}),
        "min_sites": min_sites if min_sites is not None else len(cfg.sites),
    }
    if timeout is not None:
        body["timeout_s"] = timeout
    task = _client(api, token_file).request("POST", "/tasks", json=body)
    console.print(f"queued task {task['id']} ({cfg.name}, priority {priority})")


@tasks_app.command("list")
def tasks_list(
    state: Annotated[str | None, typer.Option(help="Only tasks in this state.")] = None,
    api: Api = None,
    token_file: TokenFile = None,
) -> None:
    """List tasks."""
    rows = _client(api, token_file).request("GET", "/tasks", params={"state": state} if state else None)
    _table("tasks", rows, ["id", "state", "priority", "attempts", "max_attempts", "submitted_at", "finished_at"])


@tasks_app.command("dead")
def tasks_dead(api: Api = None, token_file: TokenFile = None) -> None:
    """List dead-lettered tasks with their last failure."""
    rows = _client(api, token_file).request("GET", "/tasks/dead")
    flat = []
    for row in rows:
        task = row.get("task", row)
        failures = row.get("failures", [])
        last = failures[-1] if failures else {}
        flat.append(task | {"exc_type": last.get("exc_type"), "message": last.get("message")})
    _table("dead-lettered tasks", flat, ["id", "attempts", "exc_type", "message", "finished_at"])


@tasks_app.command("replay")
def tasks_replay(task_id: int, api: Api = None, token_file: TokenFile = None) -> None:
    """Requeue a failed or dead-lettered task."""
    task = _client(api, token_file).request("POST", f"/tasks/{task_id}/replay")
    console.print(f"task {task['id']} is {task['state']} again")


@tasks_app.command("cancel")
def tasks_cancel(task_id: int, api: Api = None, token_file: TokenFile = None) -> None:
    """Cancel a task."""
    task = _client(api, token_file).request("POST", f"/tasks/{task_id}/cancel")
    console.print(f"task {task['id']} is {task['state']}")


def sites(api: Api = None, token_file: TokenFile = None) -> None:
    """List the registered sites with their health and capabilities, and the pools."""
    client = _client(api, token_file)
    _table(
        "sites",
        client.request("GET", "/sites"),
        ["name", "health", "pool", "node_id", "software_version", "device", "dataset_size", "last_seen"],
    )
    _table("pools", client.request("GET", "/pools"), ["name", "device", "capacity"])


@models_app.command("list")
def models_list(
    task: Annotated[str, typer.Option(help="Task id.")], api: Api = None, token_file: TokenFile = None
) -> None:
    """List a task's model versions."""
    rows = _client(api, token_file).request("GET", "/models", params={"task_id": task})
    _table(f"model versions of task {task}", rows, ["id", "round", "metrics", "sites", "content_hash", "created_at"])


@models_app.command("export")
def models_export(version: int, path: Path, api: Api = None, token_file: TokenFile = None) -> None:
    """Save a model version as a safetensors file."""
    data = _client(api, token_file).request("GET", f"/models/{version}/export")
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    console.print(f"model version {version} written to {path}")


@models_app.command("rollback")
def models_rollback(task: str, version: int, api: Api = None, token_file: TokenFile = None) -> None:
    """Make an earlier version the task's latest (nothing is deleted)."""
    row = _client(api, token_file).request("POST", f"/models/{task}/rollback", json={"version_id": version})
    console.print(f"task {task}: version {row['id']} now holds version {version}'s model")
