"""A whole task that crashes and is resumed from its snapshots ends as if it had never stopped.

Everything is the real code: :func:`server.loop.run_federation` (join, strategy, federated
scaling, the fault-tolerant round loop, snapshots, run directory) over an in-process grid
whose sites are the real handlers (:class:`tests.sitegrid.SiteGrid`), signing their replies
with key material from :func:`dmsc_fed.security.provision.provision`. The "server process"
dies when it sends round 3's training messages; a second ``run_federation`` (another run
id, the same snapshot directory) takes over after the last good snapshot.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from numpy.typing import NDArray
from safetensors.numpy import load_file

from dmsc_fed.config import FederationConfig
from dmsc_fed.data.scaling import FeatureStats, fit_scaler
from dmsc_fed.errors import SnapshotError
from dmsc_fed.snapshots import SnapshotStore, fingerprint_of
from dmsc_fed.wire import CONFIG_KEY, JOIN_KEY, ROUND_KEY, SCALER_MEAN, SCALER_STD, TASK_ID_KEY
from server.loop import run_federation
from tests.conftest import make_config
from tests.sitegrid import SiteGrid, provision_keys, site_nodes

pytestmark = pytest.mark.usefixtures("flwr_identity")

SITES = ("a", "b", "c")
ROUNDS = 4
CRASH_ROUND = 3
FIRST_RUN_ID = 1
SNAPSHOT_LOGGER = "dmsc_fed.snapshots"


class ServerDied(Exception):
    """The server process is gone: nothing after this point of the run happens."""


@dataclass
class CrashingGrid(SiteGrid):
    """A healthy grid until the server sends round ``crash_round``'s training messages: then the server dies."""

    crash_round: int = CRASH_ROUND

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.TRAIN and _round(m) == self.crash_round for m in messages):
            raise ServerDied(f"server killed while sending round {self.crash_round}'s training messages")
        return super().send_and_receive(messages, timeout)


@dataclass
class GrownGrid(SiteGrid):
    """A healthy grid whose site ``a`` has gained records since the task started.

    Its join reply declares the feature statistics of twice its training rows, so a
    scaler fitted on this join differs from the one the task started with.
    """

    joins: list[ConfigRecord] = field(default_factory=list)  # the join replies, as the server read them

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            rec = reply.content.get(JOIN_KEY)
            if not isinstance(rec, ConfigRecord):
                continue
            if rec["site"] == "a":
                rec["feature-count"] = 2 * int(cast(int, rec["feature-count"]))
                for key in ("feature-sum", "feature-sumsq"):
                    rec[key] = [2 * float(v) for v in cast(list[float], rec[key])]
            self.joins.append(rec)
        return replies


