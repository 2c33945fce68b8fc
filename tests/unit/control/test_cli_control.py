"""The control-plane CLI commands against a real control API served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from dmsc_fed.cli import app
from dmsc_fed.control import Store, sqlite_url
from dmsc_fed.control.api import create_app
from dmsc_fed.control.auth import TokenSet
from dmsc_fed.control.models import read_export
from dmsc_fed.errors import LauncherError, StoreError
from tests.unit.control.test_api import TOKEN, fast_validator, seed_store


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Store, dict[str, int], dict[str, str]]]:
    store = Store.open(sqlite_url(tmp_path / "c.db"), seed=0)
    ids = seed_store(store)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = create_app(store=store, tokens=TokenSet.from_secrets(secrets={"ci": TOKEN}), validate_task=fast_validator)
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    try:
        yield store, ids, {"DMSC_FED_API": f"http://127.0.0.1:{port}", "DMSC_FED_TOKEN_FILE": str(token)}
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        store.close()


def test_tasks_dead_cancel_replay_and_models_through_the_api(served, tmp_path: Path) -> None:
    store, ids, env = served
    run = CliRunner().invoke
    res = run(app, ["tasks", "dead"], env=env)
    assert res.exit_code == 0 and "RuntimeError" in res.stdout and "site a crashed" in res.stdout
    res = run(app, ["tasks", "replay", str(ids["dead"])], env=env)
    assert res.exit_code == 0 and store.queue.get(task_id=ids["dead"]).state == "queued"
    res = run(app, ["tasks", "cancel", str(ids["queued"])], env=env)
    assert res.exit_code == 0 and store.queue.get(task_id=ids["queued"]).state == "cancelled"
    res = run(app, ["tasks", "cancel", str(ids["queued"])], env=env)  # already cancelled: 409
    assert isinstance(res.exception, StoreError) and "cannot cancel" in str(res.exception)  # exit 10 via main()
    versions = store.models.versions(task_id=ids["queued"])
    out = tmp_path / "m.safetensors"
    res = run(app, ["models", "export", str(versions[0].id), str(out)], env=env)
    exported = read_export(path=out)
    assert (
        res.exit_code == 0
        and exported.version_id == versions[0].id
        and exported.content_hash == versions[0].content_hash
    )
    res = run(app, ["models", "rollback", str(ids["queued"]), str(versions[0].id)], env=env)
    assert res.exit_code == 0
    latest = store.models.latest(task_id=ids["queued"])
    assert latest is not None and latest.content_hash == versions[0].content_hash
    res = run(app, ["sites"], env=env)
    assert res.exit_code == 0 and "suspect" in res.stdout


def test_unreachable_api_is_a_clear_error(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x\n")
    env = {"DMSC_FED_API": "http://127.0.0.1:9", "DMSC_FED_TOKEN_FILE": str(token)}
    res = CliRunner().invoke(app, ["tasks", "list"], env=env)
    assert isinstance(res.exception, LauncherError) and "cannot reach the control API" in str(res.exception)
