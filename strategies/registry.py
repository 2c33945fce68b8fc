"""Strategies by name: the built-in ones, registered ones, and ``"package.module:Class"`` paths.

The public API for custom strategies is :class:`strategies.WeightedFedAvg`: subclass
it and override :meth:`~strategies.WeightedFedAvg.aggregate_arrays` (how accepted
replies become the new global model). Reply validation, signature checks, site
sampling, refusals and the per-round report stay the framework's. Then either
register the class (:func:`register_strategy`) or name it in the config as
``strategy.name = "my_package.module:MyStrategy"``; ``strategy.options`` are passed
to its constructor as keyword arguments.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from dmsc_fed.config import FederationConfig
from dmsc_fed.errors import ConfigError
from strategies.fedavg import WeightedFedAvg

S = TypeVar("S", bound=type[WeightedFedAvg])

STRATEGIES: dict[str, type[WeightedFedAvg]] = {"fedavg": WeightedFedAvg}

#: Constructor arguments the framework sets itself; options may not override them.
RESERVED = frozenset(
    {"sites", "expected_arrays", "fraction_train", "fraction_evaluate", "min_sites", "on_round", "reply_check", "seed"}
)


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a :class:`WeightedFedAvg` subclass available under ``name``."""

    def deco(cls: S) -> S:
        if not (inspect.isclass(cls) and issubclass(cls, WeightedFedAvg)):
            raise TypeError(f"{cls!r} must subclass strategies.WeightedFedAvg to be registered")
        STRATEGIES[name] = cls
        return cls

    return deco


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if os.getcwd() not in sys.path:  # a user module next to where the command runs
            sys.path.insert(0, os.getcwd())
            try:
                return importlib.import_module(module)
            except ModuleNotFoundError:
                pass
        raise ConfigError(f"strategy module {module!r} cannot be imported: {err}") from None
    except Exception as err:
        raise ConfigError(f"importing strategy module {module!r} failed: {type(err).__name__}: {err}") from None


def resolve_strategy(name: str) -> type[WeightedFedAvg]:
    """The strategy class for a built-in or registered name, or a ``"module:Class"`` path."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        raise ConfigError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)} or 'package.module:Class'")
    module_name, _, attr = name.partition(":")
    module = _import(module_name)
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"strategy module {module_name!r} has no attribute {attr!r}")
    if not (inspect.isclass(cls) and issubclass(cls, WeightedFedAvg)):
        raise ConfigError(f"strategy {name!r} must be a class that subclasses strategies.WeightedFedAvg")
    return cls


def check_options(cls: type[WeightedFedAvg], options: Mapping[str, Any]) -> None:
    """Raise ConfigError if ``options`` are not keyword arguments ``cls`` accepts."""
    reserved = sorted(RESERVED & set(options))
    if reserved:
        raise ConfigError(f"strategy.options {reserved} are set by the framework, not by options")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and cls is not WeightedFedAvg:
        return
    accepted = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"strategy {cls.__name__} does not take option(s) {unknown}; it takes {sorted(accepted - RESERVED)}"
        )


def strategy_for(cfg: FederationConfig) -> type[WeightedFedAvg]:
    """The strategy class of task ``cfg``, checked: importable, options accepted, fits the privacy settings."""
    cls = resolve_strategy(cfg.strategy.name)
    check_options(cls, cfg.strategy.options)
    seg = cfg.segmentation
    if seg is not None:
        from strategies.segmented import BlockFedAvg

        if seg.mode != "block":
            raise ConfigError(
                f"segmented training in mode {seg.mode!r} is validated but not yet run by this version "
                "(block mode is); remove [segmentation] to train the whole model"
            )
        if cfg.privacy.encryption != "off":
            raise ConfigError("block mode cannot encrypt its per-block updates yet: set privacy.encryption = 'off'")
        if cls is not WeightedFedAvg:
            raise ConfigError(f"block mode averages each block (strategy 'fedavg'), not {cfg.strategy.name!r}")
        return BlockFedAvg
    if cfg.privacy.encryption != "off" and cls is not WeightedFedAvg:
        raise ConfigError(
            f"strategy {cfg.strategy.name!r} aggregates plaintext updates; with encryption on the server can only "
            "add ciphertexts (strategy 'fedavg')"
        )
    return cls
