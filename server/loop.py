"""The server's round loop: load the task config, let sites join, train, write results.

The loop itself is Flower's (``Strategy.start``); this module wires our
strategy to it and records what happened in the run directory.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from dmsc_fed import __version__
from dmsc_fed.config import FederationConfig, config_from_json, load_config
from dmsc_fed.data.scaling import fit_scaler
from dmsc_fed.errors import ConfigError, RunFailedError
from dmsc_fed.runfiles import append_jsonl, save_model, write_json
from dmsc_fed.training import model_for
from dmsc_fed.wire import SCALER_MEAN, SCALER_STD, TASK_KEY
from server.join import discover_sites
from strategies import STRATEGIES, RoundReport, WeightedFedAvg

log = logging.getLogger("dmsc_fed.server")
APP_ROOT = Path(__file__).resolve().parent.parent


def _setup_logging(out: Path | None) -> None:
    logger = logging.getLogger("dmsc_fed")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if out is not None:
        handlers.append(logging.FileHandler(out / "server.log"))
    logger.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)


def task_config(run_config: dict[str, Any]) -> FederationConfig:
    """The federation config of this run.

    ``dmsc-config`` (inline JSON, set by ``dmsc-fed run``) wins; otherwise
    ``config-file``, relative to the app root, so that ``flwr run .`` works.
    """
    inline = str(run_config.get("dmsc-config", "") or "")
    if inline:
        return config_from_json(inline)
    path = Path(str(run_config.get("config-file", "") or "examples/hospital/config.toml"))
    return load_config(path=path if path.is_absolute() else APP_ROOT / path)


def run_federation(*, grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run one federated training task to completion and return its result."""
    out_value = str(run_config.get("out-dir", "") or "")
    out = Path(out_value) if out_value else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    cfg = task_config(run_config)
    if cfg.strategy.name not in STRATEGIES:
        raise ConfigError(f"strategy {cfg.strategy.name!r} is not available; built-in: {sorted(STRATEGIES)}")
    log.info(
        "task %r: %d rounds, %d sites, model %s, dataset %s",
        cfg.name,
        cfg.rounds,
        len(cfg.sites),
        cfg.model.name,
        cfg.dataset.name,
    )
    if out is not None:
        write_json(out / "config.json", cfg.model_dump(mode="json"))

    joined = discover_sites(grid=grid, cfg=cfg, timeout_s=cfg.strategy.join_timeout_s)
    sites = joined.sites
    if out is not None:
        write_json(out / "sites.json", [s.to_dict() for s in sites.values()])

    model = model_for(cfg, seed=cfg.seed)
    initial = ArrayRecord(model.state_dict())

    def on_round(report: RoundReport) -> None:
        row = report.to_dict()
        log.info(
            "round %d/%d: loss=%s accuracy=%s sites=%s rejected=%d (%.1fs)",
            report.round,
            cfg.rounds,
            _fmt(row["loss"]),
            _fmt(row["accuracy"]),
            report.train_sites,
            len(report.rejected),
            report.seconds,
        )
        if out is not None:
            append_jsonl(out / "metrics.jsonl", row)

    strategy = WeightedFedAvg.for_model(
        initial=initial,
        sites=sites,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_sites=min(cfg.min_sites, len(sites)),
        on_round=on_round,
        seed=cfg.seed,
    )
    task = ConfigRecord({TASK_KEY: cfg.to_json()})
    if joined.stats:
        if len(joined.stats) != len(sites):
            raise RunFailedError("federated scaling needs feature statistics from every site; some sent none")
        scaler = fit_scaler(list(joined.stats.values()))
        task[SCALER_MEAN] = scaler.mean.tolist()
        task[SCALER_STD] = scaler.std.tolist()
        log.info(
            "federated scaling fitted on %d training samples from %d sites",
            sum(s.count for s in joined.stats.values()),
            len(joined.stats),
        )
    started = time.time()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.round_timeout_s,
        train_config=task,
        evaluate_config=ConfigRecord(dict(task)),
    )
    outcome = _outcome(cfg, strategy, sites, time.time() - started)
    if out is not None:
        save_model(out, {k: a.numpy() for k, a in result.arrays.items()})
        write_json(out / "result.json", outcome)
    if outcome["rounds_completed"] == 0:
        raise RunFailedError("no round completed: every training reply was rejected or missing")
    return outcome


def _outcome(cfg: FederationConfig, strategy: WeightedFedAvg, sites: dict[int, Any], seconds: float) -> dict[str, Any]:
    reports = strategy.reports
    last_eval = next((r.evaluate for r in reversed(reports) if r.evaluate), {})
    return {
        "name": cfg.name,
        "version": __version__,
        "rounds_planned": cfg.rounds,
        "rounds_completed": sum(r.aggregated for r in reports),
        "final_metrics": {"accuracy": last_eval.get("accuracy"), "loss": last_eval.get("loss")},
        "sites": {s.name: s.to_dict() | {"final": _last_site_metrics(reports, s.name)} for s in sites.values()},
        "rejected": [r | {"round": rep.round} for rep in reports for r in rep.rejected],
        "seconds": round(seconds, 2),
    }


def _last_site_metrics(reports: list[RoundReport], site: str) -> dict[str, dict[str, float]]:
    for r in reversed(reports):
        if site in r.per_site:
            return r.per_site[site]
    return {}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
