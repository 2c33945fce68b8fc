"""Voting over the predictions of sub-models: the pure functions live in :mod:`dmsc_fed.voting`.

They are in the core because the sites (``clients/``) apply them when they evaluate an
ensemble; this module keeps them among the aggregators.
"""

from dmsc_fed.voting import majority_vote, soft_vote, soft_vote_labels

__all__ = ["majority_vote", "soft_vote", "soft_vote_labels"]
