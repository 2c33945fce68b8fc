"""What a site does for each message: join, train, evaluate.

Each handler takes the incoming records and the SuperNode's node config (see
:mod:`clients.context`) and returns the reply's records. The site's policy is
checked first; privacy steps (:mod:`clients.privacy`) wrap training and the reply.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from clients import attention, ensemble, segments
from clients.chaos import Chaos, finish_train
from clients.context import SiteContext
from clients.privacy import Refusal, encrypter, fit, open_global, seal_update, sign_reply
from dmsc_fed import __version__
from dmsc_fed.config import FederationConfig, config_from_json
from dmsc_fed.data import Scaler, SiteData, describe_site, load_site_data
from dmsc_fed.errors import ConfigError, PrivacyError
from dmsc_fed.privacy import dp
from dmsc_fed.privacy.policy import refusal, segment_refusal
from dmsc_fed.privacy.signing import Binding
from dmsc_fed.sites import hardware_capabilities, hardware_load
from dmsc_fed.wire import (
    ARRAYS_KEY,
    ATTENTION_DISTANCES,
    ATTENTION_PHASE,
    ATTENTION_STEP,
    ATTENTION_WEIGHTS,
    CONFIG_KEY,
    CT_PREFIX,
    ENSEMBLE_KEY,
    JOIN_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SCALER_MEAN,
    SCALER_STD,
    SCORE_KEY,
    STATUS_KEY,
    TASK_ID_KEY,
    TASK_KEY,
    WEIGHT_KEY,
    WEIGHT_TOTAL_KEY,
)


def _config(content: RecordDict) -> ConfigRecord:
    rec = content.get(CONFIG_KEY)
    if not isinstance(rec, ConfigRecord) or TASK_KEY not in rec:
        raise ConfigError(f"the message carries no {TASK_KEY!r} task configuration")
    return rec


#: Bins of the score histograms a binary task's evaluation reply carries (for the federated ROC AUC).
BINARY_BINS = 1000


def _task(content: RecordDict) -> FederationConfig:
    return config_from_json(str(_config(content)[TASK_KEY]))


def _scaler(content: RecordDict) -> Scaler | None:
    rec = _config(content)
    if SCALER_MEAN not in rec:
        return None
    mean = np.asarray(rec[SCALER_MEAN], dtype=np.float64)
    std = np.asarray(rec[SCALER_STD], dtype=np.float64)
    if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ConfigError("the task's feature scaler is malformed (mean/std shapes differ or values are not finite)")
    return Scaler(mean=mean, std=std)


def _binding(content: RecordDict, site: SiteContext, stage: str) -> Binding:
    rec = _config(content)
    return Binding(
        task=str(rec.get(TASK_ID_KEY, "")),
        round=int(cast(int, rec.get(ROUND_KEY, 0))),
        site=site.name,
        stage=stage,
    )


def _arrays(content: RecordDict) -> ArrayRecord:
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        raise ConfigError(f"the message carries no model parameters under {ARRAYS_KEY!r}")
    return arrays


def _refused(reason: str, metrics: dict[str, float] | None = None) -> RecordDict:
    content = RecordDict({STATUS_KEY: ConfigRecord({"refused": reason})})
    if metrics:
        values: dict[str, int | float | list[int] | list[float]] = dict(metrics)
        content[METRICS_KEY] = MetricRecord(values)
    return content


def _prepare(content: RecordDict, node_config: dict[str, Any]) -> tuple[FederationConfig, SiteContext, str | None]:
    cfg = _task(content)
    site = SiteContext.from_node_config(node_config)
    return cfg, site, refusal(site.policy, cfg)


def _task_for(
    content: RecordDict, node_config: dict[str, Any], stage: str
) -> RecordDict | tuple[FederationConfig, SiteContext, Binding, SiteData, nn.Module]:
    """Everything a train or evaluate message needs, or the signed refusal to send instead."""
    from dmsc_fed.training import model_for

    cfg, site, refused = _prepare(content, node_config)
    binding = _binding(content, site, stage)
    if refused is not None:
        return sign_reply(_refused(refused), cfg=cfg, site=site, binding=binding)
    data = load_site_data(cfg=cfg, site=site.name, data_path=site.data_path, scaler=_scaler(content))
    model = model_for(cfg)
    layout = segments.layout_of(_config(content))
    arrays = _arrays(content)
    if ensemble.is_ensemble(arrays):  # a voting ensemble: train (or, for evaluation, start from) a member
        model.load_state_dict(ensemble.own_member(arrays, site=site.name))
        return cfg, site, binding, data, model
    state = open_global(arrays, model=model, site=site, layout=layout)
    missing = set(model.state_dict()) - set(state)
    if missing and (layout is None or layout.needed(site.name) is None):
        raise ConfigError(f"the global model lacks parameter(s) {sorted(missing)[:4]}")
    model.load_state_dict(state, strict=not missing)  # business mode: other tasks' heads are not sent
    return cfg, site, binding, data, model


def _site_model(cfg: FederationConfig, site: SiteContext, model: nn.Module) -> nn.Module:
    """What the site trains and evaluates: the model, or in business mode its task's view of it."""
    from dmsc_fed.data.site import site_task
    from dmsc_fed.models.zoo import task_view

    task = site_task(cfg=cfg, site=site.name)
    return model if task is None else task_view(model=model, task=task)


