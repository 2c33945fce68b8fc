"""Chaos report: faults injected into real dmsc-fed processes, and what the federation made of them.

What is run
-----------
The three scenarios of ``tests/e2e/test_chaos.py``, with the same task configs and the
same fault schedules, on loopback with real processes started through the test rig
(:mod:`tests.chaos_rig`). Sites inject faults through ``dmsc-fed client --chaos``
(honoured only with ``DMSC_FED_ALLOW_CHAOS=1``, which the rig sets for chaos sites
alone); processes are killed with SIGKILL by PID. Each scenario runs in its own
directory under ``--work``, is bounded in time and stops every process it started.

1. **bad-updates**: ``dmsc-fed server`` and sites a, b, c; c's schedule is
   ``2:replay,3:nan,4:shape,5:oversized,6:stale`` (a replayed signed update, NaNs, a
   wrong shape, an oversized update, a reply signed for the previous round); 6 rounds,
   quorum 2.
2. **site-faults**: sites a, b, c; b sleeps 100 s before replying in round 3
   (``3:slow=100``, past the 60 s round deadline); c's ``dmsc-fed client`` and every
   Flower process under it are SIGKILLed 4 s after ``round 2: training on`` appears in
   the server log, and c is restarted at once with the same key and state; 4 rounds,
   quorum 2.
3. **server-kill**: ``dmsc-fed coordinator`` and sites east, west; 4 rounds. Once the
   round-2 snapshot exists, the coordinator and every Flower process under its state
   directory (SuperLink, ServerApp) are SIGKILLed and the coordinator is restarted; the
   task must then succeed by resuming after its last snapshot. The figures come from
   the last attempt's ``result.json``.

What is reported, per scenario
------------------------------
* **faults injected**, e.g. ``c: replay r2``, ``c: SIGKILL mid-round 2``,
  ``server: SIGKILL after round 2``; for a site's bad update, the kinds it was
  rejected as in that round (from the round's ``rejected`` entries).
* **rounds** completed / planned (``rounds_completed`` of ``summary.json`` or of the
  last attempt's ``result.json``).
* **rounds lost** (must be 0): rounds recorded before a crash (a snapshot manifest on
  disk when the server was killed, or a ``metrics.jsonl`` row of any attempt) that are
  missing from the final round history (the ``reports`` of the newest snapshot), plus
  rounds trained more than once (a round with a ``metrics.jsonl`` row in more than one
  attempt). Computed from the files, never assumed.
* **updates rejected by kind**: training replies rejected, counted by ``kind``
  (``replayed``, ``non-finite``, ``malformed``, ``oversized``, ``stale-round``,
  ``late``, ...) over the final history; rejections at evaluation are listed apart.
* **time to recover** after each fault: seconds from the fault to the end
  (``started + seconds``) of the first round at or after the fault's round that
  aggregated and ended after the fault. The fault's time is the kill time taken by
  this benchmark for a SIGKILL, and the start of the round the fault was in for a bad
  update or a slow site. For the server kill that first round is the first round the
  resumed run aggregated, so the figure includes the coordinator's restart, the sites
  joining again and that round's training.

A scenario fails if a process step fails or times out, fewer rounds complete than
planned, a round is lost, or a fault is never followed by an aggregated round; the
exit status is then 1.

Usage::

    python benchmarks/chaos.py [--scenarios bad-updates,site-faults,server-kill] [--work DIR]
                               [--out FILE.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the rig lives in the repository's tests package
    sys.path.insert(0, str(REPO))

from dmsc_fed.config import parse_config  # noqa: E402
from tests.chaos_rig import Coordinated, Federation, kill_9, text, wait  # noqa: E402
from tests.e2e.test_chaos import BAD_UPDATES, COORDINATED, KILL_AND_SLOW  # noqa: E402
from tests.helpers import processes_under  # noqa: E402

Row = Mapping[str, Any]

BAD_SCHEDULE = "2:replay,3:nan,4:shape,5:oversized,6:stale"
SLOW_SCHEDULE = "3:slow=100"
SITE_KILL_ROUND = 2
SITE_KILL_DELAY_S = 4.0
SERVER_KILL_AFTER_ROUND = 2

# Time bounds (the e2e tests' own).
RUN_TIMEOUT_S = 780.0  # a whole run, from submit to its end
ROUND_START_TIMEOUT_S = 400.0  # until round 2 starts (site-faults)
API_TIMEOUT_S = 90.0  # until the coordinator's control API is up
SNAPSHOT_TIMEOUT_S = 500.0  # until the round-2 snapshot exists (server-kill)
RESUME_TIMEOUT_S = 600.0  # until the task succeeds after the coordinator's restart

SCENARIOS: dict[str, str] = {
    "bad-updates": "3 sites; c sends a replayed, NaN, misshapen, oversized and stale update in rounds 2-6",
    "site-faults": "3 sites; b sleeps past the deadline in round 3, c is SIGKILLed mid-round 2 and restarted",
    "server-kill": "coordinator + 2 sites; the coordinator is SIGKILLed after the round-2 snapshot and restarted",
}
CONFIGS = {"bad-updates": BAD_UPDATES, "site-faults": KILL_AND_SLOW, "server-kill": COORDINATED}

_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress line on stderr, with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class ScenarioFailed(Exception):
    """A step of a scenario failed (a command's exit status, a process that never got there)."""


# ------------------------------------------------------------------ pure parts
@dataclass
class Fault:
    """One injected fault: who, what, the round it hit, and when (epoch seconds) if the benchmark timed it."""

    who: str
    what: str
    round: int
    at: float | None = None  # the kill time; None: the start of ``round``
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.who}: {self.what} r{self.round}"


