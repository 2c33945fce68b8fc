"""Where raw samples come from: bundled datasets, or a site's CSV.

Nothing is downloaded: ``breast_cancer`` and ``digits`` ship inside scikit-learn;
``clinical`` is a SYNTHETIC multi-task set that the project generates itself
(:func:`make_clinical`), it describes no real patients; ``fraud`` is a SYNTHETIC,
imbalanced set of card transactions that the project generates itself
(:func:`make_fraud`), it describes no real customers or transactions.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import DataError


@dataclass(frozen=True)
class RawData:
    """Features ``x`` (float32, one row per sample) and integer labels ``y``.

    Attributes
    ----------
    x
        Features, one row per sample.
    y
        Labels; for a multi-task dataset, those of its first task.
    num_classes
        Classes of ``y``.
    image_shape
        ``(channels, height, width)`` of image data, else None.
    tasks
        Multi-task datasets only: task name -> labels of every sample, first task
        first (its labels are ``y``). None for single-task data.
    task_classes
        Task name -> number of classes, with the same keys as ``tasks``.

    """

    x: NDArray[np.float32]
    y: NDArray[np.int64]
    num_classes: int
    image_shape: tuple[int, int, int] | None = None
    tasks: Mapping[str, NDArray[np.int64]] | None = None
    task_classes: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        """Check that the tasks, if any, label every sample and have class counts."""
        if self.tasks is None:
            if self.task_classes is not None:
                raise DataError("task_classes given without tasks")
            return
        if not self.tasks:
            raise DataError("a multi-task dataset needs at least one task")
        if self.task_classes is None or set(self.task_classes) != set(self.tasks):
            raise DataError(f"task_classes must name the tasks {list(self.tasks)}")
        for task, labels in self.tasks.items():
            if labels.shape != self.y.shape:
                raise DataError(f"task {task!r} has {labels.shape[0]} labels for {self.y.shape[0]} samples")

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, first task first; empty for single-task data."""
        return tuple(self.tasks or ())

    def labels(self, task: str | None = None) -> NDArray[np.int64]:
        """Labels of ``task`` (None: ``y``); DataError naming the tasks when there is no such task."""
        if task is None:
            return self.y
        if self.tasks is None or task not in self.tasks:
            raise DataError(f"the data has no task {task!r} (its tasks: {list(self.task_names)})")
        return self.tasks[task]

    def classes(self, task: str | None = None) -> int:
        """Number of classes of ``task`` (None: of ``y``)."""
        if task is None:
            return self.num_classes
        self.labels(task)
        assert self.task_classes is not None
        return self.task_classes[task]

    def take(self, index: NDArray[np.int64]) -> RawData:
        """The rows ``index`` of every array, with the same classes and tasks."""
        return RawData(
            x=self.x[index],
            y=self.y[index],
            num_classes=self.num_classes,
            image_shape=self.image_shape,
            tasks=None if self.tasks is None else MappingProxyType({t: v[index] for t, v in self.tasks.items()}),
            task_classes=self.task_classes,
        )


CLINICAL_SEED = 20240611
"""Seed of the generator of the synthetic ``clinical`` set (fixed: every site sees the same population)."""
CLINICAL_SAMPLES = 2400
CLINICAL_FEATURES = 16
CLINICAL_TASKS = ("diagnosis", "readmission")
CLINICAL_READMISSION_RATE = 0.28


