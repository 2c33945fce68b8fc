"""ClientApp of the plain-Flower baseline.

The local work is dmsc-fed's own (``load_site_data``, ``model_for``, ``train``,
``evaluate``, the same seeds and the same thread cap), so that a comparison
with dmsc-fed measures only the framework layer. Unlike dmsc-fed, the task
config and the federated feature scaler come from the run config
(``dmsc-config``, ``scaler``) rather than from each message.

Node config: ``site-name`` (required), ``data-path`` (CSV data only),
``threads`` (cap torch's CPU threads), ``device`` (force a torch device).

Each reply carries, besides Flower's usual ``arrays``/``metrics`` records, a
``timing`` ConfigRecord of wall-clock timestamps (seconds since the epoch):

``process-start``  when this ``flwr-clientapp`` process was created;
``handler-start``  when Flower called the handler;
``work-start``     after the handler's imports (torch, dmsc-fed);
``handler-end``    when the reply content was ready;
``train-s``        (train only) the duration of dmsc-fed's ``train()`` call.

Flower 1.42 starts a fresh process per message, so module-level imports are kept
to Flower's own; torch and dmsc-fed are imported inside the handlers, as
dmsc-fed's ClientApp does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def process_start() -> float:
    """Wall-clock time (epoch seconds) at which this process was created, from /proc."""
    raw = Path("/proc/self/stat").read_text()
    ticks = int(raw[raw.rindex(")") + 2 :].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


class _Local:
    """What every handler needs: the task config, this site's data and a torch device."""

    def __init__(self, context: Context) -> None:
        import numpy as np
        import torch

        from dmsc_fed.config import config_from_json
        from dmsc_fed.data import Scaler, load_site_data
        from dmsc_fed.training import pick_device

        node = dict(context.node_config)
        run = dict(context.run_config)
        self.cfg = config_from_json(str(run["dmsc-config"]))
        self.site = str(node["site-name"])
        scaler = None
        if str(run.get("scaler", "") or ""):
            values = json.loads(str(run["scaler"]))
            scaler = Scaler(
                mean=np.asarray(values["mean"], dtype=np.float64), std=np.asarray(values["std"], dtype=np.float64)
            )
        data_path = str(node.get("data-path", "") or "")
        self.data = load_site_data(
            cfg=self.cfg, site=self.site, data_path=Path(data_path) if data_path else None, scaler=scaler
        )
        threads = int(node.get("threads", 0) or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = pick_device(str(node.get("device", "") or "") or None)

    def model(self, content: RecordDict) -> Any:
        """The configured model, loaded with the received global parameters."""
        from dmsc_fed.training import model_for

        model = model_for(self.cfg)
        arrays = content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model


def _import_stack() -> float:
    """Import torch and dmsc-fed's data and training code; returns the time when done.

    (sklearn, which loads the bundled datasets, is imported later, as part of the data loading.)
    """
    import torch  # noqa: F401

    import dmsc_fed.config
    import dmsc_fed.data
    import dmsc_fed.training  # noqa: F401

    return time.time()


def _timing(started: float, work_start: float, **extra: float) -> ConfigRecord:
    return ConfigRecord(
        {
            "process-start": process_start(),
            "handler-start": started,
            "work-start": work_start,
            "handler-end": time.time(),
            **extra,
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    started = time.time()
    work_start = _import_stack()
    from dmsc_fed.training import train as local_train

    local = _Local(context)
    model = local.model(msg.content)
    config = msg.content["config"]
    assert isinstance(config, ConfigRecord)
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    cfg = local.cfg
    fit = local_train(
        model=model,
        x=local.data.x_train,
        y=local.data.y_train,
        cfg=cfg,
        device=local.device,
        seed=cfg.seed * 100_003 + server_round * 101 + cfg.site_index(local.site),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.cpu().state_dict()),
            "metrics": MetricRecord(
                {
                    "num-examples": fit.num_examples,
                    "loss": fit.loss,
                    "accuracy": fit.accuracy,
                    "train-time-s": fit.seconds,
                }
            ),
        }
    )
    content["timing"] = _timing(started, work_start, **{"train-s": fit.seconds})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out test split."""
    started = time.time()
    work_start = _import_stack()
    from dmsc_fed.training import evaluate as local_evaluate

    local = _Local(context)
    model = local.model(msg.content)
    res = local_evaluate(model=model, x=local.data.x_test, y=local.data.y_test, device=local.device)
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": res.num_examples, "loss": res.loss, "accuracy": res.accuracy}),
        }
    )
    content["timing"] = _timing(started, work_start)
    return Message(content=content, reply_to=msg)
