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
* **ours**: ``LocalFederation(cfg, insecure=True).run()``. DP and encryption are
  turned off whatever the config says (the baseline has neither).

The figure compared is the **per-round wall time measured inside the
ServerApp**, from ``configure_train`` of round r to the end of
``aggregate_evaluate`` of round r, for both stacks. Start-up, dmsc-fed's join
phase and tear-down are outside the rounds and excluded. The ratio is
``mean(ours) / mean(plain)``; the goal is at most 1.1. Beside the wall time,
the CPU seconds that each stack's processes (SuperLink, SuperNodes, SuperExecs,
ServerApp, ClientApps; not the ``flwr`` CLI) use during each round are sampled
from /proc (:class:`CpuSampler`): on a shared machine they vary much less than
wall time with what else is running.

With ``--pairs N`` the runs alternate in ABBA order (plain, ours, ours,
plain, ...), so that a steady drift in background load cancels out. The
driver follows each run the way ``LocalFederation`` does (a ``flwr ls``
call about every second), so the driver adds the same load to both.

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
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
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
from dmsc_fed.launcher.runs import STATUS_EVERY_S, RunEvents

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
    status_calls: list[tuple[float, float]] = field(default_factory=list)  # (wall s, CPU s) per 'flwr ls'
    load: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-min load average when the run ended
    cpu: list[float] = field(default_factory=list)  # CPU seconds of the stack's processes, per round

    @property
    def seconds(self) -> list[float]:
        """Per-round wall times, in round order."""
        return [float(r["seconds"]) for r in sorted(self.rows, key=lambda r: int(r["round"]))]


