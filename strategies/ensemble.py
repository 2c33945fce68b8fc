"""A voting ensemble of the sites' models: draft-yang-dmsc-distributed-model-03, section 6.2.7 (voting).

Instead of averaging parameters, the server keeps every site's trained model as a
member of an ensemble, and the ensemble's prediction is a vote of the members: hard
(plurality) voting over their predicted classes or soft voting over their class
probabilities (Kuncheva 2004, "Combining Pattern Classifiers"; scikit-learn's
``VotingClassifier``). Each round a site trains its own member further (in round 1,
the common initial model) and returns it in full; the global record holds every
member as ``member/<site>/<parameter>``, and a member whose site did not reply keeps
its previous parameters. At evaluation every site scores the whole ensemble on its
held-out split (:mod:`dmsc_fed.voting`). Plaintext only: the server holds every
member, which is why sites should train them with DP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ARRAYS_KEY, ENSEMBLE_KEY, MEMBER_PREFIX, member_key
from strategies.fedavg import WeightedFedAvg
from strategies.registry import register_strategy

VOTING = ("majority", "soft")


@register_strategy("vote")
class VotingEnsemble(WeightedFedAvg):
    """Keep every site's model; predict by majority or soft voting (option ``voting``)."""

    def __init__(self, *, voting: str = "soft", **kwargs: Any) -> None:
        if voting not in VOTING:
            raise ConfigError(f"strategy option voting must be one of {list(VOTING)}, got {voting!r}")
        super().__init__(**kwargs)
        self.voting = voting

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg; the message says the model is an ensemble."""
        config[ENSEMBLE_KEY] = self.voting
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every evaluating site scores the whole ensemble by the vote."""
        config[ENSEMBLE_KEY] = self.voting
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """The members: each replying site's model, the previous member of every other site."""
        previous = self.current if self.current is not None else ArrayRecord()
        members = ArrayRecord({k: a for k, a in previous.items() if k.startswith(MEMBER_PREFIX)})
        for site, content in accepted:
            arrays = content[ARRAYS_KEY]
            assert isinstance(arrays, ArrayRecord)  # checked by check_train
            for key, array in arrays.items():
                members[member_key(site.name, key)] = array
        return members
