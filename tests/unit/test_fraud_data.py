"""The synthetic ``fraud`` dataset and the bank example that uses it."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from dmsc_fed.config import load_config
from dmsc_fed.data import describe_site, fit_scaler, load_site_data
from dmsc_fed.data.sources import (
    BUNDLED_SHAPES,
    FRAUD_FEATURES,
    FRAUD_RATE,
    FRAUD_SAMPLES,
    RawData,
    load_bundled,
    make_fraud,
)
from dmsc_fed.errors import ConfigError
from dmsc_fed.metrics import binary_counts, binary_scores
from dmsc_fed.training import data_shape
from tests.conftest import ROOT, make_config

BANK = ROOT / "examples/bank/config.toml"


@pytest.fixture(scope="module")
def fraud():
    return make_fraud()


def _col(data: RawData, name: str) -> NDArray[np.float32]:
    return data.x[:, FRAUD_FEATURES.index(name)]


def test_shape_and_imbalance(fraud) -> None:
    assert fraud.x.shape == (FRAUD_SAMPLES, len(FRAUD_FEATURES)) == (8000, 15)
    assert fraud.x.dtype == np.float32 and fraud.y.dtype == np.int64
    assert fraud.num_classes == 2 and fraud.tasks is None
    assert int(fraud.y.sum()) == round(FRAUD_RATE * FRAUD_SAMPLES) == 240
    assert np.isfinite(fraud.x).all()
    shape = BUNDLED_SHAPES["fraud"]
    assert (shape.num_features, shape.num_classes, shape.image_shape, shape.tasks) == (15, 2, None, ())


def test_generated_deterministically_with_a_fixed_seed(fraud) -> None:
    again = load_bundled(name="fraud")
    np.testing.assert_array_equal(again.x, fraud.x)
    np.testing.assert_array_equal(again.y, fraud.y)
    other = make_fraud(seed=1, num_samples=500)
    assert other.x.shape == (500, 15) and not np.array_equal(other.x, fraud.x[:500])


def test_features_are_plausible(fraud) -> None:
    for flag in ("card_present", "foreign", "new_device"):
        assert set(np.unique(_col(fraud, flag))) == {0.0, 1.0}
    hour = _col(fraud, "hour")
    assert hour.min() >= 0 and hour.max() <= 23 and np.all(hour == np.round(hour))
    for count in ("txn_24h", "merchants_24h", "declines_24h", "account_age_days"):
        values = _col(fraud, count)
        assert values.min() >= 0 and np.all(values == np.round(values)), count
    assert np.all(_col(fraud, "merchants_24h") <= _col(fraud, "txn_24h"))
    risk = _col(fraud, "merchant_risk")
    assert risk.min() >= 0 and risk.max() <= 1
    amount, avg = _col(fraud, "amount"), _col(fraud, "avg_amount")
    assert amount.min() >= 0.5 and np.all(_col(fraud, "amount_24h") >= amount - 1e-3)
    np.testing.assert_allclose(_col(fraud, "amount_ratio"), amount / avg, rtol=1e-5)
    assert 20 < np.median(amount) < 60  # log-normal: median near exp(3.6), a long right tail
    assert np.mean(amount) > np.median(amount) * 1.1


def test_fraud_concentrates_where_the_generator_puts_it(fraud) -> None:
    hour, remote = _col(fraud, "hour"), _col(fraud, "card_present") == 0
    night_remote = ((hour < 5) | (hour >= 23)) & remote
    foreign_remote = (_col(fraud, "foreign") == 1) & remote
    assert fraud.y[night_remote].mean() > 5 * FRAUD_RATE
    assert fraud.y[foreign_remote].mean() > 5 * FRAUD_RATE
    assert fraud.y[~night_remote & ~foreign_remote].mean() < FRAUD_RATE


def test_accuracy_misleads_but_auc_does_not(fraud) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    test = rng.permutation(fraud.y.size)[:2000]
    train = np.setdiff1d(np.arange(fraud.y.size), test)
    mu, sd = fraud.x[train].mean(0), fraud.x[train].std(0)
    x_tr, x_te = (fraud.x[train] - mu) / sd, (fraud.x[test] - mu) / sd
    always_legit = binary_scores(binary_counts(labels=fraud.y[test], scores=np.zeros(test.size)))
    assert always_legit["accuracy"] > 0.96 and always_legit["recall"] == 0.0 and always_legit["auc"] == 0.5
    scores = LogisticRegression(max_iter=1000).fit(x_tr, fraud.y[train]).predict_proba(x_te)[:, 1]
    auc = binary_scores(binary_counts(labels=fraud.y[test], scores=scores))["auc"]
    assert auc is not None and 0.8 < auc < 0.95  # learnable, but not linearly easy


def test_config_accepts_fraud_and_its_shape() -> None:
    cfg = make_config(dataset={"name": "fraud", "partitioning": "iid"}, model={"name": "mlp", "hidden": [8]})
    assert data_shape(cfg) == BUNDLED_SHAPES["fraud"]
    with pytest.raises(ConfigError, match="apply to csv data only"):
        make_config(dataset={"name": "fraud", "label_column": "fraud"})


def test_bank_example_gives_every_bank_frauds_on_both_sides_of_its_split() -> None:
    cfg = load_config(path=BANK)
    assert [s.name for s in cfg.sites] == ["bank-a", "bank-b", "bank-c", "bank-d"]
    assert cfg.dataset.name == "fraud" and cfg.dataset.partitioning == "dirichlet"
    assert cfg.privacy.dp == "on" and cfg.privacy.encryption == "ckks"
    stats = [describe_site(cfg=cfg, site=s.name).stats for s in cfg.sites]
    scaler = fit_scaler([st for st in stats if st is not None])  # federated scaling: every bank declares stats
    assert len(stats) == 4 and scaler.mean.shape == (15,)
    sites = [load_site_data(cfg=cfg, site=s.name, scaler=scaler) for s in cfg.sites]
    assert sum(d.num_train + d.num_test for d in sites) == FRAUD_SAMPLES
    assert all(d.y_train.sum() >= 25 and d.y_test.sum() >= 10 for d in sites)
    rates = [(d.y_train.sum() + d.y_test.sum()) / (d.num_train + d.num_test) for d in sites]
    assert max(rates) > 2 * min(rates)  # label skew: the banks' fraud rates differ