@dataclass(frozen=True)
class Finished:
    """What a ``run_federation`` call left: its run directory, snapshot directory, site state and grid."""

    out: Path
    snapshots: Path
    state: Path
    grid: SiteGrid


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``run_federation`` sets up logger ``dmsc_fed`` (own handlers, no propagation): undo it for other tests."""
    logger = logging.getLogger("dmsc_fed")
    level, propagate, handlers = logger.level, logger.propagate, list(logger.handlers)
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision_keys(tmp_path_factory.mktemp("keys") / "keys", SITES)


@pytest.fixture(scope="module")
def cache() -> dict[str, Finished]:
    """Runs shared by the tests of this module (each is made once, on first use)."""
    return {}


def _cfg(**overrides: Any) -> FederationConfig:
    cfg = make_config(rounds=ROUNDS, sites=[{"name": s} for s in SITES], **overrides)
    assert cfg.dataset.name == "breast_cancer" and cfg.model.name == "logreg"
    assert cfg.dataset.scaling == "federated" and cfg.fault.snapshots and cfg.fault.keep >= 2
    assert not cfg.uses_dp and not cfg.uses_encryption
    return cfg


def _federate(
    cfg: FederationConfig,
    grid: SiteGrid,
    *,
    out: Path,
    snapshots: Path,
    keys: Path,
    run_id: int,
) -> dict[str, Any]:
    run_config = {
        "dmsc-config": cfg.to_json(),
        "out-dir": str(out),
        "snapshot-dir": str(snapshots),
        "keys-dir": str(keys / "server"),
    }
    return run_federation(grid=cast(Grid, grid), run_config=run_config, run_id=run_id)


def _grid(state: Path, keys: Path, cls: type[SiteGrid] = SiteGrid) -> SiteGrid:
    return cls(nodes=site_nodes(SITES, state_dir=state, keys=keys))


def _round(msg: Message) -> int:
    return int(cast(int, cast(ConfigRecord, msg.content[CONFIG_KEY])[ROUND_KEY]))


def _server_config(grid: SiteGrid, kind: str) -> list[ConfigRecord]:
    return [cast(ConfigRecord, m.content[CONFIG_KEY]) for m in grid.sent if m.metadata.message_type == kind]


def _task_ids(grid: SiteGrid) -> set[str]:
    """The task ids of every training and evaluation message the server sent."""
    return {
        str(c[TASK_ID_KEY]) for kind in (MessageType.TRAIN, MessageType.EVALUATE) for c in _server_config(grid, kind)
    }


def _scaler(grid: SiteGrid) -> tuple[list[float], list[float]]:
    """The federated scaler every training message carried (one and the same in all of them)."""
    configs = _server_config(grid, MessageType.TRAIN)
    assert configs
    scalers = {(tuple(cast(list[float], c[SCALER_MEAN])), tuple(cast(list[float], c[SCALER_STD]))) for c in configs}
    assert len(scalers) == 1, "the scaler changed within a run"
    [(mean, std)] = scalers
    return list(mean), list(std)


def _refit(grid: GrownGrid) -> list[float]:
    """The mean of a scaler fitted on the statistics the sites declared at this run's join."""
    stats = [
        FeatureStats(
            count=int(cast(int, rec["feature-count"])),
            total=np.asarray(rec["feature-sum"], dtype=np.float64),
            total_sq=np.asarray(rec["feature-sumsq"], dtype=np.float64),
        )
        for rec in grid.joins
    ]
    assert len(stats) == len(SITES)
    return [float(v) for v in fit_scaler(stats).mean]


def _trained_rounds(grid: SiteGrid) -> list[int]:
    return sorted({_round(req) for _, req, _ in grid.train_calls})


def _model(out: Path) -> dict[str, NDArray[Any]]:
    return load_file(str(out / "model.safetensors"))


def _result(out: Path) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads((out / "result.json").read_text()))


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _copy(src: Path, dst: Path) -> Path:
    if src.exists():
        shutil.copytree(src, dst)
    return dst


