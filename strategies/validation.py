"""Validation of a site's reply before it may be aggregated.

:func:`check_reply` is a pure function: it returns ``None`` for a reply that may
be aggregated, or a one-line reason why it must be left out. It checks the
expected records and keys, each array's shape and dtype, finiteness of every
array and metric, and a sample count that is a positive integer no larger than
what the site declared when it joined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from dmsc_fed.wire import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype of one parameter array."""

    shape: tuple[int, ...]
    dtype: str


def specs_of(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """The expected layout of replies, taken from the global model's arrays."""
    return {k: ArraySpec(shape=tuple(a.shape), dtype=str(a.dtype)) for k, a in arrays.items()}


def _check_metrics(content: RecordDict, max_examples: int) -> str | None:
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord):
        return f"no MetricRecord under {METRICS_KEY!r}"
    if NUM_EXAMPLES_KEY not in metrics:
        return f"metrics lack {NUM_EXAMPLES_KEY!r}"
    n = metrics[NUM_EXAMPLES_KEY]
    if not isinstance(n, int) or isinstance(n, bool):
        return f"{NUM_EXAMPLES_KEY!r} must be an integer, got {type(n).__name__} {n!r}"
    if n <= 0:
        return f"{NUM_EXAMPLES_KEY!r} must be positive, got {n}"
    if n > max_examples:
        return f"{NUM_EXAMPLES_KEY!r} = {n} exceeds the {max_examples} samples the site declared"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            return f"metric {key!r} is not finite ({value!r})"
    return None


def _check_arrays(content: RecordDict, expected: Mapping[str, ArraySpec]) -> str | None:
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord under {ARRAYS_KEY!r}"
    missing = sorted(set(expected) - set(arrays))
    if missing:
        return f"missing parameter(s) {missing}"
    extra = sorted(set(arrays) - set(expected))
    if extra:
        return f"unexpected parameter(s) {extra}"
    for key, spec in expected.items():
        arr = arrays[key]
        if str(arr.dtype) != spec.dtype:
            return f"parameter {key!r} has dtype {arr.dtype}, expected {spec.dtype}"
        if tuple(arr.shape) != spec.shape:
            return f"parameter {key!r} has shape {tuple(arr.shape)}, expected {spec.shape}"
        try:
            values = arr.numpy()
        except Exception as err:
            return f"parameter {key!r} cannot be decoded: {err}"
        if values.shape != spec.shape:
            return (
                f"parameter {key!r} holds {values.size} values, its shape {spec.shape} needs {int(np.prod(spec.shape))}"
            )
        if not np.isfinite(values).all():
            return f"parameter {key!r} has non-finite values"
    return None


def check_reply(
    content: RecordDict,
    *,
    max_examples: int,
    expected_arrays: Mapping[str, ArraySpec] | None = None,
) -> str | None:
    """Return why ``content`` must not be aggregated, or ``None`` if it may be.

    Parameters
    ----------
    content
        The reply's records.
    max_examples
        The sample count the site declared for this split (train or test).
    expected_arrays
        Expected parameter layout for training replies; ``None`` for evaluation
        replies, which carry no arrays.

    """
    reason = _check_metrics(content, max_examples)
    if reason is None and expected_arrays is not None:
        reason = _check_arrays(content, expected_arrays)
    return reason
