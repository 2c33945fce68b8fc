"""When a round must be rolled back, and which sites to suspect (draft section 6.3.7).

Pure functions over numbers the round loop already has: whether the new global
model is finite, the evaluation loss of the round against the last stable
round's, and each site's distance to the previous global model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

#: A site whose update is this many times farther from the global model than the median site is suspected.
SUSPECT_FACTOR = 3.0


def rollback_reason(
    *, finite: bool, loss: float | None, stable_loss: float | None, factor: float | None, eval_failed: bool = False
) -> str | None:
    """Why the round's result must be rolled back, or ``None`` to keep it.

    Parameters
    ----------
    finite
        Whether every value of the new global model the server can see is finite.
    loss
        The round's evaluation loss (``None`` when no site evaluated).
    stable_loss
        The evaluation loss of the last stable round (``None`` before the first).
    factor
        Roll back when ``loss > factor * stable_loss``; ``None`` turns the loss check off.
    eval_failed
        Every site's evaluation reported a non-finite metric (an encrypted model the
        server cannot look at shows a broken aggregate this way).

    """
    if not finite:
        return "the aggregated model has non-finite values"
    if eval_failed:
        return "every site's evaluation of the aggregated model was not finite"
    if loss is not None and not math.isfinite(loss):
        return f"the evaluation loss is not finite ({loss})"
    worse = factor is not None and loss is not None and stable_loss is not None and stable_loss > 0
    if worse and loss > factor * stable_loss:  # type: ignore[operator]
        return (
            f"the evaluation loss rose from {stable_loss:.4g} to {loss:.4g}, "
            f"more than {factor:g} times the last stable round's"
        )
    return None


def suspects(norms: Mapping[str, float], *, factor: float = SUSPECT_FACTOR) -> list[str]:
    """Sites whose update distance is more than ``factor`` times the median of the others (needs 3+ sites).

    A non-finite distance always makes a site suspect.
    """
    out = []
    for site, norm in norms.items():
        others = [v for k, v in norms.items() if k != site and math.isfinite(v)]
        outlier = len(others) >= 2 and norm > factor * max(statistics.median(others), 1e-12)
        if not math.isfinite(norm) or outlier:
            out.append(site)
    return sorted(out)
