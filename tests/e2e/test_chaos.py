"""Chaos tests with real processes: bad updates, a SuperNode killed mid-round, a slow site, a killed server.

Sites inject faults through ``dmsc-fed client --chaos`` (only with ``DMSC_FED_ALLOW_CHAOS=1``
in their environment); processes are killed with SIGKILL by PID. Each test bounds its own
time and stops every process it started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.chaos_rig import Coordinated, Federation, kill_9, metrics_rows, text, wait
from tests.helpers import processes_under

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

THREE_SITES = """
name = "{name}"
rounds = {rounds}
local_epochs = 1
learning_rate = 0.05
[[sites]]
name = "a"
[[sites]]
name = "b"
[[sites]]
name = "c"
[dataset]
name = "breast_cancer"
[strategy]
round_timeout_s = {deadline_s}
[fault]
quorum = 2
"""

BAD_UPDATES = THREE_SITES.format(name="chaos-updates", rounds=6, deadline_s=240)


def test_bad_updates_are_rejected_recorded_and_leave_the_aggregate_to_the_others(tmp_path: Path) -> None:
    fed = Federation(tmp_path, ["a", "b", "c"])
    out = tmp_path / "run"
    try:
        fed.start_server()
        fed.start_site("a")
        fed.start_site("b")
        fed.start_site("c", chaos="2:replay,3:nan,4:shape,5:oversized,6:stale")
        submit = fed.submit(BAD_UPDATES, out)
        stdout, _ = submit.communicate(timeout=780)
        assert submit.returncode == 0, stdout[-3000:]
    finally:
        fed.stop()
    result = json.loads((out / "summary.json").read_text())
    rows = metrics_rows(out)
    assert result["rounds_completed"] == 6
    assert sorted(rows[1]["train_sites"]) == ["a", "b", "c"]  # c honest in round 1
    expected = {2: "replayed", 3: "non-finite", 4: "malformed", 5: "oversized", 6: "stale-round"}
    for rnd, kind in expected.items():
        assert sorted(rows[rnd]["train_sites"]) == ["a", "b"], rows[rnd]  # the aggregate is a's and b's alone
        bad = [r for r in rows[rnd]["rejected"] if r["site"] == "c" and r["stage"] == "train"]
        assert [r["kind"] for r in bad] == [kind], bad
    assert "identical to the signed update received in round 1" in rows[2]["rejected"][0]["reason"]
    for kind in expected.values():
        assert result["rejected_by_kind"][kind] == 1
    assert result["final_metrics"]["accuracy"] > 0.8


KILL_AND_SLOW = THREE_SITES.format(name="chaos-sites", rounds=4, deadline_s=60)


def test_a_killed_site_and_a_slow_site_leave_the_task_to_the_others_and_the_killed_one_rejoins(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path, ["a", "b", "c"])
    out = tmp_path / "run"
    try:
        fed.start_server()
        fed.start_site("a")
        fed.start_site("b", chaos="3:slow=100")
        fed.start_site("c")
        submit = fed.submit(KILL_AND_SLOW, out)
        wait("round 2 to start", lambda: "round 2: training on" in text(out / "server.log"), 400)
        time.sleep(4)  # c's ClientApp is training round 2 now
        killed = kill_9(fed.procs["c"], tmp_path / "c")
        assert len(killed) >= 2
        fed.start_site("c")  # the site comes back mid-task, with the same key and ledger
        stdout, _ = submit.communicate(timeout=780)
        assert submit.returncode == 0, stdout[-3000:]
    finally:
        fed.stop()
    result = json.loads((out / "summary.json").read_text())
    rows = metrics_rows(out)
    assert result["rounds_completed"] == 4
    assert sorted(rows[1]["train_sites"]) == ["a", "b", "c"]
    assert sorted(rows[2]["train_sites"]) == ["a", "b"]  # c was killed mid-round: fewer participants
    assert any(r["site"] == "c" and r["stage"] == "train" for r in rows[2]["rejected"])
    assert "b" not in rows[3]["train_sites"] and len(rows[3]["train_sites"]) >= 2  # b slept past the deadline
    late = [r["kind"] for r in rows[3]["rejected"] if r["site"] == "b" and r["stage"] == "train"]
    assert late and set(late) == {"late"}, late
    assert "c" in rows[3]["train_sites"] or "c" in rows[4]["train_sites"]  # c rejoined from the next round


COORDINATED = """
name = "chaos-server"
rounds = 4
local_epochs = 1
learning_rate = 0.05
[[sites]]
name = "east"
[[sites]]
name = "west"
[dataset]
name = "breast_cancer"
"""


def test_a_killed_server_resumes_the_task_after_its_last_snapshot(tmp_path: Path) -> None:
    fed = Coordinated(tmp_path, ["east", "west"])
    try:
        fed.start_server()
        fed.start_site("east")
        fed.start_site("west")
        task = fed.submit_task(COORDINATED)
        snapshots = fed.state / "runs" / f"task-{task}" / "snapshots"
        wait("the round-2 snapshot", lambda: (snapshots / "round-000002.json").exists(), 500)
        fed.kill_server()
        done = sorted(int(p.stem.split("-")[1]) for p in snapshots.glob("round-*.json"))
        assert processes_under(fed.state) == []
        fed.start_server()
        wait("the task to succeed after the restart", lambda: fed.task_state(task) == "succeeded", 600, 5)
    finally:
        fed.stop()
    assert processes_under(tmp_path) == [], "Flower processes were left running"
    attempts = sorted(snapshots.parent.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(attempts) >= 2
    result = json.loads((attempts[-1] / "result.json").read_text())
    assert result["resumed_after_round"] == max(done)  # no completed round lost, none repeated
    assert result["rounds_completed"] == 4
    rows = metrics_rows(attempts[-1])
    assert sorted(rows) == list(range(max(done) + 1, 5))  # the new run trained only the remaining rounds
    assert result["final_metrics"]["accuracy"] > 0.8
    assert f"resuming task 'task-{task}' after round {max(done)}" in text(attempts[-1] / "server.log")
