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
SEGMENT_BLOCKS = "segment-blocks"  # block mode: ids of the blocks this site trains (in CONFIG_KEY)
SEGMENT_OFFSETS = "segment-offsets"  # their offsets in the flat parameter vector
SEGMENT_LENGTHS = "segment-lengths"  # their lengths
BLOCK_PREFIX = "block-"  # a site's block-mode update: ArrayRecord "block-00003", ... of float32 values
