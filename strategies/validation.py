"""Validation of a site's reply before it may be aggregated.

:func:`check_reply` is a pure function: it returns ``None`` for a reply that may
be aggregated, or a one-line reason why it must be left out. It checks the
expected records and keys, each array's shape and dtype, finiteness of every
array and metric, and a sample count that is a positive integer no larger than
what the site declared when it joined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from dmsc_fed.segmentation.layout import RunSegment
from dmsc_fed.wire import (
    ARRAYS_KEY,
    CT_PREFIX,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    WEIGHT_KEY,
    segment_chunk_key,
    segment_key,
    segment_weight_key,
)


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype of one parameter array."""

    shape: tuple[int, ...]
    dtype: str


def specs_of(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """The expected layout of replies, taken from the global model's arrays."""
    return {k: ArraySpec(shape=tuple(a.shape), dtype=str(a.dtype)) for k, a in arrays.items()}


def check_metrics(content: RecordDict, max_examples: int) -> str | None:
    """Why a reply's metrics are unacceptable (record, sample count within ``max_examples``, finite values)."""
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


#: Kinds of rejected replies, by the phrase their reason starts with or contains (first match wins).
REJECTION_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("late", ("no reply by the round deadline",)),
    ("unavailable", ("node unavailable", "unavailable")),
    ("replayed", ("replayed update",)),
    ("stale-round", ("stale update",)),
    ("oversized", ("oversized update", "more than the")),
    ("non-finite", ("not finite", "non-finite")),
    ("malformed", ("shape", "dtype", "parameter(s)", "ciphertext", "chunk", "holds", "no arrayrecord", "plaintext")),
    ("signature", ("signature", "signed", "bound to")),
    ("site-error", ("site reported an error",)),
    ("metrics", ("metric", "num-examples", "weight")),
)


def rejection_kind(reason: str) -> str:
    """The kind of a rejection reason: ``late``, ``non-finite``, ``oversized``, ``stale-round``, ... or ``other``."""
    text = reason.lower()
    for kind, phrases in REJECTION_KINDS:
        if any(p in text for p in phrases):
            return kind
    return "other"


#: Room for the ``.npy`` header each serialised array carries on top of its values.
NPY_HEADER_BYTES = 1024


