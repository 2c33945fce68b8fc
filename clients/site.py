"""What a site does for each message: join, train, evaluate.

Each handler takes the incoming records and the SuperNode's node config and
returns the reply's records. The node config is set by the site's administrator
on its SuperNode (``dmsc-fed client``):

``site-name``
    The site's name in the federation (required).
``data-path``
    The site's own CSV file, for CSV datasets.
``device``
    Force a torch device (default: CUDA when available, else CPU).
``threads``
    Cap torch's CPU threads (the local launcher sets 1: its sites share a machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dmsc_fed import __version__
from dmsc_fed.config import FederationConfig, config_from_json
from dmsc_fed.data import Scaler, SiteData, describe_site, load_site_data
from dmsc_fed.errors import ConfigError
from dmsc_fed.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    JOIN_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SCALER_MEAN,
    SCALER_STD,
    SITE_KEY,
    TASK_KEY,
)


def _task(content: RecordDict) -> FederationConfig:
    rec = content.get(CONFIG_KEY)
    if not isinstance(rec, ConfigRecord) or TASK_KEY not in rec:
        raise ConfigError(f"the message carries no {TASK_KEY!r} task configuration")
    return config_from_json(str(rec[TASK_KEY]))


def _site_name(node_config: dict[str, Any]) -> str:
    name = node_config.get("site-name")
    if not name:
        raise ConfigError("this SuperNode has no 'site-name' in its node config (set it with dmsc-fed client --site)")
    return str(name)


def _data_path(node_config: dict[str, Any]) -> Path | None:
    value = str(node_config.get("data-path", "") or "")
    return Path(value) if value else None


def _scaler(content: RecordDict) -> Scaler | None:
    rec = content.get(CONFIG_KEY)
    if not isinstance(rec, ConfigRecord) or SCALER_MEAN not in rec:
        return None
    mean = np.asarray(rec[SCALER_MEAN], dtype=np.float64)
    std = np.asarray(rec[SCALER_STD], dtype=np.float64)
    if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ConfigError("the task's feature scaler is malformed (mean/std shapes differ or values are not finite)")
    return Scaler(mean=mean, std=std)


def site_data(content: RecordDict, node_config: dict[str, Any]) -> tuple[FederationConfig, SiteData]:
    """Return the task config and this site's data for it, scaled as the task says."""
    cfg = _task(content)
    data = load_site_data(
        cfg=cfg, site=_site_name(node_config), data_path=_data_path(node_config), scaler=_scaler(content)
    )
    return cfg, data


def _device(node_config: dict[str, Any]) -> Any:
    """The torch device for this site; ``threads`` in the node config caps CPU threads."""
    import torch

    from dmsc_fed.training import pick_device

    threads = int(node_config.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return pick_device(str(node_config.get("device", "") or "") or None)


def handle_join(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Declare the site: name, sample counts, device, version and training feature statistics."""
    cfg = _task(content)
    site = _site_name(node_config)
    summary = describe_site(cfg=cfg, site=site, data_path=_data_path(node_config))
    record = ConfigRecord(
        {
            "site": site,
            "num-train": summary.num_train,
            "num-test": summary.num_test,
            "device": str(_device(node_config)),
            "version": __version__,
        }
    )
    stats = summary.stats
    if stats is not None:
        record["feature-count"] = stats.count
        record["feature-sum"] = stats.total.tolist()
        record["feature-sumsq"] = stats.total_sq.tolist()
    return RecordDict({JOIN_KEY: record})


def handle_train(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Train the received global model on the site's training split."""
    from dmsc_fed.training import model_for, train

    cfg, data = site_data(content, node_config)
    model = model_for(cfg)
    model.load_state_dict(_arrays(content).to_torch_state_dict())
    server_round = int(content[CONFIG_KEY].get(ROUND_KEY, 0))  # type: ignore[arg-type]
    fit = train(
        model=model,
        x=data.x_train,
        y=data.y_train,
        cfg=cfg,
        device=_device(node_config),
        seed=cfg.seed * 100_003 + server_round * 101 + cfg.site_index(data.site),
    )
    arrays = ArrayRecord(model.cpu().state_dict())
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: fit.num_examples,
            "loss": fit.loss,
            "accuracy": fit.accuracy,
            "train-time-s": fit.seconds,
        }
    )
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics, SITE_KEY: ConfigRecord({"name": data.site})})


def handle_evaluate(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Evaluate the received global model on the site's held-out test split."""
    from dmsc_fed.training import evaluate, model_for

    cfg, data = site_data(content, node_config)
    model = model_for(cfg)
    model.load_state_dict(_arrays(content).to_torch_state_dict())
    res = evaluate(model=model, x=data.x_test, y=data.y_test, device=_device(node_config))
    metrics = MetricRecord({NUM_EXAMPLES_KEY: res.num_examples, "loss": res.loss, "accuracy": res.accuracy})
    return RecordDict({METRICS_KEY: metrics, SITE_KEY: ConfigRecord({"name": data.site})})


def _arrays(content: RecordDict) -> ArrayRecord:
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        raise ConfigError(f"the message carries no model parameters under {ARRAYS_KEY!r}")
    return arrays
