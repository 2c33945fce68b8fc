"""Names of the records and keys that cross the wire between server and sites.

Only Flower records (ArrayRecord, ConfigRecord, MetricRecord) travel; these
constants are the single place both sides take their keys from.
"""

from __future__ import annotations

CONFIG_KEY = "config"  # ConfigRecord of every server message
TASK_KEY = "dmsc-config"  # the federation config as JSON, inside CONFIG_KEY
ROUND_KEY = "server-round"
SCALER_MEAN = "scaler-mean"  # federated feature scaling, inside CONFIG_KEY
SCALER_STD = "scaler-std"
ARRAYS_KEY = "arrays"  # ArrayRecord of model parameters
METRICS_KEY = "metrics"  # MetricRecord of a site's reply
NUM_EXAMPLES_KEY = "num-examples"
JOIN_KEY = "join"  # ConfigRecord of a site's join reply
SITE_KEY = "site"  # ConfigRecord naming the replying site
STATUS_KEY = "status"  # ConfigRecord of a site's refusal ("refused": reason)
WEIGHT_KEY = "weight"  # the plaintext aggregation weight a site applied before encrypting (in METRICS_KEY)
WEIGHT_TOTAL_KEY = "weight-total"  # sum of the sampled sites' declared sizes (in CONFIG_KEY)
TASK_ID_KEY = "task-id"  # "<name>/<run id>": what signatures and the privacy ledger bind to (in CONFIG_KEY)
CT_PREFIX = "ct-"  # encrypted global model / update: ArrayRecord of uint8 ciphertext chunks "ct-00000", ...
CT_WEIGHT = "ct-weight"  # float64[1] in an encrypted global model: the weight the sum must be divided by
EPSILON_KEY = "epsilon"  # a site's spend on this task so far (in METRICS_KEY)
EPSILON_TOTAL_KEY = "epsilon-site"  # the site's total spend across tasks (in METRICS_KEY)
SEGMENTS_KEY = "segments"  # segmented training: the run's segment layout as JSON (in CONFIG_KEY)
SEGMENT_NAMES = "segment-names"  # the segments this site trains this round (in CONFIG_KEY)
SEGMENT_WEIGHT_TOTALS = "segment-weight-totals"  # per segment above: its training sites' declared sizes, summed


def segment_key(name: str) -> str:
    """A plaintext segment update: one float32 vector of the segment's values (ArrayRecord key)."""
    return f"seg:{name}"


def segment_chunk_key(name: str, index: int) -> str:
    """Chunk ``index`` of an encrypted segment, in an update or in the global model (ArrayRecord key)."""
    return f"seg:{name}:ct:{index:05d}"


def segment_weight_key(name: str) -> str:
    """An encrypted segment's weight: applied by a site (MetricRecord) or summed in the global model (ArrayRecord)."""
    return f"seg:{name}:weight"


SCORE_KEY = "val-accuracy"  # a site's validation score of its trained local model (in METRICS_KEY of a train reply)
# Encrypted FedAtt (two phases per round, see strategies/encrypted_attention.py), in CONFIG_KEY / METRICS_KEY:
ATTENTION_PHASE = "attention-phase"  # "scores": train and report distances; "combine": send the weighted share
ATTENTION_STEP = "attention-step"  # the server step size epsilon
ATTENTION_WEIGHTS = "attention-weights"  # phase 2: this site's softmax weight per tensor, in state-dict order
ATTENTION_DISTANCES = "attention-distances"  # phase 1 reply: ||w - w_k|| per tensor, in state-dict order
ENSEMBLE_KEY = "ensemble"  # voting ensemble: "majority" or "soft" (in CONFIG_KEY); the global record holds members
MEMBER_PREFIX = "member/"  # a voting ensemble's global record: "member/<site>/<parameter>" per sub-model


def member_key(site: str, parameter: str) -> str:
    """Record key of ``parameter`` of ``site``'s sub-model in a voting ensemble."""
    return f"{MEMBER_PREFIX}{site}/{parameter}"
