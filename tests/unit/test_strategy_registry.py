from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from strategies import (
    STRATEGIES,
    MedianFedAvg,
    WeightedFedAvg,
    check_options,
    register_strategy,
    resolve_strategy,
    strategy_for,
)
from tests.conftest import make_config

MODULE = """
from strategies import WeightedFedAvg

class Mine(WeightedFedAvg):
    def __init__(self, *, factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

class NotAStrategy:
    pass
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_strats.py").write_text(MODULE)
    (tmp_path / "broken_strats.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_strats"
    sys.modules.pop("user_strats", None)


def test_builtin_and_import_path(user_module: str) -> None:
    assert resolve_strategy("fedavg") is WeightedFedAvg
    assert resolve_strategy("median") is MedianFedAvg
    cls = resolve_strategy(f"{user_module}:Mine")
    assert issubclass(cls, WeightedFedAvg) and cls.__name__ == "Mine"
    check_options(cls, {"factor": 2.0})


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("nosuch", "unknown strategy 'nosuch'"),
        ("no_such_module_xyz:Cls", "cannot be imported"),
        ("user_strats:Missing", "has no attribute 'Missing'"),
        ("user_strats:NotAStrategy", "must be a class that subclasses strategies.WeightedFedAvg"),
        ("broken_strats:Cls", "RuntimeError: boom"),
    ],
)
def test_bad_strategy_names(user_module: str, name: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_strategy(name)


def test_options_are_checked(user_module: str) -> None:
    cls = resolve_strategy(f"{user_module}:Mine")
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['speed'\]"):
        check_options(WeightedFedAvg, {"speed": 1})
    with pytest.raises(ConfigError, match="set by the framework"):
        check_options(cls, {"sites": 3})


def test_plaintext_strategies_refuse_encryption() -> None:
    cfg = make_config(strategy={"name": "median"}, privacy={"dp": "off", "encryption": "ckks"})
    with pytest.raises(ConfigError, match="only add ciphertexts"):
        strategy_for(cfg)
    assert strategy_for(make_config(strategy={"name": "trimmed-mean", "options": {"beta": 0.3}})).__name__ == (
        "TrimmedMeanFedAvg"
    )


def test_register_requires_a_subclass() -> None:
    with pytest.raises(TypeError):
        register_strategy("bad")(object)  # type: ignore[type-var]
    assert "bad" not in STRATEGIES


def _reply(node: int, w: list[float], n: int) -> Message:
    out = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(w, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content=content, reply_to=out)


@pytest.mark.usefixtures("flwr_identity")
def test_example_custom_strategy_clips_then_averages() -> None:
    cls = resolve_strategy("examples.custom_strategy.clipped_mean:ClippedFedAvg")
    sites = {i: SiteInfo(name=f"s{i}", node_id=i, num_train=10, num_test=5, device="cpu", version="t") for i in (1, 2)}
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strat = cls.for_model(initial=initial, sites=sites, max_update_norm=5.0)
    strat.current = initial
    arrays, _ = strat.aggregate_train(1, [_reply(1, [3.0, 4.0], 10), _reply(2, [0.0, 30.0], 10)])
    # s1's update (3, 4) has norm 5: kept; s2's (0, 30) is clipped to (0, 5); the mean is (1.5, 4.5).
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), [1.5, 4.5])


@pytest.mark.usefixtures("flwr_identity")
def test_median_strategy_ignores_an_outlier() -> None:
    sites = {
        i: SiteInfo(name=f"s{i}", node_id=i, num_train=10, num_test=5, device="cpu", version="t") for i in (1, 2, 3)
    }
    initial = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    strat = MedianFedAvg.for_model(initial=initial, sites=sites)
    arrays, _ = strat.aggregate_train(1, [_reply(1, [1.0], 10), _reply(2, [2.0], 10), _reply(3, [1000.0], 10)])
    assert arrays is not None and arrays["w"].numpy().tolist() == [2.0]
