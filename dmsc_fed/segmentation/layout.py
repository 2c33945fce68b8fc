"""What a segmentation plan means at run time: each segment's parameter pieces, sites, privacy and rule.

The planners (:mod:`.registry`) decide *which* sites train *which* segment. Training
and aggregation also need to know which numbers of the model a segment is, whether
it is trained with DP and sent encrypted, and by which rule the server combines it.
:class:`SegmentLayout` holds that for every segment, the same for the server and the
sites (it travels as JSON in the task's config record):

* a segment is a tuple of :class:`~dmsc_fed.segmentation.block.ParamSlice` pieces of
  the model's parameters, in state-dict order, each a range of one flattened tensor
  (whole tensors for layer stages and business segments, ranges for blocks);
* its *values* are its pieces concatenated, as one flat vector (:meth:`gather`,
  :meth:`scatter`), or keyed per piece for layer-wise rules (:meth:`split`, :meth:`join`);
* ``dp`` and ``encrypted`` are the segment's privacy (draft section 6.2.4: "privacy
  protection requirements" per segment), the task's ``[privacy]`` where the spec says
  nothing;
* ``rule`` names the aggregator of :mod:`strategies.aggregators` the server applies.

DP is decided per site, not per tensor: a site trains with DP-SGD whenever *any*
segment it trains asks for DP, and then every parameter it trains is clipped and
noised, because a segment trained without DP at the same site would reach the others
through the shared forward pass. Privacy is never weaker than a segment asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.block import BlockPlan, ParamSlice
from dmsc_fed.segmentation.business import BusinessPlan
from dmsc_fed.segmentation.costs import LayerPlan
from dmsc_fed.segmentation.registry import SegmentationPlan
from dmsc_fed.wire import segment_chunk_key, segment_key, segment_weight_key

#: Aggregation rules that work on ciphertexts: the server can only add them.
ADDITIVE_RULES = frozenset({"mean"})


@dataclass(frozen=True)
class RunSegment:
    """One segment as trained and aggregated.

    Attributes
    ----------
    name
        ``stage-k``, ``backbone`` or a task name, ``block-i``.
    pieces
        The ranges of the model's flattened parameters it covers, in model order.
    sites
        The sites that train it, in member order.
    dp
        Whether its sites train with DP-SGD.
    encrypted
        Whether its updates travel as CKKS ciphertexts (the server only adds them).
    rule
        Name of its aggregator (``mean``, ``median``, ``trimmed-mean``, ``krum``, ``attention``).

    """

    name: str
    pieces: tuple[ParamSlice, ...]
    sites: tuple[str, ...]
    dp: bool
    encrypted: bool
    rule: str

    @property
    def size(self) -> int:
        """Number of values."""
        return sum(p.stop - p.start for p in self.pieces)

    def parameters(self) -> tuple[str, ...]:
        """The parameter tensors it touches, in model order, each once."""
        return tuple(dict.fromkeys(p.name for p in self.pieces))


def piece_key(piece: ParamSlice) -> str:
    """Name of a piece in per-piece mappings: ``param[start:stop]``."""
    return f"{piece.name}[{piece.start}:{piece.stop}]"


@dataclass(frozen=True)
class SegmentLayout:
    """Every segment of a run, and the model's parameter shapes in state-dict order."""

    mode: str
    segments: tuple[RunSegment, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ConfigError(f"segment names repeat: {names}")
        sizes = dict(self._sizes())
        for seg in self.segments:
            if not seg.pieces:
                raise ConfigError(f"segment {seg.name!r} covers no parameter")
            for p in seg.pieces:
                if p.name not in sizes or not 0 <= p.start < p.stop <= sizes[p.name]:
                    raise ConfigError(f"segment {seg.name!r}: piece {piece_key(p)} is not within the model")
            if seg.encrypted and seg.rule not in ADDITIVE_RULES:
                raise ConfigError(
                    f"segment {seg.name!r} is encrypted, so the server can only add its updates (rule 'mean'), "
                    f"not apply {seg.rule!r}"
                )

    def _sizes(self) -> list[tuple[str, int]]:
        return [(name, math.prod(shape)) for name, shape in self.shapes]

    # ----------------------------------------------------------------- lookup
    def segment(self, name: str) -> RunSegment:
        """The segment called ``name`` (ConfigError naming the known ones if none)."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise ConfigError(f"no segment {name!r} in this run (segments: {[s.name for s in self.segments]})")

    def of_site(self, site: str) -> tuple[RunSegment, ...]:
        """The segments ``site`` trains, in layout order."""
        return tuple(seg for seg in self.segments if site in seg.sites)

    def trained_parameters(self, segments: Sequence[RunSegment]) -> set[str]:
        """Parameter tensors that ``segments`` touch (a site trains these; the rest stay frozen)."""
        return {name for seg in segments for name in seg.parameters()}

    def needed(self, site: str) -> set[str] | None:
        """The segments ``site`` needs to train and evaluate, or None when it needs the whole model.

        In business mode a site needs the backbone and its own task's head only; a layer
        stage or a block needs every other parameter for the forward pass.
        """
        if self.mode != "business":
            return None
        return {seg.name for seg in self.of_site(site)}

    def key_needed(self, key: str, segments: set[str]) -> bool:
        """Whether a global-model record key (a tensor, or a segment's chunk or weight) belongs to ``segments``."""
        if is_segment_key(key):
            return key.split(":", 2)[1] in segments
        return any(key in self.segment(name).parameters() for name in segments)

    @property
    def encrypted_segments(self) -> tuple[RunSegment, ...]:
        """The segments that travel encrypted."""
        return tuple(s for s in self.segments if s.encrypted)

    # ----------------------------------------------------------------- values
    def gather(self, state: Mapping[str, NDArray[Any]], segment: RunSegment) -> NDArray[np.float64]:
        """The segment's values out of a state dict: its pieces concatenated, as float64."""
        parts = [np.asarray(state[p.name], dtype=np.float64).reshape(-1)[p.start : p.stop] for p in segment.pieces]
        return np.concatenate(parts) if parts else np.zeros(0)

    def scatter(
        self, state: Mapping[str, NDArray[Any]], segment: RunSegment, values: NDArray[Any]
    ) -> dict[str, NDArray[Any]]:
        """A copy of ``state`` with the segment's pieces overwritten by ``values`` (dtypes kept)."""
        values = np.asarray(values).reshape(-1)
        if values.shape[0] != segment.size:
            raise ValueError(f"segment {segment.name!r} has {segment.size} values, got {values.shape[0]}")
        out = dict(state)
        pos = 0
        for p in segment.pieces:
            if out[p.name] is state[p.name]:
                out[p.name] = np.array(state[p.name], copy=True)
            flat = out[p.name].reshape(-1)
            n = p.stop - p.start
            flat[p.start : p.stop] = values[pos : pos + n]
            pos += n
        return out

    def split(self, segment: RunSegment, values: NDArray[Any]) -> dict[str, NDArray[Any]]:
        """The flat values of a segment keyed per piece (:func:`piece_key`), for layer-wise rules."""
        out: dict[str, NDArray[Any]] = {}
        pos = 0
        for p in segment.pieces:
            n = p.stop - p.start
            out[piece_key(p)] = np.asarray(values[pos : pos + n])
            pos += n
        return out

    def join(self, segment: RunSegment, pieces: Mapping[str, NDArray[Any]]) -> NDArray[Any]:
        """Inverse of :meth:`split`."""
        return np.concatenate([np.asarray(pieces[piece_key(p)]).reshape(-1) for p in segment.pieces])

    # ------------------------------------------------------------------- wire
    def to_json(self) -> str:
        """Compact JSON form, sent to the sites in the task's config record."""
        return json.dumps(
            {
                "mode": self.mode,
                "shapes": [[n, list(s)] for n, s in self.shapes],
                "segments": [
                    {
                        "name": s.name,
                        "pieces": [[p.name, p.start, p.stop] for p in s.pieces],
                        "sites": list(s.sites),
                        "dp": s.dp,
                        "encrypted": s.encrypted,
                        "rule": s.rule,
                    }
                    for s in self.segments
                ],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SegmentLayout:
        """Parse :meth:`to_json` output; ConfigError if it is malformed."""
        try:
            data = json.loads(text)
            return cls(
                mode=str(data["mode"]),
                shapes=tuple((str(n), tuple(int(d) for d in s)) for n, s in data["shapes"]),
                segments=tuple(
                    RunSegment(
                        name=str(s["name"]),
                        pieces=tuple(ParamSlice(name=str(n), start=int(a), stop=int(b)) for n, a, b in s["pieces"]),
                        sites=tuple(str(x) for x in s["sites"]),
                        dp=bool(s["dp"]),
                        encrypted=bool(s["encrypted"]),
                        rule=str(s["rule"]),
                    )
                    for s in data["segments"]
                ),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"the task's segment layout is malformed: {err}") from None


def _whole(names: Sequence[str], sizes: Mapping[str, int]) -> tuple[ParamSlice, ...]:
    return tuple(ParamSlice(name=n, start=0, stop=sizes[n]) for n in names)


def layout_from_plan(
    *,
    plan: SegmentationPlan,
    shapes: Sequence[tuple[str, Sequence[int]]],
    task_dp: bool,
    task_encrypted: bool,
    rules: Mapping[str, str],
    layer_parameters: Mapping[str, Sequence[str]] | None = None,
    layers: Sequence[str] = (),
) -> SegmentLayout:
    """The run-time layout of ``plan`` over a model with parameter ``shapes`` (state-dict order).

    Parameters
    ----------
    plan
        The planner's result.
    shapes
        ``(name, shape)`` of every model tensor, in state-dict order.
    task_dp, task_encrypted
        The task's ``[privacy]`` settings, for segments whose spec says nothing.
    rules
        Segment name -> aggregator name (every segment of the plan).
    layer_parameters, layers
        Layer mode: the parameter tensors of every layer, and the layers in chain order.

    """
    shape_t = tuple((str(n), tuple(int(d) for d in s)) for n, s in shapes)
    sizes = {n: math.prod(s) for n, s in shape_t}
    pieces: dict[str, tuple[ParamSlice, ...]] = {}
    detail = plan.detail
    if isinstance(detail, BlockPlan):
        pieces = {b.name: b.slices for b in detail.blocks}
    elif isinstance(detail, BusinessPlan):
        pieces = {s.name: _whole(s.parameters, sizes) for s in detail.segments}
    elif isinstance(detail, LayerPlan):
        if layer_parameters is None or not layers:
            raise ConfigError("layer mode needs the model's layers and their parameters")
        for k, (lo, hi) in enumerate(detail.stage_ranges(num_layers=len(layers))):
            names = [p for layer in layers[lo : hi + 1] for p in layer_parameters[layer]]
            pieces[plan.segments[k]] = _whole(names, sizes)
    else:  # pragma: no cover - the three planners are the only ones
        raise ConfigError(f"no run-time layout for plans of mode {plan.mode!r}")
    segments = []
    for name in plan.segments:
        privacy = plan.privacy[name]
        segments.append(
            RunSegment(
                name=name,
                pieces=pieces[name],
                sites=tuple(plan.sites[name]),
                dp=task_dp if privacy.dp is None else privacy.dp == "on",
                encrypted=task_encrypted if privacy.encryption is None else privacy.encryption != "off",
                rule=rules[name],
            )
        )
    return SegmentLayout(mode=plan.mode, segments=tuple(segments), shapes=shape_t)


def is_segment_key(key: str) -> bool:
    """Whether a global-model record key belongs to an encrypted segment (chunk or weight), not a tensor."""
    return key.startswith(segment_key(""))


def open_segments(*, values: Mapping[str, NDArray[Any]], layout: SegmentLayout, ctx: Any) -> dict[str, NDArray[Any]]:
    """The plaintext state dict of a segmented global model, decrypting its encrypted segments.

    ``values`` holds the model's tensors (zero where a segment is encrypted) and, per
    encrypted segment that has been aggregated, its ciphertext chunks and weight sum; a
    site in business mode gets only its own segments, and only those are returned.
    ``ctx`` is a CKKS context with the secret key (only a site has one); it is only
    used when there is something to decrypt.

    Raises
    ------
    PrivacyError
        A weight that is not a positive finite number, or a chunk that does not decrypt.

    """
    from dmsc_fed.errors import PrivacyError

    state = {name: np.asarray(values[name]) for name, _ in layout.shapes if name in values}
    for seg in layout.encrypted_segments:
        wkey = segment_weight_key(seg.name)
        if wkey not in values or not all(p in state for p in seg.parameters()):
            continue  # not aggregated yet (the plaintext initial values stand), or not sent to this site
        weight = float(np.asarray(values[wkey]).reshape(-1)[0])
        if not math.isfinite(weight) or weight <= 0:
            raise PrivacyError(f"encrypted segment {seg.name!r} carries an invalid weight {weight!r}")
        prefix = segment_chunk_key(seg.name, 0).removesuffix("00000")
        chunks = [np.asarray(values[k]).tobytes() for k in sorted(k for k in values if k.startswith(prefix))]
        from dmsc_fed.privacy.he import decrypt

        state = layout.scatter(state, seg, decrypt(ctx=ctx, chunks=chunks, length=seg.size) / weight)
    return state
