"""Aggregation strategies (Flower message-API) and the public API for custom ones.

Write a custom strategy by subclassing :class:`WeightedFedAvg` and overriding
``aggregate_arrays``; register it with :func:`register_strategy` or name it in the
config as ``"package.module:Class"`` (see :mod:`strategies.registry`).
``STRATEGIES`` maps the registered names to their classes.
"""

from strategies.attention import FedAttFedAvg
from strategies.encrypted import EncryptedFedAvg
from strategies.ensemble import VotingEnsemble
from strategies.fedavg import ReplyCheck, RoundReport, TaskFinished, WeightedFedAvg, weighted_average, weighted_metrics
from strategies.fixed_weights import FixedWeightsFedAvg
from strategies.registry import STRATEGIES, check_options, register_strategy, resolve_strategy, strategy_for
from strategies.robust import KrumFedAvg, MedianFedAvg, TrimmedMeanFedAvg
from strategies.score_weighted import ScoreWeightedFedAvg
from strategies.validation import ArraySpec, check_encrypted_reply, check_reply, specs_of

__all__ = [
    "STRATEGIES",
    "ArraySpec",
    "EncryptedFedAvg",
    "FedAttFedAvg",
    "FixedWeightsFedAvg",
    "KrumFedAvg",
    "MedianFedAvg",
    "ReplyCheck",
    "RoundReport",
    "ScoreWeightedFedAvg",
    "TaskFinished",
    "TrimmedMeanFedAvg",
    "VotingEnsemble",
    "WeightedFedAvg",
    "check_encrypted_reply",
    "check_options",
    "check_reply",
    "register_strategy",
    "resolve_strategy",
    "specs_of",
    "strategy_for",
    "weighted_average",
    "weighted_metrics",
]
