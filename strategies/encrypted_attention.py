r"""Attentive aggregation (FedAtt) under CKKS: the server learns per-site, per-layer distances, never parameters.

FedAtt (Ji et al. 2019, "Learning Private Neural Language Modeling with Attentive
Aggregation", https://arxiv.org/abs/1812.07108) weighs site :math:`k` in layer :math:`l`
by :math:`\alpha_k^l = \operatorname{softmax}_k(\lVert w^l - w_k^l \rVert_2)` and moves the
server's model by a step :math:`\epsilon`:
:math:`w^l \leftarrow (1 - \epsilon)\, w^l + \epsilon \sum_k \alpha_k^l w_k^l` (the sum of
the :math:`\alpha` is 1). With encryption on, each round has two phases:

1. **Scores.** The server sends the encrypted global model as in
   :class:`~strategies.EncryptedFedAvg`, marked ``attention-phase = "scores"``. Each
   site decrypts it (:math:`w`), trains (:math:`w_k`, with DP-SGD when the task asks),
   keeps both in its state directory and replies, signed, with only its distances
   :math:`s_k^l = \lVert w^l - w_k^l \rVert_2`, one scalar per layer (tensor).
2. **Combine.** The server computes :math:`\alpha_k^l` from the scores
   (:func:`~strategies.aggregators.attention_from_scores`) and sends each site its own
   weights (``attention-phase = "combine"``). The site encrypts
   :math:`c_k^l = \alpha_k^l \big((1 - \epsilon)\, w^l + \epsilon\, w_k^l\big)` and replies,
   signed for stage ``attention``. The server adds the ciphertexts; the weight sent
   with the sum is, per layer, :math:`\sum_k \alpha_k^l` over the sites whose shares
   arrived (1 when all did), and the sites divide by it when they decrypt, so a
   missing share renormalises the softmax over the others.

The server learns the distances (scalars), which sites replied and their sample
counts; it never holds a parameter after round 1. The distances are self-reported:
since a larger distance earns more weight, a site that overstates them takes over the
layer (signatures bind a score to its site; they do not make it true). Run it among
sites trusted to follow the protocol. FedAtt's optional server noise is not offered
under encryption. Phase 2 is a second message exchange inside ``aggregate_train``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import (
    ARRAYS_KEY,
    ATTENTION_DISTANCES,
    ATTENTION_PHASE,
    ATTENTION_STEP,
    ATTENTION_WEIGHTS,
    CONFIG_KEY,
    CT_PREFIX,
    CT_WEIGHT,
    METRICS_KEY,
    ROUND_KEY,
)
from strategies.aggregators import attention_from_scores
from strategies.encrypted import EncryptedFedAvg
from strategies.validation import check_ciphertexts, check_metrics

log = logging.getLogger("dmsc_fed.strategy")

#: The stage signatures of phase-2 replies are bound to (phase 1 is ``train``).
ATTENTION_STAGE = "attention"


def check_scores(content: RecordDict, *, max_examples: int, layers: int) -> str | None:
    """Why a phase-1 reply must be left out: its metrics, or distances that are not ``layers`` finite numbers >= 0."""
    reason = check_metrics(content, max_examples)
    if reason is not None:
        return reason
    if ARRAYS_KEY in content and len(cast(ArrayRecord, content[ARRAYS_KEY])) > 0:
        return "a phase-1 (scores) reply must not carry parameters"
    metrics = cast(MetricRecord, content[METRICS_KEY])
    distances = metrics.get(ATTENTION_DISTANCES)
    if not isinstance(distances, list) or len(distances) != layers:
        return f"{ATTENTION_DISTANCES!r} must list {layers} distances, got {distances!r}"[:200]
    if not all(math.isfinite(float(d)) and float(d) >= 0 for d in distances):
        return f"{ATTENTION_DISTANCES!r} must be finite and non-negative"
    return None


def _distances(content: RecordDict) -> list[float]:
    return [float(d) for d in cast(list[float], cast(MetricRecord, content[METRICS_KEY])[ATTENTION_DISTANCES])]


class EncryptedFedAtt(EncryptedFedAvg):
    r"""FedAtt over CKKS ciphertexts, in two phases per round (see the module docstring).

    Parameters
    ----------
    step_size
        Server step size :math:`0 < \epsilon \le 1`.
    phase_timeout
        Seconds to wait for the phase-2 shares.

    """

    def __init__(self, *, step_size: float = 1.0, phase_timeout: float = 600.0, **kwargs: Any) -> None:
        if not (math.isfinite(step_size) and 0 < step_size <= 1):
            raise ConfigError(f"fedatt step_size must be in (0, 1] under encryption, got {step_size}")
        super().__init__(**kwargs)
        self.step_size = step_size
        self.phase_timeout = phase_timeout
        self.layers = list(self.expected_arrays)
        self.last_attention: dict[str, dict[str, float]] = {}
        self._grid: Grid | None = None
        self._config = ConfigRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Phase 1: the encrypted model, to be trained and scored."""
        self._grid = grid
        config[ATTENTION_PHASE] = "scores"
        config[ATTENTION_STEP] = self.step_size
        self._config = ConfigRecord(dict(config))
        return list(super().configure_train(server_round, arrays, config, grid))

    def check_train(self, site: SiteInfo, content: RecordDict, server_round: int) -> str | None:
        """A phase-1 reply: sample count and one distance per layer, nothing else."""
        return check_scores(content, max_examples=site.num_train, layers=len(self.layers))

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Softmax the scores, collect the sites' encrypted shares (phase 2) and add them."""
        from dmsc_fed.privacy.he import aggregate

        assert self._grid is not None and self.current is not None
        report = self.reports[-1]
        scores = [
            dict(
                zip(
                    self.layers, cast(list[float], cast(MetricRecord, c[METRICS_KEY])[ATTENTION_DISTANCES]), strict=True
                )
            )
            for _, c in accepted
        ]
        alphas = attention_from_scores(scores=scores)
        self.last_attention = {site.name: a for (site, _), a in zip(accepted, alphas, strict=True)}
        by_node = {site.node_id: (site, a) for (site, _), a in zip(accepted, alphas, strict=True)}
        messages = []
        for node, (_, alpha) in by_node.items():
            config = ConfigRecord(dict(self._config))
            config[ATTENTION_PHASE] = "combine"
            config[ATTENTION_WEIGHTS] = [alpha[layer] for layer in self.layers]
            config[ROUND_KEY] = report.round
            messages.append(
                Message(content=RecordDict({CONFIG_KEY: config}), message_type=MessageType.TRAIN, dst_node_id=node)
            )
        replies = list(self._grid.send_and_receive(messages, timeout=self.phase_timeout))
        shares: list[list[bytes]] = []
        weight = np.zeros(len(self.layers))
        for msg in replies:
            entry = by_node.get(msg.metadata.src_node_id)
            if entry is None:
                continue
            site, alpha = entry
            reason = self._check_share(site, msg, report.round)
            if reason is not None:
                log.warning("round %d: attention share of %s left out: %s", report.round, site.name, reason)
                report.rejected.append({"site": site.name, "stage": ATTENTION_STAGE, "reason": reason})
                continue
            arrays = cast(ArrayRecord, msg.content[ARRAYS_KEY])
            shares.append([arrays[f"{CT_PREFIX}{i:05d}"].numpy().tobytes() for i in range(self.num_chunks)])
            weight += np.array([alpha[layer] for layer in self.layers])
        missing = sorted(s.name for n, (s, _) in by_node.items() if n not in {m.metadata.src_node_id for m in replies})
        for name in missing:
            report.rejected.append({"site": name, "stage": ATTENTION_STAGE, "reason": "no attention share in time"})
        if not shares:
            log.warning("round %d: no valid attention share; the global model is unchanged", report.round)
            return self.current
        chunks = aggregate(ctx=self.public_context, updates=shares)
        record = ArrayRecord(
            {f"{CT_PREFIX}{i:05d}": Array(np.frombuffer(c, dtype=np.uint8)) for i, c in enumerate(chunks)}
        )
        record[CT_WEIGHT] = Array(weight.astype(np.float64))
        return record

    def _check_share(self, site: SiteInfo, msg: Message, server_round: int) -> str | None:
        if msg.has_error():
            return f"site reported an error: {msg.error.reason}"
        if self.reply_check is not None:
            reason = self.reply_check(site, msg.content, ATTENTION_STAGE, server_round)
            if reason is not None:
                return reason
        return check_ciphertexts(msg.content, num_chunks=self.num_chunks, max_chunk_bytes=self.max_chunk_bytes)
