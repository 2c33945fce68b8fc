"""Per-round overhead of dmsc-fed against plain Flower, on the same engine.

What is measured
----------------
The same task (config, model, data partition, scaler, seeds, local epochs,
``threads = 1`` per site) is run end to end twice, on identical deployments:
one ``flower-superlink --insecure`` and one ``flower-supernode`` per site, all
real processes on 127.0.0.1, started with dmsc-fed's own launcher primitives
(``superlink_argv``, ``supernode_argv``, ``flower_env``, ``ProcessGroup``).

* **plain**: ``benchmarks/plain_flower_app``, Flower's own
  ``flwr.serverapp.strategy.FedAvg`` (train + evaluate every round) and a
  ClientApp that calls dmsc-fed's ``load_site_data``/``model_for``/``train``/
  ``evaluate``. It gets the task config and the federated feature scaler
  through the run config; the scaler is fitted here, before the run, from
  ``describe_site`` of every site, exactly what dmsc-fed's join phase
  computes (the data are public and bundled, so this is only a shortcut).
* **ours**: ``LocalFederation(cfg, insecure=True).run()`` (no DP, no HE).

The figure compared is the **per-round wall time measured inside the
ServerApp**, from ``configure_train`` of round r to the end of
``aggregate_evaluate`` of round r, for both stacks. Start-up, dmsc-fed's join
phase and tear-down are outside the rounds and excluded. The ratio is
``mean(ours) / mean(plain)``; the goal is at most 1.1.

The driver follows each run the way ``LocalFederation`` does (a ``flwr ls``
call about every second), so both runs see the same background load.

The plain run also records where Flower's own time goes in a round: for each
phase (train, evaluate), the reply that arrived last is split into
server push, dispatch (SuperNode idle poll of 3 s + SuperExec poll of 1 s +
process spawn), ClientApp process start-up (interpreter, flwr, connecting,
fetching the message and the app), imports in the handler (torch, dmsc-fed),
local work (data loading, scaling, training or evaluation) and reply collection
(SuperNode push + the ServerApp's 3 s pull poll). Before the runs, the cost of
a fresh Python process importing flwr + torch + dmsc-fed and of one ``flwr``
CLI call is timed on their own.

Usage::

    python benchmarks/round_overhead.py [--config PATH] [--rounds 3] [--pairs 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from dmsc_fed.config import FederationConfig, load_config, parse_config
from dmsc_fed.data import describe_site, fit_scaler
from dmsc_fed.errors import DmscError, LauncherError, RunFailedError
from dmsc_fed.launcher.flower import (
    FlowerCli,
    executable,
    flower_env,
    superlink_argv,
    supernode_argv,
    tail,
    wait_healthy,
    write_node_config,
)
from dmsc_fed.launcher.local import LocalFederation, sigterm_as_interrupt
from dmsc_fed.launcher.ports import free_port
from dmsc_fed.launcher.processes import Child, ProcessGroup
from dmsc_fed.launcher.runs import RunEvents

REPO = Path(__file__).resolve().parents[1]
PLAIN_APP = Path(__file__).resolve().parent / "plain_flower_app"
DEFAULT_CONFIG = REPO / "examples" / "hospital" / "config.toml"
HOST = "127.0.0.1"
GOAL = 1.1
STARTUP_TIMEOUT_S = 120.0
IMPORTS = "import flwr.clientapp, torch, dmsc_fed.data, dmsc_fed.training"


class BenchmarkTimeout(Exception):
    """A run took longer than ``--run-timeout``."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`BenchmarkTimeout` in the main thread after ``seconds`` (SIGALRM)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise BenchmarkTimeout(f"the run did not finish within {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress line on stderr, with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    """One end-to-end run of one stack."""

    stack: str
    index: int
    rows: list[dict[str, Any]]
    out: Path
    status_calls: list[float] = field(default_factory=list)
    load: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-min load average when the run ended

    @property
    def seconds(self) -> list[float]:
        """Per-round wall times, in round order."""
        return [float(r["seconds"]) for r in sorted(self.rows, key=lambda r: int(r["round"]))]


# --------------------------------------------------------------------- setup
def task_config(path: Path, rounds: int) -> FederationConfig:
    """The config at ``path`` with ``rounds`` rounds (validated again)."""
    cfg = load_config(path=path)
    return parse_config(data=cfg.model_dump(mode="json") | {"rounds": rounds}, source=str(path))


def federated_scaler(cfg: FederationConfig) -> str:
    """The scaler dmsc-fed's join phase fits, as JSON; "" when the task uses none."""
    summaries = [describe_site(cfg=cfg, site=s.name, data_path=s.data_path) for s in cfg.sites]
    stats = [s.stats for s in summaries if s.stats is not None]
    if not stats:
        return ""
    scaler = fit_scaler(stats)
    return json.dumps({"mean": scaler.mean.tolist(), "std": scaler.std.tolist()})


def timed(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one command (which must succeed)."""
    start = time.perf_counter()
    subprocess.run(
        list(argv),
        env=env,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    return time.perf_counter() - start


def fixed_costs(work: Path) -> dict[str, float]:
    """Median of 3 timings of the per-process costs Flower pays (also warms the page cache)."""
    env = flower_env(work / "cli-probe")
    probes: dict[str, Sequence[str]] = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python: import flwr.clientapp": [sys.executable, "-c", "import flwr.clientapp"],
        "python: import flwr + torch + dmsc-fed": [sys.executable, "-c", IMPORTS],
        "flwr --help (one CLI call)": [executable("flwr"), "--help"],
    }
    return {name: statistics.median(timed(argv, env) for _ in range(3)) for name, argv in probes.items()}


# ------------------------------------------------------------- plain Flower
def _wait_online(cli: FlowerCli, nodes: list[Child]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    online = 0
    while time.monotonic() < deadline:
        for child in nodes:
            if child.popen.poll() is not None:
                raise LauncherError(f"{child.name} exited (code {child.popen.returncode}):\n{tail(child.log_path)}")
        online = sum(1 for n in cli.nodes() if str(n.get("status", "")).lower() == "online")
        if online >= len(nodes):
            return
        time.sleep(1.0)
    raise LauncherError(f"only {online} of {len(nodes)} SuperNodes came online within {STARTUP_TIMEOUT_S:.0f}s")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_plain(
    cfg: FederationConfig, scaler: str, out: Path, on_round: Callable[[dict[str, Any]], None], index: int
) -> RunResult:
    """Run the plain-Flower app on a fresh SuperLink + SuperNodes set up as ``LocalFederation`` does."""
    work, logs, metrics = out / "flower", out / "logs", out / "metrics.jsonl"
    result = RunResult(stack="plain", index=index, rows=[], out=out)
    with sigterm_as_interrupt(), ProcessGroup() as group:
        port = free_port()
        say(f"plain: starting SuperLink on {HOST}:{port} (insecure)")
        link = group.start(
            name="superlink",
            argv=superlink_argv(host=HOST, port=port, tls=None, auth=False, database=work / "superlink" / "state.db"),
            env=flower_env(work / "superlink"),
            log_path=logs / "superlink.log",
        )
        wait_healthy(host=HOST, port=port, ca_cert=None, child=link, timeout_s=STARTUP_TIMEOUT_S)
        cli = FlowerCli(home=work / "cli", address=f"{HOST}:{port}", ca_cert=None)
        say(f"plain: starting {len(cfg.sites)} SuperNodes")
        nodes = []
        for site in cfg.sites:
            values = {"site-name": site.name, "threads": "1"}
            if site.data_path is not None:
                values["data-path"] = str(site.data_path)
            node_cfg = write_node_config(work / "sites" / f"{site.name}.toml", values)
            argv = supernode_argv(
                superlink=f"{HOST}:{port}", port=free_port(), ca_cert=None, private_key=None, node_config=node_cfg
            )
            nodes.append(
                group.start(
                    name=f"supernode {site.name}",
                    argv=argv,
                    env=flower_env(work / "sites" / site.name),
                    log_path=logs / f"supernode-{site.name}.log",
                )
            )
        _wait_online(cli, nodes)
        overrides = work / "run-config.toml"
        overrides.write_text(
            f"dmsc-config = {json.dumps(cfg.to_json())}\nscaler = {json.dumps(scaler)}\n"
            f"metrics-file = {json.dumps(str(metrics.resolve()))}\n"
        )
        run_id = cli.submit(app_dir=PLAIN_APP, run_config=overrides)
        say(f"plain: run {run_id} submitted; training {cfg.rounds} rounds")
        status = "pending"
        try:
            while not status.startswith("finished"):
                rows = _read_rows(metrics)
                for row in rows[len(result.rows) :]:
                    on_round(row)
                result.rows = rows
                if link.popen.poll() is not None:
                    raise LauncherError(f"the SuperLink exited during the run:\n{tail(link.log_path)}")
                start = time.perf_counter()
                status = cli.status(run_id)
                result.status_calls.append(time.perf_counter() - start)
                time.sleep(1.0)
            result.rows = _read_rows(metrics)
            (logs / "run.log").write_text(cli.logs(run_id))
        finally:
            if not status.startswith("finished"):
                with contextlib.suppress(Exception):
                    cli.stop_run(run_id)
        say("plain: stopping Flower processes")
    if status != "finished:completed":
        raise RunFailedError(f"plain run {run_id} ended as {status}:\n{tail(logs / 'run.log', 25)}")
    result.load = os.getloadavg()[0]
    return result


# ---------------------------------------------------------------------- ours
def run_ours(cfg: FederationConfig, out: Path, on_round: Callable[[dict[str, Any]], None], index: int) -> RunResult:
    """Run dmsc-fed's own launcher (insecure: no TLS, no SuperNode auth, no DP, no HE)."""
    events = RunEvents(on_stage=lambda msg: say(f"ours: {msg}"), on_round=on_round)
    LocalFederation(cfg=cfg, out=out, insecure=True, events=events, startup_timeout_s=STARTUP_TIMEOUT_S).run()
    return RunResult(stack="ours", index=index, rows=_read_rows(out / "metrics.jsonl"), out=out)


# ------------------------------------------------------------------ analysis
PHASE_PARTS = (
    ("server: configure + push", "configure", "pushed"),
    ("dispatch: SuperNode 3 s poll + SuperExec 1 s poll + spawn", "pushed", "process-start"),
    ("ClientApp process start-up (python, flwr, fetch msg + app)", "process-start", "handler-start"),
    ("handler imports (torch, dmsc-fed)", "handler-start", "work-start"),
    ("local work (data load + scale + train/eval)", "work-start", "handler-end"),
    ("reply collection: SuperNode push + ServerApp 3 s pull poll", "handler-end", "aggregate"),
)


def phase_breakdown(rows: list[dict[str, Any]], phase: str) -> tuple[dict[str, float], float, float]:
    """Mean over rounds of the critical path of ``phase``, its mean wall time and mean pull count.

    The critical path is that of the reply whose handler finished last: its parts add
    up exactly to the phase's wall time (configure_* to aggregate_*).
    """
    parts: dict[str, list[float]] = {name: [] for name, _, _ in PHASE_PARTS}
    walls, pulls = [], []
    for row in rows:
        ph: dict[str, Any] = row.get(phase) or {}
        replies = [r for r in ph.get("replies", []) if "handler-end" in r]
        if not replies:
            continue
        last = max(replies, key=lambda r: float(r["handler-end"]))
        stamps = {
            **{k: float(v) for k, v in last.items()},
            **{k: float(ph[k]) for k in ("configure", "pushed", "aggregate")},
        }
        for name, a, b in PHASE_PARTS:
            parts[name].append(stamps[b] - stamps[a])
        walls.append(stamps["aggregate"] - stamps["configure"])
        pulls.append(float(ph.get("pulls", 0)))
    return (
        {k: statistics.fmean(v) for k, v in parts.items() if v},
        statistics.fmean(walls) if walls else float("nan"),
        statistics.fmean(pulls) if pulls else float("nan"),
    )


def all_replies(rows: list[dict[str, Any]], a: str, b: str) -> list[float]:
    """``b - a`` over every reply of every phase of every round."""
    return [
        float(r[b]) - float(r[a])
        for row in rows
        for ph in ("train", "evaluate")
        for r in (row.get(ph) or {}).get("replies", [])
        if a in r and b in r
    ]


def train_times(result: RunResult) -> list[float]:
    """The sites' reported local training times (``train-time-s``) over all rounds."""
    if result.stack == "ours":
        return [
            float(site["train"]["train-time-s"])
            for row in result.rows
            for site in row.get("per_site", {}).values()
            if "train-time-s" in site.get("train", {})
        ]
    return [
        float(r["handler-end"]) - float(r["work-start"])
        for row in result.rows
        for r in (row.get("train") or {}).get("replies", [])
        if "work-start" in r
    ]


def _fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:6.2f}" for v in values)


def report(results: list[RunResult], costs: dict[str, float], cfg: FederationConfig) -> None:
    """Print the per-round table, the ratio and Flower's own per-round costs."""
    print()
    print(
        f"Task {cfg.name!r}: {len(cfg.sites)} sites, dataset {cfg.dataset.name}, model {cfg.model.name}, "
        f"{cfg.rounds} rounds, {cfg.local_epochs} local epochs; insecure; {os.cpu_count()} CPUs"
    )
    print()
    print(f"{'stack':<6} {'run':>3} {'rounds':>6} {'mean s':>7} {'median s':>8} {'load':>5}  per-round seconds")
    for r in results:
        s = r.seconds
        print(
            f"{r.stack:<6} {r.index:>3} {len(s):>6} {statistics.fmean(s):7.2f} {statistics.median(s):8.2f} "
            f"{r.load:5.2f}  {_fmt(s)}"
        )
    by_stack = {k: [x for r in results if r.stack == k for x in r.seconds] for k in ("plain", "ours")}
    print()
    for k, s in by_stack.items():
        if s:
            print(
                f"{k:<6} all rounds: n={len(s)} mean={statistics.fmean(s):.2f}s median={statistics.median(s):.2f}s "
                f"min={min(s):.2f}s max={max(s):.2f}s"
            )
    if by_stack["plain"] and by_stack["ours"]:
        ratio = statistics.fmean(by_stack["ours"]) / statistics.fmean(by_stack["plain"])
        ratio_med = statistics.median(by_stack["ours"]) / statistics.median(by_stack["plain"])
        verdict = "within" if ratio <= GOAL else "NOT within"
        print(f"ratio ours/plain: {ratio:.3f} (means), {ratio_med:.3f} (medians) -> {verdict} the {GOAL}x goal")
    for r in results:
        t = train_times(r)
        if t:
            print(
                f"{r.stack:<6} run {r.index}: local train time per site-round mean {statistics.fmean(t):.2f}s "
                f"(plain: whole handler work incl. data load; ours: train() only)"
            )

    plain_rows = [row for r in results if r.stack == "plain" for row in r.rows]
    if plain_rows:
        print()
        print("Where plain Flower's round time goes (critical path = last reply of each phase, mean over rounds):")
        tr, tr_wall, tr_pulls = phase_breakdown(plain_rows, "train")
        ev, ev_wall, ev_pulls = phase_breakdown(plain_rows, "evaluate")
        print(f"  {'part':<62} {'train s':>8} {'eval s':>8}")
        for name, _, _ in PHASE_PARTS:
            print(f"  {name:<62} {tr.get(name, float('nan')):8.2f} {ev.get(name, float('nan')):8.2f}")
        print(f"  {'phase wall (configure_* -> aggregate_*)':<62} {tr_wall:8.2f} {ev_wall:8.2f}")
        print(f"  {'ServerApp pull requests per phase (n-1 sleeps of 3 s)':<62} {tr_pulls:8.2f} {ev_pulls:8.2f}")
        rest = [
            float(row["seconds"])
            - (float(row["train"]["aggregate"]) - float(row["train"]["configure"]))
            - (float(row["evaluate"]["aggregate"]) - float(row["evaluate"]["configure"]))
            for row in plain_rows
        ]
        print(f"  server-side between phases (aggregation etc.), per round: {statistics.fmean(rest):.2f}s")
        spawn = all_replies(plain_rows, "process-start", "handler-start")
        imports = all_replies(plain_rows, "handler-start", "work-start")
        if spawn:
            print(
                f"  over all {len(spawn)} messages: process start-up mean {statistics.fmean(spawn):.2f}s, "
                f"handler imports mean {statistics.fmean(imports):.2f}s "
                f"(a fresh process per message, each paid once per message)"
            )
        calls = [c for r in results for c in r.status_calls]
        if calls:
            print(
                f"  driver's 'flwr ls' status call (as LocalFederation polls): mean {statistics.fmean(calls):.2f}s "
                f"over {len(calls)} calls, one about every {1 + statistics.fmean(calls):.1f}s"
            )
    print()
    print("Fixed per-process costs measured on their own before the runs (median of 3):")
    for name, value in costs.items():
        print(f"  {name:<40} {value:6.2f}s")


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="federation config (TOML)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (both stacks)")
    parser.add_argument("--pairs", type=int, default=1, help="how many (plain, ours) pairs to run, alternating")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a new temp dir, kept)")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds allowed per run")
    args = parser.parse_args(argv)

    cfg = task_config(args.config, args.rounds)
    out = (args.out or Path(tempfile.mkdtemp(prefix="round-overhead-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["DMSC_FED_HOME"] = str(out / "dmsc-fed-home")  # our run lock lives here, not in ~/.dmsc-fed
    say(f"work directory {out}")
    scaler = federated_scaler(cfg)
    say("timing fixed per-process costs")
    costs = fixed_costs(out)

    def on_round(stack: str) -> Callable[[dict[str, Any]], None]:
        return lambda row: say(f"{stack}: round {row['round']} took {float(row['seconds']):.2f}s")

    results: list[RunResult] = []
    try:
        for i in range(1, args.pairs + 1):
            with time_limit(args.run_timeout):
                results.append(run_plain(cfg, scaler, out / f"plain-{i}", on_round("plain"), i))
            with time_limit(args.run_timeout):
                results.append(run_ours(cfg, out / f"ours-{i}", on_round("ours"), i))
    except (KeyboardInterrupt, BenchmarkTimeout, DmscError) as err:
        say(f"stopped early: {type(err).__name__}: {err}")
        if results:
            report(results, costs, cfg)
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    report(results, costs, cfg)
    print(f"\nlogs and per-round rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
