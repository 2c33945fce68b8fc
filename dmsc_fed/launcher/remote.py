"""The two sides of a multi-machine deployment, each started on its own machine.

* ``dmsc-fed keys init`` (coordinator): all key material (:mod:`dmsc_fed.security.provision`).
* ``dmsc-fed server`` (coordinator): a SuperLink with TLS and SuperNode
  authentication; it registers the sites' SuperNode keys.
* ``dmsc-fed client`` (each site): a SuperNode that names its site and its data.
* ``dmsc-fed submit`` (coordinator): submits a task and follows it round by round.

Both stay in the foreground until Ctrl-C or SIGTERM, then stop their process tree.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
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
from dmsc_fed.privacy.policy import load_policy
from dmsc_fed.security.pki import TlsFiles, require_file
from dmsc_fed.security.provision import ServerKeys, SiteKeys

Say = Callable[[str], None]


#: What a SuperNode logs when the SuperLink refuses to activate it (its previous session is still online).
STILL_ACTIVE = "Failed to activate SuperNode"
#: How long a restarted site keeps retrying while its previous session expires (Flower: 2 x 30 s heartbeats).
REJOIN_WAIT_S = 180.0
REJOIN_RETRY_S = 10.0


def _hold(group: ProcessGroup, main: Child, say: Say) -> None:
    say(f"{main.name} running (pid {main.popen.pid}); logs in {main.log_path}; Ctrl-C to stop")
    try:
        while main.popen.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        raise Interrupted(f"{main.name} stopped") from None
    raise LauncherError(f"{main.name} exited with code {main.popen.returncode}:\n{tail(main.log_path)}")


def hold_rejoining(
    group: ProcessGroup,
    *,
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    log_path: Path,
    say: Say,
    wait_s: float = REJOIN_WAIT_S,
    retry_s: float = REJOIN_RETRY_S,
) -> None:
    """Run a SuperNode until interrupted, starting it again while the SuperLink still holds its old session.

    A site restarted right after a crash is refused (Flower keeps the previous session
    online until two heartbeats are missed); it retries every ``retry_s`` for up to
    ``wait_s`` and then fails with the SuperNode's own message.
    """
    give_up = time.monotonic() + wait_s
    while True:
        offset = log_path.stat().st_size if log_path.exists() else 0
        node = group.start(name=name, argv=argv, env=env, log_path=log_path)
        try:
            _hold(group, node, say)
        except LauncherError:
            with log_path.open("rb") as fh:
                fh.seek(offset)
                held = STILL_ACTIVE in fh.read().decode(errors="replace")
            if not held or time.monotonic() > give_up:
                raise
            say(f"the SuperLink still holds this site's previous session; retrying in {retry_s:g} s")
            time.sleep(retry_s)


def start_superlink(
    group: ProcessGroup, *, host: str, port: int, keys: Path | None, state: Path, insecure: bool, say: Say
) -> tuple[Child, FlowerCli, ServerKeys | None]:
    """Start a SuperLink in ``group`` (TLS and SuperNode auth unless ``insecure``) and register the sites' keys.

    Returns the SuperLink's child process, a ``flwr`` CLI bound to it, and the
    server's key material (None when insecure without keys).
    """
    ensure_free(port, host=host, what="SuperLink port")
    server = None
    if keys is not None:
        server = ServerKeys.load(keys)
    elif not insecure:
        raise ConfigError("--keys is required unless --insecure (the server/ folder of 'dmsc-fed keys init')")
    tls = None if insecure or server is None else TlsFiles(server.ca_cert, server.server_cert, server.server_key)
    nodes = server.supernode_keys() if server is not None and tls is not None else {}
    if tls is not None and not nodes:
        raise ConfigError(f"no site SuperNode keys in {keys}/supernodes: add sites with 'dmsc-fed keys add-site'")
    state.mkdir(parents=True, exist_ok=True)
    argv = superlink_argv(host=host, port=port, tls=tls, auth=bool(nodes), database=state / "state.db")
    link = group.start(name="SuperLink", argv=argv, env=flower_env(state / "home"), log_path=state / "superlink.log")
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    ca = tls.ca_cert if tls else None
    wait_healthy(host=probe, port=port, ca_cert=ca, child=link)
    cli = FlowerCli(home=state / "cli", address=f"{probe}:{port}", ca_cert=ca)
    if nodes:
        register_sites(cli, nodes=nodes, state=state, say=say)
    return link, cli, server


NODE_IDS = "supernodes.json"


def site_node_ids(state: Path) -> dict[str, int]:
    """Site name -> Flower node id of the SuperNode keys this SuperLink registered (``state/supernodes.json``).

    ``flwr supernode list`` does not report the names given at registration, so the
    coordinator keeps them itself.
    """
    path = state / NODE_IDS
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is malformed ({err}); delete it and restart with a fresh --state") from None


def register_sites(cli: FlowerCli, *, nodes: dict[str, Path], state: Path, say: Say) -> dict[str, int]:
    """Register every site's SuperNode key not yet registered with this SuperLink; returns name -> node id.

    A SuperLink restarted on the same state keeps its registrations (and refuses a key
    registered twice), so the ids are kept in ``state/supernodes.json`` and only new
    sites, or sites whose registration the SuperLink lost, are registered.
    """
    known = site_node_ids(state)
    listed = {int(n["node-id"]) for n in cli.nodes() if str(n.get("status", "")) != "unregistered"}
    for name, pub in nodes.items():
        if known.get(name) in listed:
            continue
        known[name] = cli.register(pub, name)
        say(f"registered site {name} as node {known[name]}")
    tmp = state / (NODE_IDS + ".tmp")
    tmp.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    tmp.replace(state / NODE_IDS)
    return known


def serve(*, host: str, port: int, keys: Path | None, state: Path, insecure: bool, say: Say) -> None:
    """Run a SuperLink until interrupted; registers every site's SuperNode key found in ``keys``."""
    with sigterm_as_interrupt(), ProcessGroup() as group:
        link, _, _ = start_superlink(group, host=host, port=port, keys=keys, state=state, insecure=insecure, say=say)
        _hold(group, link, say)


