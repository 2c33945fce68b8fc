"""The segmentation interface: a validated spec of the mode and its limits.

Implements the "model segmentation interface" of draft-yang-dmsc-distributed-model-03,
section 6.2.4: the caller picks the splitting mode (per layer, per business task, per
block) and the restrictions of that mode (the range of layers a cut may fall in, the
rules of the tabu search, the layers the tasks share) and the privacy requirements,
here per segment. The spec is one frozen pydantic model that forbids unknown keys, so
it can sit under ``[segmentation]`` in the TOML config or arrive through an API.

Example ``config.toml`` fragment::

    [segmentation]
    mode = "business"

    [segmentation.business]
    backbone = ["encoder"]
    heads = { readmission = ["heads.readmission"], mortality = ["heads.mortality"] }
    holders = { readmission = ["hospital-a", "hospital-b"], mortality = ["hospital-c"] }

    [segmentation.privacy.default]
    encryption = "ckks"

    [segmentation.privacy.segments.backbone]
    dp = "on"

What the spec can check alone (ranges out of order, a task head that no site holds, a
block size and a block count given together) it checks when it is built. What needs
the model and the federation (layer names, site names, a replication factor larger
than the number of sites) :meth:`SegmentationSpec.check_against` checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from dmsc_fed.errors import ConfigError, invalid_settings
from dmsc_fed.segmentation.names import (
    BACKBONE,
    BLOCK_PREFIX,
    STAGE_PREFIX,
    matches_prefix,
    segment_index,
)

MODES = ("layer", "business", "block")
_PREFIX_PATTERN = r"^[^.\s]([^\s]*[^.\s])?$"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_SHOWN = 12

Prefix = Annotated[str, Field(pattern=_PREFIX_PATTERN, max_length=512)]
TaskName = Annotated[str, Field(pattern=_NAME_PATTERN)]
SiteName = Annotated[str, Field(pattern=_NAME_PATTERN)]
LayerRef = Annotated[StrictInt, Field(ge=0, le=10_000_000)] | Annotated[str, Field(min_length=1, max_length=512)]
Ref = int | str
Weight = Annotated[float, Field(ge=0.0, le=1e12)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _shown(names: Sequence[str]) -> str:
    """A list of names for a message, cut after ``_SHOWN`` entries."""
    head = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return f"[{head}{more}]"


class CostWeightsSpec(_Frozen):
    """Weights of the three terms of the layer cost model (:mod:`dmsc_fed.segmentation.costs`)."""

    compute: Weight = 1.0
    communication: Weight = 1.0
    latency: Weight = 1.0

    @model_validator(mode="after")
    def _not_all_zero(self) -> CostWeightsSpec:
        if self.compute == 0 and self.communication == 0 and self.latency == 0:
            raise ValueError("the cost weights compute, communication and latency are all zero: nothing to optimize")
        return self


class TabuSpec(_Frozen):
    """Rules of the tabu search over cut positions (:mod:`dmsc_fed.segmentation.layer_tabu`).

    Attributes
    ----------
    iterations
        Moves made before the search stops.
    tenure
        Iterations during which a cut may not return to a position it just left.
    neighbourhood
        Candidate moves looked at per iteration (drawn with ``seed`` when there are more).
    seed
        Seed of the search; the same spec and costs give the same plan.
    verify
        Also run the exact solver and keep the better plan (the gap is recorded).

    """

    iterations: Annotated[int, Field(ge=1, le=1_000_000)] = 300
    tenure: Annotated[int, Field(ge=0, le=100_000)] = 7
    neighbourhood: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    verify: bool = False


class LayerSpec(_Frozen):
    """Limits of layer segmentation: a chain of layers cut into ``stages`` contiguous stages.

    Attributes
    ----------
    stages
        Number of stages; the sites, in order, are split into ``stages`` groups and group
        ``k`` trains stage ``k``.
    cut_ranges
        Where cuts may fall, as inclusive ``[start, end]`` ranges of layers, each end a
        layer index (0-based) or a layer name; a cut "at layer l" goes right after layer
        ``l``. None: anywhere.
    weights
        Weights of bottleneck compute time, communication and per-cut latency.
    tabu
        Rules of the tabu search.
    solver
        ``tabu`` (the draft's heuristic, checked against the exact solver on request) or
        ``exact`` (dynamic programming over the chain).

    """

    stages: Annotated[int, Field(ge=2, le=10_000)] = 2
    cut_ranges: Annotated[list[tuple[LayerRef, LayerRef]], Field(min_length=1, max_length=10_000)] | None = None
    weights: CostWeightsSpec = Field(default_factory=CostWeightsSpec)
    tabu: TabuSpec = Field(default_factory=TabuSpec)
    solver: Literal["tabu", "exact"] = "tabu"

    @field_validator("cut_ranges")
    @classmethod
    def _ranges_in_order(cls, ranges: list[tuple[Ref, Ref]] | None) -> list[tuple[Ref, Ref]] | None:
        for start, end in ranges or []:
            if isinstance(start, int) and isinstance(end, int) and start > end:
                raise ValueError(f"cut range [{start}, {end}] is out of order: start {start} is after end {end}")
        return ranges

    def cut_positions(self, *, layers: Sequence[str]) -> tuple[int, ...]:
        """Layer indices ``l`` after which a cut is allowed, sorted, within ``0 .. len(layers) - 2``.

        Raises
        ------
        ConfigError
            A range names a layer the model does not have, an index past the last
            layer, or resolves out of order; or fewer positions remain than
            ``stages - 1`` cuts need.

        """
        problems = self._cut_problems(layers=layers)
        if problems:
            raise ConfigError("segmentation: " + "; ".join(problems))
        return self._positions(layers=layers)

    def _resolve(self, ref: int | str, layers: Sequence[str], index: Mapping[str, int]) -> int | str:
        """The index of ``ref``, or a message saying why there is none."""
        if isinstance(ref, int):
            if ref >= len(layers):
                return f"layer index {ref} is out of range: the model has {len(layers)} layers (0-{len(layers) - 1})"
            return ref
        if ref not in index:
            return f"{ref!r} is not a layer of the model (layers: {_shown(list(layers))})"
        return index[ref]

    def _cut_problems(self, *, layers: Sequence[str]) -> list[str]:
        problems: list[str] = []
        if len(layers) < self.stages:
            problems.append(
                f"layer.stages = {self.stages} needs at least {self.stages} layers, the model has {len(layers)}"
            )
            return problems
        index = {name: i for i, name in enumerate(layers)}
        named = {r for pair in self.cut_ranges or [] for r in pair if isinstance(r, str)}
        twice = sorted({n for n in layers if n in named and list(layers).count(n) > 1})
        if twice:
            problems.append(f"layer.cut_ranges name layers that appear twice in the model: {twice}")
        for start, end in self.cut_ranges or []:
            lo, hi = self._resolve(start, layers, index), self._resolve(end, layers, index)
            bad = [m for m in (lo, hi) if isinstance(m, str)]
            problems.extend(f"layer.cut_ranges [{start!r}, {end!r}]: {m}" for m in bad)
            if not bad and int(lo) > int(hi):
                problems.append(
                    f"layer.cut_ranges [{start!r}, {end!r}] is out of order: "
                    f"it starts at layer {lo} and ends at layer {hi}"
                )
        if not problems and len(self._positions(layers=layers)) < self.stages - 1:
            problems.append(
                f"layer.cut_ranges allow {len(self._positions(layers=layers))} cut position(s) before the last layer, "
                f"stages = {self.stages} needs {self.stages - 1}"
            )
        return problems

    def _positions(self, *, layers: Sequence[str]) -> tuple[int, ...]:
        last = len(layers) - 2
        if self.cut_ranges is None:
            return tuple(range(last + 1))
        index = {name: i for i, name in enumerate(layers)}
        allowed: set[int] = set()
        for start, end in self.cut_ranges:
            lo = start if isinstance(start, int) else index[start]
            hi = end if isinstance(end, int) else index[end]
            allowed.update(range(lo, min(hi, last) + 1))
        return tuple(sorted(allowed))


class BusinessSpec(_Frozen):
    """Limits of business (multi-task) segmentation: a shared backbone and one head per task.

    Attributes
    ----------
    backbone
        Parameter-name prefixes of the shared part, aggregated across all sites.
    heads
        Task name -> parameter-name prefixes of that task's head.
    holders
        Task name -> the sites that hold data for the task; a head is aggregated
        among its holders only.

    """

    backbone: Annotated[list[Prefix], Field(min_length=1, max_length=10_000)]
    heads: Annotated[dict[TaskName, Annotated[list[Prefix], Field(min_length=1)]], Field(min_length=1)]
    holders: dict[TaskName, list[SiteName]]

    @model_validator(mode="after")
    def _consistent(self) -> BusinessSpec:
        if BACKBONE in self.heads:
            raise ValueError(f"{BACKBONE!r} names the shared part and cannot be a task name")
        for task in self.holders:
            if task not in self.heads:
                raise ValueError(f"holders names task {task!r}, which has no head (heads: {sorted(self.heads)})")
        for task in self.heads:
            sites = self.holders.get(task, [])
            if not sites:
                raise ValueError(f"task head {task!r} is held by no site: list its sites in holders.{task}")
            if len(set(sites)) != len(sites):
                raise ValueError(f"holders.{task} lists a site twice: {sites}")
        owners: list[tuple[str, str]] = [(p, BACKBONE) for p in self.backbone]
        owners += [(p, task) for task, prefixes in self.heads.items() for p in prefixes]
        for i, (p, seg) in enumerate(owners):
            for q, other in owners[i + 1 :]:
                if p == q:
                    raise ValueError(f"prefix {p!r} is listed twice ({seg!r} and {other!r})")
                if seg != other and (matches_prefix(name=q, prefix=p) or matches_prefix(name=p, prefix=q)):
                    raise ValueError(
                        f"prefix {p!r} of {seg!r} and prefix {q!r} of {other!r} overlap: "
                        "a parameter would belong to two segments"
                    )
        return self

    def segment_names(self) -> tuple[str, ...]:
        """``backbone`` then the task names, in spec order."""
        return (BACKBONE, *self.heads)


class BlockSpec(_Frozen):
    """Limits of block segmentation: the flat parameter vector cut into blocks.

    Attributes
    ----------
    block_size
        Parameters per block (the last block may be shorter); or
    block_count
        Number of blocks of near-equal size (exactly one of the two).
    replication
        Distinct sites that train every block every round (r >= 1).

    """

    block_size: Annotated[int, Field(ge=1, le=10**12)] | None = None
    block_count: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    replication: Annotated[int, Field(ge=1, le=10_000)] = 1

    @model_validator(mode="after")
    def _size_or_count(self) -> BlockSpec:
        if (self.block_size is None) == (self.block_count is None):
            raise ValueError("block segmentation needs exactly one of block_size or block_count")
        return self


class SegmentPrivacy(_Frozen):
    """Privacy of one segment; None takes the setting of the task's ``[privacy]`` section."""

    dp: Literal["off", "on"] | None = None
    encryption: Literal["off", "ckks"] | None = None

    def over(self, base: SegmentPrivacy) -> SegmentPrivacy:
        """This setting where it says something, ``base`` elsewhere."""
        return SegmentPrivacy(
            dp=self.dp if self.dp is not None else base.dp,
            encryption=self.encryption if self.encryption is not None else base.encryption,
        )


class SegmentPrivacySpec(_Frozen):
    """Privacy per segment: a default and per-segment overrides (keys are segment names)."""

    default: SegmentPrivacy = Field(default_factory=SegmentPrivacy)
    segments: dict[str, SegmentPrivacy] = Field(default_factory=dict)


#: Per-segment aggregation rules (:mod:`strategies.aggregators`) and the options each takes.
RULE_OPTIONS: dict[str, frozenset[str]] = {
    "mean": frozenset(),
    "median": frozenset(),
    "trimmed-mean": frozenset({"beta"}),
    "krum": frozenset({"num_malicious", "num_to_keep"}),
    "attention": frozenset({"step_size", "noise_std"}),
}
Rule = Literal["mean", "median", "trimmed-mean", "krum", "attention"]


class AggregationSpec(_Frozen):
    """How each segment is aggregated (draft section 6.2.7): a default rule and per-segment rules.

    Attributes
    ----------
    default
        Rule of every segment not named in ``segments``; None: the rule of the task's
        strategy (``fedavg`` -> ``mean``, ``median``, ``trimmed-mean``, ``krum``, ``fedatt`` ->
        ``attention``).
    segments
        Segment name -> rule.
    options
        Rule -> its parameters (``trimmed-mean``: ``beta``; ``krum``: ``num_malicious``,
        ``num_to_keep``; ``attention``: ``step_size``, ``noise_std``).

    """

    default: Rule | None = None
    segments: dict[str, Rule] = Field(default_factory=dict)
    options: dict[Rule, dict[str, float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_options(self) -> AggregationSpec:
        for rule, opts in self.options.items():
            unknown = sorted(set(opts) - RULE_OPTIONS[rule])
            if unknown:
                takes = sorted(RULE_OPTIONS[rule]) or "no options"
                raise ValueError(f"aggregation.options.{rule}: unknown option(s) {unknown}; {rule!r} takes {takes}")
        return self


class SegmentationSpec(_Frozen):
    """The segmentation interface of draft section 6.2.4: mode, its limits, privacy per segment.

    Exactly the section of the chosen mode is given (``layer``, ``business`` or
    ``block``); a section of another mode is an error rather than silently ignored.
    """

    mode: Literal["layer", "business", "block"]
    layer: LayerSpec | None = None
    business: BusinessSpec | None = None
    block: BlockSpec | None = None
    privacy: SegmentPrivacySpec = Field(default_factory=SegmentPrivacySpec)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)

    @model_validator(mode="after")
    def _one_section(self) -> SegmentationSpec:
        for mode in MODES:
            given = getattr(self, mode) is not None
            if mode == self.mode and not given:
                raise ValueError(f"mode = {mode!r} needs a [segmentation.{mode}] section")
            if mode != self.mode and given:
                raise ValueError(f"section [segmentation.{mode}] applies to mode = {mode!r}, not {self.mode!r}")
        for where, names in (("privacy", self.privacy.segments), ("aggregation", self.aggregation.segments)):
            for name in names:
                problem = self._segment_problem(name)
                if problem:
                    raise ValueError(f"{where}.segments.{name}: {problem}")
        return self

    def _segment_problem(self, name: str, num_blocks: int | None = None) -> str | None:
        """Why ``name`` is not a segment of this spec's plans, or None if it is (or may be)."""
        if self.layer is not None:
            k = segment_index(name=name, prefix=STAGE_PREFIX)
            if k is None or k >= self.layer.stages:
                return f"not a stage of layer segmentation (stage-0 .. stage-{self.layer.stages - 1})"
        elif self.business is not None:
            if name not in self.business.segment_names():
                return f"not a segment of business segmentation {list(self.business.segment_names())}"
        elif self.block is not None:
            i = segment_index(name=name, prefix=BLOCK_PREFIX)
            count = num_blocks if num_blocks is not None else self.block.block_count
            if i is None:
                return "not a block name (block-0, block-1, ...)"
            if count is not None and i >= count:
                return f"there are {count} blocks (block-0 .. block-{count - 1})"
        return None

    @property
    def layer_spec(self) -> LayerSpec:
        """The layer section (ConfigError when the mode is another)."""
        if self.layer is None:
            raise ConfigError(f"segmentation mode is {self.mode!r}, not 'layer'")
        return self.layer

    @property
    def business_spec(self) -> BusinessSpec:
        """The business section (ConfigError when the mode is another)."""
        if self.business is None:
            raise ConfigError(f"segmentation mode is {self.mode!r}, not 'business'")
        return self.business

    @property
    def block_spec(self) -> BlockSpec:
        """The block section (ConfigError when the mode is another)."""
        if self.block is None:
            raise ConfigError(f"segmentation mode is {self.mode!r}, not 'block'")
        return self.block

    def rule_for(self, segment: str, *, fallback: str) -> str:
        """The aggregation rule of ``segment``: its own, else the spec's default, else ``fallback``."""
        return self.aggregation.segments.get(segment) or self.aggregation.default or fallback

    def asks_for(self, *, dp: bool = False, encryption: bool = False) -> bool:
        """Whether the default or any segment override turns DP (or encryption) on."""
        settings = [self.privacy.default, *self.privacy.segments.values()]
        if dp and any(p.dp == "on" for p in settings):
            return True
        return encryption and any(p.encryption == "ckks" for p in settings)

    def privacy_for(self, segment: str) -> SegmentPrivacy:
        """The privacy of ``segment``: its override over the default (None fields inherit ``[privacy]``)."""
        override = self.privacy.segments.get(segment)
        return override.over(self.privacy.default) if override is not None else self.privacy.default

    def check_against(self, *, layers: Sequence[str], sites: Sequence[str], num_parameters: int | None = None) -> None:
        """Check the spec against a model and the federation's members.

        Parameters
        ----------
        layers
            For layer mode, the model's layer names in chain order; for business
            mode, its parameter (or module) names that the prefixes must match;
            for block mode, its parameter names (not checked further).
        sites
            Names of the federation's member sites.
        num_parameters
            Total number of parameters, if known (block mode: checks the block
            count and the block names in privacy overrides).

        Raises
        ------
        ConfigError
            Naming every problem: layers or prefixes the model does not have,
            ranges out of order, sites that are not members, more stages or a
            larger replication factor than there are sites.

        """
        problems: list[str] = []
        members = set(sites)
        if not sites:
            problems.append("the federation has no sites")
        elif len(members) != len(sites):
            problems.append(f"a site is listed twice among the members {_shown(list(sites))}")
        if self.layer is not None:
            if self.layer.stages > len(sites):
                problems.append(
                    f"layer.stages = {self.layer.stages} needs {self.layer.stages} sites, "
                    f"the federation has {len(sites)}"
                )
            problems += self.layer._cut_problems(layers=layers)
        if self.business is not None:
            named = [("backbone", p) for p in self.business.backbone]
            named += [(f"heads.{t}", p) for t, ps in self.business.heads.items() for p in ps]
            for where, prefix in named:
                if not any(matches_prefix(name=n, prefix=prefix) for n in layers):
                    problems.append(f"business.{where}: prefix {prefix!r} matches no layer or parameter of the model")
            for task, holders in self.business.holders.items():
                for site in holders:
                    if site not in members:
                        problems.append(
                            f"business.holders.{task}: site {site!r} is not a member (members: {_shown(list(sites))})"
                        )
        if self.block is not None:
            r = self.block.replication
            if r > len(members):
                problems.append(
                    f"block.replication = {r} is more than the {len(members)} site(s): "
                    f"every block must be trained by {r} distinct sites"
                )
            if num_parameters is not None:
                count = self.block.block_count
                if count is not None and count > num_parameters:
                    problems.append(f"block.block_count = {count} is more than the model's {num_parameters} parameters")
                if count is None:
                    assert self.block.block_size is not None
                    count = -(-num_parameters // self.block.block_size)
                for where, names in (("privacy", self.privacy.segments), ("aggregation", self.aggregation.segments)):
                    for name in names:
                        problem = self._segment_problem(name, num_blocks=min(count, num_parameters))
                        if problem:
                            problems.append(f"{where}.segments.{name}: {problem}")
        if problems:
            listed = "\n".join(f"  {p}" for p in problems)
            raise ConfigError(f"segmentation does not fit the model and sites:\n{listed}")


def parse_segmentation(*, data: Mapping[str, Any], source: str = "segmentation") -> SegmentationSpec:
    """Validate a ``[segmentation]`` mapping; every problem is a ConfigError naming the key."""
    try:
        return SegmentationSpec.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(invalid_settings(err, source)) from None