def handle_join(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Declare the site (name, sample counts, device, version, feature statistics), or refuse the task."""
    cfg, site, refused = _prepare(content, node_config)
    if refused is not None:
        return RecordDict({JOIN_KEY: ConfigRecord({"site": site.name, "refused": refused})})
    summary = describe_site(cfg=cfg, site=site.name, data_path=site.data_path)
    if cfg.privacy.dp == "on":
        try:
            noise = dp.plan(cfg, num_train=summary.num_train).noise_multiplier
        except PrivacyError as err:
            return RecordDict({JOIN_KEY: ConfigRecord({"site": site.name, "refused": str(err)})})
        if noise < site.policy.min_noise_multiplier:
            reason = f"noise multiplier {noise:.3f} is below the site's minimum {site.policy.min_noise_multiplier}"
            return RecordDict({JOIN_KEY: ConfigRecord({"site": site.name, "refused": reason})})
    record = ConfigRecord(
        {
            "site": site.name,
            "num-train": summary.num_train,
            "num-test": summary.num_test,
            "device": str(site.torch_device()),
            "version": __version__,
            **hardware_capabilities(),
        }
    )
    if summary.stats is not None:
        record["feature-count"] = summary.stats.count
        record["feature-sum"] = summary.stats.total.tolist()
        record["feature-sumsq"] = summary.stats.total_sq.tolist()
    return RecordDict({JOIN_KEY: record})


def handle_train(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Train the received global model on the site's training split and return the sealed, signed update."""
    phase = _config(content).get(ATTENTION_PHASE)
    if phase == "combine":
        return _attention_share(content, node_config)
    task = _task_for(content, node_config, "train")
    if isinstance(task, RecordDict):
        return task
    cfg, site, binding, data, model = task
    chaos = Chaos.from_node_config(node_config)  # opt-in fault injection for chaos tests; None normally
    # Encrypted FedAtt, phase 1, compares the trained model with the one received: keep a copy only then.
    received = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()} if phase == "scores" else {}
    plan = segments.assignment(_config(content), site=site.name)
    if plan is not None:
        refused = segment_refusal(site.policy, segments={s.name: (s.dp, s.encrypted) for s in plan.segments})
        if refused is not None:
            return sign_reply(_refused(refused), cfg=cfg, site=site, binding=binding)
        segments.freeze_outside(model, plan)
    seed = cfg.seed * 100_003 + binding.round * 101 + cfg.site_index(site.name)
    outcome = fit(
        model=_site_model(cfg, site, model),
        cfg=cfg,
        data=data,
        site=site,
        task_id=binding.task,
        server_round=binding.round,
        seed=seed,
        dp_on=plan.dp if plan is not None else None,
    )
    if isinstance(outcome, Refusal):
        return sign_reply(_refused(outcome.reason, outcome.metrics), cfg=cfg, site=site, binding=binding)
    result, privacy_metrics = outcome
    metrics: dict[str, float | int] = {
        NUM_EXAMPLES_KEY: result.num_examples,
        "loss": result.loss,
        "accuracy": result.accuracy,
        SCORE_KEY: _score(cfg, site, data, model),
        "train-time-s": result.seconds,
        **privacy_metrics,
        **hardware_load(),
    }
    if phase == "scores":  # encrypted FedAtt, phase 1: keep both models, report only the distances
        trained = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        attention.save_pair(
            state_dir=site.state_dir, task_id=binding.task, server_round=binding.round, server=received, local=trained
        )
        scores: dict[str, Any] = dict(metrics)
        scores[ATTENTION_DISTANCES] = attention.distances(server=received, local=trained)
        return sign_reply(RecordDict({METRICS_KEY: MetricRecord(scores)}), cfg=cfg, site=site, binding=binding)
    if plan is not None:
        encrypt = encrypter(site) if plan.encrypted else None
        update, weights = segments.seal_segments(model, plan, num_examples=result.num_examples, encrypt=encrypt)
        metrics.update(weights)
    else:
        total = float(_config(content).get(WEIGHT_TOTAL_KEY, 0) or 0)  # type: ignore[arg-type]
        weight = result.num_examples / total if total > 0 else 1.0
        if cfg.privacy.encryption != "off":
            metrics[WEIGHT_KEY] = weight
        update = seal_update(model=model, cfg=cfg, site=site, weight=weight)
    reply = RecordDict(
        {
            ARRAYS_KEY: update,
            METRICS_KEY: MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )
    return finish_train(
        reply,
        chaos=chaos,
        binding=binding,
        sign=lambda c, b: sign_reply(c, cfg=cfg, site=site, binding=b),
        state_dir=site.state_dir,
    )


def _attention_share(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Encrypted FedAtt, phase 2: the site's encrypted, attention-weighted share of the new model."""
    cfg, site, refused = _prepare(content, node_config)
    binding = _binding(content, site, "attention")
    if refused is not None:
        return sign_reply(_refused(refused), cfg=cfg, site=site, binding=binding)
    rec = _config(content)
    chunks = attention.share(
        state_dir=site.state_dir,
        task_id=binding.task,
        server_round=binding.round,
        weights=[float(a) for a in cast(list[float], rec.get(ATTENTION_WEIGHTS, []))],
        step_size=float(cast(float, rec.get(ATTENTION_STEP, 1.0))),
        encrypt=encrypter(site),
    )
    arrays = ArrayRecord({f"{CT_PREFIX}{i:05d}": Array(np.frombuffer(c, dtype=np.uint8)) for i, c in enumerate(chunks)})
    return sign_reply(RecordDict({ARRAYS_KEY: arrays}), cfg=cfg, site=site, binding=binding)


def _ensemble_metrics(
    cfg: FederationConfig, site: SiteContext, data: SiteData, content: RecordDict, voting: str
) -> RecordDict:
    """Accuracy and log-loss of the ensemble's vote on the test split (and binary counts for 2 classes)."""
    from dmsc_fed.training import model_for

    probs = ensemble.vote(
        arrays=_arrays(content), build=lambda: model_for(cfg), x=data.x_test, voting=voting, device=site.torch_device()
    )
    labels = probs.argmax(axis=1)
    picked = np.clip(probs[np.arange(len(labels)), data.y_test], 1e-12, 1.0)
    values: dict[str, Any] = {
        NUM_EXAMPLES_KEY: int(data.num_test),
        "loss": float(-np.log(picked).mean()),
        "accuracy": float((labels == data.y_test).mean()),
    }
    if data.num_classes == 2 and data.num_test > 0:
        from dmsc_fed.metrics import binary_counts, to_metric_lists

        values.update(to_metric_lists(binary_counts(labels=data.y_test, scores=probs[:, 1], bins=BINARY_BINS)))
    return RecordDict({METRICS_KEY: MetricRecord(values)})


def _score(cfg: FederationConfig, site: SiteContext, data: SiteData, model: nn.Module) -> float:
    """The site's validation score of its trained local model: accuracy on its held-out split."""
    from dmsc_fed.training import evaluate

    if data.num_test == 0:
        return 0.0
    view = _site_model(cfg, site, model)
    return evaluate(model=view, x=data.x_test, y=data.y_test, device=site.torch_device()).accuracy


def handle_evaluate(content: RecordDict, node_config: dict[str, Any]) -> RecordDict:
    """Evaluate the received global model on the site's held-out test split."""
    from dmsc_fed.training import evaluate

    task = _task_for(content, node_config, "evaluate")
    if isinstance(task, RecordDict):
        return task
    cfg, site, binding, data, model = task
    view = _site_model(cfg, site, model)
    voting = _config(content).get(ENSEMBLE_KEY)
    if voting is not None and ensemble.is_ensemble(_arrays(content)):
        return sign_reply(_ensemble_metrics(cfg, site, data, content, str(voting)), cfg=cfg, site=site, binding=binding)
    res = evaluate(model=view, x=data.x_test, y=data.y_test, device=site.torch_device())
    values: dict[str, Any] = {NUM_EXAMPLES_KEY: res.num_examples, "loss": res.loss, "accuracy": res.accuracy}
    if data.num_classes == 2 and data.num_test > 0:
        # Confusion counts and score histograms, which the server adds up exactly (dmsc_fed.metrics).
        from dmsc_fed.metrics import binary_counts, to_metric_lists
        from dmsc_fed.training import predict_scores

        scores = predict_scores(model=view, x=data.x_test, device=site.torch_device())
        values.update(to_metric_lists(binary_counts(labels=data.y_test, scores=scores, bins=BINARY_BINS)))
    return sign_reply(RecordDict({METRICS_KEY: MetricRecord(values)}), cfg=cfg, site=site, binding=binding)