def schedule_faults(site: str, schedule: str) -> list[Fault]:
    """The faults of a ``--chaos`` schedule (``ROUND:MODE,...``), in round order; ``*`` items are not supported."""
    faults = []
    for item in schedule.split(","):
        head, _, mode = item.strip().partition(":")
        if not head.strip().isdigit() or not mode.strip():
            raise ValueError(f"cannot place chaos item {item!r} in a round")
        faults.append(Fault(who=site, what=mode.strip(), round=int(head)))
    return sorted(faults, key=lambda f: f.round)


def round_end(row: Row) -> float:
    """When a round ended (epoch seconds): ``started + seconds``."""
    return float(row["started"]) + float(row["seconds"])


def rounds_lost(before: Iterable[int], history: Iterable[int], recorded: Iterable[int]) -> list[int]:
    """Rounds lost: recorded ``before`` a crash but not in the final ``history``, or trained more than once.

    ``recorded`` is the round of every metrics row of every attempt (a round that appears
    twice was trained again after a restart).
    """
    retrained = {r for r, n in Counter(recorded).items() if n > 1}
    return sorted((set(before) - set(history)) | retrained)


def rejections_by_kind(rows: Iterable[Row], *, train: bool = True) -> dict[str, int]:
    """Rejected replies counted by kind, over training replies (``train``) or the others (evaluation)."""
    counts = Counter(
        str(r.get("kind", "other"))
        for row in rows
        for r in row.get("rejected", [])
        if (r.get("stage") == "train") == train
    )
    return dict(sorted(counts.items()))


def rejected_as(rows: Iterable[Row], *, site: str, round: int) -> list[str]:
    """The kinds ``site``'s training replies were rejected as in ``round``."""
    return [
        str(r.get("kind", "other"))
        for row in rows
        if int(row["round"]) == round
        for r in row.get("rejected", [])
        if r.get("site") == site and r.get("stage") == "train"
    ]


def recovery_seconds(rows: Iterable[Row], fault: Fault) -> float | None:
    """Seconds from ``fault`` to the end of the first round at or after its round that aggregated after it.

    The fault's time is ``fault.at`` or, when that is None, the start of the round it
    was in (None if that round has no row). None if no later round aggregated.
    """
    ordered = sorted(rows, key=lambda r: int(r["round"]))
    at = fault.at
    if at is None:
        own = [r for r in ordered if int(r["round"]) == fault.round]
        if not own:
            return None
        at = float(own[0]["started"])
    for row in ordered:
        if int(row["round"]) >= fault.round and row.get("aggregated") and round_end(row) > at:
            return round_end(row) - at
    return None


