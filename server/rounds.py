"""The fault-tolerant round loop (draft sections 6.2.7 and 6.3.7).

It replaces Flower's ``Strategy.start`` loop and calls the same strategy hooks
(``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``), adding what a run over unreliable sites needs:

* **Deadline and quorum.** Each exchange waits at most the round deadline; sites
  that did not reply by then are recorded (``kind = "late"``). A round aggregates
  once ``quorum`` valid training replies arrived, otherwise it is retried (fresh
  messages, the same round number) up to ``round_retries`` times and the run then
  fails with :class:`RoundFailed`, which sends the task to the coordinator's
  exception queue.
* **Reassignment.** Before aggregating, the strategy may hand the work of sites
  that failed to sites that replied (:meth:`~strategies.fedavg.WeightedFedAvg.reassign`).
* **Rollback.** A round whose aggregate is not finite, or whose evaluation loss
  exceeds ``rollback_loss_factor`` times the last stable round's, is rolled back
  to the last stable model; the sites whose updates stood out are recorded as
  suspects and, with ``exclude_suspects``, retired from training. Suspects are found
  from whole-model plaintext updates only: with encryption or segmentation the
  server cannot compare updates, and a rollback names none.
* **Snapshots.** After every round the strategy's state (global model, round
  history, retired sites, seen signatures, RNG state, the sites' privacy spend)
  is saved atomically; a restarted server restores the last good snapshot
  (:meth:`~strategies.fedavg.WeightedFedAvg.restore`) and runs on from the next round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from dmsc_fed.config import FaultSpec
from dmsc_fed.errors import RunFailedError, SnapshotError
from dmsc_fed.snapshots import SnapshotStore
from dmsc_fed.wire import EPSILON_KEY, EPSILON_TOTAL_KEY
from server.rollback import rollback_reason, suspects
from strategies.fedavg import RoundReport, WeightedFedAvg

log = logging.getLogger("dmsc_fed.server")


class RoundFailed(RunFailedError):
    """A round stayed below its quorum after every retry."""


@dataclass(frozen=True)
class Stable:
    """The last round whose result was kept: its number, global model and evaluation loss."""

    round: int
    model: ArrayRecord | None
    loss: float | None


def privacy_spend(reports: list[RoundReport]) -> dict[str, dict[str, float]]:
    """Each site's latest reported privacy spend (epsilon this task, and its total over tasks)."""
    out: dict[str, dict[str, float]] = {}
    for report in reports:
        for site, stages in report.per_site.items():
            train = stages.get("train", {})
            if EPSILON_KEY in train:
                out[site] = {"epsilon": train[EPSILON_KEY], "epsilon_site_total": train.get(EPSILON_TOTAL_KEY, 0.0)}
    return out