def make_clinical(*, seed: int = CLINICAL_SEED, num_samples: int = CLINICAL_SAMPLES) -> RawData:
    """Generate the SYNTHETIC multi-task ``clinical`` dataset (no real patients).

    Every patient has hidden factors: four shared ones ``z`` (think general
    health), two for the diagnosis ``u_d`` and two for readmission ``u_r``, all
    standard normal. The 16 observed features mix them linearly with small
    noise: features 0-6 mostly carry ``z``, 7-10 ``u_d`` and 11-14 ``u_r`` (each
    with some ``z``), feature 15 is mostly noise; features 2 and 9 are skewed
    (exponentiated, like lab values) and every feature gets its own offset and
    scale, so standardization matters. The two binary tasks share ``z``::

        diagnosis   = 1[4 * (0.8 z0 - 0.6 z1 + 0.9 ud0 + ud1 z2 - 0.8 (|ud1| - 0.8)) + e > 0]
        readmission = 1[4 * (0.7 z0 + 0.6 z3 + 0.9 ur0 + (ur1^2 - 1) + 0.8 z1 ur0) + e > t]

    with logistic noise ``e`` and ``t`` the quantile that makes 28 % of the
    patients readmitted (diagnosis is about balanced). The interaction and
    square terms make both tasks non-linear: a logistic regression reaches
    about 0.78 accuracy on either, a small MLP about 0.85-0.9.

    Parameters
    ----------
    seed
        Generator seed; the default is fixed and independent of any run's seed.
    num_samples
        Number of patients.

    Returns
    -------
    RawData
        Features (float32), ``y`` = the diagnosis labels, and both tasks.

    """
    rng = np.random.default_rng(seed)
    n, f = num_samples, CLINICAL_FEATURES
    z = rng.standard_normal((n, 4))
    ud = rng.standard_normal((n, 2))
    ur = rng.standard_normal((n, 2))
    loadings = rng.normal(0.0, 0.3, (8, f))
    for j in range(f):
        if j < 7:
            loadings[rng.choice(4, 2, replace=False), j] += rng.choice([-1.0, 1.0], 2) * rng.uniform(0.8, 1.4, 2)
        elif j < 11:
            loadings[4 + rng.integers(2), j] += rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.4)
            loadings[rng.integers(4), j] += 0.5
        elif j < 15:
            loadings[6 + rng.integers(2), j] += rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.4)
            loadings[rng.integers(4), j] += 0.5
    x = np.concatenate([z, ud, ur], axis=1) @ loadings + 0.25 * rng.standard_normal((n, f))
    x[:, 2] = np.exp(0.5 * x[:, 2])
    x[:, 9] = np.exp(0.4 * x[:, 9])
    x = rng.uniform(-5.0, 100.0, f) + rng.uniform(0.5, 20.0, f) * x
    diagnosis = 0.8 * z[:, 0] - 0.6 * z[:, 1] + 0.9 * ud[:, 0] + ud[:, 1] * z[:, 2] - 0.8 * (np.abs(ud[:, 1]) - 0.8)
    readmission = 0.7 * z[:, 0] + 0.6 * z[:, 3] + 0.9 * ur[:, 0] + (ur[:, 1] ** 2 - 1.0) + 0.8 * z[:, 1] * ur[:, 0]
    d = 4.0 * diagnosis + rng.logistic(size=n)
    r = 4.0 * readmission + rng.logistic(size=n)
    labels = {
        "diagnosis": (d > 0).astype(np.int64),
        "readmission": (r > np.quantile(r, 1.0 - CLINICAL_READMISSION_RATE)).astype(np.int64),
    }
    return RawData(
        x=x.astype(np.float32),
        y=labels[CLINICAL_TASKS[0]],
        num_classes=2,
        tasks=MappingProxyType(labels),
        task_classes=MappingProxyType(dict.fromkeys(CLINICAL_TASKS, 2)),
    )


FRAUD_SEED = 20240917
"""Seed of the generator of the synthetic ``fraud`` set (fixed: every bank sees the same population)."""
FRAUD_SAMPLES = 8000
FRAUD_RATE = 0.03
"""Share of fraudulent transactions in the synthetic ``fraud`` set."""
FRAUD_FEATURES = (
    "amount",
    "hour",
    "merchant_risk",
    "distance_km",
    "account_age_days",
    "txn_24h",
    "card_present",
    "foreign",
    "amount_ratio",
    "minutes_since_last",
    "merchants_24h",
    "amount_24h",
    "declines_24h",
    "avg_amount",
    "new_device",
)
"""Column names of the ``fraud`` features, in order (a bank's own CSV may use the same)."""