def latest_per_round(rows: Iterable[Row]) -> list[Row]:
    """The last row seen of each round, in round order (a history rebuilt from metrics rows)."""
    by_round = {int(r["round"]): r for r in rows}
    return [by_round[k] for k in sorted(by_round)]


# ----------------------------------------------------------------- file reads
def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a ``metrics.jsonl`` (none if it does not exist)."""
    return [json.loads(line) for line in text(path).splitlines() if line.strip()]


def snapshot_rounds(snapshots: Path) -> list[int]:
    """Rounds with a snapshot manifest in ``snapshots``."""
    return sorted(int(p.stem.split("-")[1]) for p in snapshots.glob("round-*.json"))


def final_history(snapshots: Path) -> list[dict[str, Any]] | None:
    """The round history (``state.reports``) of the newest snapshot, or None without one."""
    rounds = snapshot_rounds(snapshots)
    if not rounds:
        return None
    manifest = json.loads((snapshots / f"round-{rounds[-1]:06d}.json").read_text())
    return list(manifest["state"]["reports"])


# ----------------------------------------------------------------- scenarios
@dataclass
class ScenarioResult:
    """What one scenario did and what came of it."""

    name: str
    work: Path
    rounds_planned: int
    rounds_completed: int | None = None
    faults: list[Fault] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)  # per fault: what the server recorded
    recovery_s: list[float | None] = field(default_factory=list)  # per fault
    lost: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # training updates, by kind
    rejected_other: dict[str, int] = field(default_factory=dict)  # evaluation replies, by kind
    error: str | None = None
    seconds: float = 0.0
    # Filled by the runner, read by analyse():
    run_dirs: list[Path] = field(default_factory=list)  # run directories of every attempt, in order
    snapshots: Path | None = None
    summary: Path | None = None
    before_crash: list[int] = field(default_factory=list)  # snapshot rounds on disk when the server was killed

    @property
    def problems(self) -> list[str]:
        """Why the scenario failed (empty: it passed)."""
        out = [self.error] if self.error else []
        if self.lost:
            out.append(f"rounds lost: {self.lost}")
        if self.rounds_completed is not None and self.rounds_completed < self.rounds_planned:
            out.append(f"{self.rounds_completed} of {self.rounds_planned} rounds completed")
        if self.rounds_completed is None and not self.error:
            out.append("no summary of the run")
        out += [f"no aggregated round after '{f.label}'" for f, _, s in self.fault_rows() if s is None]
        return out

    def fault_rows(self) -> list[tuple[Fault, str, float | None]]:
        """Each fault with what the server recorded and its recovery time (unknown ones: "" and None)."""
        n = len(self.faults)
        outcomes = (self.outcomes + [""] * n)[:n]
        recovery = (self.recovery_s + [None] * n)[:n]
        return list(zip(self.faults, outcomes, recovery, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "scenario": self.name,
            "ok": not self.problems,
            "problems": self.problems,
            "rounds_planned": self.rounds_planned,
            "rounds_completed": self.rounds_completed,
            "rounds_lost": self.lost,
            "faults": [
                {"fault": f.label, "round": f.round, "at": f.at, "outcome": o, "recovery_s": s}
                for f, o, s in self.fault_rows()
            ],
            "rejected_updates_by_kind": self.rejected,
            "rejected_evaluation_by_kind": self.rejected_other,
            "seconds": round(self.seconds, 1),
            "work": str(self.work),
        }


def _finish_submit(submit: subprocess.Popen[str]) -> None:
    """Wait for ``dmsc-fed submit`` (bounded); it must succeed."""
    try:
        stdout, _ = submit.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ScenarioFailed(f"the run did not finish within {RUN_TIMEOUT_S:.0f}s") from None
    if submit.returncode != 0:
        raise ScenarioFailed(f"dmsc-fed submit exited {submit.returncode}:\n{stdout[-2000:]}")


def _kill_submit(submit: subprocess.Popen[str] | None) -> None:
    if submit is not None and submit.poll() is None:
        submit.kill()
        submit.wait(timeout=30)


def run_bad_updates(res: ScenarioResult) -> None:
    """Scenario 1: c sends a bad update in each of rounds 2-6."""
    fed = Federation(res.work, ["a", "b", "c"])
    out = res.work / "run"
    res.run_dirs, res.snapshots, res.summary = [out], out / "snapshots", out / "summary.json"
    res.faults = schedule_faults("c", BAD_SCHEDULE)
    submit = None
    try:
        say("bad-updates: starting the server and sites a, b, c (c with a chaos schedule)")
        fed.start_server()
        fed.start_site("a")
        fed.start_site("b")
        fed.start_site("c", chaos=BAD_SCHEDULE)
        submit = fed.submit(BAD_UPDATES, out)
        say(f"bad-updates: task submitted; c injects {BAD_SCHEDULE}")
        _finish_submit(submit)
    finally:
        _kill_submit(submit)
        fed.stop()


def run_site_faults(res: ScenarioResult) -> None:
    """Scenario 2: b is slow in round 3; c is SIGKILLed mid-round 2 and restarted."""
    fed = Federation(res.work, ["a", "b", "c"])
    out = res.work / "run"
    res.run_dirs, res.snapshots, res.summary = [out], out / "snapshots", out / "summary.json"
    submit = None
    try:
        say("site-faults: starting the server and sites a, b (slow in round 3), c")
        fed.start_server()
        fed.start_site("a")
        fed.start_site("b", chaos=SLOW_SCHEDULE)
        fed.start_site("c")
        submit = fed.submit(KILL_AND_SLOW, out)
        res.faults = schedule_faults("b", SLOW_SCHEDULE)
        marker = f"round {SITE_KILL_ROUND}: training on"
        wait(f"round {SITE_KILL_ROUND} to start", lambda: marker in text(out / "server.log"), ROUND_START_TIMEOUT_S)
        time.sleep(SITE_KILL_DELAY_S)  # c's ClientApp is training the round now
        at = time.time()
        killed = kill_9(fed.procs["c"], res.work / "c")
        kill = Fault(who="c", what="SIGKILL", round=SITE_KILL_ROUND, at=at)
        kill.label = f"c: SIGKILL mid-round {SITE_KILL_ROUND} ({len(killed)} processes), restarted at once"
        res.faults.insert(0, kill)
        say(f"site-faults: SIGKILLed c's processes {killed}; restarting c")
        fed.start_site("c")  # the site comes back mid-task, with the same key and ledger
        _finish_submit(submit)
    finally:
        _kill_submit(submit)
        fed.stop()


def run_server_kill(res: ScenarioResult) -> None:
    """Scenario 3: the coordinator is SIGKILLed after the round-2 snapshot and restarted; the task resumes."""
    fed = Coordinated(res.work, ["east", "west"])
    try:
        say("server-kill: starting the coordinator and sites east, west")
        fed.start_server()
        fed.start_site("east")
        fed.start_site("west")
        task = fed.submit_task(COORDINATED)
        task_dir = fed.state / "runs" / f"task-{task}"
        res.snapshots = task_dir / "snapshots"
        target = res.snapshots / f"round-{SERVER_KILL_AFTER_ROUND:06d}.json"
        wait(f"the round-{SERVER_KILL_AFTER_ROUND} snapshot", target.exists, SNAPSHOT_TIMEOUT_S)
        at = time.time()
        killed = fed.kill_server()  # the coordinator, its SuperLink and the ServerApp
        res.before_crash = snapshot_rounds(res.snapshots)
        done = max(res.before_crash)
        res.faults = [
            Fault(
                who="server",
                what="SIGKILL",
                round=done + 1,  # the round in progress when it was killed
                at=at,
                label=f"server: SIGKILL after round {done} ({len(killed)} processes), restarted at once",
            )
        ]
        say(f"server-kill: SIGKILLed the coordinator's processes {killed} after round {done}; restarting it")
        if processes_under(fed.state):
            raise ScenarioFailed(f"processes survived the SIGKILL: {processes_under(fed.state)}")
        fed.start_server()

        def succeeded() -> bool:
            state = fed.task_state(task)
            if state in ("dead_lettered", "cancelled"):
                raise ScenarioFailed(f"the task did not resume: it is {state}")
            return state == "succeeded"

        wait("the task to succeed after the restart", succeeded, RESUME_TIMEOUT_S, 5)
    finally:
        fed.stop()
        if res.snapshots is not None:
            res.run_dirs = sorted(res.snapshots.parent.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
            res.summary = res.run_dirs[-1] / "result.json" if res.run_dirs else None


RUNNERS: dict[str, Callable[[ScenarioResult], None]] = {
    "bad-updates": run_bad_updates,
    "site-faults": run_site_faults,
    "server-kill": run_server_kill,
}


def analyse(res: ScenarioResult) -> None:
    """Fill the report's figures from the run's files (whatever exists, also after a failure)."""
    attempts = [read_rows(d / "metrics.jsonl") for d in res.run_dirs]
    recorded = [row for rows in attempts for row in rows]
    history = (final_history(res.snapshots) if res.snapshots is not None else None) or latest_per_round(recorded)
    before = set(res.before_crash) | {int(r["round"]) for r in recorded}
    res.lost = rounds_lost(before, [int(r["round"]) for r in history], [int(r["round"]) for r in recorded])
    res.rejected = rejections_by_kind(history)
    res.rejected_other = rejections_by_kind(history, train=False)
    res.recovery_s = [recovery_seconds(history, f) for f in res.faults]
    summary = json.loads(res.summary.read_text()) if res.summary is not None and res.summary.exists() else {}
    res.outcomes = []
    for f in res.faults:
        kinds = rejected_as(history, site=f.who, round=f.round)
        if kinds:
            res.outcomes.append(f"rejected as {', '.join(kinds)}")
        elif f.who == "server" and summary.get("resumed_after_round") is not None:
            res.outcomes.append(f"resumed after round {summary['resumed_after_round']}")
        else:
            res.outcomes.append("")
    if "rounds_completed" in summary:
        res.rounds_completed = int(summary["rounds_completed"])


def run_scenario(name: str, work: Path) -> ScenarioResult:
    """Run one scenario in ``work`` and analyse its files; never raises for a failed run."""
    res = ScenarioResult(name=name, work=work, rounds_planned=int(tomllib.loads(CONFIGS[name])["rounds"]))
    if work.exists() and any(work.iterdir()):
        res.error = f"{work} is not empty (a scenario needs a fresh directory)"
        return res
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        RUNNERS[name](res)
    except Exception as err:  # a failed step or a bug: report it, go on with the next scenario
        res.error = f"{type(err).__name__}: {err}"
        say(f"{name}: FAILED: {res.error}")
    try:
        analyse(res)
    except Exception as err:
        res.error = res.error or f"cannot read the run's files: {type(err).__name__}: {err}"
    res.seconds = time.monotonic() - started
    left = processes_under(work)
    if left:  # stop them by PID, and say so
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        res.error = res.error or f"processes were left running under {work}: {left} (SIGKILLed)"
    say(f"{name}: done in {res.seconds:.0f}s")
    return res


# -------------------------------------------------------------------- output
def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def report(results: Sequence[ScenarioResult]) -> None:
    """Print one block per scenario: rounds, losses, rejections and each fault's recovery time."""
    print()
    print(f"{'scenario':<12} {'result':<6} {'rounds':>6} {'lost':>4} {'wall s':>7}  updates rejected by kind")
    for r in results:
        completed = "?" if r.rounds_completed is None else str(r.rounds_completed)
        print(
            f"{r.name:<12} {'ok' if not r.problems else 'FAIL':<6} {completed + '/' + str(r.rounds_planned):>6} "
            f"{len(r.lost):>4} {r.seconds:7.0f}  {_counts(r.rejected)}"
        )
    for r in results:
        print()
        print(f"{r.name}: {SCENARIOS[r.name]}")
        lost = f"{len(r.lost)} {r.lost}" if r.lost else "0"
        print(f"  rounds completed {r.rounds_completed}/{r.rounds_planned}; rounds lost {lost}")
        print(f"  updates rejected by kind: {_counts(r.rejected)}")
        if r.rejected_other:
            print(f"  evaluation replies rejected by kind: {_counts(r.rejected_other)}")
        if r.faults:
            print(f"  {'fault injected':<62} {'round':>5} {'recover s':>9}  recorded")
        for f, outcome, secs in r.fault_rows():
            shown = "never" if secs is None else f"{secs:.1f}"
            print(f"  {f.label:<62} {f.round:>5} {shown:>9}  {outcome}")
        for p in r.problems:
            print(f"  FAIL: {p}")
        print(f"  files: {r.work}")
    print()
    print(
        "recover s: from the fault (kill time, or the start of the bad/slow round) to the end of the first round "
        "at or after it that aggregated"
    )


