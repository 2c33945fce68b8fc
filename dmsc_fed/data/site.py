"""Assemble one site's train and test splits, and the pooled baseline data.

A site sees only its own rows: for bundled datasets the whole set is partitioned
(deterministically by seed) and the site keeps its part; for CSV data the site
reads its own file. Each site holds out a test split; feature scaling is fitted
on training splits only (see :mod:`dmsc_fed.data.scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.config import FederationConfig
from dmsc_fed.data.partition import dirichlet_partition, iid_partition, train_test_indices
from dmsc_fed.data.scaling import FeatureStats, Scaler, fit_scaler
from dmsc_fed.data.sources import RawData, load_bundled, load_csv
from dmsc_fed.errors import DataError

_SPLIT_STREAM = 1  # seed-sequence stream for per-site train/test splits


@dataclass(frozen=True)
class SiteData:
    """A site's scaled train and test arrays."""

    site: str
    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    num_classes: int
    image_shape: tuple[int, int, int] | None = None

    @property
    def num_features(self) -> int:
        """Number of input features per sample."""
        return int(self.x_train.shape[1])

    @property
    def num_train(self) -> int:
        """Training samples held by the site."""
        return int(self.y_train.size)

    @property
    def num_test(self) -> int:
        """Held-out test samples of the site."""
        return int(self.y_test.size)


def _site_rows(cfg: FederationConfig, index: int, data_path: Path | None) -> RawData:
    ds = cfg.dataset
    if ds.name == "csv":
        path = data_path or cfg.sites[index].data_path
        if path is None:
            raise DataError(
                f"site {cfg.sites[index].name!r} has no CSV file: set sites.data_path "
                "or pass --data to 'dmsc-fed client'"
            )
        assert ds.label_column is not None and ds.feature_columns is not None and ds.num_classes is not None
        return load_csv(
            path=path, label_column=ds.label_column, feature_columns=ds.feature_columns, num_classes=ds.num_classes
        )
    raw = load_bundled(name=ds.name)
    rng = np.random.default_rng(cfg.seed)
    n_sites = len(cfg.sites)
    if ds.partitioning == "iid":
        parts = iid_partition(num_samples=raw.y.size, num_parts=n_sites, rng=rng)
    else:
        parts = dirichlet_partition(
            labels=raw.y, num_parts=n_sites, alpha=ds.alpha, rng=rng, min_size=ds.min_samples_per_site
        )
    idx = parts[index]
    return RawData(x=raw.x[idx], y=raw.y[idx], num_classes=raw.num_classes, image_shape=raw.image_shape)


def _split(
    cfg: FederationConfig, index: int, data_path: Path | None
) -> tuple[RawData, NDArray[np.int64], NDArray[np.int64]]:
    rows = _site_rows(cfg, index, data_path)
    rng = np.random.default_rng([cfg.seed, _SPLIT_STREAM, index])
    tr, te = train_test_indices(labels=rows.y, test_fraction=cfg.dataset.test_fraction, rng=rng)
    return rows, tr, te


def _assemble(
    site: str,
    rows: RawData,
    x_tr: NDArray[np.float32],
    y_tr: NDArray[np.int64],
    x_te: NDArray[np.float32],
    y_te: NDArray[np.int64],
    scaler: Scaler | None,
) -> SiteData:
    if scaler is not None:
        x_tr, x_te = scaler.apply(x_tr), scaler.apply(x_te)
    return SiteData(
        site=site,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=rows.num_classes,
        image_shape=rows.image_shape,
    )


def _scaler_for(
    cfg: FederationConfig, rows: RawData, x_train: NDArray[np.float32], given: Scaler | None
) -> Scaler | None:
    if rows.image_shape is not None:
        return None  # images use a fixed intensity scale
    if cfg.dataset.scaling == "local":
        return fit_scaler([FeatureStats.of(x_train)])
    if given is None:
        raise DataError(
            "dataset.scaling = 'federated' needs the federation's scaler, fitted from all sites' "
            "training statistics; none was given"
        )
    return given


@dataclass(frozen=True)
class SiteSummary:
    """What a site declares when it joins: split sizes and, for federated scaling, feature statistics."""

    num_train: int
    num_test: int
    stats: FeatureStats | None


def describe_site(*, cfg: FederationConfig, site: str, data_path: Path | None = None) -> SiteSummary:
    """Summarize a site's data without scaling it (used when the site joins a run)."""
    rows, tr, te = _split(cfg, cfg.site_index(site), data_path)
    federated = rows.image_shape is None and cfg.dataset.scaling == "federated"
    return SiteSummary(
        num_train=int(tr.size), num_test=int(te.size), stats=FeatureStats.of(rows.x[tr]) if federated else None
    )


def load_site_data(
    *, cfg: FederationConfig, site: str, data_path: Path | None = None, scaler: Scaler | None = None
) -> SiteData:
    """Load the train and test splits of one site.

    Parameters
    ----------
    cfg
        The federation config (dataset, partitioning, seed, member sites).
    site
        The site's name; it must be one of ``cfg.sites``.
    data_path
        The site's CSV file; overrides ``sites[i].data_path`` (CSV data only).
    scaler
        The federation's scaler, required for ``dataset.scaling = "federated"``
        on tabular data.

    """
    rows, tr, te = _split(cfg, cfg.site_index(site), data_path)
    fitted = _scaler_for(cfg, rows, rows.x[tr], scaler)
    return _assemble(site, rows, rows.x[tr], rows.y[tr], rows.x[te], rows.y[te], fitted)


def pooled_data(*, cfg: FederationConfig) -> SiteData:
    """All sites' training splits pooled, with all their test splits.

    This is what a centralized model would see if the data could be moved; it
    exists only to measure the centralized baseline on a local run. Scaling is
    fitted on the pooled training split, as a centralized pipeline would do.
    """
    splits = [_split(cfg, i, s.data_path) for i, s in enumerate(cfg.sites)]
    rows = splits[0][0]
    x_train = np.concatenate([r.x[tr] for r, tr, _ in splits])
    scaler = None if rows.image_shape is not None else fit_scaler([FeatureStats.of(x_train)])
    return _assemble(
        "pooled",
        rows,
        x_train,
        np.concatenate([r.y[tr] for r, tr, _ in splits]),
        np.concatenate([r.x[te] for r, _, te in splits]),
        np.concatenate([r.y[te] for r, _, te in splits]),
        scaler,
    )
