"""``dmsc-fed run``: a real Flower deployment on 127.0.0.1, run to completion and torn down.

One SuperLink and one SuperNode per site are started as separate processes.

The steps are those of a real multi-machine deployment (TLS, SuperNode
authentication, one process tree per site); only the addresses are loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from dmsc_fed.config import FederationConfig
from dmsc_fed.errors import AlreadyRunningError, Interrupted, LauncherError
from dmsc_fed.launcher.flower import (
    FlowerCli,
    flower_env,
    superlink_argv,
    supernode_argv,
    tail,
    wait_healthy,
    write_node_config,
)
from dmsc_fed.launcher.ports import free_port
from dmsc_fed.launcher.processes import Child, ProcessGroup
from dmsc_fed.launcher.runs import RunEvents, submit_and_follow
from dmsc_fed.runfiles import ENCRYPTED_MODEL, decrypt_model_file, save_model
from dmsc_fed.security.pki import TlsFiles
from dmsc_fed.security.provision import ServerKeys, SiteKeys, provision
from dmsc_fed.segmentation.layout import SegmentLayout

HOST = "127.0.0.1"
APP_PYPROJECT = """\
[project]
name = "dmsc-fed-app"
version = "{version}"
dependencies = ["flwr>=1.42.0,<1.43"]

[tool.flwr.app]
publisher = "dmsc-fed"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "clients.app:app"

[tool.flwr.app.config]
dmsc-config = ""
config-file = ""
out-dir = ""
keys-dir = ""
control-db = ""
control-task = ""
snapshot-dir = ""
task-id = ""
"""


def state_dir() -> Path:
    """Where machine-wide launcher state (the run lock) lives: ``$DMSC_FED_HOME`` or ``~/.dmsc-fed``."""
    return Path(os.environ.get("DMSC_FED_HOME", Path.home() / ".dmsc-fed"))


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold the machine-wide run lock; a second ``dmsc-fed run`` fails at once."""
    path = state_dir() / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise AlreadyRunningError(
                f"another dmsc-fed run is in progress ({holder}); wait for it to finish or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, writing to {out}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` so cleanup runs (Ctrl-C already raises)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def app_dir(work: Path) -> Path:
    """The Flower App to submit: the source checkout if there is one, else a minimal app.

    The minimal app only names the components; their code comes from the
    installed ``dmsc-fed`` distribution, which the SuperLink's and SuperNodes'
    environments must have.
    """
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
        return root
    from dmsc_fed import __version__

    gen = work / "app"
    gen.mkdir(parents=True, exist_ok=True)
    (gen / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__))
    return gen


