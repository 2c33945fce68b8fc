"""What the ServerApp tells the control plane while a queued task runs (draft sections 6.1.3, 6.2.3, 6.2.4).

When the coordinator starts a task, the run config names the control store
(``control-db``) and the task (``control-task``). The round loop then reports:

* at join, every site with its capabilities (registry: node id, version, pool,
  device, dataset size, signing-key fingerprint);
* the segmentation plan and the site allocation (``segmentation`` and ``allocation`` events);
* after each round, a ``round`` event (time, participants, bytes, accuracy, loss,
  epsilon per site), ``fault`` events for rejected or refused replies, a ``privacy``
  event with the epsilon spent, registry heartbeats for the sites that replied and
  missed replies for those that did not, and the aggregated global model as a new
  version in the model store (plain or encrypted, as the server holds it).

Reporting never stops training: a store that fails is logged and the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from dmsc_fed import __version__
from dmsc_fed.config import FederationConfig
from dmsc_fed.security.provision import ServerKeys
from dmsc_fed.segmentation.layout import SegmentLayout
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import EPSILON_KEY
from strategies import RoundReport

log = logging.getLogger("dmsc_fed.server")

#: Load a site reports with each training reply (:func:`dmsc_fed.sites.hardware_load`).
HARDWARE_KEYS = ("cpu-seconds", "max-rss-mb", "gpu-max-memory-mb", "train-time-s")


def record_bytes(arrays: ArrayRecord) -> int:
    """Bytes of a record's arrays (what one copy of the model costs on the wire, roughly)."""
    return sum(int(a.numpy().nbytes) for a in arrays.values())


class ControlReporter:
    """Reports one task's progress to the control store; every method swallows store errors."""

    def __init__(self, *, url: str, task: str, cfg: FederationConfig) -> None:
        from dmsc_fed.control import Store

        self.store = Store.open(url)
        self.task = task
        self.cfg = cfg

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            log.warning("control store: could not record %s: %s", what, err)
            return None

    def _event(self, kind: str, **payload: Any) -> None:
        """Log one event of this task (a failure to record it is logged, not raised)."""
        self._safe(f"{kind} event", self.store.events.log_event, kind=kind, task_id=self.task, **payload)

    def joined(self, sites: Mapping[int, SiteInfo], keys: ServerKeys | None) -> None:
        """Register every site that joined, with what it declared."""
        pools = {s.name: s.pool for s in self.cfg.sites}
        fingerprints = {}
        if keys is not None:
            for path in sorted((keys.directory / "signing").glob("*.pub")):
                fingerprints[path.stem] = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        for s in sites.values():
            self._safe(
                f"site {s.name}",
                self.store.registry.register_site,
                name=s.name,
                node_id=s.node_id,
                software_version=s.version or __version__,
                pool=pools.get(s.name, "cpu"),
                device=s.device,
                cpu_cores=s.cpu_cores,
                gpu_memory_mb=s.gpu_memory_mb,
                dataset_size=s.num_train + s.num_test,
                key_fingerprint=fingerprints.get(s.name),
                allow_key_change=False,
            )
        self._event(
            "allocation",
            sites=sorted(s.name for s in sites.values()),
        )

    def planned(self, layout: SegmentLayout) -> None:
        """The segmentation plan of the task."""
        self._event(
            "segmentation",
            mode=layout.mode,
            segments=[
                {"name": s.name, "values": s.size, "sites": list(s.sites), "dp": s.dp, "encrypted": s.encrypted}
                for s in layout.segments
            ],
        )

    def round_done(
        self,
        report: RoundReport,
        *,
        model: ArrayRecord | None,
        bytes_down: int,
        he_params: Mapping[str, Any] | None,
    ) -> None:
        """Round event, faults, privacy spend, heartbeats and the new model version."""
        epsilon = {
            site: float(m["train"][EPSILON_KEY])
            for site, m in report.per_site.items()
            if "train" in m and EPSILON_KEY in m["train"]
        }
        row = report.to_dict()
        self._event(
            "round",
            round=report.round,
            seconds=report.seconds,
            participants=len(report.train_sites),
            bytes_up=report.bytes_up,
            bytes_down=bytes_down,
            accuracy=row["accuracy"],
            loss=row["loss"],
            epsilon=epsilon,
            hardware={
                site: {k: m["train"][k] for k in HARDWARE_KEYS if k in m["train"]}
                for site, m in report.per_site.items()
                if "train" in m
            },
        )
        for bad in report.rejected + report.refused:
            self._event("fault", round=report.round, **bad)
        if report.attempts > 1:
            self._event("recovery", action="retry", round=report.round, attempts=report.attempts)
        for moved in report.reassigned:
            self._event("recovery", action="reassign", round=report.round, **moved)
        if report.rolled_back:
            self._event(
                "recovery", action="rollback", round=report.round, reason=report.rolled_back, suspects=report.suspects
            )
        if epsilon:
            self._event(
                "privacy",
                round=report.round,
                epsilon=epsilon,
            )
        replied = set(report.train_sites) | set(report.evaluate_sites)
        for site in report.sampled:
            fn = self.store.registry.reply_received if site in replied else self.store.registry.reply_missed
            self._safe(f"health of {site}", fn, site=site)
        if model is not None and report.aggregated:
            metrics = {k: float(v) for k, v in (("accuracy", row["accuracy"]), ("loss", row["loss"])) if v is not None}
            self._safe(
                "model version",
                self.store.models.add_version,
                task_id=self.task,
                round=report.round,
                arrays={k: np.ascontiguousarray(a.numpy()) for k, a in model.items()},
                metrics=metrics,
                sites=report.train_sites,
                epsilon=epsilon or None,
                he_params=dict(he_params) if he_params else None,
            )

    def resumed(self, *, round: int, path: str) -> None:
        """The task resumed after a restart from the snapshot of ``round``."""
        self._event("recovery", action="resume", round=round, snapshot=path)

    def close(self) -> None:
        """Release the store."""
        self._safe("close", self.store.close)
