"""Where raw samples come from: datasets bundled with scikit-learn, or a site's CSV.

Nothing is downloaded: ``breast_cancer`` and ``digits`` ship inside scikit-learn.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import DataError


@dataclass(frozen=True)
class RawData:
    """Features ``x`` (float32, one row per sample) and integer labels ``y``."""

    x: NDArray[np.float32]
    y: NDArray[np.int64]
    num_classes: int
    image_shape: tuple[int, int, int] | None = None


def load_bundled(*, name: str) -> RawData:
    """Load a dataset that ships with scikit-learn."""
    from sklearn import datasets

    if name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
        return RawData(x=x.astype(np.float32), y=y.astype(np.int64), num_classes=2)
    if name == "digits":
        x, y = datasets.load_digits(return_X_y=True)
        # Pixel intensities are 0..16; a fixed scale keeps images comparable across sites.
        return RawData(x=(x / 16.0).astype(np.float32), y=y.astype(np.int64), num_classes=10, image_shape=(1, 8, 8))
    raise DataError(f"unknown bundled dataset {name!r}; known: ['breast_cancer', 'digits']")


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
    """What a model needs to know about the data without seeing it."""

    num_features: int
    num_classes: int
    image_shape: tuple[int, int, int] | None = None


BUNDLED_SHAPES: dict[str, DataShape] = {
    "breast_cancer": DataShape(num_features=30, num_classes=2),
    "digits": DataShape(num_features=64, num_classes=10, image_shape=(1, 8, 8)),
}
