"""Aggregation strategies (Flower message-API) and the public API for custom ones.

``STRATEGIES`` maps the built-in names a config may use to their classes.
"""

from strategies.encrypted import EncryptedFedAvg
from strategies.fedavg import ReplyCheck, RoundReport, TaskFinished, WeightedFedAvg, weighted_average, weighted_metrics
from strategies.validation import ArraySpec, check_encrypted_reply, check_reply, specs_of

STRATEGIES = {"fedavg": WeightedFedAvg}

__all__ = [
    "STRATEGIES",
    "ArraySpec",
    "EncryptedFedAvg",
    "ReplyCheck",
    "RoundReport",
    "TaskFinished",
    "WeightedFedAvg",
    "check_encrypted_reply",
    "check_reply",
    "specs_of",
    "weighted_average",
    "weighted_metrics",
]
