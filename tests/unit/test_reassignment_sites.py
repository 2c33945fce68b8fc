"""Reassignment with real sites: a failed site's block is trained by a substitute within the round.

Everything the server does is the real code: the join (:func:`server.join.discover_sites`),
the strategy and its layout as ``run_federation`` builds them (``server.loop.build_strategy``,
signature checks included), and the fault-tolerant round loop
(:class:`server.rounds.RoundLoop`). The sites are the real handlers
(:func:`clients.site.handle_train`, :func:`clients.site.handle_evaluate`) run in this
process on the bundled breast-cancer data, with key material from
:func:`dmsc_fed.security.provision.provision`. Site ``c`` joins, then goes down: the grid
drops every training and evaluation message sent to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from dmsc_fed.config import FaultSpec, FederationConfig
from dmsc_fed.data.scaling import fit_scaler
from dmsc_fed.privacy.he import load_secret_context
from dmsc_fed.security.provision import ServerKeys, provision
from dmsc_fed.segmentation.layout import SegmentLayout, open_segments
from dmsc_fed.training import model_for
from dmsc_fed.wire import (
    ARRAYS_KEY,
    SCALER_MEAN,
    SCALER_STD,
    SEGMENT_NAMES,
    SEGMENTS_KEY,
    TASK_ID_KEY,
    TASK_KEY,
    segment_chunk_key,
    segment_key,
    segment_weight_key,
)
from server.join import discover_sites
from server.loop import build_strategy
from server.rounds import RoundLoop
from strategies.segmented import SegmentedFedAvg
from tests.conftest import make_config
from tests.sitegrid import SiteGrid

pytestmark = pytest.mark.usefixtures("flwr_identity")

SITES = ("a", "b", "c")
DOWN = "c"
TASK_ID = "reassign/1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The federation's key material, as ``dmsc-fed keys init`` makes it."""
    return provision(out=tmp_path_factory.mktemp("keys") / "keys", sites=list(SITES))


@dataclass
class Run:
    layout: SegmentLayout
    strategy: SegmentedFedAvg
    grid: SiteGrid
    initial: ArrayRecord


def _config(*, encryption: str, reassign: bool) -> FederationConfig:
    return make_config(
        rounds=1,
        local_epochs=2,
        sites=[{"name": s} for s in SITES],
        segmentation={"mode": "block", "block": {"block_count": 3, "replication": 1}},
        privacy={"encryption": encryption},
        fault=FaultSpec(quorum=2, round_retries=0, reassign=reassign, snapshots=False).model_dump(),
    )


def _run(cfg: FederationConfig, keys: Path, tmp_path: Path) -> Run:
    """Join, build the strategy as ``run_federation`` does, and run the task's rounds with RoundLoop."""
    nodes = {
        i: {"site-name": s, "state-dir": str(tmp_path / "state"), "keys-dir": str(keys / "sites" / s), "device": "cpu"}
        for i, s in enumerate(SITES, start=1)
    }
    grid = SiteGrid(nodes=nodes, down={i for i, n in nodes.items() if n["site-name"] == DOWN})
    joined = discover_sites(grid=cast(Grid, grid), cfg=cfg, timeout_s=5.0)
    assert sorted(s.name for s in joined.sites.values()) == list(SITES)  # c joined: it fails later
    server_keys = ServerKeys.load(keys / "server")
    initial = ArrayRecord(model_for(cfg, seed=cfg.seed).state_dict())
    strategy, _, layout = build_strategy(cfg, server_keys, initial, sites=joined.sites, task_id=TASK_ID)
    assert isinstance(strategy, SegmentedFedAvg) and layout is not None
    task = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: TASK_ID, SEGMENTS_KEY: layout.to_json()})
    if joined.stats:
        scaler = fit_scaler(list(joined.stats.values()))
        task[SCALER_MEAN] = scaler.mean.tolist()
        task[SCALER_STD] = scaler.std.tolist()
    loop = RoundLoop(
        strategy=strategy,
        grid=cast(Grid, grid),
        fault=cfg.fault,
        deadline_s=1.0,
        train_config=task,
        evaluate_config=ConfigRecord(dict(task)),
    )
    loop.run(initial=initial, rounds=cfg.rounds)
    return Run(layout=layout, strategy=strategy, grid=grid, initial=initial)


def _values(arrays: ArrayRecord) -> dict[str, Any]:
    return {k: a.numpy() for k, a in arrays.items()}


def _blocks(run: Run) -> tuple[list[str], list[str]]:
    """The down site's blocks, and every other block (each block has exactly one site)."""
    assert all(len(seg.sites) == 1 for seg in run.layout.segments)
    lost = [seg.name for seg in run.layout.of_site(DOWN)]
    others = [seg.name for seg in run.layout.segments if seg.name not in lost]
    assert lost and others
    return lost, others


