r"""Attentive aggregation (FedAtt).

Implements the attentive aggregation of Ji et al. 2019, "Learning Private Neural
Language Modeling with Attentive Aggregation" (IJCNN 2019,
https://arxiv.org/abs/1812.07108; authors' code: github.com/shaoxiongji/fed-att).
For every layer (named array) :math:`l` and site :math:`k`, with :math:`w` the
server's current parameters and :math:`w_k` site :math:`k`'s trained ones:

.. math::

    s_k^l = \lVert w^l - w_k^l \rVert_2, \qquad
    \alpha_k^l = \operatorname{softmax}_k(s^l)_k = \frac{e^{s_k^l}}{\sum_j e^{s_j^l}}, \\
    w^l \leftarrow w^l - \epsilon \sum_k \alpha_k^l \, (w^l - w_k^l) + \beta\, \mathcal{N}(0, I)

with server step size :math:`\epsilon` and noise magnitude :math:`\beta`
(``noise_std``): the authors' code adds ``dp * randn(shape)``, i.e. independent
:math:`\mathcal{N}(0, \beta^2)` noise on every coordinate. The softmax runs over the
sites, separately for each layer, and (as in the paper) gives *more* weight to a site
whose layer moved *further* from the server's. The norm is the Euclidean norm of the
flattened layer (Frobenius for matrices); note that the authors' code calls
``scipy.linalg.norm(..., ord=2)``, which for a 2-D weight matrix is the spectral norm.
The noise is FedAtt's randomisation, not a calibrated differential-privacy
mechanism; the project's DP guarantee comes from DP-SGD at the sites.

Because :math:`\sum_k \alpha_k^l = 1`, the update equals
:math:`w^l \leftarrow w^l - \epsilon\,(w^l - \sum_k \alpha_k^l w_k^l)`: the server
only needs the attention-weighted *sum* of the sites' layers. That makes FedAtt work
with additively homomorphic encryption (CKKS), where the server never sees a
parameter:

1. Every site decrypts the global model :math:`w`, trains, and computes its own
   per-layer distances :math:`s_k^l = \lVert w^l - w_k^l \rVert_2` locally
   (:func:`layer_distances`).
2. It sends only these scalars, signed, to the server.
3. The server turns them into softmax weights (:func:`attention_from_scores`) and
   sends each site its own per-layer weights :math:`\alpha_k^l`.
4. Every site encrypts :math:`\alpha_k^l \big((1 - \epsilon) w^l + \epsilon w_k^l\big)` (the
   step folded into its share, since :math:`\sum_k \alpha_k^l = 1`) and sends it; the
   server adds the ciphertexts into :math:`\mathrm{Enc}\big((1 - \epsilon) w + \epsilon
   \sum_k \alpha_k w_k\big)`, the new model, with the per-layer sum of the weights of the
   shares that arrived (the sites divide by it, renormalising if a share is missing).
5. FedAtt's server noise is not offered under encryption.

This is what :mod:`strategies.encrypted_attention` (server) and :mod:`clients.attention`
(sites) run, in two message exchanges per round.

The server learns one scalar per site and layer, never parameters. Those scalars
are self-reported: the server cannot check them, and since a larger distance earns
a larger weight, a site that overstates its distances takes over the layer. Use the
scores only among sites that are trusted to follow the protocol (signatures bind
each score to its site, they do not make it true).

All functions are pure; :func:`fedatt` is the plaintext reference and the
composition of steps 1-5 gives the same result (see ``tests/unit/test_aggregators.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from strategies.aggregators.median import check_updates

__all__ = ["attention_from_scores", "attention_step", "attention_weights", "fedatt", "layer_distances"]


def _check_server(
    server: Mapping[str, NDArray[Any]], updates: Sequence[Mapping[str, NDArray[Any]]], *, what: str
) -> list[str]:
    """Check ``updates`` and that ``server`` has the same names and shapes; return the layer names."""
    keys = check_updates(updates, what=what)
    check_updates([server, *updates], what=f"{what} (server parameters first)")
    return keys


def _check_step(step_size: float, noise_std: float) -> None:
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be finite and positive, got {step_size}")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be finite and non-negative, got {noise_std}")


def layer_distances(*, server: Mapping[str, NDArray[Any]], update: Mapping[str, NDArray[Any]]) -> dict[str, float]:
    r"""Per-layer distance :math:`s^l = \lVert w^l - w_k^l \rVert_2` between the server's and one site's parameters.

    This is what a site computes locally (protocol step 1) and sends as its scores.

    Parameters
    ----------
    server
        The server's current parameters :math:`w`.
    update
        The site's trained parameters :math:`w_k`, with the same names and shapes.

    Returns
    -------
    dict[str, float]
        The Euclidean norm of the flattened difference, per layer.

    Raises
    ------
    ValueError
        On mismatched names or shapes, or non-finite values.

    """
    keys = _check_server(server, [update], what="layer_distances")
    return _distances(server, update, keys)


def _distances(
    server: Mapping[str, NDArray[Any]], update: Mapping[str, NDArray[Any]], keys: list[str]
) -> dict[str, float]:
    return {
        k: float(np.linalg.norm((np.asarray(server[k], np.float64) - np.asarray(update[k], np.float64)).ravel()))
        for k in keys
    }


def attention_from_scores(*, scores: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    r"""Softmax over the sites, per layer, of the distances the sites reported.

    The server's part of the encrypted protocol (step 3):
    :math:`\alpha_k^l = e^{s_k^l} / \sum_j e^{s_j^l}`, computed stably (the largest
    score is subtracted first).

    Parameters
    ----------
    scores
        One mapping per site from layer name to that site's distance
        :math:`s_k^l \ge 0` (see :func:`layer_distances`).

    Returns
    -------
    list[dict[str, float]]
        For each site (in input order), its weight for each layer; for every layer the
        weights over the sites sum to 1.

    Raises
    ------
    ValueError
        If there are no scores, the sites name different layers, or a score is
        negative or not finite.

    """
    if len(scores) == 0:
        raise ValueError("attention_from_scores: need the scores of at least one site")
    keys = list(scores[0])
    if not keys:
        raise ValueError("attention_from_scores: site 0 reported no layer")
    for i, site in enumerate(scores):
        missing = sorted(set(keys) - set(site))
        extra = sorted(set(site) - set(keys))
        if missing or extra:
            raise ValueError(
                f"attention_from_scores: site {i} has mismatched keys (missing {missing}, unexpected {extra})"
            )
        for key in keys:
            value = site[key]
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise ValueError(f"attention_from_scores: site {i} score for {key!r} is not a number: {value!r}")
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(
                    f"attention_from_scores: site {i} score for {key!r} must be a finite non-negative distance, "
                    f"got {value}"
                )
    out: list[dict[str, float]] = [{} for _ in scores]
    for key in keys:
        s = np.array([float(site[key]) for site in scores], dtype=np.float64)
        e = np.exp(s - s.max())
        alpha = e / e.sum()
        for i, a in enumerate(alpha):
            out[i][key] = float(a)
    return out


def attention_weights(
    *, server: Mapping[str, NDArray[Any]], updates: Sequence[Mapping[str, NDArray[Any]]]
) -> dict[str, NDArray[np.float64]]:
    r"""FedAtt attention :math:`\alpha^l = \operatorname{softmax}_k(\lVert w^l - w_k^l \rVert_2)` for every layer.

    Parameters
    ----------
    server
        The server's current parameters :math:`w`.
    updates
        One mapping of named arrays per site, with the server's names and shapes.

    Returns
    -------
    dict[str, NDArray[np.float64]]
        Per layer, an array of one weight per site (in input order), summing to 1.

    Raises
    ------
    ValueError
        On empty input, mismatched names or shapes, or non-finite values.

    """
    keys = _check_server(server, updates, what="attention_weights")
    scores = [_distances(server, u, keys) for u in updates]
    per_site = attention_from_scores(scores=scores)
    return {k: np.array([site[k] for site in per_site], dtype=np.float64) for k in keys}


def attention_step(
    *,
    server: Mapping[str, NDArray[Any]],
    combined: Mapping[str, NDArray[Any]],
    step_size: float,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, NDArray[Any]]:
    r"""The FedAtt step from the attention-weighted sum: :math:`w \leftarrow w - \epsilon (w - A) + \beta \xi`.

    What the sites compute after decrypting :math:`A^l = \sum_k \alpha_k^l w_k^l`
    (protocol step 5). Computed in float64; returned in the dtype of ``server`` (the
    decrypted CKKS sum is float64, the model keeps its own dtype).

    Parameters
    ----------
    server
        The server's current parameters :math:`w`.
    combined
        The attention-weighted sum :math:`A` of the sites' parameters.
    step_size
        Server step size :math:`\epsilon > 0` (1 moves the model onto :math:`A`).
    noise_std
        :math:`\beta`: standard deviation of the Gaussian noise added to every coordinate.
    rng
        Source of the noise; a fresh ``np.random.default_rng()`` when None.

    Returns
    -------
    dict[str, NDArray]
        The new server parameters.

    Raises
    ------
    ValueError
        On mismatched names or shapes, non-finite values, or a bad step size or noise.

    """
    _check_step(step_size, noise_std)
    keys = _check_server(server, [combined], what="attention_step")
    gen = rng if rng is not None or noise_std == 0 else np.random.default_rng()
    out: dict[str, NDArray[Any]] = {}
    for k in keys:
        w = np.asarray(server[k], dtype=np.float64)
        new = w - step_size * (w - np.asarray(combined[k], dtype=np.float64))
        if noise_std > 0:
            assert gen is not None
            new = new + noise_std * gen.standard_normal(w.shape)
        out[k] = new.astype(np.asarray(server[k]).dtype)
    return out


def fedatt(
    *,
    server: Mapping[str, NDArray[Any]],
    updates: Sequence[Mapping[str, NDArray[Any]]],
    step_size: float,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, NDArray[Any]]:
    r"""One round of attentive aggregation (Ji et al. 2019) in plaintext.

    :math:`w^l \leftarrow w^l - \epsilon \sum_k \alpha_k^l (w^l - w_k^l) + \beta\,\mathcal{N}(0, I)`
    with :math:`\alpha^l` from :func:`attention_weights`. Computed in float64;
    returned in the dtype of the first update.

    Parameters
    ----------
    server
        The server's current parameters :math:`w`.
    updates
        One mapping of named arrays per site (the sites' trained parameters
        :math:`w_k`, not their differences to :math:`w`).
    step_size
        Server step size :math:`\epsilon > 0`; with 1 the new model is the
        attention-weighted average of the sites' models.
    noise_std
        :math:`\beta`: standard deviation of the Gaussian noise added to every
        coordinate (0 for none).
    rng
        Source of the noise, for reproducibility; a fresh ``np.random.default_rng()``
        when None.

    Returns
    -------
    dict[str, NDArray]
        The new server parameters.

    Raises
    ------
    ValueError
        On empty input, mismatched names or shapes, non-finite values, or a bad step
        size or noise.

    """
    _check_step(step_size, noise_std)
    alphas = attention_weights(server=server, updates=updates)
    gen = rng if rng is not None or noise_std == 0 else np.random.default_rng()
    out: dict[str, NDArray[Any]] = {}
    for k, alpha in alphas.items():
        w = np.asarray(server[k], dtype=np.float64)
        pull = np.zeros_like(w)
        for a, upd in zip(alpha, updates, strict=True):
            pull += a * (w - np.asarray(upd[k], dtype=np.float64))
        new = w - step_size * pull
        if noise_std > 0:
            assert gen is not None
            new = new + noise_std * gen.standard_normal(w.shape)
        out[k] = new.astype(np.asarray(updates[0][k]).dtype)
    return out
