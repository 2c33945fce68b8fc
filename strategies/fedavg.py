"""Weighted federated averaging with per-reply validation.

Implements FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", https://arxiv.org/abs/1602.05629): the
global model is the average of the sites' models weighted by their sample
counts. Unlike Flower's ``FedAvg``, which drops the whole round when one reply is
inconsistent, every reply is validated on its own (:func:`check_reply`) and a bad
one is left out with a logged reason while the others are aggregated.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from numpy.typing import NDArray

from dmsc_fed.config import FederationConfig
from dmsc_fed.privacy.signing import SIGNATURE_KEY
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    STATUS_KEY,
    WEIGHT_TOTAL_KEY,
)
from strategies.validation import (
    ArraySpec,
    check_binary_counts,
    check_reply,
    merged_binary_scores,
    rejection_kind,
    specs_of,
)

log = logging.getLogger("dmsc_fed.strategy")

#: ``(site, content, stage, server_round) -> reason or None``: a check every reply must pass
#: before its content is looked at (the server plugs signature verification in here).
ReplyCheck = Callable[[SiteInfo, RecordDict, str, int], "str | None"]


#: Rounds for which accepted signatures are remembered to name a replay as such.
REPLAY_WINDOW = 5


class TaskFinished(Exception):
    """Raised by a strategy when no site can train any more (for example, every budget is spent)."""


def weighted_average(
    updates: Sequence[Mapping[str, NDArray[Any]]], weights: Sequence[float]
) -> dict[str, NDArray[Any]]:
    """Average each named array over ``updates``, weighting update ``i`` by ``weights[i]``.

    Accumulates in float64 and returns arrays in the dtype of the first update.
    """
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(w < 0 or not np.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights sum to zero")
    out: dict[str, NDArray[Any]] = {}
    for key, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for upd, w in zip(updates, weights, strict=True):
            acc += (w / total) * upd[key]
        out[key] = acc.astype(first.dtype)
    return out


def weighted_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Weighted mean of every scalar metric present in all replies; ``num-examples`` is summed."""
    if not metrics:
        return {}
    total = float(sum(weights))
    keys = set.intersection(*(set(m) for m in metrics))
    out: dict[str, float] = {}
    for key in sorted(keys):
        if key == NUM_EXAMPLES_KEY:
            value = float(sum(m[key] for m in metrics))
        else:
            value = sum((w / total) * float(m[key]) for m, w in zip(metrics, weights, strict=True))
        if math.isfinite(value):  # finite inputs can still overflow; a non-finite mean is left out
            out[key] = value
    return out


@dataclass
class RoundReport:
    """Everything that happened in one round, for logs and ``metrics.jsonl``."""

    round: int
    started: float = field(default_factory=time.time)
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    train_sites: list[str] = field(default_factory=list)
    evaluate_sites: list[str] = field(default_factory=list)
    per_site: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    sampled: list[str] = field(default_factory=list)
    bytes_up: int = 0
    aggregated: bool = False
    seconds: float = 0.0
    attempts: int = 1
    rolled_back: str | None = None
    suspects: list[str] = field(default_factory=list)
    reassigned: list[dict[str, str]] = field(default_factory=list)
    restored: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "round": self.round,
            "aggregated": self.aggregated,
            "loss": self.evaluate.get("loss"),
            "accuracy": self.evaluate.get("accuracy"),
            "train": self.train,
            "evaluate": self.evaluate,
            "train_sites": self.train_sites,
            "evaluate_sites": self.evaluate_sites,
            "per_site": self.per_site,
            "rejected": self.rejected,
            "refused": self.refused,
            "sampled": self.sampled,
            "bytes_up": self.bytes_up,
            "started": round(self.started, 3),
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
            "rolled_back": self.rolled_back,
            "suspects": self.suspects,
            "reassigned": self.reassigned,
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RoundReport:
        """The report back from :meth:`to_dict` (a snapshot's round history); marked ``restored``."""
        return cls(
            round=int(row["round"]),
            started=float(row.get("started", 0.0)),
            train=dict(row.get("train", {})),
            evaluate=dict(row.get("evaluate", {})),
            train_sites=list(row.get("train_sites", [])),
            evaluate_sites=list(row.get("evaluate_sites", [])),
            per_site={k: dict(v) for k, v in row.get("per_site", {}).items()},
            rejected=list(row.get("rejected", [])),
            refused=list(row.get("refused", [])),
            sampled=list(row.get("sampled", [])),
            bytes_up=int(row.get("bytes_up", 0)),
            aggregated=bool(row.get("aggregated", False)),
            seconds=float(row.get("seconds", 0.0)),
            attempts=int(row.get("attempts", 1)),
            rolled_back=row.get("rolled_back"),
            suspects=list(row.get("suspects", [])),
            reassigned=list(row.get("reassigned", [])),
            restored=True,
        )