def _check_round(run: Run, *, reassign: bool) -> tuple[list[str], list[str], str | None]:
    """The round completed with a and b; with ``reassign``, c's blocks went to one of them and were accepted."""
    lost, others = _blocks(run)
    [report] = run.strategy.reports
    assert report.aggregated and report.rolled_back is None and report.attempts == 1
    assert sorted(set(report.train_sites)) == ["a", "b"]
    assert not report.refused
    # c is the only site left out, and only for missing the deadline (train, and evaluate).
    assert {(r["site"], r["stage"], r["kind"]) for r in report.rejected} == {
        (DOWN, "train", "late"),
        (DOWN, "evaluate", "late"),
    }
    assert report.evaluate_sites and DOWN not in report.evaluate_sites
    if not reassign:
        assert report.reassigned == []
        assert len(run.grid.train_calls) == 2  # only a's and b's own training
        return lost, others, None
    assert [r["segment"] for r in report.reassigned] == lost
    substitutes = {r["to"] for r in report.reassigned}
    assert len(substitutes) == 1 and {r["from"] for r in report.reassigned} == {DOWN}
    [substitute] = substitutes
    assert substitute in ("a", "b")
    # The substitute trained twice: its own blocks, then (a second exchange, same round) c's blocks.
    calls = [(req, rep) for site, req, rep in run.grid.train_calls if site == substitute]
    assert len(calls) == 2
    request = calls[1][0].content["config"]
    assert list(cast(list[str], request[SEGMENT_NAMES])) == lost
    moved = SegmentLayout.from_json(str(request[SEGMENTS_KEY]))
    assert all(moved.segment(name).sites == (DOWN, substitute) for name in lost)
    return lost, others, substitute


def test_a_failed_sites_block_is_trained_by_a_substitute_in_plaintext(keys: Path, tmp_path: Path) -> None:
    run = _run(_config(encryption="off", reassign=True), keys, tmp_path / "on")
    lost, others, substitute = _check_round(run, reassign=True)
    assert substitute is not None
    model = run.strategy.current
    assert model is not None
    before, after = _values(run.initial), _values(model)
    for name in lost + others:  # every block was trained, c's by the substitute
        seg = run.layout.segment(name)
        assert not np.allclose(run.layout.gather(after, seg), run.layout.gather(before, seg)), name
    # c's blocks in the aggregate are exactly what the substitute's reassignment reply carried.
    reply = [rep for site, _, rep in run.grid.train_calls if site == substitute][1]
    for name in lost:
        sent = cast(ArrayRecord, reply.content[ARRAYS_KEY])[segment_key(name)].numpy()
        np.testing.assert_allclose(run.layout.gather(after, run.layout.segment(name)), sent, rtol=1e-6)

    # Without reassignment c's blocks keep their initial values exactly: the reassignment trained them.
    off = _run(_config(encryption="off", reassign=False), keys, tmp_path / "off")
    _check_round(off, reassign=False)
    assert off.layout == run.layout
    assert off.strategy.current is not None
    after_off = _values(off.strategy.current)
    for name in lost:
        seg = off.layout.segment(name)
        assert np.array_equal(off.layout.gather(after_off, seg), off.layout.gather(before, seg)), name
    for name in others:  # a's and b's blocks are trained as before (same seeds, same data)
        seg = off.layout.segment(name)
        np.testing.assert_array_equal(off.layout.gather(after_off, seg), run.layout.gather(after, seg))


def test_a_failed_sites_encrypted_block_is_trained_by_a_substitute(keys: Path, tmp_path: Path) -> None:
    run = _run(_config(encryption="ckks", reassign=True), keys, tmp_path / "on")
    lost, others, substitute = _check_round(run, reassign=True)
    assert substitute is not None
    assert all(seg.encrypted for seg in run.layout.segments)
    model = run.strategy.current
    assert model is not None
    values = _values(model)
    secret = load_secret_context((keys / "sites" / "a" / "he-secret.ctx").read_bytes())
    before = _values(run.initial)
    for name in lost + others:
        seg = run.layout.segment(name)
        assert segment_chunk_key(name, 0) in values and segment_weight_key(name) in values, name
        assert not run.layout.gather(values, seg).any()  # the server holds no plaintext of the block
    # c's blocks carry the substitute's weight only (n / n = 1): its reply alone was added.
    for name in lost:
        np.testing.assert_allclose(values[segment_weight_key(name)], [1.0])
    opened = open_segments(values=values, layout=run.layout, ctx=secret)
    for name in lost + others:  # every block decrypts to trained values, c's too
        seg = run.layout.segment(name)
        assert not np.allclose(run.layout.gather(opened, seg), run.layout.gather(before, seg), atol=1e-4), name

    # Without reassignment c's blocks were never aggregated: no ciphertext, the plaintext initial values stay.
    off = _run(_config(encryption="ckks", reassign=False), keys, tmp_path / "off")
    _check_round(off, reassign=False)
    assert off.strategy.current is not None
    values_off = _values(off.strategy.current)
    for name in lost:
        seg = off.layout.segment(name)
        assert segment_chunk_key(name, 0) not in values_off and segment_weight_key(name) not in values_off
        assert np.array_equal(off.layout.gather(values_off, seg), off.layout.gather(before, seg)), name
    opened_off = open_segments(values=values_off, layout=off.layout, ctx=secret)
    for name in lost:
        seg = off.layout.segment(name)
        assert np.array_equal(off.layout.gather(opened_off, seg), off.layout.gather(before, seg)), name