class CpuSampler:
    """CPU time of the stack's processes, sampled in a background thread.

    Every ``period`` seconds it reads /proc: the user + system time of every
    descendant of this process (SuperLink, SuperNodes, SuperExecs, ServerApp and
    ClientApp processes, zombies included) except ``flwr`` CLI calls, and the
    number of rows in ``metrics``, to time when each round ended. CPU time is
    much less sensitive than wall time to what else runs on the machine. A process
    that exits between two samples loses at most ``period`` seconds of CPU.
    """

    def __init__(self, metrics: Path, period: float = 0.2) -> None:
        self.metrics = metrics
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (time, cumulative CPU seconds)
        self.row_times: list[float] = []  # when each metrics row was first seen
        self._cpu: dict[tuple[int, int], float] = {}  # (pid, start) -> latest CPU seconds
        self._skip: set[tuple[int, int]] = set()
        self._tick = float(os.sysconf("SC_CLK_TCK"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _scan(self) -> None:
        table: dict[int, tuple[int, int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            f = raw[raw.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) / self._tick)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(children.get(os.getpid(), []))
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            _, start, cpu = table[pid]
            key = (pid, start)
            if key not in self._cpu and key not in self._skip:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "flwr":
                        self._skip.add(key)
            if key not in self._skip:
                self._cpu[key] = max(cpu, self._cpu.get(key, 0.0))
        now = time.time()
        self.samples.append((now, sum(self._cpu.values())))
        with contextlib.suppress(OSError):
            rows = sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
            self.row_times.extend([now] * (rows - len(self.row_times)))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._scan()

    def _at(self, t: float) -> float:
        """Cumulative CPU seconds at time ``t`` (linear between samples)."""
        prev = (0.0, 0.0)
        for ts, cpu in self.samples:
            if ts >= t:
                if prev[0] == 0.0 or ts == prev[0]:
                    return cpu
                return prev[1] + (cpu - prev[1]) * (t - prev[0]) / (ts - prev[0])
            prev = (ts, cpu)
        return prev[1]

    def per_round(self, rows: list[dict[str, Any]]) -> list[float]:
        """CPU seconds spent during each round (rows in file order, as the sampler saw them)."""
        return [
            self._at(end) - self._at(end - float(row["seconds"]))
            for row, end in zip(rows, self.row_times, strict=False)
        ]


# --------------------------------------------------------------------- setup
NO_PRIVACY = {"dp": "off", "encryption": "off"}


def task_config(path: Path, rounds: int) -> FederationConfig:
    """The config at ``path`` with ``rounds`` rounds and no DP, no encryption (validated again).

    The plain-Flower baseline has neither, so the comparison is made without them
    whatever the config asks for.
    """
    cfg = load_config(path=path)
    data = cfg.model_dump(mode="json") | {"rounds": rounds, "privacy": NO_PRIVACY}
    return parse_config(data=data, source=str(path))


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


def _children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children (here: the ``flwr`` CLI calls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
        last_asked = -math.inf
        try:
            while not status.startswith("finished"):
                rows = _read_rows(metrics)
                for row in rows[len(result.rows) :]:
                    on_round(row)
                result.rows = rows
                if link.popen.poll() is not None:
                    raise LauncherError(f"the SuperLink exited during the run:\n{tail(link.log_path)}")
                # Poll the way LocalFederation does: every STATUS_EVERY_S, and at once when all rounds are in.
                if time.monotonic() - last_asked >= STATUS_EVERY_S or len(rows) >= cfg.rounds:
                    start, cpu = time.perf_counter(), _children_cpu()
                    status = cli.status(run_id)
                    result.status_calls.append((time.perf_counter() - start, _children_cpu() - cpu))
                    last_asked = time.monotonic()
                time.sleep(0.5)
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
    """Durations of dmsc-fed's ``train()`` call, per site and round (an indicator of CPU contention)."""
    if result.stack == "ours":
        return [
            float(site["train"]["train-time-s"])
            for row in result.rows
            for site in row.get("per_site", {}).values()
            if "train-time-s" in site.get("train", {})
        ]
    return [
        float(r["train-s"])
        for row in result.rows
        for r in (row.get("train") or {}).get("replies", [])
        if "train-s" in r
    ]


def final_metrics(result: RunResult) -> str:
    """The last round's aggregated evaluation loss and accuracy (equal for both stacks on the same task)."""
    if not result.rows:
        return "n/a"
    last = max(result.rows, key=lambda r: int(r["round"]))
    ev = last.get("evaluate") or {}
    if result.stack == "plain":
        ev = ev.get("metrics", {})
    loss, acc = ev.get("loss"), ev.get("accuracy")
    return "n/a" if loss is None or acc is None else f"loss {float(loss):.6f}, accuracy {float(acc):.4f}"


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
    print(
        f"{'stack':<6} {'run':>3} {'rounds':>6} {'mean s':>7} {'median s':>8} {'CPU s':>6} {'load':>5}  "
        "per-round seconds (CPU: mean CPU-seconds of the stack's processes per round; load: 1-min load at the end)"
    )
    for r in results:
        s = r.seconds
        cpu_col = f"{statistics.fmean(r.cpu):6.1f}" if r.cpu else f"{'n/a':>6}"
        print(
            f"{r.stack:<6} {r.index:>3} {len(s):>6} {statistics.fmean(s):7.2f} {statistics.median(s):8.2f} {cpu_col} "
            f"{r.load:5.2f}  {_fmt(s)}"
        )
    by_stack = {k: [x for r in results if r.stack == k for x in r.seconds] for k in ("plain", "ours")}
    cpu_by_stack = {k: [x for r in results if r.stack == k for x in r.cpu] for k in ("plain", "ours")}
    print()
    for k, s in by_stack.items():
        if s:
            cpus = cpu_by_stack[k]
            cpu_s = f", CPU mean={statistics.fmean(cpus):.1f}s" if cpus else ""
            print(
                f"{k:<6} all rounds: n={len(s)} mean={statistics.fmean(s):.2f}s median={statistics.median(s):.2f}s "
                f"min={min(s):.2f}s max={max(s):.2f}s{cpu_s}"
            )
    if by_stack["plain"] and by_stack["ours"]:
        ratio = statistics.fmean(by_stack["ours"]) / statistics.fmean(by_stack["plain"])
        ratio_med = statistics.median(by_stack["ours"]) / statistics.median(by_stack["plain"])
        verdict = "within" if ratio <= GOAL else "NOT within"
        print(
            f"ratio ours/plain, per-round wall time: {ratio:.3f} (means), {ratio_med:.3f} (medians) "
            f"-> {verdict} the {GOAL}x goal"
        )
        if cpu_by_stack["plain"] and cpu_by_stack["ours"]:
            cpu_ratio = statistics.fmean(cpu_by_stack["ours"]) / statistics.fmean(cpu_by_stack["plain"])
            print(f"ratio ours/plain, per-round CPU time:  {cpu_ratio:.3f} (means; less sensitive to other load)")
    for r in results:
        t = train_times(r)
        train_s = f"{statistics.fmean(t):.2f}s" if t else "n/a"
        print(f"{r.stack:<6} run {r.index}: train() per site-round mean {train_s}; final evaluation {final_metrics(r)}")

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
            wall = statistics.fmean(c[0] for c in calls)
            cpu = statistics.fmean(c[1] for c in calls)
            print(
                f"  driver's 'flwr ls' status poll (as LocalFederation does it): {len(calls)} calls, mean {wall:.2f}s "
                f"wall and {cpu:.2f}s CPU each, one call every {1 + wall:.1f}s (~{cpu / (1 + wall):.2f} CPU busy)"
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
    parser.add_argument(
        "--pairs", type=int, default=1, help="pairs of runs: plain then ours, then ours then plain, ..."
    )
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a new temp dir, kept)")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds allowed per run")
    args = parser.parse_args(argv)

    cfg = task_config(args.config, args.rounds)
    asked = load_config(path=args.config).privacy
    if (asked.dp, asked.encryption) != (NO_PRIVACY["dp"], NO_PRIVACY["encryption"]):
        say(f"{args.config} asks for dp={asked.dp!r}, encryption={asked.encryption!r}: both are off in this benchmark")
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
            for stack in ("plain", "ours") if i % 2 else ("ours", "plain"):  # ABBA order cancels a linear drift
                run_out = out / f"{stack}-{i}"
                with time_limit(args.run_timeout), CpuSampler(run_out / "metrics.jsonl") as sampler:
                    if stack == "plain":
                        result = run_plain(cfg, scaler, run_out, on_round("plain"), i)
                    else:
                        result = run_ours(cfg, run_out, on_round("ours"), i)
                result.cpu = sampler.per_round(result.rows)
                results.append(result)
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
