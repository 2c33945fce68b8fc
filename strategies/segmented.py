"""Segment-aware aggregation: draft-yang-dmsc-distributed-model-03, sections 6.2.5-6.2.7.

One strategy serves the three segmentation modes, because at run time they differ
only in their :class:`~dmsc_fed.segmentation.layout.SegmentLayout`: layer stages,
business backbone and task heads, or blocks of the flat parameter vector, each a set
of parameter pieces trained by some sites, with its own privacy and aggregation rule.

Each round:

1. Every connected member site that trains a segment is sent the global model, the
   names of its segments and, per segment, the sum of the declared training sizes of
   the sites training it this round (``segment-weight-totals``).
2. The site decrypts the encrypted segments of the global model, trains only the
   parameters its segments touch (the rest frozen; DP-SGD when any of them asks for
   DP), and returns only its segments: a plaintext segment as one float32 vector, an
   encrypted one as CKKS ciphertexts of ``w_i * values`` with ``w_i = n_i / total``.
3. The server checks every reply (:func:`~strategies.validation.check_segment_reply`)
   and aggregates each segment over the sites that returned it: a plaintext segment by
   its rule (``mean`` weighted by sample count as in FedAvg, McMahan et al. 2017;
   ``median``, ``trimmed-mean``, ``krum``, ``attention``: :mod:`strategies.aggregators`),
   an encrypted one by adding ciphertexts (the weights sum travels with them and the
   sites divide when they decrypt). A segment that no valid reply carried keeps its
   previous value, encrypted or not.

The server never holds a plaintext value of an encrypted segment after round 1: in
the new global model those ranges of the plaintext tensors are zero and the segment
travels as ``seg:<name>:ct:<i>`` chunks with its ``seg:<name>:weight``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from dmsc_fed.errors import ConfigError, PrivacyError
from dmsc_fed.segmentation.layout import RunSegment, SegmentLayout
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SEGMENT_NAMES,
    SEGMENT_WEIGHT_TOTALS,
    SEGMENTS_KEY,
    STATUS_KEY,
    segment_chunk_key,
    segment_key,
    segment_weight_key,
)
from strategies.aggregators import get_aggregator
from strategies.fedavg import WeightedFedAvg, log
from strategies.validation import check_segment_reply, specs_of

#: Modes whose segments any site can train (a business head needs its task's labels).
REASSIGNABLE_MODES = frozenset({"block", "layer"})


class SegmentedFedAvg(WeightedFedAvg):
    """Train each segment on its sites and aggregate it by its own rule, in plaintext or under CKKS.

    Parameters
    ----------
    layout
        The run's segments (pieces, sites, privacy, rule).
    rule_options
        Rule name -> its keyword parameters (e.g. ``{"trimmed-mean": {"beta": 0.2}}``).
    public_context, slots, max_chunk_bytes
        The server's key-less CKKS context and its geometry; required when a segment
        is encrypted.
    pools
        Site name -> resource pool; a failed site's segment goes to a site of the same
        pool first when it is reassigned.

    """

    def __init__(
        self,
        *,
        layout: SegmentLayout,
        rule_options: Mapping[str, Mapping[str, float]] | None = None,
        public_context: Any = None,
        slots: int = 0,
        max_chunk_bytes: int = 0,
        pools: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layout = layout
        self.rule_options = {k: dict(v) for k, v in (rule_options or {}).items()}
        for seg in layout.segments:
            get_aggregator(seg.rule)  # an unknown rule fails here, before round 1
        if layout.encrypted_segments:
            from dmsc_fed.privacy.he import has_secret_key

            if public_context is None or slots <= 0:
                raise ConfigError("encrypted segments need the server's CKKS context (keys-dir)")
            if has_secret_key(public_context):
                raise PrivacyError("the server's CKKS context holds a secret key; refusing to aggregate with it")
        self.public_context = public_context
        self.slots = slots
        self.max_chunk_bytes = max_chunk_bytes
        self.weight_totals: dict[str, float] = {}
        self.noise_rng = np.random.default_rng(kwargs.get("seed", 0))
        self.pools = dict(pools or {})
        self.reassigned_to: dict[str, tuple[RunSegment, ...]] = {}  # this round: substitute site -> segments

    @classmethod
    def for_layout(cls, *, initial: ArrayRecord, layout: SegmentLayout, **kwargs: Any) -> SegmentedFedAvg:
        """Build the strategy for the model whose initial parameters are ``initial``."""
        return cls(expected_arrays=specs_of(initial), layout=layout, **kwargs)

    # ------------------------------------------------------------------ rounds
    def _segments_of(self, node: int) -> tuple[RunSegment, ...]:
        return self.layout.of_site(self.sites[node].name)

    def train_nodes(self, grid: Grid) -> list[int]:
        """Every connected member site with a segment trains: each segment needs all its sites."""
        connected = set(grid.get_node_ids())
        return sorted(n for n in self.sites if n in connected and n not in self.retired and self._segments_of(n))

    def node_config(self, node: int, config: ConfigRecord) -> ConfigRecord:
        """The shared config plus the node's segments and their weight totals."""
        out = ConfigRecord(dict(config))
        segs = self._segments_of(node)
        out[SEGMENT_NAMES] = [s.name for s in segs]
        out[SEGMENT_WEIGHT_TOTALS] = [self.weight_totals.get(seg.name, 0.0) for seg in segs]
        return out

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        # Weight totals depend on which sites train, known only once the nodes are chosen.
        if kind == MessageType.TRAIN:
            self.reassigned_to = {}
            names = {self.sites[n].name for n in nodes}
            self.weight_totals = {
                seg.name: float(sum(self._num_train(s) for s in seg.sites if s in names))
                for seg in self.layout.segments
            }
        messages = super()._messages(server_round, arrays, config, nodes, kind)
        for msg in messages:  # send each site only what it needs (business mode: not the other tasks' heads)
            needed = self.layout.needed(self.sites[msg.metadata.dst_node_id].name)
            if needed is not None:
                msg.content[self.arrayrecord_key] = ArrayRecord(
                    {k: a for k, a in arrays.items() if self.layout.key_needed(k, needed)}
                )
        return messages

    # ------------------------------------------------------------------ snapshots
    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """The base state plus the attention rule's noise generator."""
        state, arrays = super().state()
        state["noise_rng"] = self.noise_rng.bit_generator.state
        state["layout"] = self.layout.to_json()
        return state, arrays

    def restore(self, state: Mapping[str, Any], arrays: Mapping[str, NDArray[Any]]) -> None:
        """Continue from :meth:`state`, with the snapshot's layout (its segments match the saved model).

        A site of that layout that did not rejoin has its block or layer segments
        reassigned each round.
        """
        super().restore(state, arrays)
        if "noise_rng" in state:
            self.noise_rng.bit_generator.state = dict(state["noise_rng"])
        if "layout" in state:
            saved = SegmentLayout.from_json(str(state["layout"]))
            if saved != self.layout:
                log.warning(
                    "resuming with the segmentation of the snapshot; the sites that joined now would plan another"
                )
                self.layout = saved

    # ------------------------------------------------------------ reassignment
    def reassign(self, server_round: int, replies: list[Message], config: ConfigRecord, grid: Grid) -> list[Message]:
        """Hand every segment no valid reply carries to a site that replied, within the round.

        Block and layer segments can be trained by any site; a business task's head
        needs that task's labels, so it is not moved. With a replication factor of 2
        or more a segment survives one failure without this. Each substitute is sent
        the round's model with a layout that lists it for the segments it takes over,
        and trains them (with DP-SGD and encryption as the segment asks) in a second
        exchange of the same round.
        """
        if self.layout.mode not in REASSIGNABLE_MODES or self.current is None:
            return []
        healthy: list[SiteInfo] = []
        covered: set[str] = set()
        for msg in replies:
            site = self.sites.get(msg.metadata.src_node_id)
            if site is not None and self._acceptable(site, msg, server_round):
                healthy.append(site)
                covered.update(seg.name for seg in self.layout.of_site(site.name))
        lost = [seg for seg in self.layout.segments if seg.name not in covered]
        if not lost or not healthy:
            return []
        load = {site.name: len(self.layout.of_site(site.name)) for site in healthy}
        taken: dict[str, list[RunSegment]] = {}
        for seg in lost:
            wanted = {self.pools.get(name, "cpu") for name in seg.sites}
            best = min(healthy, key=lambda s: (self.pools.get(s.name, "cpu") not in wanted, load[s.name], s.name))
            load[best.name] += 1
            taken.setdefault(best.name, []).append(seg)
        report = self.reports[-1]
        messages = []
        for site in healthy:
            if site.name not in taken:
                continue
            moved = tuple(replace(seg, sites=(*seg.sites, site.name)) for seg in taken[site.name])
            self.reassigned_to[site.name] = moved
            for seg in moved:
                self.weight_totals[seg.name] = float(site.num_train)
                report.reassigned.append({"segment": seg.name, "from": ",".join(seg.sites[:-1]), "to": site.name})
            log.warning(
                "round %d: segment(s) %s got no valid reply; reassigned to %s",
                server_round,
                [seg.name for seg in moved],
                site.name,
            )
            out = ConfigRecord(dict(config))
            by_name = {seg.name: seg for seg in moved}
            out[SEGMENTS_KEY] = SegmentLayout(
                mode=self.layout.mode,
                segments=tuple(by_name.get(seg.name, seg) for seg in self.layout.segments),
                shapes=self.layout.shapes,
            ).to_json()
            out[SEGMENT_NAMES] = [seg.name for seg in moved]
            out[SEGMENT_WEIGHT_TOTALS] = [float(site.num_train)] * len(moved)
            content = RecordDict({self.arrayrecord_key: self.current, self.configrecord_key: out})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=site.node_id))
        return messages

    def refusal_retires(self, site: SiteInfo) -> bool:
        """A substitute that refuses a reassigned segment (its policy) keeps training its own segments."""
        return site.name not in self.reassigned_to

    def _acceptable(self, site: SiteInfo, msg: Message, server_round: int) -> bool:
        """Whether a training reply would be aggregated (checked quietly, nothing recorded)."""
        if msg.has_error() or STATUS_KEY in msg.content or self.is_replay(msg):
            return False
        if self.reply_check is not None and self.reply_check(site, msg.content, "train", server_round) is not None:
            return False
        return self.check_train(site, msg.content, server_round) is None

    def _num_train(self, site: str) -> int:
        return next(s.num_train for s in self.sites.values() if s.name == site)

    # --------------------------------------------------------------- validation
    def check_train(self, site: SiteInfo, content: RecordDict, server_round: int) -> str | None:
        """The reply must hold exactly the site's segments, each well formed."""
        segments = self.layout.of_site(site.name)
        moved = self.reassigned_to.get(site.name)
        if moved and _carries(content, moved[0]):  # the reply to a reassignment
            segments = moved
        return check_segment_reply(
            content,
            max_examples=site.num_train,
            segments=segments,
            weight_totals=self.weight_totals,
            slots=self.slots,
            max_chunk_bytes=self.max_chunk_bytes,
        )

    # --------------------------------------------------------------- aggregation
    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Aggregate every segment over the sites that returned it, by its rule or under CKKS."""
        assert self.current is not None
        previous = self.current
        state = {k: a.numpy() for k, a in previous.items() if k in self.expected_arrays}
        extra: dict[str, NDArray[Any]] = {}
        for seg in self.layout.segments:
            senders = [(site, c) for site, c in accepted if _carries(c, seg)]
            if seg.encrypted:
                chunks, weight = self._encrypted(seg, senders, previous)
                if chunks is None:
                    continue  # no reply and no ciphertext yet: the plaintext initial values stay
                state = self.layout.scatter(state, seg, np.zeros(seg.size))
                for i, chunk in enumerate(chunks):
                    extra[segment_chunk_key(seg.name, i)] = chunk
                extra[segment_weight_key(seg.name)] = np.array([weight], dtype=np.float64)
            elif senders:
                state = self.layout.scatter(state, seg, self._plain(seg, senders, state))
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
        for key, value in extra.items():
            record[key] = Array(np.ascontiguousarray(value))
        return record

    def _plain(
        self, seg: RunSegment, senders: list[tuple[SiteInfo, RecordDict]], state: Mapping[str, NDArray[Any]]
    ) -> NDArray[Any]:
        updates = [
            self.layout.split(seg, cast(ArrayRecord, c[ARRAYS_KEY])[segment_key(seg.name)].numpy()) for _, c in senders
        ]
        samples = [float(cast(int, cast(MetricRecord, c[METRICS_KEY])[NUM_EXAMPLES_KEY])) for _, c in senders]
        params: dict[str, Any] = dict(self.rule_options.get(seg.rule, {}))
        if seg.rule == "mean":
            params["weights"] = samples
        elif seg.rule == "krum":
            params = {k: int(v) for k, v in params.items()} | {"weights": samples}
            params.setdefault("num_malicious", 0)
        elif seg.rule == "attention":
            params.setdefault("step_size", 1.0)
            params["server"] = self.layout.split(seg, self.layout.gather(state, seg).astype(np.float32))
            params["rng"] = self.noise_rng
        out = get_aggregator(seg.rule)(updates=updates, **params)
        return self.layout.join(seg, out)

    def _encrypted(
        self, seg: RunSegment, senders: list[tuple[SiteInfo, RecordDict]], previous: ArrayRecord
    ) -> tuple[list[NDArray[np.uint8]] | None, float]:
        count = math.ceil(seg.size / self.slots)
        if not senders:
            if segment_weight_key(seg.name) not in previous:
                return None, 0.0
            chunks = [previous[segment_chunk_key(seg.name, i)].numpy() for i in range(count)]
            return chunks, float(previous[segment_weight_key(seg.name)].numpy()[0])
        from dmsc_fed.privacy.he import aggregate

        updates = [
            [cast(ArrayRecord, c[ARRAYS_KEY])[segment_chunk_key(seg.name, i)].numpy().tobytes() for i in range(count)]
            for _, c in senders
        ]
        total = 0.0
        for _, c in senders:
            total += float(cast(float, cast(MetricRecord, c[METRICS_KEY])[segment_weight_key(seg.name)]))
        summed = aggregate(ctx=self.public_context, updates=updates)
        return [np.frombuffer(b, dtype=np.uint8) for b in summed], total


def _carries(content: RecordDict, seg: RunSegment) -> bool:
    """Whether a (validated) reply holds ``seg``: its plaintext vector or its first ciphertext chunk."""
    arrays = content.get(ARRAYS_KEY)
    return isinstance(arrays, ArrayRecord) and (
        segment_key(seg.name) in arrays or segment_chunk_key(seg.name, 0) in arrays
    )