@dataclass
class LocalFederation:
    """One local deployment: SuperLink + SuperNodes for ``cfg`` under ``out``."""

    cfg: FederationConfig
    out: Path
    insecure: bool = False
    events: RunEvents = field(default_factory=RunEvents)
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.work = self.out / "flower"
        self.logs = self.out / "logs"
        self.keys = self.work / "keys"

    # ---------------------------------------------------------------- startup
    def _start_superlink(self, group: ProcessGroup, port: int) -> tuple[Child, Path | None]:
        server = ServerKeys.load(self.keys / "server")
        tls = None if self.insecure else TlsFiles(server.ca_cert, server.server_cert, server.server_key)
        argv = superlink_argv(
            host=HOST, port=port, tls=tls, auth=not self.insecure, database=self.work / "superlink" / "state.db"
        )
        child = group.start(
            name="superlink", argv=argv, env=flower_env(self.work / "superlink"), log_path=self.logs / "superlink.log"
        )
        ca = None if tls is None else tls.ca_cert
        wait_healthy(host=HOST, port=port, ca_cert=ca, child=child, timeout_s=self.startup_timeout_s)
        return child, ca

    def _start_sites(self, group: ProcessGroup, cli: FlowerCli, superlink: str, ca: Path | None) -> list[Child]:
        children = []
        for site in self.cfg.sites:
            keys = SiteKeys.load(self.keys / "sites" / site.name)
            key = None
            if not self.insecure:
                cli.register(keys.directory / "supernode.pub", site.name)
                key = keys.supernode_key
            values = {
                "site-name": site.name,
                "threads": "1",
                "keys-dir": str(keys.directory.resolve()),
                "state-dir": str((self.work / "sites" / "state").resolve()),
            }
            if site.data_path is not None:
                values["data-path"] = str(site.data_path)
            if site.policy is not None:
                values["policy"] = str(site.policy)
            node_cfg = write_node_config(self.work / "sites" / f"{site.name}.toml", values)
            argv = supernode_argv(
                superlink=superlink, port=free_port(), ca_cert=ca, private_key=key, node_config=node_cfg
            )
            children.append(
                group.start(
                    name=f"supernode {site.name}",
                    argv=argv,
                    env=flower_env(self.work / "sites" / site.name),
                    log_path=self.logs / f"supernode-{site.name}.log",
                )
            )
        return children

    def _wait_online(self, cli: FlowerCli, nodes: list[Child]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        want = len(nodes)
        online = 0
        while time.monotonic() < deadline:
            for child in nodes:
                if child.popen.poll() is not None:
                    raise LauncherError(f"{child.name} exited (code {child.popen.returncode}):\n{tail(child.log_path)}")
            online = sum(1 for n in cli.nodes() if str(n.get("status", "")).lower() == "online")
            if online >= want:
                return
            time.sleep(1.0)
        raise LauncherError(f"only {online} of {want} SuperNodes came online within {self.startup_timeout_s:.0f}s")

    def _decrypt_final_model(self) -> None:
        """With encryption on, decrypt the final model as a site would, so the run directory has model.pt."""
        encrypted = self.out / ENCRYPTED_MODEL
        if not encrypted.exists():
            return
        from dmsc_fed.training import model_for

        site = SiteKeys.load(self.keys / "sites" / self.cfg.sites[0].name)
        reference = {k: v.numpy() for k, v in model_for(self.cfg).state_dict().items()}
        segments = self.out / "segments.json"
        layout = SegmentLayout.from_json(segments.read_text()) if segments.exists() else None
        state = decrypt_model_file(
            path=encrypted, secret_context=site.he_secret.read_bytes(), reference=reference, layout=layout
        )
        save_model(self.out, state)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Start everything, run the task, write the run directory, stop everything."""
        self.out.mkdir(parents=True, exist_ok=True)
        with run_lock(self.out), sigterm_as_interrupt(), ProcessGroup() as group:
            try:
                self.events.on_stage("creating the federation's keys")
                provision(out=self.keys, sites=[s.name for s in self.cfg.sites], he_profile=self.cfg.privacy.he_profile)
                port = free_port()
                mode = "insecure" if self.insecure else "TLS + SuperNode auth"
                self.events.on_stage(f"starting SuperLink on {HOST}:{port} ({mode})")
                link, ca = self._start_superlink(group, port)
                cli = FlowerCli(home=self.work / "cli", address=f"{HOST}:{port}", ca_cert=ca)
                self.events.on_stage(f"starting {len(self.cfg.sites)} SuperNodes")
                nodes = self._start_sites(group, cli, f"{HOST}:{port}", ca)
                self._wait_online(cli, nodes)

                def check_alive() -> None:
                    if link.popen.poll() is not None:
                        raise LauncherError(f"the SuperLink exited during the run:\n{tail(link.log_path)}")

                result = submit_and_follow(
                    cli=cli,
                    cfg=self.cfg,
                    out=self.out,
                    app=app_dir(self.work),
                    events=self.events,
                    check_alive=check_alive,
                    keys_dir=(self.keys / "server").resolve(),
                )
                self._decrypt_final_model()
                return result
            except KeyboardInterrupt:
                raise Interrupted("interrupted (Ctrl-C); all processes stopped") from None
            finally:
                self.events.on_stage("stopping Flower processes")