@pytest.fixture
def uninterrupted(cache: dict[str, Finished], keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """The task run to its end without a crash (made once per module)."""
    if "uninterrupted" not in cache:
        base = tmp_path_factory.mktemp("uninterrupted")
        grid = _grid(base / "state", keys)
        _federate(_cfg(), grid, out=base / "run", snapshots=base / "snapshots", keys=keys, run_id=FIRST_RUN_ID)
        cache["uninterrupted"] = Finished(
            out=base / "run", snapshots=base / "snapshots", state=base / "state", grid=grid
        )
    return cache["uninterrupted"]


@pytest.fixture
def crashed(cache: dict[str, Finished], keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """The same task, whose server died when it sent round 3's training messages (made once per module)."""
    if "crashed" not in cache:
        base = tmp_path_factory.mktemp("crashed")
        grid = _grid(base / "state", keys, CrashingGrid)
        with pytest.raises(ServerDied):
            _federate(_cfg(), grid, out=base / "run", snapshots=base / "snapshots", keys=keys, run_id=FIRST_RUN_ID)
        cache["crashed"] = Finished(out=base / "run", snapshots=base / "snapshots", state=base / "state", grid=grid)
    return cache["crashed"]


def _resume(crashed: Finished, keys: Path, tmp_path: Path, *, corrupt: int | None = None) -> Finished:
    """Restart the crashed task on copies of its snapshots and site state, with run id 2 and a healthy grid.

    Site ``a`` has gained records meanwhile (:class:`GrownGrid`): a refit scaler would differ.
    """
    snapshots = _copy(crashed.snapshots, tmp_path / "snapshots")
    state = _copy(crashed.state, tmp_path / "state")
    if corrupt is not None:  # the newest arrays file cut short, as by a full disk
        manifest = json.loads((snapshots / f"round-{corrupt:06d}.json").read_text())
        npz = snapshots / manifest["npz"]
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    grid = _grid(state, keys, GrownGrid)
    _federate(_cfg(), grid, out=tmp_path / "run", snapshots=snapshots, keys=keys, run_id=FIRST_RUN_ID + 1)
    return Finished(out=tmp_path / "run", snapshots=snapshots, state=state, grid=grid)


def _assert_same_end(resumed: Finished, uninterrupted: Finished, *, resumed_after: int) -> None:
    """The resumed task completed every round and ends exactly where the uninterrupted one did."""
    result, reference = _result(resumed.out), _result(uninterrupted.out)
    assert result["resumed_after_round"] == resumed_after
    assert result["rounds_completed"] == ROUNDS and result["ended_early"] is None
    assert result["rejected"] == [] and result["refused"] == [] and result["rolled_back"] == []
    assert result["privacy"]["signed_updates"] is True
    # Training is deterministic (seeded per task, round and site): the final model is bit for bit the same.
    model, expected = _model(resumed.out), _model(uninterrupted.out)
    assert set(model) == set(expected)
    for name, values in expected.items():
        assert model[name].dtype == values.dtype
        np.testing.assert_array_equal(model[name], values, err_msg=name)
    assert result["final_metrics"] == reference["final_metrics"]
    # This run's metrics.jsonl holds the rounds it ran, and they evaluate as those of the uninterrupted run.
    rows = _metrics(resumed.out)
    assert [r["round"] for r in rows] == list(range(resumed_after + 1, ROUNDS + 1))
    assert all(r["aggregated"] for r in rows)
    same = {r["round"]: r for r in _metrics(uninterrupted.out)}
    for row in rows:
        assert row["evaluate"] == same[row["round"]]["evaluate"], row["round"]
        assert row["train_sites"] == same[row["round"]]["train_sites"] == list(SITES)
    assert _trained_rounds(resumed.grid) == list(range(resumed_after + 1, ROUNDS + 1))
    # The newest snapshot is now the last round's.
    latest = SnapshotStore(resumed.snapshots, fingerprint=fingerprint_of(config_json=_cfg().to_json())).latest()
    assert latest is not None and latest.round == ROUNDS


def test_an_uninterrupted_task_runs_every_round_and_snapshots_each(uninterrupted: Finished) -> None:
    result = _result(uninterrupted.out)
    assert result["rounds_completed"] == ROUNDS and result["resumed_after_round"] is None
    assert result["rejected"] == [] and result["privacy"]["signed_updates"] is True
    assert [r["round"] for r in _metrics(uninterrupted.out)] == list(range(1, ROUNDS + 1))
    assert _trained_rounds(uninterrupted.grid) == list(range(1, ROUNDS + 1))
    assert _task_ids(uninterrupted.grid) == {f"t/{FIRST_RUN_ID}"}
    _scaler(uninterrupted.grid)
    store = SnapshotStore(uninterrupted.snapshots, fingerprint=fingerprint_of(config_json=_cfg().to_json()))
    assert store.rounds() == list(range(ROUNDS - _cfg().fault.keep + 1, ROUNDS + 1))  # the newest `keep`
    latest = store.latest()
    assert latest is not None and latest.round == ROUNDS
    model = _model(uninterrupted.out)
    assert set(model) == set(latest.arrays)
    for name, values in model.items():  # the last snapshot holds the final model
        np.testing.assert_array_equal(latest.arrays[name], values, err_msg=name)


def test_a_crashed_task_resumes_after_its_last_snapshot_and_ends_as_if_uninterrupted(
    crashed: Finished, uninterrupted: Finished, keys: Path, tmp_path: Path
) -> None:
    # The crash: rounds 1 and 2 done and snapshotted, round 3 never reached a site, no result written.
    store = SnapshotStore(crashed.snapshots, fingerprint=fingerprint_of(config_json=_cfg().to_json()))
    assert store.rounds() == [1, 2]
    assert _trained_rounds(crashed.grid) == [1, 2]
    assert [r["round"] for r in _metrics(crashed.out)] == [1, 2]
    assert not (crashed.out / "result.json").exists()
    first_task = f"t/{FIRST_RUN_ID}"
    assert _task_ids(crashed.grid) == {first_task}

    resumed = _resume(crashed, keys, tmp_path)
    _assert_same_end(resumed, uninterrupted, resumed_after=2)
    # One task id across the restart (the sites sign, and keep their privacy ledgers, by it), not run 2's.
    assert _task_ids(resumed.grid) == {first_task}
    log = (resumed.out / "server.log").read_text()
    assert f"task {first_task!r}:" in log
    assert f"resuming task {first_task!r} after round 2" in log
    assert repr(f"t/{FIRST_RUN_ID + 1}") not in log  # the id a fresh run 2 would have had
    # The sites standardize their features as before the crash: the snapshot's scaler, not one
    # refit on what they declared at this join (site a has gained records since).
    assert _scaler(resumed.grid) == _scaler(crashed.grid) == _scaler(uninterrupted.grid)
    assert not np.allclose(_refit(cast(GrownGrid, resumed.grid)), _scaler(resumed.grid)[0])


def test_a_truncated_newest_snapshot_falls_back_to_the_one_before(
    crashed: Finished, uninterrupted: Finished, keys: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # run_federation stops logger "dmsc_fed" from propagating to the root logger, where caplog listens.
    snapshot_log = logging.getLogger(SNAPSHOT_LOGGER)
    snapshot_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=SNAPSHOT_LOGGER):
            resumed = _resume(crashed, keys, tmp_path, corrupt=2)
    finally:
        snapshot_log.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.name == SNAPSHOT_LOGGER and r.levelno == logging.WARNING]
    assert any(
        "snapshot round 2" in w
        and "not usable" in w
        and "truncated" in w
        and "falling back to an earlier snapshot" in w
        for w in warnings
    ), warnings
    _assert_same_end(resumed, uninterrupted, resumed_after=1)
    assert _task_ids(resumed.grid) == {f"t/{FIRST_RUN_ID}"}
    assert _scaler(resumed.grid) == _scaler(uninterrupted.grid)
    assert not np.allclose(_refit(cast(GrownGrid, resumed.grid)), _scaler(resumed.grid)[0])
    assert "resuming task 't/1' after round 1" in (resumed.out / "server.log").read_text()


def test_a_snapshot_of_another_config_stops_the_run_before_anything_is_sent(keys: Path, tmp_path: Path) -> None:
    # Another task config (another learning rate) crashed after round 1 and left its snapshot here.
    snapshots = tmp_path / "snapshots"
    other = _cfg(learning_rate=0.05)
    assert fingerprint_of(config_json=other.to_json()) != fingerprint_of(config_json=_cfg().to_json())
    crashing = CrashingGrid(nodes=site_nodes(SITES, state_dir=tmp_path / "state", keys=keys), crash_round=2)
    with pytest.raises(ServerDied):
        _federate(other, crashing, out=tmp_path / "other", snapshots=snapshots, keys=keys, run_id=7)
    files = {p.name: p.read_bytes() for p in snapshots.iterdir()}
    assert {"round-000001.json", "round-000001.npz"} <= set(files)

    grid = _grid(tmp_path / "state", keys)
    out = tmp_path / "run"
    with pytest.raises(SnapshotError, match="another task config") as err:
        _federate(_cfg(), grid, out=out, snapshots=snapshots, keys=keys, run_id=8)
    assert str(snapshots) in str(err.value)
    assert grid.sent == []  # no site was asked anything: not even to join
    assert not (out / "metrics.jsonl").exists() and not (out / "result.json").exists()
    assert {p.name: p.read_bytes() for p in snapshots.iterdir()} == files  # the other task's snapshot is untouched
