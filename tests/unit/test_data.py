from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmsc_fed.data import describe_site, fit_scaler, load_site_data, pooled_data
from dmsc_fed.data.sources import load_csv
from dmsc_fed.errors import DataError
from tests.conftest import make_config


def _scaler(cfg):
    return fit_scaler([describe_site(cfg=cfg, site=s.name).stats for s in cfg.sites])


def test_sites_hold_disjoint_deterministic_shares(cfg) -> None:
    sc = _scaler(cfg)
    parts = [load_site_data(cfg=cfg, site=s.name, scaler=sc) for s in cfg.sites]
    again = load_site_data(cfg=cfg, site="a", scaler=sc)
    np.testing.assert_array_equal(parts[0].x_train, again.x_train)
    total = sum(p.num_train + p.num_test for p in parts)
    assert total == 569  # every breast-cancer sample lands at exactly one site
    rows = {tuple(r) for p in parts for r in np.round(np.concatenate([p.x_train, p.x_test]), 5)}
    assert len(rows) == total


def test_federated_scaling_uses_training_rows_only(cfg) -> None:
    sc = _scaler(cfg)
    parts = [load_site_data(cfg=cfg, site=s.name, scaler=sc) for s in cfg.sites]
    x_train = np.concatenate([p.x_train for p in parts])
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(x_train.std(0), 1, atol=1e-3)
    # the pooled baseline standardizes the same way
    pooled = pooled_data(cfg=cfg)
    np.testing.assert_allclose(np.sort(pooled.x_train, axis=0), np.sort(x_train, axis=0), atol=1e-5)


def test_local_scaling_fits_each_site_alone() -> None:
    cfg = make_config(dataset={"name": "breast_cancer", "scaling": "local"})
    d = load_site_data(cfg=cfg, site="b")
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-4)
    assert describe_site(cfg=cfg, site="b").stats is None


def test_federated_scaling_without_scaler_is_an_error(cfg) -> None:
    with pytest.raises(DataError, match="needs the federation's scaler"):
        load_site_data(cfg=cfg, site="a")


def test_digits_images_use_fixed_scale() -> None:
    cfg = make_config(dataset={"name": "digits", "partitioning": "dirichlet", "alpha": 0.3}, model={"name": "cnn"})
    d = load_site_data(cfg=cfg, site="a")
    assert d.image_shape == (1, 8, 8) and d.x_train.min() >= 0 and d.x_train.max() <= 1


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.csv"
    p.write_text(text)
    return p


def test_csv_site_data(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i * 2.5},{i % 2}" for i in range(20))
    path = _csv(tmp_path, "age,dose,label\n" + rows + "\n")
    cfg = make_config(
        sites=[{"name": "s", "data_path": str(path)}],
        dataset={
            "name": "csv",
            "label_column": "label",
            "feature_columns": ["age", "dose"],
            "num_classes": 2,
            "scaling": "local",
        },
    )
    d = load_site_data(cfg=cfg, site="s")
    assert d.num_train + d.num_test == 20 and d.num_features == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("age,label\n1,0\n", "missing column(s) ['dose']"),
        ("age,dose,label\n1,abc,0\n", "site.csv:2: column 'dose' has non-numeric value 'abc'"),
        ("age,dose,label\n1,2,7\n", "label '7'"),
        ("age,dose,label\n1,2\n", "2 fields, header has 3"),
        ("age,dose,label\n1,nan,1\n", "non-finite"),
        ("", "empty"),
        ("age,dose,label\n", "no data rows"),
    ],
)
def test_bad_csv_names_file_row_and_column(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        load_csv(path=_csv(tmp_path, text), label_column="label", feature_columns=["age", "dose"], num_classes=2)
    assert needle in str(err.value)


def test_missing_csv_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_csv(path=tmp_path / "none.csv", label_column="y", feature_columns=["x"], num_classes=2)


def test_csv_site_without_path() -> None:
    cfg = make_config(
        sites=[{"name": "s"}],
        dataset={"name": "csv", "label_column": "y", "feature_columns": ["x"], "num_classes": 2},
    )
    with pytest.raises(DataError, match="has no CSV file"):
        describe_site(cfg=cfg, site="s")