def submit_run(
    *, cfg: FederationConfig, server: str, keys: Path | None, out: Path, insecure: bool, events: RunEvents
) -> dict[str, Any]:
    """Submit ``cfg`` to the SuperLink at ``server`` and follow it to the end.

    ``keys`` is the server's key folder on this (the coordinator's) machine: its
    CA certificate secures the connection, and the ServerApp verifies the
    sites' signatures and aggregates ciphertexts with it.
    """
    host, port = _address(server, "--server")
    server_keys = ServerKeys.load(keys) if keys is not None else None
    if server_keys is None and not insecure:
        raise ConfigError("--keys is required unless --insecure (the server/ folder of 'dmsc-fed keys init')")
    if not can_connect(host, port):
        raise LauncherError(f"cannot reach the SuperLink at {server}: is 'dmsc-fed server' running?")
    ca = None if insecure or server_keys is None else server_keys.ca_cert
    cli = FlowerCli(home=out / "flower" / "cli", address=server, ca_cert=ca)
    return submit_and_follow(
        cli=cli,
        cfg=cfg,
        out=out,
        app=app_dir(out / "flower"),
        events=events,
        keys_dir=server_keys.directory.resolve() if server_keys else None,
    )


def _address(value: str, flag: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{flag} {value!r} must be HOST:PORT")
    return host, int(port)


def join(
    *,
    server: str,
    site: str,
    keys: Path | None,
    data: Path | None,
    policy: Path | None,
    port: int,
    state: Path,
    insecure: bool,
    say: Say,
    chaos: str | None = None,
) -> None:
    """Run this site's SuperNode until interrupted.

    ``chaos`` is a fault-injection schedule for chaos tests (:mod:`clients.chaos`); the
    site refuses to train with one unless ``DMSC_FED_ALLOW_CHAOS=1`` is set.
    """
    if not re.match(SITE_NAME_PATTERN, site):
        raise ConfigError(f"--site {site!r} must match {SITE_NAME_PATTERN}")
    host, server_port = _address(server, "--server")
    site_keys = SiteKeys.load(keys) if keys is not None else None
    if site_keys is None and not insecure:
        raise ConfigError("--keys is required unless --insecure (this site's folder from 'dmsc-fed keys init')")
    if data is not None:
        require_file(data, "site data file")
    if policy is not None:
        load_policy(policy)  # a bad policy is an error now, not at the first task
    ensure_free(port, what="SuperNode runtime port")
    if not can_connect(host, server_port):
        raise LauncherError(f"cannot reach the SuperLink at {server}: is 'dmsc-fed server' running and the port open?")
    state.mkdir(parents=True, exist_ok=True)
    values = {"site-name": site, "state-dir": str(state.resolve())}
    if site_keys is not None:
        values["keys-dir"] = str(site_keys.directory.resolve())
    if data is not None:
        values["data-path"] = str(data.resolve())
    if policy is not None:
        values["policy"] = str(policy.resolve())
    if chaos:
        from clients.chaos import Chaos

        Chaos.parse(chaos)  # a bad schedule is an error now, not at the first round
        values["chaos"] = chaos
        say(f"fault injection on: {chaos} (chaos testing only)")
    node_cfg = write_node_config(state / "node-config.toml", values)
    with sigterm_as_interrupt(), ProcessGroup() as group:
        argv = supernode_argv(
            superlink=server,
            port=port,
            ca_cert=None if insecure or site_keys is None else site_keys.ca_cert,
            private_key=None if insecure or site_keys is None else site_keys.supernode_key,
            node_config=node_cfg,
        )
        hold_rejoining(
            group,
            name=f"SuperNode {site}",
            argv=argv,
            env=flower_env(state / "home"),
            log_path=state / "supernode.log",
            say=say,
        )
