"""The two sides of a multi-machine deployment, each started on its own machine.

* ``dmsc-fed keys init`` (coordinator): CA, SuperLink certificate, site key pairs.
* ``dmsc-fed server`` (coordinator): a SuperLink with TLS and SuperNode
  authentication; it registers the sites' public keys it is given.
* ``dmsc-fed client`` (each site): a SuperNode that names its site and its data.
* ``dmsc-fed submit`` (coordinator): submits a task and follows it round by round.

Both stay in the foreground until Ctrl-C or SIGTERM, then stop their process tree.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmsc_fed.config import SITE_NAME_PATTERN, FederationConfig
from dmsc_fed.errors import ConfigError, Interrupted, LauncherError
from dmsc_fed.launcher.flower import (
    FlowerCli,
    flower_env,
    superlink_argv,
    supernode_argv,
    tail,
    wait_healthy,
    write_node_config,
)
from dmsc_fed.launcher.local import app_dir, sigterm_as_interrupt
from dmsc_fed.launcher.ports import can_connect, ensure_free
from dmsc_fed.launcher.processes import Child, ProcessGroup
from dmsc_fed.launcher.runs import RunEvents, submit_and_follow
from dmsc_fed.security.pki import TlsFiles, create_node_keys, create_tls, require_file

Say = Callable[[str], None]


def init_keys(*, out: Path, sites: list[str], hosts: list[str]) -> dict[str, Path]:
    """Create the federation's transport key material under ``out``."""
    if not sites:
        raise ConfigError("--sites needs at least one site name")
    for site in sites:
        if not re.match(SITE_NAME_PATTERN, site):
            raise ConfigError(f"site name {site!r} must match {SITE_NAME_PATTERN}")
    if (out / "ca.crt").exists():
        raise ConfigError(f"{out} already holds key material (ca.crt); use a new directory")
    tls = create_tls(directory=out, hosts=hosts)
    made: dict[str, Path] = {"ca_cert": tls.ca_cert, "server_cert": tls.server_cert, "server_key": tls.server_key}
    for site in sites:
        keys = create_node_keys(directory=out / "nodes", site=site)
        made[f"{site}_private_key"] = keys.private
        made[f"{site}_public_key"] = keys.public
    return made


def _hold(group: ProcessGroup, main: Child, say: Say) -> None:
    say(f"{main.name} running (pid {main.popen.pid}); logs in {main.log_path}; Ctrl-C to stop")
    try:
        while main.popen.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        raise Interrupted(f"{main.name} stopped") from None
    raise LauncherError(f"{main.name} exited with code {main.popen.returncode}:\n{tail(main.log_path)}")


def serve(
    *, host: str, port: int, certs: Path | None, authorized_keys: Path | None, state: Path, insecure: bool, say: Say
) -> None:
    """Run a SuperLink until interrupted."""
    ensure_free(port, host=host, what="SuperLink port")
    tls = None
    if not insecure:
        if certs is None:
            raise ConfigError("--certs is required unless --insecure (create it with 'dmsc-fed keys init')")
        tls = TlsFiles(
            ca_cert=require_file(certs / "ca.crt", "CA certificate"),
            server_cert=require_file(certs / "server.pem", "server certificate"),
            server_key=require_file(certs / "server.key", "server key"),
        )
    elif authorized_keys is not None:
        raise ConfigError("--authorized-keys needs TLS: SuperNode authentication cannot run with --insecure")
    keys = sorted(authorized_keys.glob("*.pub")) if authorized_keys else []
    if authorized_keys is not None and not keys:
        raise ConfigError(f"no site public keys (*.pub) in {authorized_keys}")
    state.mkdir(parents=True, exist_ok=True)
    with sigterm_as_interrupt(), ProcessGroup() as group:
        argv = superlink_argv(host=host, port=port, tls=tls, auth=bool(keys), database=state / "state.db")
        link = group.start(
            name="SuperLink", argv=argv, env=flower_env(state / "home"), log_path=state / "superlink.log"
        )
        probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        wait_healthy(host=probe, port=port, ca_cert=tls.ca_cert if tls else None, child=link)
        if keys:
            cli = FlowerCli(home=state / "cli", address=f"{probe}:{port}", ca_cert=tls.ca_cert if tls else None)
            registered = {str(n.get("name", "")) for n in cli.nodes()}
            for pub in keys:
                name = pub.name.removesuffix(".pub").removesuffix("_key")
                if name in registered:
                    continue
                node_id = cli.register(pub, name)
                say(f"registered site {name} as node {node_id}")
        _hold(group, link, say)


def submit_run(
    *, cfg: FederationConfig, server: str, ca: Path | None, out: Path, insecure: bool, events: RunEvents
) -> dict[str, Any]:
    """Submit ``cfg`` to the SuperLink at ``server`` and follow it to the end."""
    host, port = _address(server, "--server")
    if not insecure and ca is None:
        raise ConfigError("--ca is required unless --insecure")
    if ca is not None:
        require_file(ca, "CA certificate")
    if not can_connect(host, port):
        raise LauncherError(f"cannot reach the SuperLink at {server}: is 'dmsc-fed server' running?")
    cli = FlowerCli(home=out / "flower" / "cli", address=server, ca_cert=None if insecure else ca)
    return submit_and_follow(cli=cli, cfg=cfg, out=out, app=app_dir(out / "flower"), events=events)


def _address(value: str, flag: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{flag} {value!r} must be HOST:PORT")
    return host, int(port)


def join(
    *,
    server: str,
    site: str,
    data: Path | None,
    ca: Path | None,
    key: Path | None,
    port: int,
    state: Path,
    insecure: bool,
    say: Say,
) -> None:
    """Run this site's SuperNode until interrupted."""
    if not re.match(SITE_NAME_PATTERN, site):
        raise ConfigError(f"--site {site!r} must match {SITE_NAME_PATTERN}")
    host, server_port = _address(server, "--server")
    if insecure and key is not None:
        raise ConfigError("--key needs TLS: drop --insecure or drop --key")
    if not insecure and ca is None:
        raise ConfigError("--ca is required unless --insecure")
    if ca is not None:
        require_file(ca, "CA certificate")
    if key is not None:
        require_file(key, "SuperNode private key")
    if data is not None:
        require_file(data, "site data file")
    ensure_free(port, what="SuperNode runtime port")
    if not can_connect(host, server_port):
        raise LauncherError(f"cannot reach the SuperLink at {server}: is 'dmsc-fed server' running and the port open?")
    state.mkdir(parents=True, exist_ok=True)
    values = {"site-name": site}
    if data is not None:
        values["data-path"] = str(data.resolve())
    node_cfg = write_node_config(state / "node-config.toml", values)
    with sigterm_as_interrupt(), ProcessGroup() as group:
        argv = supernode_argv(
            superlink=server, port=port, ca_cert=None if insecure else ca, private_key=key, node_config=node_cfg
        )
        node = group.start(
            name=f"SuperNode {site}", argv=argv, env=flower_env(state / "home"), log_path=state / "supernode.log"
        )
        _hold(group, node, say)
