"""The server's round loop: load the task config, let sites join, train, write results.

The loop itself is Flower's (``Strategy.start``); this module wires our
strategy to it, plugs in signature verification and encrypted aggregation when
the task asks for them, and records what happened in the run directory.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from dmsc_fed import __version__
from dmsc_fed.config import FederationConfig, config_from_json, load_config
from dmsc_fed.data.scaling import fit_scaler
from dmsc_fed.errors import ConfigError, RunFailedError
from dmsc_fed.privacy.he import HEProfile
from dmsc_fed.runfiles import append_jsonl, save_encrypted_model, save_model, write_json
from dmsc_fed.security.provision import ServerKeys
from dmsc_fed.segmentation.layout import SegmentLayout, is_segment_key
from dmsc_fed.segmentation.names import BACKBONE
from dmsc_fed.segmentation.task import plan_task
from dmsc_fed.sites import SiteInfo
from dmsc_fed.snapshots import SnapshotStore, fingerprint_of
from dmsc_fed.training import model_for
from dmsc_fed.wire import (
    CT_WEIGHT,
    EPSILON_KEY,
    EPSILON_TOTAL_KEY,
    NUM_EXAMPLES_KEY,
    SCALER_MEAN,
    SCALER_STD,
    SEGMENTS_KEY,
    TASK_ID_KEY,
    TASK_KEY,
)
from server.control import ControlReporter, record_bytes
from server.join import discover_sites
from server.rounds import RoundFailed, RoundLoop
from strategies import (
    EncryptedFedAvg,
    ReplyCheck,
    RoundReport,
    TaskFinished,
    WeightedFedAvg,
    strategy_for,
)
from strategies.encrypted_attention import EncryptedFedAtt
from strategies.segmented import SegmentedFedAvg

log = logging.getLogger("dmsc_fed.server")

#: Metrics of binary tasks the server computes from the sites' summed counts (dmsc_fed.metrics).
BINARY_METRICS = ("precision", "recall", "f1", "specificity", "auc")
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
    if cfg.uses_dp or cfg.uses_encryption:
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


def segment_layout(cfg: FederationConfig, initial: ArrayRecord, sites: dict[int, SiteInfo]) -> SegmentLayout:
    """Plan the task's segmentation over the sites that joined (RunFailedError if no plan fits them)."""
    from strategies.registry import segment_rule

    joined = {s.name for s in sites.values()}
    members = [s.name for s in cfg.sites if s.name in joined]
    try:
        return plan_task(
            cfg, shapes=[(k, tuple(a.shape)) for k, a in initial.items()], members=members, fallback=segment_rule(cfg)
        )
    except ConfigError as err:
        raise RunFailedError(f"no plan fits the {len(members)} sites that joined {members}: {err}") from None


def _he(cfg: FederationConfig, keys: ServerKeys | None) -> tuple[Any, HEProfile]:
    from dmsc_fed.privacy.he import get_profile, load_public_context

    if keys is None:
        raise ConfigError("the task encrypts updates, which needs the server's key material (run config 'keys-dir')")
    if keys.he_profile != cfg.privacy.he_profile:
        raise ConfigError(
            f"privacy.he_profile = {cfg.privacy.he_profile!r}, but the federation's keys were made with "
            f"{keys.he_profile!r}"
        )
    return load_public_context(keys.he_public.read_bytes()), get_profile(keys.he_profile)  # fails on a secret key


def _strategy(
    cfg: FederationConfig, keys: ServerKeys | None, initial: ArrayRecord, **kwargs: Any
) -> tuple[WeightedFedAvg, dict[str, Any] | None, SegmentLayout | None]:
    from dmsc_fed.privacy.he import ciphertext_bytes_limit

    cls = strategy_for(cfg)
    if cls is SegmentedFedAvg:
        from strategies.registry import rule_options

        layout = segment_layout(cfg, initial, kwargs["sites"])
        log.info(
            "%s segmentation: %s",
            layout.mode,
            "; ".join(
                f"{s.name} ({s.size} values{', DP' if s.dp else ''}{', CKKS' if s.encrypted else ''}, {s.rule}) "
                f"on {list(s.sites)}"
                for s in layout.segments[:16]
            )
            + (f"; ... {len(layout.segments) - 16} more" if len(layout.segments) > 16 else ""),
        )
        he: dict[str, Any] = {}
        described = None
        if layout.encrypted_segments:
            ctx, profile = _he(cfg, keys)
            he = {"public_context": ctx, "slots": profile.slots, "max_chunk_bytes": ciphertext_bytes_limit(profile)}
            described = profile.describe()
        segmented = SegmentedFedAvg.for_layout(
            initial=initial,
            layout=layout,
            rule_options=rule_options(cfg),
            pools={s.name: s.pool for s in cfg.sites},
            **he,
            **kwargs,
        )
        return segmented, described, layout
    if cfg.privacy.encryption == "off":
        return cls.for_model(initial=initial, **kwargs, **cfg.strategy.options), None, None
    ctx, profile = _he(cfg, keys)
    extra: dict[str, Any] = {}
    if cls is EncryptedFedAtt:
        extra = {"step_size": cfg.strategy.options.get("step_size", 1.0), "phase_timeout": cfg.strategy.round_timeout_s}
    strategy = (EncryptedFedAtt if cls is EncryptedFedAtt else EncryptedFedAvg).for_encrypted_model(
        initial=initial,
        public_context=ctx,
        slots=profile.slots,
        max_chunk_bytes=ciphertext_bytes_limit(profile),
        **extra,
        **kwargs,
    )
    return strategy, profile.describe(), None


