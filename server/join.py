"""Site discovery at the start of a run (draft section 6.1.3, registration).

The server asks every connected node who it is. A node answers with its site
name and what it holds (train and test sample counts, device, software
version). Only names listed in the federation config become members; the
declared sample counts bound every later reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from dmsc_fed.config import FederationConfig
from dmsc_fed.data.scaling import FeatureStats
from dmsc_fed.errors import RunFailedError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import CONFIG_KEY, JOIN_KEY, TASK_KEY

log = logging.getLogger("dmsc_fed.server")
POLL_S = 2.0


@dataclass(frozen=True)
class Joined:
    """The member sites of a run and their training feature statistics (for federated scaling)."""

    sites: dict[int, SiteInfo]
    stats: dict[int, FeatureStats]
    refused: dict[str, str]  # site name -> why it refused the task


def _stats(rec: ConfigRecord) -> FeatureStats | None:
    if "feature-count" not in rec:
        return None
    total = np.asarray(rec["feature-sum"], dtype=np.float64)
    total_sq = np.asarray(rec["feature-sumsq"], dtype=np.float64)
    if total.shape != total_sq.shape or not (np.isfinite(total).all() and np.isfinite(total_sq).all()):
        raise ValueError("feature statistics have mismatched shapes or non-finite values")
    return FeatureStats(count=int(rec["feature-count"]), total=total, total_sq=total_sq)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Refused:
    """A site that declined the task (its policy forbids it)."""

    site: str
    reason: str


def _parse(msg: Message) -> tuple[SiteInfo, FeatureStats | None] | Refused | str:
    node = msg.metadata.src_node_id
    if msg.has_error():
        return f"node {node} failed to join: {msg.error.reason}"
    rec = msg.content.get(JOIN_KEY)
    if not isinstance(rec, ConfigRecord):
        return f"node {node} sent no {JOIN_KEY!r} record"
    if "refused" in rec:
        return Refused(site=str(rec.get("site")), reason=str(rec["refused"]))
    try:
        info = SiteInfo(
            name=str(rec["site"]),
            node_id=node,
            num_train=int(rec["num-train"]),  # type: ignore[arg-type]
            num_test=int(rec["num-test"]),  # type: ignore[arg-type]
            device=str(rec["device"]),
            version=str(rec["version"]),
            cpu_cores=_optional_int(rec.get("cpu-cores")),
            gpu_memory_mb=_optional_int(rec.get("gpu-memory-mb")),
        )
        if info.num_train <= 0 or info.num_test <= 0:
            return f"node {node} declared no training or no test samples"
        return info, _stats(rec)
    except (KeyError, TypeError, ValueError) as err:
        return f"node {node} sent a malformed join record: {err!r}"


def discover_sites(*, grid: Grid, cfg: FederationConfig, timeout_s: float) -> Joined:
    """Ask connected nodes to join until every configured site has, or the timeout.

    Raises
    ------
    RunFailedError
        When fewer than ``cfg.min_sites`` member sites joined in time.

    """
    wanted = {s.name for s in cfg.sites}
    members: dict[int, SiteInfo] = {}
    stats: dict[int, FeatureStats] = {}
    refused: dict[str, str] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout_s
    record = RecordDict({CONFIG_KEY: ConfigRecord({TASK_KEY: cfg.to_json()})})
    while time.monotonic() < deadline and {s.name for s in members.values()} | set(refused) != wanted:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if not new:
            time.sleep(POLL_S)
            continue
        asked.update(new)
        msgs = [Message(content=record, message_type=MessageType.QUERY, dst_node_id=n) for n in new]
        for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
            parsed = _parse(reply)
            if isinstance(parsed, str):
                log.warning("join: %s", parsed)
                continue
            if isinstance(parsed, Refused):
                log.warning("join: site %r refused the task: %s", parsed.site, parsed.reason)
                refused[parsed.site] = parsed.reason
                continue
            info, site_stats = parsed
            if info.name not in wanted:
                log.warning(
                    "join: node %d calls itself %r, not a member of %s", info.node_id, info.name, sorted(wanted)
                )
            elif any(m.name == info.name for m in members.values()):
                log.warning("join: node %d claims site %r, which already joined; ignored", info.node_id, info.name)
            else:
                members[info.node_id] = info
                if site_stats is not None:
                    stats[info.node_id] = site_stats
                log.info(
                    "join: %s (node %d) with %d train / %d test samples on %s",
                    info.name,
                    info.node_id,
                    info.num_train,
                    info.num_test,
                    info.device,
                )
    joined = sorted(s.name for s in members.values())
    if len(members) < cfg.min_sites:
        raise RunFailedError(
            f"only {len(members)} of {len(wanted)} sites joined within {timeout_s:.0f}s "
            f"(joined: {joined}; refused: {refused}; missing: {sorted(wanted - set(joined) - set(refused))}); "
            f"{cfg.min_sites} needed"
        )
    return Joined(sites=members, stats=stats, refused=refused)


def _optional_int(value: object) -> int | None:
    """A declared non-negative integer capability, or None when absent or malformed."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
