"""Prometheus metrics of the control plane, read from the store on every scrape.

Draft: draft-yang-dmsc-distributed-model-03, section 6.1.2 (the API gateway monitors
the service), section 6.2.3 (log management: round, allocation and node metrics) and
sections 6.2.1 and 6.2.2 (queue and exception-queue lengths).

:class:`StoreCollector` is a custom collector: it holds no state of its own, so every
scrape shows what the store holds now, whichever process wrote it. Families:

==========================================  ====================================================
``dmsc_fed_tasks{state}``                   tasks by state: the queue lengths (6.2.1, 6.2.2)
``dmsc_fed_sites{health}``                  registered sites by computed health (6.1.3)
``dmsc_fed_round{task}``                    last finished round of a task
``dmsc_fed_round_seconds{task}``            wall time of that round
``dmsc_fed_round_participants{task}``       sites that took part in it
``dmsc_fed_round_bytes{task,direction}``    bytes sent ``up`` (sites to server) and ``down``
``dmsc_fed_round_accuracy{task}``           its accuracy, when the event has one
``dmsc_fed_round_loss{task}``               its loss, when the event has one
``dmsc_fed_epsilon{task,site}``             each site's privacy spend so far (6.4.1)
==========================================  ====================================================

The per-task families come from each task's newest event of kind ``"round"``, whose
payload contract is::

    {"round": int, "seconds": float, "participants": int, "bytes_up": int,
     "bytes_down": int, "accuracy": float | None, "loss": float | None,
     "epsilon": {site: float}}

A field that is missing or not a finite number is left out of the scrape, never an
error. :class:`ApiMetrics` adds the API's own request counter and latency histogram.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dmsc_fed.control.queue import TASK_STATES
from dmsc_fed.control.registry import HEALTH_STATES

if TYPE_CHECKING:
    from dmsc_fed.control.db import Store

__all__ = [
    "CONTENT_TYPE",
    "ApiMetrics",
    "StoreCollector",
    "metrics_registry",
    "render_metrics",
]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""Content type of the Prometheus text exposition format."""

_ROUND_FIELDS: Final = (
    ("dmsc_fed_round", "Last finished federated round of the task (draft 6.2.3).", "round"),
    ("dmsc_fed_round_seconds", "Wall time of the task's last round in seconds (draft 6.2.3).", "seconds"),
    ("dmsc_fed_round_participants", "Sites that took part in the task's last round (draft 6.2.6).", "participants"),
    ("dmsc_fed_round_accuracy", "Accuracy after the task's last round (draft 6.3.5).", "accuracy"),
    ("dmsc_fed_round_loss", "Loss after the task's last round (draft 6.3.5).", "loss"),
)


def _number(payload: Mapping[str, Any], key: str) -> float | None:
    """``payload[key]`` as a finite float, or None when missing, not a number, or not finite."""
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return number if math.isfinite(number) else None


class StoreCollector(Collector):
    """Reads queue lengths, site health and the latest round of every task from the store (draft 6.1.2, 6.2.3).

    Parameters
    ----------
    store
        The control-plane store; each :meth:`collect` runs three short queries on it.

    Raises
    ------
    StoreError
        From :meth:`collect`, when the store cannot be read (the scrape fails; nothing
        is cached).

    """

    def __init__(self, *, store: Store) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (so registering does not query the store)."""
        tasks, sites, per_round, bytes_, epsilon, load = self._families()
        return [tasks, sites, *per_round, bytes_, epsilon, load]

    def collect(self) -> Iterable[Metric]:
        """One scrape: every family with the store's current values."""
        tasks, sites, per_round, bytes_, epsilon, load = self._families()
        counts = self._store.queue.counts_by_state()
        for state in TASK_STATES:
            tasks.add_metric([state], counts.get(state, 0))
        by_health = dict.fromkeys(HEALTH_STATES, 0)
        for site in self._store.registry.sites():
            by_health[site.health] += 1
        for state, count in by_health.items():
            sites.add_metric([state], count)
        for task, event in self._store.events.latest_per_task(kind="round").items():
            payload = event.payload
            for (_, _, key), family in zip(_ROUND_FIELDS, per_round, strict=True):
                value = _number(payload, key)
                if value is not None:
                    family.add_metric([task], value)
            for direction in ("up", "down"):
                value = _number(payload, f"bytes_{direction}")
                if value is not None:
                    bytes_.add_metric([task, direction], value)
            spend = payload.get("epsilon")
            if isinstance(spend, Mapping):
                for site_name in sorted(spend):
                    value = _number(spend, site_name)
                    if isinstance(site_name, str) and value is not None:
                        epsilon.add_metric([task, site_name], value)
            hardware = payload.get("hardware")
            if isinstance(hardware, Mapping):
                for site_name in sorted(hardware):
                    used = hardware[site_name]
                    if not (isinstance(site_name, str) and isinstance(used, Mapping)):
                        continue
                    for resource in sorted(used):
                        value = _number(used, resource)
                        if isinstance(resource, str) and value is not None:
                            load.add_metric([task, site_name, resource], value)
        yield tasks
        yield sites
        yield from per_round
        yield bytes_
        yield epsilon
        yield load

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        list[GaugeMetricFamily],
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        tasks = GaugeMetricFamily(
            "dmsc_fed_tasks",
            "Tasks by state: queue and exception-queue lengths (draft 6.2.1, 6.2.2).",
            labels=["state"],
        )
        sites = GaugeMetricFamily(
            "dmsc_fed_sites", "Registered sites by computed health (draft 6.1.3).", labels=["health"]
        )
        per_round = [GaugeMetricFamily(name, doc, labels=["task"]) for name, doc, _ in _ROUND_FIELDS]
        bytes_ = GaugeMetricFamily(
            "dmsc_fed_round_bytes",
            "Bytes moved in the task's last round, up (sites to server) and down (draft 6.2.3).",
            labels=["task", "direction"],
        )
        epsilon = GaugeMetricFamily(
            "dmsc_fed_epsilon",
            "Each site's privacy spend (epsilon) for the task (draft 6.4.1).",
            labels=["task", "site"],
        )
        load = GaugeMetricFamily(
            "dmsc_fed_site_load",
            "Resources each site's last training reply used: cpu-seconds, max-rss-mb, gpu-max-memory-mb, "
            "train-time-s (draft 6.2.3).",
            labels=["task", "site", "resource"],
        )
        return tasks, sites, per_round, bytes_, epsilon, load


class ApiMetrics:
    """Requests served by the control API, by method, route template and status (draft 6.1.2 monitoring).

    Parameters
    ----------
    registry
        Where the counter and histogram are registered (one registry per app, so apps
        in the same process do not share counts).

    """

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dmsc_fed_api_requests",
            "Requests the control API answered (draft 6.1.2).",
            labelnames=("method", "route", "status"),
            registry=registry,
        )
        self.seconds = Histogram(
            "dmsc_fed_api_request_seconds",
            "Time the control API took to answer (draft 6.1.2).",
            labelnames=("method", "route"),
            registry=registry,
        )

    def observe(self, *, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.seconds.labels(method=method, route=route).observe(max(0.0, seconds))


def metrics_registry(*, store: Store) -> tuple[CollectorRegistry, ApiMetrics]:
    """A fresh registry with a :class:`StoreCollector` on ``store`` and the API's own metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store=store))
    return registry, ApiMetrics(registry=registry)


def render_metrics(*, registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry`` (content type :data:`CONTENT_TYPE`).

    Raises
    ------
    StoreError
        When the store cannot be read.

    """
    return generate_latest(registry)