def plan(names: Sequence[str], work: Path | None) -> None:
    """Print what would be run, starting nothing."""
    print(f"work directory: {work if work is not None else '(a new temp dir)'}")
    for name in names:
        cfg = parse_config(data=tomllib.loads(CONFIGS[name]), source=f"{name} scenario")  # defaults filled in
        print()
        print(f"{name}: {SCENARIOS[name]}")
        print(
            f"  task {cfg.name!r}: {cfg.rounds} rounds, sites {', '.join(s.name for s in cfg.sites)}, "
            f"quorum {cfg.fault.quorum}, round deadline {cfg.strategy.round_timeout_s:g} s, dataset {cfg.dataset.name}"
        )
        if name == "bad-updates":
            faults = [f.label for f in schedule_faults("c", BAD_SCHEDULE)]
            bounds = f"the run {RUN_TIMEOUT_S:.0f} s"
            print(f"  dmsc-fed server; c runs with --chaos {BAD_SCHEDULE!r}")
        elif name == "site-faults":
            faults = [f"c: SIGKILL mid-round {SITE_KILL_ROUND}, restarted at once"]
            faults += [f.label for f in schedule_faults("b", SLOW_SCHEDULE)]
            bounds = f"round {SITE_KILL_ROUND} starts {ROUND_START_TIMEOUT_S:.0f} s, the run {RUN_TIMEOUT_S:.0f} s"
            print(f"  dmsc-fed server; b runs with --chaos {SLOW_SCHEDULE!r}; c is SIGKILLed {SITE_KILL_DELAY_S:.0f} s "
                  f"after 'round {SITE_KILL_ROUND}: training on' in server.log")  # fmt: skip
        else:
            faults = [f"server: SIGKILL after round {SERVER_KILL_AFTER_ROUND} (or later), restarted at once"]
            bounds = (
                f"control API {API_TIMEOUT_S:.0f} s, snapshot {SNAPSHOT_TIMEOUT_S:.0f} s, "
                f"success after the restart {RESUME_TIMEOUT_S:.0f} s"
            )
            print(f"  dmsc-fed coordinator; killed with its Flower processes once round-"
                  f"{SERVER_KILL_AFTER_ROUND:06d}.json exists; the task must succeed after the restart")  # fmt: skip
        print(f"  faults: {'; '.join(faults)}")
        print(f"  time bounds: {bounds}")


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios; exit status 1 if any failed or lost a round."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, among {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new temp dir, kept)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown or not names:
        parser.error(f"--scenarios must be among {', '.join(SCENARIOS)}, got {args.scenarios!r}")
    if args.dry_run:
        plan(names, args.work)
        return 0
    work = (args.work or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say(f"work directory {work}")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # so that every scenario's finally block stops its processes

    signal.signal(signal.SIGTERM, on_sigterm)
    results: list[ScenarioResult] = []
    try:
        for name in names:
            results.append(run_scenario(name, work / name))
    except KeyboardInterrupt:
        say("interrupted: the running scenario's processes were stopped")
        report(results)
        return 130
    report(results)
    ok = all(not r.problems for r in results)
    if args.out is not None:
        args.out.write_text(json.dumps({"ok": ok, "scenarios": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
