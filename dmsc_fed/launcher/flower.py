"""Thin wrappers over Flower's executables, each run as a separate process.

The executables are ``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI.

Every component gets its own ``FLWR_HOME`` so that nothing is shared with other
Flower installations on the machine, telemetry and update checks are off, and the
SuperLink never installs dependencies at run time (the environment it runs in
already has dmsc-fed installed).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dmsc_fed.errors import LauncherError
from dmsc_fed.launcher.processes import Child
from dmsc_fed.security.pki import TlsFiles

FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
CONNECTION = "dmsc"


def executable(name: str) -> str:
    """Path of a Flower executable, preferring the one beside this Python."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise LauncherError(f"{name!r} not found: is flwr installed in this environment?")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process with its own ``FLWR_HOME``."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(FLWR_ENV)
    env["FLWR_HOME"] = str(home)
    # Flower starts a process per message: let them cache bytecode instead of recompiling every time.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def superlink_argv(*, host: str, port: int, tls: TlsFiles | None, auth: bool, database: Path | None) -> list[str]:
    """Command line of a SuperLink (Fleet, Control and Runtime APIs on one port)."""
    argv = [
        executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
        if auth:
            argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def supernode_argv(
    *,
    superlink: str,
    port: int,
    ca_cert: Path | None,
    private_key: Path | None,
    node_config: Path,
    max_wait_s: float | None = None,
) -> list[str]:
    """Command line of a SuperNode for one site."""
    argv = [
        executable("flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        str(node_config),
    ]
    argv += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_s is not None:
        argv += ["--max-wait-time", str(max_wait_s)]
    return argv


def write_node_config(path: Path, values: dict[str, str]) -> Path:
    """Write a SuperNode ``--node-config`` TOML file (safe for any path or name)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file (empty if it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(*, host: str, port: int, ca_cert: Path | None, child: Child, timeout_s: float = 60.0) -> None:
    """Poll the SuperLink's ``/health`` until it answers, failing early if it exited."""
    scheme = "http" if ca_cert is None else "https"
    ctx = None if ca_cert is None else ssl.create_default_context(cafile=str(ca_cert))
    url = f"{scheme}://{host}:{port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.popen.poll() is not None:
            raise LauncherError(
                f"the SuperLink exited (code {child.popen.returncode}) before it became healthy:\n"
                f"{tail(child.log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError, ssl.SSLError):
            pass
        time.sleep(0.3)
    raise LauncherError(f"the SuperLink at {url} was not healthy after {timeout_s:.0f}s:\n{tail(child.log_path)}")


def _json_from(text: str) -> Any:
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in output")
    return json.loads(text[start:])


class FlowerCli:
    """The ``flwr`` CLI bound to one SuperLink through its own ``FLWR_HOME``."""

    def __init__(self, *, home: Path, address: str, ca_cert: Path | None) -> None:
        self.home = home
        self.env = flower_env(home)
        conn = [f'[superlink]\ndefault = "{CONNECTION}"\n', f"[superlink.{CONNECTION}]", f'address = "{address}"']
        conn.append(
            "insecure = true" if ca_cert is None else f"root-certificates = {json.dumps(str(ca_cert.resolve()))}"
        )
        (home / "config.toml").write_text("\n".join(conn) + "\n")

    def call(self, *args: str, timeout_s: float = 120.0) -> str:
        """Run ``flwr ARGS`` and return its stdout; raise LauncherError on failure."""
        argv = [executable("flwr"), *args]
        try:
            res = subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LauncherError(f"'flwr {' '.join(args)}' did not finish within {timeout_s:.0f}s") from None
        if res.returncode != 0:
            raise LauncherError(
                f"'flwr {' '.join(args[:2])}' failed (code {res.returncode}): "
                f"{(res.stdout + res.stderr).strip()[-2000:]}"
            )
        return res.stdout

    def call_json(self, *args: str, timeout_s: float = 120.0) -> Any:
        """Run ``flwr ARGS --format json`` and parse its JSON reply."""
        out = self.call(*args, "--format", "json", timeout_s=timeout_s)
        try:
            data = _json_from(out)
        except ValueError as err:
            raise LauncherError(f"'flwr {' '.join(args[:2])}' gave no JSON ({err}): {out[-500:]}") from None
        if isinstance(data, dict) and data.get("success") is False:
            raise LauncherError(f"'flwr {' '.join(args[:2])}' failed: {data.get('error-message', data)}")
        return data

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key; returns its node id."""
        data = self.call_json("supernode", "register", str(public_key), CONNECTION, "--name", name)
        return int(data["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's nodes as ``flwr supernode list`` reports them."""
        data = self.call_json("supernode", "list", CONNECTION)
        return list(data.get("nodes", []))

    def submit(self, *, app_dir: Path, run_config: Path) -> int:
        """Submit the Flower App at ``app_dir`` with run-config overrides; returns the run id."""
        data = self.call_json("run", str(app_dir), CONNECTION, "--run-config", str(run_config), timeout_s=300)
        return int(data["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status, e.g. ``running`` or ``finished:completed``."""
        data = self.call_json("ls", CONNECTION, "--run-id", str(run_id))
        runs = data.get("runs", [])
        if not runs:
            raise LauncherError(f"the SuperLink does not know run {run_id}")
        return str(runs[0].get("status", "unknown"))

    def logs(self, run_id: int) -> str:
        """The run's logs as stored by the SuperLink."""
        return self.call("log", str(run_id), CONNECTION, "--show", timeout_s=60)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run."""
        self.call("stop", str(run_id), CONNECTION, timeout_s=60)
