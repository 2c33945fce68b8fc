"""FedAvg over CKKS ciphertexts: the server adds encrypted, pre-weighted updates.

Protocol (see SECURITY.md):

1. The server sends the round's ``weight-total`` (sum of the sampled sites'
   declared training sizes) with the global model.
2. Site *i* trains, multiplies its parameters by ``w_i = n_i / weight-total`` in
   plaintext, encrypts them with the federation's CKKS key (TenSEAL), signs the
   reply and sends the ciphertexts with ``w_i`` and ``n_i`` in clear.
3. The server checks each reply (signature, chunk count and size, ``w_i`` against
   ``n_i``), adds the ciphertexts in place with a context that holds no secret
   key, and sums the ``w_i``. The encrypted sum and ``sum(w_i)`` are the new
   global model: sites decrypt and divide, which gives exactly the weighted
   average of FedAvg (McMahan et al. 2017) over the sites that replied.

The server never holds a plaintext parameter after round 1 (whose model is the
public random initialization).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from dmsc_fed.errors import PrivacyError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ARRAYS_KEY, CT_PREFIX, CT_WEIGHT, METRICS_KEY, WEIGHT_KEY, WEIGHT_TOTAL_KEY
from strategies.fedavg import WeightedFedAvg
from strategies.validation import check_encrypted_reply, specs_of


class EncryptedFedAvg(WeightedFedAvg):
    """:class:`WeightedFedAvg` whose aggregation runs on CKKS ciphertexts only.

    Parameters
    ----------
    public_context
        A TenSEAL context without the secret key (checked: a secret key is an error).
    num_values
        Number of model parameters (fixes the number of ciphertext chunks).
    slots, max_chunk_bytes
        Slots per ciphertext and the largest acceptable serialized chunk.

    """

    def __init__(
        self, *, public_context: Any, num_values: int, slots: int, max_chunk_bytes: int, **kwargs: Any
    ) -> None:
        from dmsc_fed.privacy.he import has_secret_key

        if has_secret_key(public_context):
            raise PrivacyError("the server's CKKS context holds a secret key; refusing to aggregate with it")
        super().__init__(**kwargs)
        self.public_context = public_context
        self.num_chunks = math.ceil(num_values / slots)
        self.max_chunk_bytes = max_chunk_bytes
        self._weight_total = 0.0

    @classmethod
    def for_encrypted_model(
        cls, *, initial: ArrayRecord, public_context: Any, slots: int, max_chunk_bytes: int, **kwargs: Any
    ) -> EncryptedFedAvg:
        """Build the strategy for the model whose plaintext initialization is ``initial``."""
        expected = specs_of(initial)
        num_values = sum(int(np.prod(s.shape)) for s in expected.values())
        return cls(
            expected_arrays=expected,
            public_context=public_context,
            num_values=num_values,
            slots=slots,
            max_chunk_bytes=max_chunk_bytes,
            **kwargs,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As in :class:`WeightedFedAvg`; remembers the round's weight total for the weight check."""
        messages = super().configure_train(server_round, arrays, config, grid)
        self._weight_total = float(config.get(WEIGHT_TOTAL_KEY, 0))  # type: ignore[arg-type]
        return messages

    def check_train(self, site: SiteInfo, content: RecordDict, server_round: int) -> str | None:
        """Check an encrypted reply: ciphertext chunks only, sizes, and the weight against the sample count."""
        return check_encrypted_reply(
            content,
            max_examples=site.num_train,
            num_chunks=self.num_chunks,
            max_chunk_bytes=self.max_chunk_bytes,
            weight_total=self._weight_total,
        )

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Add the accepted ciphertexts in place; the weight sum travels with them."""
        from dmsc_fed.privacy.he import aggregate

        updates = [
            [c[ARRAYS_KEY][f"{CT_PREFIX}{i:05d}"].numpy().tobytes() for i in range(self.num_chunks)]  # type: ignore[union-attr]
            for _, c in accepted
        ]
        total = 0.0
        for _, c in accepted:
            total += float(cast(float, cast(MetricRecord, c[METRICS_KEY])[WEIGHT_KEY]))
        chunks = aggregate(ctx=self.public_context, updates=updates)
        record = ArrayRecord(
            {f"{CT_PREFIX}{i:05d}": Array(np.frombuffer(c, dtype=np.uint8)) for i, c in enumerate(chunks)}
        )
        record[CT_WEIGHT] = Array(np.array([total], dtype=np.float64))
        return record