class WeightedFedAvg(FedAvg):
    """FedAvg over the federation's member sites, weighted by sample count.

    Parameters
    ----------
    sites
        The member sites by Flower node id, as they declared themselves when
        joining. Replies from other nodes are rejected.
    expected_arrays
        Layout of the global model; replies must match it exactly.
    fraction_train, fraction_evaluate
        Fractions of member sites sampled each round.
    min_sites
        At least this many sites are sampled each round.
    on_round
        Called with the :class:`RoundReport` at the end of every round.
    reply_check
        Run on every reply before validation (e.g. signature verification).
    seed
        Seeds the site sampling.

    """

    def __init__(
        self,
        *,
        sites: Mapping[int, SiteInfo],
        expected_arrays: Mapping[str, ArraySpec],
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_sites: int = 1,
        on_round: Callable[[RoundReport], None] | None = None,
        reply_check: ReplyCheck | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites if fraction_evaluate > 0 else 0,
            min_available_nodes=min_sites,
            weighted_by_key=NUM_EXAMPLES_KEY,
            arrayrecord_key=ARRAYS_KEY,
        )
        self.sites = dict(sites)
        self.expected_arrays = dict(expected_arrays)
        self.on_round = on_round
        self.reply_check = reply_check
        self.rng = random.Random(seed)
        self.reports: list[RoundReport] = []
        self.retired: dict[int, str] = {}  # sites that refused to train for good (budget spent), with the reason
        self.current: ArrayRecord | None = None  # the latest global model
        self.seen_signatures: dict[str, int] = {}  # sha256 of every accepted reply's signature -> its round
        self.update_norms: dict[str, float] = {}  # last round: L2 distance of each site's update to the global model

    @classmethod
    def check_config(cls, cfg: FederationConfig) -> None:
        """Checks of the task config this strategy needs before any process starts (hook; default: none).

        Raises
        ------
        ConfigError
            Naming what does not fit (e.g. options that name sites the federation lacks).

        """

    @classmethod
    def for_model(cls, *, initial: ArrayRecord, **kwargs: Any) -> WeightedFedAvg:
        """Build the strategy with the reply layout taken from the initial model."""
        return cls(expected_arrays=specs_of(initial), **kwargs)

    # ------------------------------------------------------------------ sampling
    def _sample(self, grid: Grid, fraction: float, minimum: int, *, training: bool) -> list[int]:
        connected = set(grid.get_node_ids())
        members = sorted(n for n in self.sites if n in connected and not (training and n in self.retired))
        k = min(len(members), max(minimum, round(len(members) * fraction)))
        return sorted(self.rng.sample(members, k))

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        config[ROUND_KEY] = server_round
        return [
            Message(
                content=RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: self.node_config(n, config)}),
                message_type=kind,
                dst_node_id=n,
            )
            for n in nodes
        ]

    def node_config(self, node: int, config: ConfigRecord) -> ConfigRecord:
        """The config record sent to ``node`` (hook: a segmented strategy adds the node's segments)."""
        return config

    def train_nodes(self, grid: Grid) -> list[int]:
        """The member sites that train this round (hook: default, a sample of ``fraction_train``)."""
        return self._sample(grid, self.fraction_train, self.min_train_nodes, training=True)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to a sample of member sites for training.

        Raises
        ------
        TaskFinished
            When every member site has retired (e.g. spent its privacy budget).

        """
        self.current = arrays
        if self.sites and len(self.retired) == len(self.sites):
            raise TaskFinished(f"no site can train any more: {sorted(self.retired_reasons())}")
        self.reports.append(RoundReport(round=server_round))
        nodes = self.train_nodes(grid)
        self.reports[-1].sampled = [self.sites[n].name for n in nodes]
        config[WEIGHT_TOTAL_KEY] = sum(self.sites[n].num_train for n in nodes)
        log.info("round %d: training on %s", server_round, [self.sites[n].name for n in nodes])
        return self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the new global model to a sample of member sites for evaluation on their test splits."""
        self.current = arrays
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, training=False)
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    def retired_reasons(self) -> list[str]:
        """``"site: reason"`` for every site that stopped training."""
        return [f"{self.sites[n].name}: {why}" for n, why in self.retired.items()]

    # --------------------------------------------------------------- validation
    def check_train(self, site: SiteInfo, content: RecordDict, server_round: int) -> str | None:
        """Why a training reply must be left out (None if it may be aggregated)."""
        return check_reply(content, max_examples=site.num_train, expected_arrays=self.expected_arrays)

    def check_evaluate(self, site: SiteInfo, content: RecordDict) -> str | None:
        """Why an evaluation reply must be left out (None if it may be counted)."""
        return check_reply(content, max_examples=site.num_test) or check_binary_counts(content)

    def _report(self, server_round: int) -> RoundReport:
        if not self.reports or self.reports[-1].round != server_round:
            self.reports.append(RoundReport(round=server_round))
        return self.reports[-1]

    def _accept(
        self, replies: Iterable[Message], *, train: bool, report: RoundReport
    ) -> list[tuple[SiteInfo, RecordDict]]:
        stage = "train" if train else "evaluate"
        accepted: list[tuple[SiteInfo, RecordDict]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            site = self.sites.get(node)
            name = site.name if site else f"node-{node}"
            reason: str | None
            # A refusal carries no timing, so an honest repeat signs to the same bytes: not a replay.
            seen = self.replay_digest(msg) if site is not None else None
            if site is None:
                reason = "sender is not a member site of this run"
            elif msg.has_error():
                reason = f"site reported an error: {msg.error.reason}"
            else:
                reason = self.reply_check(site, msg.content, stage, report.round) if self.reply_check else None
                if seen in self.seen_signatures and (reason is None or rejection_kind(reason) == "stale-round"):
                    first = self.seen_signatures[seen]
                    reason = f"replayed update: identical to the signed update received in round {first}"
                elif reason is None and seen is not None:  # authentic: remember it, whatever its content
                    self.seen_signatures[seen] = report.round
                if reason is None and _refusal(msg.content) is not None:
                    why = str(_refusal(msg.content))
                    log.warning("round %d: %s refused to %s: %s", report.round, name, stage, why)
                    report.refused.append({"site": name, "stage": stage, "reason": why})
                    if train and self.refusal_retires(site):
                        self.retired[node] = why
                    continue
                if reason is None:
                    reason = (
                        self.check_train(site, msg.content, report.round)
                        if train
                        else self.check_evaluate(site, msg.content)
                    )
            if reason is not None:
                log.warning("round %d: %s reply from %s left out: %s", report.round, stage, name, reason)
                report.rejected.append({"site": name, "stage": stage, "reason": reason, "kind": rejection_kind(reason)})
                continue
            assert site is not None
            accepted.append((site, msg.content))
        return accepted

    def replay_digest(self, msg: Message) -> str | None:
        """The digest a replay of this reply would repeat (None: not signed, an error or a refusal)."""
        if msg.has_error() or STATUS_KEY in msg.content:
            return None
        return _signature_digest(msg.content)

    def is_replay(self, msg: Message) -> bool:
        """Whether this reply repeats a signed update already received (within :data:`REPLAY_WINDOW`)."""
        seen = self.replay_digest(msg)
        return seen is not None and seen in self.seen_signatures

    def refusal_retires(self, site: SiteInfo) -> bool:
        """Whether a site that refused to train this round stops training for the task (hook: always)."""
        return True

    def record_missing(self, report: RoundReport, *, stage: str, nodes: Iterable[int], deadline_s: float) -> None:
        """Log and record the sites sent a message that did not reply by the deadline."""
        for node in nodes:
            self.record_dropped(
                report, stage=stage, node=node, reason=f"no reply by the round deadline ({deadline_s:g} s)"
            )

    def record_dropped(self, report: RoundReport, *, stage: str, node: int, reason: str) -> None:
        """Log and record a reply that never came from a site (late, or its node unavailable)."""
        name = self.sites[node].name if node in self.sites else f"node-{node}"
        log.warning("round %d: %s reply from %s dropped: %s", report.round, stage, name, reason)
        report.rejected.append({"site": name, "stage": stage, "reason": reason, "kind": rejection_kind(reason)})

    def reassign(self, server_round: int, replies: list[Message], config: ConfigRecord, grid: Grid) -> list[Message]:
        """Messages that hand failed sites' work to others within the round (hook: none by default).

        Called with the round's training replies before they are aggregated; the
        replies to the returned messages are aggregated with them.
        """
        return []

    # ------------------------------------------------------------------ snapshots
    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """Everything needed to continue after the last round: JSON state and arrays (the global model).

        Subclasses with more state extend both (:meth:`restore` reads them back).
        """
        names = {n: s.name for n, s in self.sites.items()}
        state = {
            "reports": [r.to_dict() for r in self.reports],
            "retired": {names.get(n, str(n)): why for n, why in self.retired.items()},
            "seen_signatures": dict(self.seen_signatures),
            "rng": _jsonable(self.rng.getstate()),
        }
        arrays = {k: a.numpy() for k, a in self.current.items()} if self.current is not None else {}
        return state, arrays

    def restore(self, state: Mapping[str, Any], arrays: Mapping[str, NDArray[Any]]) -> None:
        """Continue from :meth:`state` (a snapshot): round history, retired sites, seen signatures, RNG, model."""
        self.reports = [RoundReport.from_dict(r) for r in state.get("reports", [])]
        by_name = {s.name: n for n, s in self.sites.items()}
        self.retired = {by_name[k]: str(v) for k, v in state.get("retired", {}).items() if k in by_name}
        self.seen_signatures = {str(k): int(v) for k, v in state.get("seen_signatures", {}).items()}
        if "rng" in state:
            self.rng.setstate(_tupled(state["rng"]))
        self.current = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}) if arrays else None

    def close_round(self, report: RoundReport) -> None:
        """The round is over (aggregated, or rolled back): time it and tell ``on_round``.

        Signatures older than :data:`REPLAY_WINDOW` rounds are forgotten: an update that
        old fails its round binding anyway (``stale-round``).
        """
        self.seen_signatures = {k: r for k, r in self.seen_signatures.items() if r > report.round - REPLAY_WINDOW}
        if not report.seconds:
            report.seconds = time.time() - report.started
        if self.on_round is not None:
            self.on_round(report)

    # --------------------------------------------------------------- aggregation
    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """The new global model from the accepted replies: their average weighted by sample count."""
        weights = [float(c[METRICS_KEY][NUM_EXAMPLES_KEY]) for _, c in accepted]  # type: ignore[arg-type]
        updates = [{k: a.numpy() for k, a in c[ARRAYS_KEY].items()} for _, c in accepted]  # type: ignore[union-attr]
        averaged = weighted_average(updates, weights)
        return ArrayRecord({k: Array(v) for k, v in averaged.items()})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, then aggregate the accepted ones."""
        report = self._report(server_round)
        accepted = self._accept(replies, train=True, report=report)
        if not accepted:
            log.warning("round %d: no valid training reply; the global model is unchanged", server_round)
            return None, None
        report.bytes_up = sum(
            int(a.numpy().nbytes)
            for _, c in accepted
            if isinstance(c.get(ARRAYS_KEY), ArrayRecord)
            for a in cast(ArrayRecord, c[ARRAYS_KEY]).values()
        )
        self.update_norms = _update_norms(accepted, self.current)
        arrays = self.aggregate_arrays(accepted)
        report.train, report.train_sites = _metrics(accepted, report, "train")
        report.aggregated = True
        self.current = arrays
        return arrays, _record(report.train)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Validate each reply and average test metrics weighted by test-set size."""
        report = self._report(server_round)
        accepted = self._accept(replies, train=False, report=report)
        if accepted:
            report.evaluate, report.evaluate_sites = _metrics(accepted, report, "evaluate")
            report.evaluate.update(merged_binary_scores([c for _, c in accepted]))
        return _record(report.evaluate) if report.evaluate else None

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "%s: %d member sites, fraction_train=%.2f, fraction_evaluate=%.2f, min sites=%d",
            type(self).__name__,
            len(self.sites),
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_nodes,
        )