def build_strategy(
    cfg: FederationConfig,
    keys: ServerKeys | None,
    initial: ArrayRecord,
    *,
    sites: dict[int, SiteInfo],
    task_id: str,
    on_round: Callable[[RoundReport], None] | None = None,
) -> tuple[WeightedFedAvg, dict[str, Any] | None, SegmentLayout | None]:
    """The task's strategy as a run builds it: sampling and seed from the config, signatures checked when keyed.

    Returns the strategy, the HE parameters it uses (None in plaintext) and the segment layout (None unsegmented).
    """
    return _strategy(
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


def run_federation(*, grid: Grid, run_config: dict[str, Any], run_id: int = 0) -> dict[str, Any]:
    """Run one federated training task to completion and return its result."""
    out_value = str(run_config.get("out-dir", "") or "")
    out = Path(out_value) if out_value else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    cfg = task_config(run_config)
    keys = _server_keys(cfg, run_config)
    snapshots = _snapshots(cfg, run_config)
    snap = snapshots.latest() if snapshots is not None else None
    # One task id for the whole task, across restarts: the sites' privacy ledgers and signatures use it.
    task_id = (
        str(snap.state["task_id"])
        if snap is not None and "task_id" in snap.state
        else str(run_config.get("task-id", "") or f"{cfg.name}/{run_id}")
    )
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

    reporter = _reporter(cfg, run_config)
    joined = discover_sites(grid=grid, cfg=cfg, timeout_s=cfg.strategy.join_timeout_s)
    sites = joined.sites
    if out is not None:
        write_json(out / "sites.json", [s.to_dict() for s in sites.values()])
    if reporter is not None:
        reporter.joined(sites, keys)
    holder: dict[str, Any] = {}  # the strategy and its HE parameters, once built (for the reporter)

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
        if reporter is not None and "strategy" in holder:
            current = holder["strategy"].current
            down = record_bytes(current) * len(report.sampled) if current is not None else 0
            reporter.round_done(report, model=current, bytes_down=down, he_params=holder["he_params"])

    strategy, he_params, layout = build_strategy(cfg, keys, initial, sites=sites, task_id=task_id, on_round=on_round)
    holder.update(strategy=strategy, he_params=he_params)
    start_round = 1
    if snap is not None:
        strategy.restore(snap.state, snap.arrays)  # a segmented strategy takes the snapshot's layout back
        start_round = snap.round + 1
        log.warning(
            "resuming task %r after round %d from snapshot %s (%d rounds of history restored)",
            task_id,
            snap.round,
            snap.path,
            len(strategy.reports),
        )
        if reporter is not None:
            reporter.resumed(round=snap.round, path=str(snap.path))
    if isinstance(strategy, SegmentedFedAvg):
        layout = strategy.layout
    if reporter is not None and layout is not None:
        reporter.planned(layout)
    task = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: task_id})
    if layout is not None:
        task[SEGMENTS_KEY] = layout.to_json()
        if out is not None:
            (out / "segments.json").write_text(layout.to_json() + "\n")
    kept: dict[str, Any] = {"task_id": task_id}
    if snap is not None and "scaler" in snap.state:  # the same standardization as before the restart
        kept["scaler"] = snap.state["scaler"]
    elif joined.stats:
        if len(joined.stats) != len(sites):
            raise RunFailedError("federated scaling needs feature statistics from every site; some sent none")
        scaler = fit_scaler(list(joined.stats.values()))
        kept["scaler"] = {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}
        log.info(
            "federated scaling fitted on %d training samples from %d sites",
            sum(s.count for s in joined.stats.values()),
            len(joined.stats),
        )
    if "scaler" in kept:
        task[SCALER_MEAN] = [float(v) for v in kept["scaler"]["mean"]]
        task[SCALER_STD] = [float(v) for v in kept["scaler"]["std"]]
    started = time.time()
    ended_early = None
    failed: RoundFailed | None = None
    loop = RoundLoop(
        strategy=strategy,
        grid=grid,
        fault=cfg.fault,
        deadline_s=cfg.strategy.round_timeout_s,
        train_config=task,
        evaluate_config=ConfigRecord(dict(task)),
        snapshots=snapshots,
        task_state=kept,
    )
    try:
        loop.run(initial=initial, rounds=cfg.rounds, start_round=start_round)
    except TaskFinished as done:
        ended_early = str(done)
        log.warning("task ended before its last round: %s", done)
    except RoundFailed as err:
        failed = err
        ended_early = str(err)
        log.error("%s", err)
    outcome = _outcome(cfg, strategy, joined.refused, time.time() - started, he_params, ended_early)
    outcome["resumed_after_round"] = start_round - 1 if snap is not None else None
    if layout is not None:
        outcome["segmentation"] = _segmentation_summary(layout, strategy.reports)
    if out is not None:
        _save_final(out, strategy.current or initial)
        write_json(out / "result.json", outcome)
    if reporter is not None:
        reporter.close()
    if failed is not None:
        raise failed
    if outcome["rounds_completed"] == 0:
        raise RunFailedError("no round completed: every training reply was rejected, refused or missing")
    return outcome