class RoundLoop:
    """Runs rounds ``start_round..rounds`` of one task with the fault semantics of :class:`FaultSpec`."""

    def __init__(
        self,
        *,
        strategy: WeightedFedAvg,
        grid: Grid,
        fault: FaultSpec,
        deadline_s: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        snapshots: SnapshotStore | None = None,
        task_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.fault = fault
        self.deadline_s = deadline_s
        self.train_config = train_config
        self.evaluate_config = evaluate_config
        self.snapshots = snapshots
        self.task_state = dict(task_state or {})
        self.poll_s = 2.0

    # ------------------------------------------------------------------ public
    def run(self, *, initial: ArrayRecord, rounds: int, start_round: int = 1) -> None:
        """Run the rounds; raises :class:`RoundFailed` when one stays below quorum after its retries."""
        self.strategy.summary()
        model = self.strategy.current if self.strategy.current is not None else initial
        stable = Stable(round=start_round - 1, model=model, loss=_last_loss(self.strategy.reports))
        for rnd in range(start_round, rounds + 1):
            stable = self.round(rnd, stable)

    def round(self, rnd: int, stable: Stable) -> Stable:
        """One round: train (with retries and reassignment), evaluate, keep or roll back, snapshot."""
        assert stable.model is not None
        report, aggregated = self._train(rnd, stable.model)
        self._evaluate(rnd, aggregated)
        reason = rollback_reason(
            finite=_finite(aggregated),
            loss=report.evaluate.get("loss"),
            stable_loss=stable.loss,
            factor=self.fault.rollback_loss_factor,
            eval_failed=_evaluation_failed(report),
        )
        if reason is None:
            stable = Stable(round=rnd, model=aggregated, loss=report.evaluate.get("loss", stable.loss))
        else:
            self._roll_back(report, reason, stable)
        report.seconds = time.time() - report.started  # the snapshot's history has the round's duration
        self._snapshot(rnd, stable)
        self.strategy.close_round(report)
        return stable

    # ------------------------------------------------------------------ steps
    def _exchange(self, messages: list[Message], report: RoundReport, stage: str) -> list[Message]:
        if not messages:
            return []
        replies = list(self.grid.send_and_receive(messages=messages, timeout=self.deadline_s))
        # The SuperLink answers for a node that stopped heartbeating: an error reply from the SuperLink itself.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        kept, answered = [], set()
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error() and node != reply.metadata.src_node_id:
                reason = f"site unavailable: {reply.error.reason}"
                self.strategy.record_dropped(report, stage=stage, node=node, reason=reason)
                continue
            kept.append(reply)
        missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered]
        self.strategy.record_missing(report, stage=stage, nodes=missing, deadline_s=self.deadline_s)
        return kept

    def _train(self, rnd: int, model: ArrayRecord) -> tuple[RoundReport, ArrayRecord]:
        strategy = self.strategy
        carried: RoundReport | None = None
        attempts = self.fault.round_retries + 1
        for attempt in range(1, attempts + 1):
            strategy.current = model
            config = ConfigRecord(dict(self.train_config))
            messages = list(strategy.configure_train(rnd, model, config, self.grid))
            report = strategy.reports[-1]
            report.attempts = attempt
            if carried is not None:  # the round's clock and what went wrong in earlier attempts stay on record
                report.started = carried.started
                report.rejected[:0] = carried.rejected
                report.refused[:0] = carried.refused
                for site, stages in carried.per_site.items():  # e.g. privacy spent in an attempt that failed
                    report.per_site.setdefault(site, stages)
            replies = self._exchange(messages, report, "train")
            if self.fault.reassign:
                extra = strategy.reassign(rnd, replies, config, self.grid)
                replies += self._exchange(extra, report, "train")
            aggregated, _ = strategy.aggregate_train(rnd, replies)
            valid = len(set(report.train_sites))
            if aggregated is not None and valid >= self.fault.quorum:
                return report, aggregated
            report.aggregated = False
            strategy.current = model
            why = f"{valid} valid training repl{'y' if valid == 1 else 'ies'}, quorum {self.fault.quorum}"
            if attempt < attempts:
                log.warning("round %d attempt %d/%d below quorum (%s): retrying", rnd, attempt, attempts, why)
                carried = strategy.reports.pop()
                self._await_quorum()
                continue
            strategy.close_round(report)
            raise RoundFailed(f"round {rnd} stayed below quorum after {attempts} attempt(s): {why}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _await_quorum(self) -> None:
        """Wait (up to one deadline) until enough member sites are connected for the next attempt.

        A site restarted after a crash needs a while to be let back in; retrying at once
        would spend every attempt without it.
        """
        strategy = self.strategy
        give_up = time.monotonic() + self.deadline_s
        while time.monotonic() < give_up:
            connected = set(self.grid.get_node_ids())
            ready = [n for n in strategy.sites if n in connected and n not in strategy.retired]
            if len(ready) >= self.fault.quorum:
                return
            time.sleep(min(self.poll_s, max(give_up - time.monotonic(), 0.0)))
        log.warning(
            "fewer than %d member sites connected after %g s; retrying anyway", self.fault.quorum, self.deadline_s
        )

    def _evaluate(self, rnd: int, model: ArrayRecord) -> None:
        strategy = self.strategy
        messages = list(strategy.configure_evaluate(rnd, model, ConfigRecord(dict(self.evaluate_config)), self.grid))
        replies = self._exchange(messages, strategy.reports[-1], "evaluate")
        strategy.aggregate_evaluate(rnd, replies)

    def _roll_back(self, report: RoundReport, reason: str, stable: Stable) -> None:
        strategy = self.strategy
        report.rolled_back = reason
        report.aggregated = False
        report.suspects = suspects(strategy.update_norms)
        strategy.current = stable.model
        log.warning(
            "round %d rolled back to round %d: %s; suspected sites: %s",
            report.round,
            stable.round,
            reason,
            report.suspects or "none identified",
        )
        if self.fault.exclude_suspects:
            by_name = {s.name: n for n, s in strategy.sites.items()}
            for name in report.suspects:
                strategy.retired[by_name[name]] = f"suspected of a harmful update in round {report.round} (rolled back)"

    def _snapshot(self, rnd: int, stable: Stable) -> None:
        if self.snapshots is None:
            return
        state, arrays = self.strategy.state()
        state["privacy"] = privacy_spend(self.strategy.reports)
        state.update(self.task_state)
        try:
            path = self.snapshots.save(round=rnd, arrays=arrays, state=state)
        except (SnapshotError, OSError) as err:  # the run goes on; only crash safety for this round is lost
            log.error("round %d: snapshot not written, a crash now would repeat this round: %s", rnd, err)
            return
        log.info("round %d: snapshot %s", rnd, path)


def _last_loss(reports: list[RoundReport]) -> float | None:
    for r in reversed(reports):
        if r.aggregated and "loss" in r.evaluate:
            return float(r.evaluate["loss"])
    return None


def _finite(model: ArrayRecord) -> bool:
    """Whether every floating value the server can see is finite (ciphertext bytes are not looked at)."""
    for arr in model.values():
        values: Any = arr.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return False
    return True


def _evaluation_failed(report: RoundReport) -> bool:
    """Every evaluation reply was rejected for non-finite values (and none was accepted)."""
    rejected = [r for r in report.rejected if r.get("stage") == "evaluate" and r.get("kind") != "late"]
    return not report.evaluate_sites and bool(rejected) and all(r.get("kind") == "non-finite" for r in rejected)
