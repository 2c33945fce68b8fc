"""The server's round loop: load the task config, let sites join, train, write results.

The loop itself is Flower's (``Strategy.start``); this module wires our
strategy to it, plugs in signature verification and encrypted aggregation when
the task asks for them, and records what happened in the run directory.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from dmsc_fed import __version__
from dmsc_fed.config import FederationConfig, config_from_json, load_config
from dmsc_fed.data.scaling import fit_scaler
from dmsc_fed.errors import ConfigError, RunFailedError
from dmsc_fed.runfiles import append_jsonl, save_encrypted_model, save_model, write_json
from dmsc_fed.security.provision import ServerKeys
from dmsc_fed.segmentation.block import BlockPlan, plan_blocks
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.wire import CT_WEIGHT, EPSILON_KEY, EPSILON_TOTAL_KEY, SCALER_MEAN, SCALER_STD, TASK_ID_KEY, TASK_KEY
from server.join import discover_sites
from strategies import (
    EncryptedFedAvg,
    ReplyCheck,
    RoundReport,
    TaskFinished,
    WeightedFedAvg,
    strategy_for,
)
from strategies.segmented import BlockFedAvg

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


def _server_keys(cfg: FederationConfig, run_config: dict[str, Any]) -> ServerKeys | None:
    keys_dir = str(run_config.get("keys-dir", "") or "")
    if keys_dir:
        return ServerKeys.load(Path(keys_dir))
    if cfg.privacy.dp == "on" or cfg.privacy.encryption != "off":
        raise ConfigError(
            "the task asks for privacy, which needs the server's key material: set the run config 'keys-dir' "
            "(the server/ folder of 'dmsc-fed keys init')"
        )
    return None


def signature_check(keys: ServerKeys, task_id: str) -> ReplyCheck:
    """A reply check that verifies each site's signature and its binding to task, round and stage."""
    from dmsc_fed.privacy.signing import Binding, verify

    verify_keys = keys.verify_keys()

    def check(site: SiteInfo, content: RecordDict, stage: str, server_round: int) -> str | None:
        key = verify_keys.get(site.name)
        if key is None:
            return f"no public signing key for site {site.name!r} in {keys.directory}"
        return verify(content, expected=Binding(task=task_id, round=server_round, site=site.name, stage=stage), key=key)

    return check


#: Relative training capacity of a site by resource pool (draft 6.3.8); block mode gives a
#: GPU site four times the blocks of a CPU site.
POOL_CAPACITY = {"cpu": 1.0, "gpu": 4.0}


def block_plan(cfg: FederationConfig, initial: ArrayRecord, sites: dict[int, SiteInfo]) -> BlockPlan:
    """The block plan over the sites that joined, by their configured pools."""
    seg = cfg.segmentation
    assert seg is not None and seg.block is not None
    pools = {s.name: s.pool for s in cfg.sites}
    joined = sorted(s.name for s in sites.values())
    try:
        return plan_blocks(
            parameters={k: tuple(a.shape) for k, a in initial.items()},
            capacities={name: POOL_CAPACITY[pools[name]] for name in joined},
            block_size=seg.block.block_size,
            block_count=seg.block.block_count,
            replication=seg.block.replication,
        )
    except ConfigError as err:
        raise RunFailedError(f"no block plan fits the {len(joined)} sites that joined ({joined}): {err}") from None


def _strategy(
    cfg: FederationConfig, keys: ServerKeys | None, initial: ArrayRecord, **kwargs: Any
) -> tuple[WeightedFedAvg, dict[str, Any] | None]:
    cls = strategy_for(cfg)
    if cls is BlockFedAvg:
        plan = block_plan(cfg, initial, kwargs["sites"])
        log.info(
            "block plan: %d blocks, replication %d, %s",
            len(plan.blocks),
            plan.replication,
            {site: len(ids) for site, ids in plan.assignment.items()},
        )
        return BlockFedAvg.for_model(initial=initial, plan=plan, **kwargs), None
    if cfg.privacy.encryption == "off":
        return cls.for_model(initial=initial, **kwargs, **cfg.strategy.options), None
    from dmsc_fed.privacy.he import ciphertext_bytes_limit, get_profile, load_public_context

    assert keys is not None
    if keys.he_profile != cfg.privacy.he_profile:
        raise ConfigError(
            f"privacy.he_profile = {cfg.privacy.he_profile!r}, but the federation's keys were made with "
            f"{keys.he_profile!r}"
        )
    profile = get_profile(keys.he_profile)
    ctx = load_public_context(keys.he_public.read_bytes())  # fails if a secret key is present
    strategy = EncryptedFedAvg.for_encrypted_model(
        initial=initial,
        public_context=ctx,
        slots=profile.slots,
        max_chunk_bytes=ciphertext_bytes_limit(profile),
        **kwargs,
    )
    return strategy, profile.describe()


