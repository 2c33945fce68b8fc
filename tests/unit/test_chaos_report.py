"""The pure parts of benchmarks/chaos.py: rounds lost, rejections by kind, recovery times."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT


def _load_benchmark() -> Any:
    # By path: opacus installs a top-level package named "benchmarks" that shadows the repository's folder.
    spec = importlib.util.spec_from_file_location("chaos_benchmark", ROOT / "benchmarks" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


chaos = _load_benchmark()
Fault = chaos.Fault
ScenarioResult = chaos.ScenarioResult
analyse = chaos.analyse
final_history = chaos.final_history
rejected_as = chaos.rejected_as
rejections_by_kind = chaos.rejections_by_kind
recovery_seconds = chaos.recovery_seconds
rounds_lost = chaos.rounds_lost
schedule_faults = chaos.schedule_faults


def row(rnd: int, started: float, seconds: float, aggregated: bool = True, rejected: Any = ()) -> dict[str, Any]:
    return {"round": rnd, "started": started, "seconds": seconds, "aggregated": aggregated, "rejected": list(rejected)}


def rej(site: str, kind: str, stage: str = "train") -> dict[str, str]:
    return {"site": site, "stage": stage, "kind": kind, "reason": f"{kind} reply"}


# ------------------------------------------------------------------ rounds lost
def test_no_round_is_lost_when_the_history_holds_every_recorded_round_once() -> None:
    assert rounds_lost(before=[1, 2], history=[1, 2, 3, 4], recorded=[1, 2, 3, 4]) == []


def test_a_round_recorded_before_the_crash_but_missing_from_the_history_is_lost() -> None:
    assert rounds_lost(before=[1, 2, 3], history=[1, 2, 4], recorded=[1, 2, 3, 4]) == [3]


def test_a_round_trained_again_after_a_restart_is_lost() -> None:
    # attempt 1 recorded rounds 1-2, the resumed run (from snapshot 1) trained 2, 3, 4 again
    assert rounds_lost(before=[1, 2], history=[1, 2, 3, 4], recorded=[1, 2, 2, 3, 4]) == [2]


def test_rounds_lost_are_sorted_and_counted_once() -> None:
    assert rounds_lost(before=[5, 1, 3], history=[2], recorded=[3, 3, 1]) == [1, 3, 5]


# ------------------------------------------------------------------ rejections
ROWS = [
    row(1, 100.0, 10.0),
    row(2, 110.0, 10.0, rejected=[rej("c", "replayed"), rej("c", "late", stage="evaluate")]),
    row(3, 120.0, 10.0, rejected=[rej("c", "non-finite"), rej("b", "late")]),
    row(4, 130.0, 10.0, rejected=[rej("c", "late")]),
]


def test_training_rejections_are_counted_by_kind_and_evaluation_ones_apart() -> None:
    assert rejections_by_kind(ROWS) == {"late": 2, "non-finite": 1, "replayed": 1}
    assert rejections_by_kind(ROWS, train=False) == {"late": 1}


def test_a_rejection_without_a_kind_counts_as_other() -> None:
    assert rejections_by_kind([row(1, 0.0, 1.0, rejected=[{"site": "a", "stage": "train"}])]) == {"other": 1}


def test_rejected_as_names_the_kinds_of_one_sites_training_replies_in_one_round() -> None:
    assert rejected_as(ROWS, site="c", round=2) == ["replayed"]  # not the evaluation one
    assert rejected_as(ROWS, site="c", round=3) == ["non-finite"]
    assert rejected_as(ROWS, site="a", round=3) == []


# ------------------------------------------------------------------ recovery
def test_a_bad_update_recovers_when_its_own_round_aggregates_without_it() -> None:
    assert recovery_seconds(ROWS, Fault(who="c", what="nan", round=3)) == pytest.approx(10.0)


def test_a_round_that_did_not_aggregate_pushes_recovery_to_the_next_one() -> None:
    rows = [row(1, 100.0, 10.0), row(2, 110.0, 15.0, aggregated=False), row(3, 125.0, 5.0)]
    assert recovery_seconds(rows, Fault(who="c", what="scale=1e4", round=2)) == pytest.approx(20.0)


def test_a_kill_is_timed_from_the_kill_to_the_end_of_the_round_it_hit() -> None:
    assert recovery_seconds(ROWS, Fault(who="c", what="SIGKILL", round=2, at=114.0)) == pytest.approx(6.0)


def test_a_server_kill_recovers_at_the_end_of_the_first_round_of_the_resumed_run() -> None:
    # rounds 1-2 restored from the snapshot; the server was killed at 125 during round 3, which ran again later
    rows = [row(1, 100.0, 10.0), row(2, 110.0, 10.0), row(3, 160.0, 20.0), row(4, 180.0, 10.0)]
    assert recovery_seconds(rows, Fault(who="server", what="SIGKILL", round=3, at=125.0)) == pytest.approx(55.0)


def test_a_round_that_ended_before_the_fault_does_not_count() -> None:
    rows = [row(2, 110.0, 10.0), row(3, 120.0, 10.0)]
    assert recovery_seconds(rows, Fault(who="c", what="SIGKILL", round=2, at=121.0)) == pytest.approx(9.0)


def test_a_round_before_the_faults_round_never_counts_even_if_its_rounded_end_overlaps() -> None:
    # times are rounded to the millisecond in metrics rows: round 1 appears to end just after round 2 started
    rows = [row(1, 100.0, 10.001), row(2, 110.0, 5.0, aggregated=False), row(3, 115.0, 5.0)]
    assert recovery_seconds(rows, Fault(who="c", what="nan", round=2)) == pytest.approx(10.0)


def test_no_recovery_without_a_later_aggregated_round() -> None:
    rows = [row(1, 100.0, 10.0), row(2, 110.0, 10.0, aggregated=False)]
    assert recovery_seconds(rows, Fault(who="c", what="nan", round=2)) is None
    assert recovery_seconds(rows, Fault(who="c", what="nan", round=5)) is None  # the fault's round has no row


# ------------------------------------------------------------------ faults and files
def test_a_chaos_schedule_becomes_one_labelled_fault_per_round_in_round_order() -> None:
    faults = schedule_faults("c", "4:shape,2:replay,3:slow=100")
    assert [(f.round, f.what, f.at) for f in faults] == [(2, "replay", None), (3, "slow=100", None), (4, "shape", None)]
    assert faults[0].label == "c: replay r2"
    with pytest.raises(ValueError, match=r"\*:nan"):
        schedule_faults("c", "*:nan")


def _snapshot(folder: Path, rnd: int, rows: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"round-{rnd:06d}.json").write_text(json.dumps({"round": rnd, "state": {"reports": rows}}))


def _metrics(folder: Path, rows: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_final_history_is_the_newest_snapshots_round_reports(tmp_path: Path) -> None:
    assert final_history(tmp_path / "none") is None
    _snapshot(tmp_path, 9, [row(1, 0.0, 1.0)])
    _snapshot(tmp_path, 10, [row(1, 0.0, 1.0), row(2, 1.0, 1.0)])  # 10 sorts after 9 as a number
    history = final_history(tmp_path)
    assert history is not None
    assert [r["round"] for r in history] == [1, 2]


def _server_kill(tmp_path: Path, resumed_rows: list[dict[str, Any]], resumed_after: int) -> Any:
    before = [row(1, 100.0, 10.0), row(2, 110.0, 10.0)]
    task = tmp_path / "task-1"
    _metrics(task / "attempt-1", before)
    _metrics(task / "attempt-2", resumed_rows)
    history = before[:resumed_after] + resumed_rows
    _snapshot(task / "snapshots", 4, history)
    (task / "attempt-2" / "result.json").write_text(
        json.dumps({"rounds_completed": sum(r["aggregated"] for r in history), "resumed_after_round": resumed_after})
    )
    res = ScenarioResult(name="server-kill", work=tmp_path, rounds_planned=4, before_crash=[1, 2])
    res.run_dirs = [task / "attempt-1", task / "attempt-2"]
    res.snapshots, res.summary = task / "snapshots", task / "attempt-2" / "result.json"
    res.faults = [Fault(who="server", what="SIGKILL", round=3, at=125.0)]
    analyse(res)
    return res


def test_a_server_kill_that_resumed_after_its_last_snapshot_loses_nothing(tmp_path: Path) -> None:
    res = _server_kill(tmp_path, [row(3, 160.0, 20.0), row(4, 180.0, 10.0)], resumed_after=2)
    assert res.lost == []
    assert res.rounds_completed == 4
    assert res.recovery_s == [pytest.approx(55.0)]
    assert res.outcomes == ["resumed after round 2"]
    assert res.problems == []
    assert res.to_dict()["ok"] is True


def test_a_server_kill_that_trained_a_round_again_loses_it_and_fails(tmp_path: Path) -> None:
    res = _server_kill(tmp_path, [row(2, 150.0, 10.0), row(3, 160.0, 20.0), row(4, 180.0, 10.0)], resumed_after=1)
    assert res.lost == [2]
    assert res.problems == ["rounds lost: [2]"]
    assert res.to_dict()["rounds_lost"] == [2]


def test_bad_updates_are_reported_with_what_they_were_rejected_as(tmp_path: Path) -> None:
    rows = [row(1, 100.0, 10.0), row(2, 110.0, 12.0, rejected=[rej("c", "replayed")]), row(3, 122.0, 8.0)]
    _metrics(tmp_path / "run", rows)
    _snapshot(tmp_path / "run" / "snapshots", 3, rows)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"rounds_completed": 2}))
    res = ScenarioResult(name="bad-updates", work=tmp_path, rounds_planned=3)
    res.run_dirs, res.snapshots = [tmp_path / "run"], tmp_path / "run" / "snapshots"
    res.summary = tmp_path / "run" / "summary.json"
    res.faults = schedule_faults("c", "2:replay,3:nan")
    analyse(res)
    assert res.rejected == {"replayed": 1}
    assert res.outcomes == ["rejected as replayed", ""]  # the round-3 NaN was not recorded as rejected
    assert res.recovery_s == [pytest.approx(12.0), pytest.approx(8.0)]
    assert res.problems == ["2 of 3 rounds completed"]


def test_a_fault_never_followed_by_an_aggregated_round_fails_the_scenario() -> None:
    res = ScenarioResult(name="site-faults", work=Path("."), rounds_planned=2, rounds_completed=2)
    res.faults = [Fault(who="b", what="slow=100", round=2)]
    res.recovery_s = [None]
    assert res.problems == ["no aggregated round after 'b: slow=100 r2'"]
    res.recovery_s = [3.0]
    assert res.problems == []