def make_fraud(*, seed: int = FRAUD_SEED, num_samples: int = FRAUD_SAMPLES) -> RawData:
    """Generate the SYNTHETIC, imbalanced ``fraud`` dataset (no real customers or transactions).

    Each row is one card transaction with 15 numeric features
    (:data:`FRAUD_FEATURES`), drawn from plausible but invented distributions:

    - ``avg_amount``: the customer's usual amount, log-normal (median about 37);
      ``amount`` = ``avg_amount`` times a log-normal factor (at least 0.50), and
      ``amount_ratio`` = ``amount / avg_amount``;
    - ``hour``: hour of day 0-23, mostly around 14:00, 15 % uniform;
    - ``merchant_risk``: risk score of the merchant category, Beta(2, 8);
    - ``card_present`` (60 %), ``foreign`` (5 %), ``new_device`` (8 %): 0/1 flags;
    - ``distance_km`` from home: log-normal, plus several hundred km abroad;
    - ``account_age_days``: Gamma, 1 to 7300 days;
    - velocity: ``txn_24h`` (Poisson), ``minutes_since_last`` (exponential,
      shorter for busy cards), ``merchants_24h`` (distinct merchants among them),
      ``amount_24h`` (spend over the last 24 h) and ``declines_24h`` (Poisson).

    The label is 1 (fraud) for the transactions whose hidden risk plus logistic
    noise ``e`` (scale 0.5) is in the top ``FRAUD_RATE`` (3 %, so always
    answering "legitimate" is 97 % accurate)::

        risk = 3.0 night (1 - card_present) + 1.5 softplus(2.5 (log amount_ratio - 0.8))
             + 1.5 (merchant_risk - 0.2) + 2.5 foreign (1 - card_present)
             + 2.0 exp(-account_age_days / 45) + 1.5 [txn_24h >= 7] [minutes_since_last < 20]
             + 0.6 declines_24h + 1.2 new_device (1 - card_present)
        fraud = 1[risk + 0.5 e > t]

    where ``night`` is 23:00-04:59 and ``t`` the 97 % quantile. Night is at both
    ends of ``hour``, and most terms are interactions or thresholds, so a
    logistic regression on the standardized features reaches a ROC AUC of
    about 0.85-0.88 on held-out data and a small MLP (32, 16) about 0.9.

    Parameters
    ----------
    seed
        Generator seed; the default is fixed and independent of any run's seed.
    num_samples
        Number of transactions.

    Returns
    -------
    RawData
        Features (float32, columns :data:`FRAUD_FEATURES`) and labels
        (1 = fraud), two classes.

    """
    rng = np.random.default_rng(seed)
    n = num_samples
    avg_amount = np.round(np.exp(rng.normal(3.6, 0.6, n)), 2)
    amount = np.round(np.maximum(avg_amount * np.exp(rng.normal(0.0, 0.6, n)), 0.5), 2)
    ratio = amount / avg_amount
    daytime = np.round(rng.normal(14.0, 4.0, n)) % 24
    hour = np.where(rng.random(n) < 0.85, daytime, rng.integers(0, 24, n))
    merchant_risk = rng.beta(2.0, 8.0, n)
    card_present = rng.random(n) < 0.6
    foreign = rng.random(n) < 0.05
    new_device = rng.random(n) < 0.08
    distance = np.exp(rng.normal(1.5, 1.2, n)) + foreign * np.exp(rng.normal(6.5, 0.7, n))
    account_age = np.round(np.clip(rng.gamma(1.5, 500.0, n), 1.0, 7300.0))
    txn_24h = rng.poisson(3.0 * np.exp(rng.normal(0.0, 0.5, n)))
    since = rng.exponential(240.0, n) / np.sqrt(1.0 + txn_24h)
    merchants_24h = rng.binomial(txn_24h, 0.7)
    amount_24h = amount + avg_amount * txn_24h * np.exp(rng.normal(0.0, 0.3, n))
    declines = rng.poisson(0.15, n)
    night = (hour < 5) | (hour >= 23)
    remote = ~card_present
    risk = (
        3.0 * (night & remote)
        + 1.5 * np.logaddexp(0.0, 2.5 * (np.log(ratio) - 0.8))
        + 1.5 * (merchant_risk - 0.2)
        + 2.5 * (foreign & remote)
        + 2.0 * np.exp(-account_age / 45.0)
        + 1.5 * ((txn_24h >= 7) & (since < 20.0))
        + 0.6 * declines
        + 1.2 * (new_device & remote)
    )
    z = risk + 0.5 * rng.logistic(size=n)
    y = (z > np.quantile(z, 1.0 - FRAUD_RATE)).astype(np.int64)
    columns = {
        "amount": amount,
        "hour": hour,
        "merchant_risk": merchant_risk,
        "distance_km": distance,
        "account_age_days": account_age,
        "txn_24h": txn_24h,
        "card_present": card_present,
        "foreign": foreign,
        "amount_ratio": ratio,
        "minutes_since_last": since,
        "merchants_24h": merchants_24h,
        "amount_24h": amount_24h,
        "declines_24h": declines,
        "avg_amount": avg_amount,
        "new_device": new_device,
    }
    x = np.stack([np.asarray(columns[name], dtype=np.float64) for name in FRAUD_FEATURES], axis=1)
    return RawData(x=x.astype(np.float32), y=y, num_classes=2)


