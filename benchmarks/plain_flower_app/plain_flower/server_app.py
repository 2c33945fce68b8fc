"""ServerApp of the plain-Flower baseline: ``flwr.serverapp.strategy.FedAvg``, timed per round.

A round is timed exactly as dmsc-fed times it: from the call of
``configure_train`` of round r to the end of ``aggregate_evaluate`` of round r.
One JSON row per round is appended to the run config's ``metrics-file``:

``round``, ``seconds``
    the round and its wall time;
``train``, ``evaluate``
    per phase: ``configure`` (configure_* called), ``pushed`` (the Grid's push
    returned), ``aggregate`` (aggregate_* called), ``pulls`` (Grid pull requests
    made, one per 3 s poll), ``replies`` (each reply's ``timing`` record, see
    ``client_app``) and ``metrics`` (Flower's aggregated MetricRecord);
``end``
    when aggregate_evaluate returned.

The Grid's ``push_messages``/``pull_messages`` are wrapped only to timestamp
and count them; the strategy logic is Flower's own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class GridProbe:
    """Timestamps the Grid's pushes and counts its pulls (its 3 s reply poll)."""

    def __init__(self, grid: Grid) -> None:
        self.pushed = 0.0
        self.pulls = 0
        push: Callable[[Iterable[Message]], Iterable[str]] = grid.push_messages
        pull: Callable[[Iterable[str]], Iterable[Message]] = grid.pull_messages

        def timed_push(messages: Iterable[Message]) -> Iterable[str]:
            ids = list(push(messages))
            self.pushed = time.time()
            return ids

        def counted_pull(message_ids: Iterable[str]) -> Iterable[Message]:
            self.pulls += 1
            return pull(message_ids)

        grid.push_messages = timed_push  # type: ignore[method-assign]
        grid.pull_messages = counted_pull  # type: ignore[method-assign]

    def reset(self) -> None:
        """Start counting a new phase."""
        self.pushed, self.pulls = 0.0, 0


def _timing(msg: Message) -> dict[str, Any]:
    if msg.has_error():
        return {"error": msg.error.reason}
    rec = msg.content.get("timing")
    return {str(k): v for k, v in rec.items()} if isinstance(rec, ConfigRecord) else {}


class TimedFedAvg(FedAvg):
    """Flower's FedAvg plus timestamps; appends one row per round to ``metrics_file``."""

    def __init__(self, *, metrics_file: Path, probe: GridProbe, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_file = metrics_file
        self.probe = probe
        self.row: dict[str, Any] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start the round's clock, then let FedAvg sample and build the messages."""
        self.row = {"round": server_round, "train": {"configure": time.time()}}
        self.probe.reset()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies' timings, then aggregate with FedAvg."""
        replies = list(replies)
        phase = self.row["train"]
        phase.update(
            aggregate=time.time(),
            pushed=self.probe.pushed,
            pulls=self.probe.pulls,
            replies=[_timing(m) for m in replies],
        )
        arrays, metrics = super().aggregate_train(server_round, replies)
        phase["metrics"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Timestamp the evaluation phase, then let FedAvg build the messages."""
        self.row["evaluate"] = {"configure": time.time()}
        self.probe.reset()
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate with FedAvg, stop the round's clock and write the round's row."""
        replies = list(replies)
        phase = self.row.setdefault("evaluate", {})
        phase.update(
            aggregate=time.time(),
            pushed=self.probe.pushed,
            pulls=self.probe.pulls,
            replies=[_timing(m) for m in replies],
        )
        metrics = super().aggregate_evaluate(server_round, replies)
        phase["metrics"] = dict(metrics) if metrics is not None else {}
        end = time.time()
        self.row.update(end=end, seconds=end - self.row["train"]["configure"])
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(self.row, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` rounds of FedAvg (train + evaluate) over the configured sites."""
    from dmsc_fed.config import config_from_json
    from dmsc_fed.training import model_for

    run = dict(context.run_config)
    cfg = config_from_json(str(run["dmsc-config"]))
    metrics_file = Path(str(run["metrics-file"]))
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    initial = ArrayRecord(model_for(cfg, seed=cfg.seed).state_dict())
    strategy = TimedFedAvg(
        metrics_file=metrics_file,
        probe=GridProbe(grid),
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites,
        min_available_nodes=len(cfg.sites),
    )
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, timeout=cfg.strategy.round_timeout_s)