def _metrics(
    accepted: list[tuple[SiteInfo, RecordDict]], report: RoundReport, stage: str
) -> tuple[dict[str, float], list[str]]:
    """Sample-weighted metrics of the accepted replies; each site's own go to ``report.per_site``.

    A site that replied twice (its own work and a reassignment) counts once, by its first reply.
    """
    firsts: dict[str, tuple[SiteInfo, RecordDict]] = {}
    for site, content in accepted:
        firsts.setdefault(site.name, (site, content))
    accepted = list(firsts.values())
    site_metrics = [_scalars(c[METRICS_KEY]) for _, c in accepted]  # type: ignore[arg-type]
    for (site, _), m in zip(accepted, site_metrics, strict=True):
        report.per_site.setdefault(site.name, {})[stage] = m
    weights = [m[NUM_EXAMPLES_KEY] for m in site_metrics]
    return weighted_metrics(site_metrics, weights), [s.name for s, _ in accepted]


def _update_norms(accepted: list[tuple[SiteInfo, RecordDict]], previous: ArrayRecord | None) -> dict[str, float]:
    """Each site's L2 distance to the previous global model, over the plaintext arrays both hold alike."""
    if previous is None:
        return {}
    base = {k: a.numpy() for k, a in previous.items() if np.dtype(a.dtype).kind == "f"}
    norms: dict[str, float] = {}
    for site, content in accepted:
        arrays = content.get(ARRAYS_KEY)
        if not isinstance(arrays, ArrayRecord):
            continue
        total, used = 0.0, 0
        for key, arr in arrays.items():
            if key in base and tuple(arr.shape) == base[key].shape and str(arr.dtype) == str(base[key].dtype):
                total += float(np.sum((arr.numpy().astype(np.float64) - base[key]) ** 2))
                used += 1
        if used:
            norms[site.name] = float(np.sqrt(total))
    return norms


def _signature_digest(content: RecordDict) -> str | None:
    """sha256 of a reply's signature bytes (None for an unsigned reply): the same bytes twice are a replay."""
    rec = content.get(SIGNATURE_KEY)
    if isinstance(rec, ConfigRecord) and isinstance(rec.get("signature"), bytes):
        return hashlib.sha256(cast(bytes, rec["signature"])).hexdigest()
    return None


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively (a ``random.Random`` state as JSON)."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    """Lists back to tuples, recursively (the inverse of :func:`_jsonable` for ``Random.setstate``)."""
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _refusal(content: RecordDict) -> str | None:
    rec = content.get(STATUS_KEY)
    if isinstance(rec, ConfigRecord) and "refused" in rec:
        return str(rec["refused"])
    return None


def _record(metrics: Mapping[str, float]) -> MetricRecord:
    values: dict[str, int | float | list[int] | list[float]] = dict(metrics)
    return MetricRecord(values)


def _scalars(metrics: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