def load_bundled(*, name: str) -> RawData:
    """Load a dataset that ships with scikit-learn, or generate a synthetic one (``clinical``, ``fraud``)."""
    if name == "clinical":
        return make_clinical()
    if name == "fraud":
        return make_fraud()
    from sklearn import datasets

    if name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
        return RawData(x=x.astype(np.float32), y=y.astype(np.int64), num_classes=2)
    if name == "digits":
        x, y = datasets.load_digits(return_X_y=True)
        # Pixel intensities are 0..16; a fixed scale keeps images comparable across sites.
        return RawData(x=(x / 16.0).astype(np.float32), y=y.astype(np.int64), num_classes=10, image_shape=(1, 8, 8))
    raise DataError(f"unknown bundled dataset {name!r}; known: {sorted(BUNDLED_SHAPES)}")


def load_csv(*, path: Path, label_column: str, feature_columns: list[str], num_classes: int) -> RawData:
    """Read a site's CSV file with a header row.

    Labels must be integers in ``[0, num_classes)`` so that every site agrees on
    what a class index means. Every error names the file, and where it applies
    the row and column.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header row)")
            header = [h.strip() for h in header]
            missing = [c for c in [label_column, *feature_columns] if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; the header has {header}")
            cols = [header.index(c) for c in feature_columns]
            label_col = header.index(label_column)
            xs: list[list[float]] = []
            ys: list[int] = []
            for row_no, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{row_no}: {len(row)} fields, header has {len(header)}")
                xs.append([_number(path, row_no, feature_columns[j], row[c]) for j, c in enumerate(cols)])
                ys.append(_label(path, row_no, label_column, row[label_col], num_classes))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV: {err}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if not ys:
        raise DataError(f"{path}: no data rows")
    return RawData(x=np.asarray(xs, dtype=np.float32), y=np.asarray(ys, dtype=np.int64), num_classes=num_classes)


def _number(path: Path, row_no: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"{path}:{row_no}: column {column!r} has non-numeric value {cell!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{row_no}: column {column!r} has non-finite value {cell!r}")
    return value


def _label(path: Path, row_no: int, column: str, cell: str, num_classes: int) -> int:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"{path}:{row_no}: label column {column!r} has non-numeric value {cell!r}") from None
    if not value.is_integer() or not 0 <= value < num_classes:
        raise DataError(f"{path}:{row_no}: label {cell!r} in column {column!r} is not an integer in [0, {num_classes})")
    return int(value)


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know about the data without seeing it.

    Attributes
    ----------
    num_features
        Input features per sample.
    num_classes
        Classes of the labels ``y`` (of the first task for multi-task data).
    image_shape
        ``(channels, height, width)`` of image data, else None.
    tasks
        Multi-task data: ``(task, classes)`` pairs, first task first; empty otherwise.

    """

    num_features: int
    num_classes: int
    image_shape: tuple[int, int, int] | None = None
    tasks: tuple[tuple[str, int], ...] = field(default=())

    @property
    def task_classes(self) -> dict[str, int]:
        """Task name -> number of classes (empty for single-task data)."""
        return dict(self.tasks)


BUNDLED_SHAPES: dict[str, DataShape] = {
    "breast_cancer": DataShape(num_features=30, num_classes=2),
    "digits": DataShape(num_features=64, num_classes=10, image_shape=(1, 8, 8)),
    "clinical": DataShape(num_features=CLINICAL_FEATURES, num_classes=2, tasks=tuple((t, 2) for t in CLINICAL_TASKS)),
    "fraud": DataShape(num_features=len(FRAUD_FEATURES), num_classes=2),
}
