"""Assemble one site's train and test splits, and the pooled baseline data.

A site sees only its own rows: for bundled datasets the whole set is partitioned
(deterministically by seed) and the site keeps its part; for CSV data the site
reads its own file. Each site holds out a test split; feature scaling is fitted
on training splits only (see :mod:`dmsc_fed.data.scaling`).

Business (multi-task) segmentation: on a dataset with tasks (``clinical``) each site
holds exactly one task, the one that ``segmentation.business.holders`` lists it
under (:func:`site_task`), and its labels are that task's. Outside business mode a
multi-task dataset's labels are those of its first task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.config import DATASET_TASKS, FederationConfig
from dmsc_fed.data.partition import dirichlet_partition, iid_partition, train_test_indices
from dmsc_fed.data.scaling import FeatureStats, Scaler, fit_scaler
from dmsc_fed.data.sources import RawData, load_bundled, load_csv
from dmsc_fed.errors import ConfigError, DataError

_SPLIT_STREAM = 1  # seed-sequence stream for per-site train/test splits


@dataclass(frozen=True)
class SiteData:
    """A site's scaled train and test arrays.

    ``task`` is the task whose labels ``y_train`` and ``y_test`` are, for a
    multi-task dataset (None for single-task data); ``num_classes`` is its
    number of classes.
    """

    site: str
    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    num_classes: int
    image_shape: tuple[int, int, int] | None = None
    task: str | None = None

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


def dataset_tasks(*, cfg: FederationConfig) -> tuple[str, ...]:
    """Task names of the configured dataset, first task first; empty for single-task data."""
    return DATASET_TASKS.get(cfg.dataset.name, ())


def site_task(*, cfg: FederationConfig, site: str) -> str | None:
    """The task whose labels ``site`` trains on in business mode; None outside business mode.

    Pure: reads the config only. In business mode (``segmentation.mode =
    "business"``) a site holds exactly one task, the one whose
    ``segmentation.business.holders`` list names it.

    Parameters
    ----------
    cfg
        The federation config.
    site
        A member site's name.

    Returns
    -------
    str | None
        The task name, or None when the run is not in business mode.

    Raises
    ------
    ConfigError
        ``site`` is not a member, holds no task or more than one, or its task
        is not a task of the dataset (each message names the site, the task and
        the dataset's tasks).

    """
    cfg.site_index(site)
    seg = cfg.segmentation
    if seg is None or seg.mode != "business":
        return None
    tasks = dataset_tasks(cfg=cfg)
    if tasks:
        known = f"tasks of dataset {cfg.dataset.name!r}: {list(tasks)}"
    else:
        known = (
            f"dataset {cfg.dataset.name!r} has no tasks; business mode needs a multi-task dataset "
            f"such as {sorted(DATASET_TASKS)}"
        )
    held = [task for task, holders in seg.business_spec.holders.items() if site in holders]
    if not held:
        raise ConfigError(
            f"site {site!r} holds no task: list it under one of segmentation.business.holders.<task> ({known})"
        )
    if len(held) > 1:
        raise ConfigError(
            f"site {site!r} holds tasks {held} in segmentation.business.holders; this version supports "
            f"exactly one task per site ({known})"
        )
    if held[0] not in tasks:
        raise ConfigError(f"site {site!r} holds task {held[0]!r}, which the dataset does not have ({known})")
    return held[0]


def _check_task(cfg: FederationConfig, task: str) -> None:
    tasks = dataset_tasks(cfg=cfg)
    if task not in tasks:
        raise ConfigError(
            f"dataset {cfg.dataset.name!r} has no task {task!r} (its tasks: {list(tasks)})"
            if tasks
            else f"dataset {cfg.dataset.name!r} has no tasks, so task {task!r} does not apply"
        )


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
    return raw.take(parts[index])


def _split(
    cfg: FederationConfig, index: int, data_path: Path | None
) -> tuple[RawData, NDArray[np.int64], NDArray[np.int64]]:
    """The site's rows and its train/test indices, stratified by the labels of the task it holds."""
    task = site_task(cfg=cfg, site=cfg.sites[index].name)
    rows = _site_rows(cfg, index, data_path)
    rng = np.random.default_rng([cfg.seed, _SPLIT_STREAM, index])
    tr, te = train_test_indices(labels=rows.labels(task), test_fraction=cfg.dataset.test_fraction, rng=rng)
    return rows, tr, te


def _assemble(
    site: str,
    rows: RawData,
    x_tr: NDArray[np.float32],
    y_tr: NDArray[np.int64],
    x_te: NDArray[np.float32],
    y_te: NDArray[np.int64],
    scaler: Scaler | None,
    task: str | None,
) -> SiteData:
    if scaler is not None:
        x_tr, x_te = scaler.apply(x_tr), scaler.apply(x_te)
    return SiteData(
        site=site,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=rows.classes(task),
        image_shape=rows.image_shape,
        task=task if task is not None else (rows.task_names[0] if rows.task_names else None),
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
    """Summarize a site's data without scaling it (used when the site joins a run).

    In business mode the split is stratified by the site's task (:func:`site_task`),
    as :func:`load_site_data` does.
    """
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

    Returns
    -------
    SiteData
        The scaled splits; in business mode labelled by the site's task
        (:func:`site_task`, also in ``SiteData.task``), otherwise by the
        dataset's labels (the first task's, for a multi-task dataset).

    Raises
    ------
    ConfigError
        ``site`` is not a member, or (business mode) does not hold exactly one task
        of the dataset.

    """
    rows, tr, te = _split(cfg, cfg.site_index(site), data_path)
    task = site_task(cfg=cfg, site=site)
    labels = rows.labels(task)
    fitted = _scaler_for(cfg, rows, rows.x[tr], scaler)
    return _assemble(site, rows, rows.x[tr], labels[tr], rows.x[te], labels[te], fitted, task)


def pooled_data(*, cfg: FederationConfig, task: str | None = None) -> SiteData:
    """All sites' training splits pooled, with all their test splits.

    This is what a centralized model would see if the data could be moved; it
    exists only to measure the centralized baseline on a local run. Scaling is
    fitted on the pooled training split, as a centralized pipeline would do.
    Each site keeps the train/test split it uses in the federation.

    One array holds the labels of one task, so on a multi-task dataset the
    ``task`` keyword picks which:

    - ``task=None``: the dataset's labels (its first task's, the task that
      ``MultiTaskNet.forward`` answers without a task), over every site, also
      in business mode. This is what the centralized baseline uses.
    - ``task="<name>"``: that task's labels. In business mode only the sites that
      hold the task (``segmentation.business.holders``) are pooled, since only they
      have its labels; otherwise every site is.

    Parameters
    ----------
    cfg
        The federation config.
    task
        A task of the dataset, or None.

    Raises
    ------
    ConfigError
        ``task`` is not a task of the dataset, or in business mode no member site
        holds it.

    """
    business = cfg.segmentation is not None and cfg.segmentation.mode == "business"
    members = list(enumerate(cfg.sites))
    if task is not None:
        _check_task(cfg, task)
        if business:
            members = [(i, s) for i, s in members if site_task(cfg=cfg, site=s.name) == task]
            if not members:
                raise ConfigError(f"no member site holds task {task!r} in segmentation.business.holders")
    splits = [_split(cfg, i, s.data_path) for i, s in members]
    rows = splits[0][0]
    x_train = np.concatenate([r.x[tr] for r, tr, _ in splits])
    scaler = None if rows.image_shape is not None else fit_scaler([FeatureStats.of(x_train)])
    return _assemble(
        "pooled",
        rows,
        x_train,
        np.concatenate([r.labels(task)[tr] for r, tr, _ in splits]),
        np.concatenate([r.x[te] for r, _, te in splits]),
        np.concatenate([r.labels(task)[te] for r, _, te in splits]),
        scaler,
        task,
    )