def _snapshots(cfg: FederationConfig, run_config: dict[str, Any]) -> SnapshotStore | None:
    """The task's snapshot store (run config ``snapshot-dir``), unless snapshots are off or no directory is set."""
    directory = str(run_config.get("snapshot-dir", "") or "")
    if not directory or not cfg.fault.snapshots:
        return None
    return SnapshotStore(Path(directory), fingerprint=fingerprint_of(config_json=cfg.to_json()), keep=cfg.fault.keep)


def _reporter(cfg: FederationConfig, run_config: dict[str, Any]) -> ControlReporter | None:
    """The control-plane reporter when the coordinator started this run (run config ``control-db``)."""
    url = str(run_config.get("control-db", "") or "")
    if not url:
        return None
    from server.control import ControlReporter

    try:
        return ControlReporter(url=url, task=str(run_config.get("control-task", "") or cfg.name), cfg=cfg)
    except Exception as err:  # reporting must not stop training
        log.warning("control store %s unavailable, the task runs without reporting: %s", url, err)
        return None


def _segmentation_summary(layout: SegmentLayout, reports: list[RoundReport]) -> dict[str, Any]:
    """The plan as it ran, and in business mode each task's evaluation over the sites holding it."""
    summary: dict[str, Any] = {
        "mode": layout.mode,
        "segments": [
            {
                "name": s.name,
                "values": s.size,
                "sites": list(s.sites),
                "dp": s.dp,
                "encrypted": s.encrypted,
                "rule": s.rule,
            }
            for s in layout.segments
        ],
    }
    if layout.mode == "business":
        last = next((r for r in reversed(reports) if r.evaluate), None)
        tasks: dict[str, dict[str, float]] = {}
        for seg in layout.segments:
            if seg.name == BACKBONE or last is None:
                continue
            rows = [last.per_site[s]["evaluate"] for s in seg.sites if "evaluate" in last.per_site.get(s, {})]
            n = sum(r[NUM_EXAMPLES_KEY] for r in rows)
            if n > 0:
                tasks[seg.name] = {
                    key: sum(r[key] * r[NUM_EXAMPLES_KEY] for r in rows) / n for key in ("accuracy", "loss")
                } | {"sites": float(len(rows))}
        summary["tasks"] = tasks
    return summary


def _save_final(out: Path, arrays: ArrayRecord) -> None:
    values = {k: a.numpy() for k, a in arrays.items()}
    if CT_WEIGHT in arrays or any(is_segment_key(k) for k in arrays):
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
    last_eval = next((r.evaluate for r in reversed(reports) if r.evaluate and r.rolled_back is None), {})
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
        "final_metrics": {"accuracy": last_eval.get("accuracy"), "loss": last_eval.get("loss")}
        | {k: last_eval[k] for k in BINARY_METRICS if k in last_eval},
        "sites": sites,
        "refused_at_join": refused_at_join,
        "rejected": [r | {"round": rep.round} for rep in reports for r in rep.rejected],
        "rejected_by_kind": dict(Counter(r.get("kind", "other") for rep in reports for r in rep.rejected)),
        "rolled_back": [
            {"round": r.round, "reason": r.rolled_back, "suspects": r.suspects} for r in reports if r.rolled_back
        ],
        "reassigned": [x | {"round": r.round} for r in reports for x in r.reassigned],
        "retried_rounds": {str(r.round): r.attempts for r in reports if r.attempts > 1},
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