def run_federation(*, grid: Grid, run_config: dict[str, Any], run_id: int = 0) -> dict[str, Any]:
    """Run one federated training task to completion and return its result."""
    out_value = str(run_config.get("out-dir", "") or "")
    out = Path(out_value) if out_value else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    cfg = task_config(run_config)
    keys = _server_keys(cfg, run_config)
    task_id = f"{cfg.name}/{run_id}"
    log.info(
        "task %r: %d rounds, %d sites, model %s, dataset %s, dp %s, encryption %s",
        task_id,
        cfg.rounds,
        len(cfg.sites),
        cfg.model.name,
        cfg.dataset.name,
        cfg.privacy.dp,
        cfg.privacy.encryption,
    )
    if out is not None:
        write_json(out / "config.json", cfg.model_dump(mode="json"))

    joined = discover_sites(grid=grid, cfg=cfg, timeout_s=cfg.strategy.join_timeout_s)
    sites = joined.sites
    if out is not None:
        write_json(out / "sites.json", [s.to_dict() for s in sites.values()])

    initial = ArrayRecord(model_for(cfg, seed=cfg.seed).state_dict())

    def on_round(report: RoundReport) -> None:
        row = report.to_dict()
        log.info(
            "round %d/%d: loss=%s accuracy=%s sites=%s rejected=%d refused=%d (%.1fs)",
            report.round,
            cfg.rounds,
            _fmt(row["loss"]),
            _fmt(row["accuracy"]),
            report.train_sites,
            len(report.rejected),
            len(report.refused),
            report.seconds,
        )
        if out is not None:
            append_jsonl(out / "metrics.jsonl", row)

    strategy, he_params = _strategy(
        cfg,
        keys,
        initial,
        sites=sites,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_sites=min(cfg.min_sites, len(sites)),
        on_round=on_round,
        reply_check=signature_check(keys, task_id) if keys is not None else None,
        seed=cfg.seed,
    )
    task = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: task_id})
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
    ended_early = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.rounds,
            timeout=cfg.strategy.round_timeout_s,
            train_config=task,
            evaluate_config=ConfigRecord(dict(task)),
        )
    except TaskFinished as done:
        ended_early = str(done)
        log.warning("task ended before its last round: %s", done)
    outcome = _outcome(cfg, strategy, joined.refused, time.time() - started, he_params, ended_early)
    if out is not None:
        _save_final(out, strategy.current or initial)
        write_json(out / "result.json", outcome)
    if outcome["rounds_completed"] == 0:
        raise RunFailedError("no round completed: every training reply was rejected, refused or missing")
    return outcome


def _save_final(out: Path, arrays: ArrayRecord) -> None:
    values = {k: a.numpy() for k, a in arrays.items()}
    if CT_WEIGHT in arrays:
        save_encrypted_model(out, values)  # the server cannot decrypt it; a site can
    else:
        save_model(out, values)


def _outcome(
    cfg: FederationConfig,
    strategy: WeightedFedAvg,
    refused_at_join: dict[str, str],
    seconds: float,
    he_params: dict[str, Any] | None,
    ended_early: str | None,
) -> dict[str, Any]:
    reports = strategy.reports
    last_eval = next((r.evaluate for r in reversed(reports) if r.evaluate), {})
    sites: dict[str, Any] = {}
    for s in strategy.sites.values():
        last = _last_site_metrics(reports, s.name)
        entry = s.to_dict() | {"final": last}
        if cfg.privacy.dp == "on":
            train = _last_train(reports, s.name)
            entry["epsilon"] = train.get(EPSILON_KEY, 0.0)
            entry["epsilon_site_total"] = train.get(EPSILON_TOTAL_KEY, 0.0)
            entry["delta"] = cfg.privacy.delta
        if s.node_id in strategy.retired:
            entry["stopped"] = strategy.retired[s.node_id]
        sites[s.name] = entry
    return {
        "name": cfg.name,
        "version": __version__,
        "rounds_planned": cfg.rounds,
        "rounds_completed": sum(r.aggregated for r in reports),
        "ended_early": ended_early,
        "final_metrics": {"accuracy": last_eval.get("accuracy"), "loss": last_eval.get("loss")},
        "sites": sites,
        "refused_at_join": refused_at_join,
        "rejected": [r | {"round": rep.round} for rep in reports for r in rep.rejected],
        "refused": [r | {"round": rep.round} for rep in reports for r in rep.refused],
        "privacy": {
            "dp": cfg.privacy.dp,
            "delta": cfg.privacy.delta if cfg.privacy.dp == "on" else None,
            "accountant": cfg.privacy.accountant if cfg.privacy.dp == "on" else None,
            "encryption": cfg.privacy.encryption,
            "he_params": he_params,
            "signed_updates": strategy.reply_check is not None,
        },
        "seconds": round(seconds, 2),
    }


def _last_train(reports: list[RoundReport], site: str) -> dict[str, float]:
    for r in reversed(reports):
        if "train" in r.per_site.get(site, {}):
            return r.per_site[site]["train"]
    return {}


def _last_site_metrics(reports: list[RoundReport], site: str) -> dict[str, dict[str, float]]:
    for r in reversed(reports):
        if site in r.per_site:
            return r.per_site[site]
    return {}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
