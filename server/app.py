"""The Flower ServerApp of dmsc-fed (component ``server.app:app``).

Run configuration keys (``[tool.flwr.app.config]``):

``dmsc-config``
    The federation config as JSON (set by ``dmsc-fed run``).
``config-file``
    A TOML config, relative to the app root, used when ``dmsc-config`` is empty.
``out-dir``
    Where to write the run directory on the server's machine ("" for none).
``keys-dir``
    The server's key material (``server/`` of ``dmsc-fed keys init``): site
    signing keys and the CKKS context without secret key. Required for tasks
    with DP or encryption; when set, every update must be signed.
``control-db``, ``control-task``
    The coordinator's store URL and the task's id in it (progress is reported there).
``snapshot-dir``
    Where the task's round snapshots live ("" for none). A run that finds a good
    snapshot of the same config there resumes after its round.
``task-id``
    The task's id for signatures and the sites' privacy ledgers, stable across
    restarts (default: ``<name>/<run id>``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated training task."""
    from server.loop import run_federation

    run_federation(grid=grid, run_config=dict(context.run_config), run_id=context.run_id)
