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
