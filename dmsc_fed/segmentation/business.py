"""Business (multi-task) segmentation: a shared backbone and per-task heads.

Implements "business segmentation" of draft-yang-dmsc-distributed-model-03, section
6.2.5: one model serves several tasks that "share feature extraction layers, and each
have task-specific output or fine-tuning layers". In a federation the shared part is
trained and aggregated by every site, while a task's head is aggregated only among the
sites that hold data for that task (hard parameter sharing, Caruana 1997, "Multitask
Learning"; federated as in Smith et al. 2017, "Federated Multi-Task Learning").

Parameters are assigned to segments by name prefix on dotted boundaries
(:func:`~dmsc_fed.segmentation.names.matches_prefix`). Every parameter must belong to
exactly one segment: one that matches no prefix, or prefixes of two segments, is an
error naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.names import BACKBONE, matches_prefix


@dataclass(frozen=True)
class Segment:
    """One segment of a business plan.

    Attributes
    ----------
    name
        ``backbone`` or a task name.
    parameters
        The parameter names in the segment, in model order.
    sites
        The sites that train it and among which it is aggregated, in member order.

    """

    name: str
    parameters: tuple[str, ...]
    sites: tuple[str, ...]


@dataclass(frozen=True)
class BusinessPlan:
    """The backbone segment first, then one segment per task head (spec order)."""

    segments: tuple[Segment, ...]

    def segment(self, name: str) -> Segment:
        """The segment called ``name`` (KeyError if there is none)."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment {name!r} (segments: {[s.name for s in self.segments]})")

    def segment_of(self, *, parameter: str) -> Segment:
        """The segment holding ``parameter`` (KeyError if none does)."""
        for seg in self.segments:
            if parameter in seg.parameters:
                return seg
        raise KeyError(f"parameter {parameter!r} is in no segment")

    def parameters_of(self, *, site: str) -> tuple[str, ...]:
        """Every parameter that ``site`` trains and sends: the backbone and the heads of its tasks."""
        return tuple(p for seg in self.segments if site in seg.sites for p in seg.parameters)


def _check_sites(sites: Sequence[str]) -> None:
    if not sites:
        raise ConfigError("business segmentation needs at least one site")
    seen: set[str] = set()
    for site in sites:
        if site in seen:
            raise ConfigError(f"site {site!r} is listed twice")
        seen.add(site)


def plan_business(
    *,
    parameter_names: Sequence[str],
    backbone: Sequence[str],
    heads: Mapping[str, Sequence[str]],
    holders: Mapping[str, Sequence[str]],
    sites: Sequence[str],
) -> BusinessPlan:
    """Assign every parameter to the backbone or one task head, and each segment to its sites.

    Parameters
    ----------
    parameter_names
        The model's parameter names, in order (e.g. ``model.named_parameters()``).
    backbone
        Prefixes of the shared part; it is aggregated across all ``sites``.
    heads
        Task name -> prefixes of its head.
    holders
        Task name -> the sites holding data for it; the head is aggregated among them.
    sites
        The federation's member sites, in order.

    Returns
    -------
    BusinessPlan
        Backbone segment first, then the heads in the order of ``heads``.

    Raises
    ------
    ConfigError
        A parameter in no segment or in two; a prefix matching no parameter; a task
        head held by no site, or holders of a task without a head; a holder that is
        not a member; a parameter or site listed twice.

    """
    _check_sites(sites)
    members = set(sites)
    if len(set(parameter_names)) != len(parameter_names):
        dup = next(p for i, p in enumerate(parameter_names) if p in parameter_names[:i])
        raise ConfigError(f"parameter {dup!r} is listed twice")
    if not backbone:
        raise ConfigError("business segmentation needs at least one backbone prefix")
    if not heads:
        raise ConfigError("business segmentation needs at least one task head")
    if BACKBONE in heads:
        raise ConfigError(f"{BACKBONE!r} names the shared part and cannot be a task name")
    for task in holders:
        if task not in heads:
            raise ConfigError(f"holders names task {task!r}, which has no head (heads: {list(heads)})")
    seg_sites: dict[str, tuple[str, ...]] = {BACKBONE: tuple(sites)}
    for task in heads:
        held = list(holders.get(task, ()))
        if not held:
            raise ConfigError(f"task head {task!r} is held by no site: it would never be trained")
        if len(set(held)) != len(held):
            raise ConfigError(f"task {task!r} lists a holder twice: {held}")
        outsiders = [s for s in held if s not in members]
        if outsiders:
            raise ConfigError(f"task {task!r} is held by {outsiders}, not members of the federation ({list(sites)})")
        seg_sites[task] = tuple(s for s in sites if s in set(held))
    prefixes: list[tuple[str, str]] = [(BACKBONE, p) for p in backbone]
    prefixes += [(task, p) for task, ps in heads.items() for p in ps]
    for seg, prefix in prefixes:
        if not prefix:
            raise ConfigError(f"segment {seg!r} has an empty prefix")
        if not any(matches_prefix(name=n, prefix=prefix) for n in parameter_names):
            raise ConfigError(f"prefix {prefix!r} of segment {seg!r} matches no parameter of the model")
    members_of: dict[str, list[str]] = {name: [] for name in seg_sites}
    for param in parameter_names:
        owners = sorted({seg for seg, prefix in prefixes if matches_prefix(name=param, prefix=prefix)})
        if not owners:
            raise ConfigError(
                f"parameter {param!r} belongs to no segment: add a prefix for it to the backbone or to a task head"
            )
        if len(owners) > 1:
            raise ConfigError(f"parameter {param!r} belongs to {len(owners)} segments {owners}: prefixes overlap")
        members_of[owners[0]].append(param)
    return BusinessPlan(
        segments=tuple(
            Segment(name=name, parameters=tuple(members_of[name]), sites=seg_sites[name]) for name in seg_sites
        )
    )