def _nbytes(spec: ArraySpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def _check_arrays(content: RecordDict, expected: Mapping[str, ArraySpec]) -> str | None:
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord under {ARRAYS_KEY!r}"
    size = sum(len(a.data) for a in arrays.values())
    limit = sum(_nbytes(s) + NPY_HEADER_BYTES for s in expected.values())
    if size > limit:
        return f"oversized update: {size} bytes of parameters, the model's take {limit}"
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
    reason = check_metrics(content, max_examples)
    if reason is None and expected_arrays is not None:
        reason = _check_arrays(content, expected_arrays)
    return reason


def check_encrypted_reply(
    content: RecordDict,
    *,
    max_examples: int,
    num_chunks: int,
    max_chunk_bytes: int,
    weight_total: float,
) -> str | None:
    """Return why an encrypted training reply must not be aggregated, or ``None``.

    With encryption on, the server cannot look at parameters; it checks what it
    can: the sample count, that the arrays are exactly ``num_chunks`` ciphertext
    chunks (1-D ``uint8``, none larger than ``max_chunk_bytes``) and nothing else,
    and that the plaintext weight the site applied is its sample count over
    ``weight_total`` (the sampled sites' declared total), so no site can inflate
    its share.
    """
    reason = check_metrics(content, max_examples) or check_ciphertexts(
        content, num_chunks=num_chunks, max_chunk_bytes=max_chunk_bytes
    )
    if reason is not None:
        return reason
    return _check_weight(content, WEIGHT_KEY, weight_total)


def check_ciphertexts(content: RecordDict, *, num_chunks: int, max_chunk_bytes: int) -> str | None:
    """Why a reply's arrays are not exactly ``num_chunks`` ciphertext chunks of at most ``max_chunk_bytes``."""
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord under {ARRAYS_KEY!r}"
    expected = {f"{CT_PREFIX}{i:05d}" for i in range(num_chunks)}
    if set(arrays) != expected:
        plain = sorted(k for k in arrays if not k.startswith(CT_PREFIX))
        if plain:
            return f"plaintext parameter(s) {plain[:3]} in an encrypted task"
        return f"expected {num_chunks} ciphertext chunks, got {len(arrays)}"
    for key in sorted(arrays):
        problem = _check_chunk(key, arrays[key], max_chunk_bytes)
        if problem:
            return problem
    return None


def _check_weight(content: RecordDict, key: str, weight_total: float) -> str | None:
    """The plaintext weight a site applied before encrypting must be its sample count over ``weight_total``."""
    metrics = content[METRICS_KEY]
    assert isinstance(metrics, MetricRecord)  # checked by check_metrics
    weight = metrics.get(key)
    if not isinstance(weight, float | int) or isinstance(weight, bool) or not math.isfinite(float(weight)):
        return f"metric {key!r} must be a finite number, got {weight!r}"
    n = cast(int, metrics[NUM_EXAMPLES_KEY])
    if weight_total <= 0 or abs(float(weight) - n / weight_total) > 1e-9:
        return f"weight {key!r} = {weight} does not match {n} samples of the round's {weight_total:g}"
    return None


def _check_chunk(key: str, arr: Array, max_chunk_bytes: int) -> str | None:
    if str(arr.dtype) != "uint8" or len(arr.shape) != 1:
        return f"chunk {key!r} is not a 1-D uint8 ciphertext (dtype {arr.dtype}, shape {tuple(arr.shape)})"
    if arr.shape[0] > max_chunk_bytes:
        return f"chunk {key!r} has {arr.shape[0]} bytes, more than the {max_chunk_bytes} a ciphertext can take"
    return None


def check_segment_reply(
    content: RecordDict,
    *,
    max_examples: int,
    segments: Sequence[RunSegment],
    weight_totals: Mapping[str, float],
    slots: int = 0,
    max_chunk_bytes: int = 0,
) -> str | None:
    """Return why a segmented training reply must not be aggregated, or ``None``.

    The reply must carry exactly the site's ``segments``: a plaintext segment as one
    finite float32 vector of its size, an encrypted one as ``ceil(size / slots)``
    ciphertext chunks with the weight the site applied (its sample count over the
    segment's ``weight_totals`` entry) in its metrics.
    """
    reason = check_metrics(content, max_examples)
    if reason is not None:
        return reason
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord under {ARRAYS_KEY!r}"
    expected: set[str] = set()
    for seg in segments:
        if seg.encrypted:
            expected.update(segment_chunk_key(seg.name, i) for i in range(math.ceil(seg.size / max(slots, 1))))
        else:
            expected.add(segment_key(seg.name))
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        return f"the reply does not hold exactly the site's segments (missing {missing[:4]}, unexpected {extra[:4]})"
    for seg in segments:
        if seg.encrypted:
            for i in range(math.ceil(seg.size / slots)):
                key = segment_chunk_key(seg.name, i)
                problem = _check_chunk(key, arrays[key], max_chunk_bytes)
                if problem:
                    return problem
            problem = _check_weight(content, segment_weight_key(seg.name), weight_totals.get(seg.name, 0.0))
            if problem:
                return f"segment {seg.name!r}: {problem}"
            continue
        arr = arrays[segment_key(seg.name)]
        if str(arr.dtype) != "float32" or tuple(arr.shape) != (seg.size,):
            return f"segment {seg.name!r} must be float32 of shape ({seg.size},), got {arr.dtype} {tuple(arr.shape)}"
        if not np.isfinite(arr.numpy()).all():
            return f"segment {seg.name!r} has non-finite values"
    return None


BINARY_KEY = "bin-counts"


def check_binary_counts(content: RecordDict) -> str | None:
    """Why a reply's binary-classification counts are malformed (see :mod:`dmsc_fed.metrics`), or None.

    The counts must be well formed and add up to the reply's sample count.
    """
    from dmsc_fed.metrics import from_metric_lists

    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord) or BINARY_KEY not in metrics:
        return None
    try:
        counts = from_metric_lists(dict(metrics))
    except ValueError as err:
        return f"binary counts are malformed: {err}"
    n = metrics.get(NUM_EXAMPLES_KEY)
    total = counts.tp + counts.fp + counts.tn + counts.fn
    if total != n:
        return f"binary counts add up to {total} samples, the reply says {n}"
    return None


def merged_binary_scores(contents: Sequence[RecordDict]) -> dict[str, float]:
    """Precision, recall, F1, specificity and ROC AUC over all replies' summed counts ({} unless all carry them)."""
    from dmsc_fed.metrics import binary_scores, from_metric_lists, merge_counts

    records = [c.get(METRICS_KEY) for c in contents]
    if not records or not all(isinstance(r, MetricRecord) and BINARY_KEY in r for r in records):
        return {}
    merged = merge_counts(from_metric_lists(dict(cast(MetricRecord, r))) for r in records)
    scores = binary_scores(merged)
    return {k: float(cast(float, v)) for k, v in scores.items() if k != "accuracy" and v is not None}
