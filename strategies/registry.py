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
from typing import Any, TypeVar, cast

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
    accepted: set[str] = set()
    for klass in cls.__mro__:  # a subclass passing **kwargs on accepts what its bases accept
        if not (isinstance(klass, type) and issubclass(klass, WeightedFedAvg)):
            break
        params = inspect.signature(klass.__init__).parameters
        accepted |= {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"strategy {cls.__name__} does not take option(s) {unknown}; it takes {sorted(accepted - RESERVED)}"
        )


#: The per-segment rule each built-in strategy stands for in segmented training.
SEGMENT_RULES = {
    "fedavg": "mean",
    "median": "median",
    "trimmed-mean": "trimmed-mean",
    "krum": "krum",
    "fedatt": "attention",
}


def segment_rule(cfg: FederationConfig) -> str:
    """The default per-segment rule of a segmented task: the spec's, else the one its strategy stands for."""
    seg = cfg.segmentation
    assert seg is not None
    if seg.aggregation.default is not None:
        return seg.aggregation.default
    try:
        return SEGMENT_RULES[cfg.strategy.name]
    except KeyError:
        raise ConfigError(
            f"segmented training aggregates each segment by a rule; strategy {cfg.strategy.name!r} is not one. "
            f"Use strategy {sorted(SEGMENT_RULES)} or set [segmentation.aggregation] default"
        ) from None


def rule_options(cfg: FederationConfig) -> dict[str, dict[str, float]]:
    """Rule -> options: the strategy's options for its own rule, under ``[segmentation.aggregation.options]``."""
    seg = cfg.segmentation
    assert seg is not None
    out: dict[str, dict[str, float]] = {}
    own = SEGMENT_RULES.get(cfg.strategy.name)
    if own is not None and cfg.strategy.options:
        out[own] = {}
        for key, value in cfg.strategy.options.items():
            if isinstance(value, dict | str):
                raise ConfigError(f"strategy option {key!r} of rule {own!r} must be a number, got {value!r}")
            out[own][key] = float(value)
    for rule, opts in seg.aggregation.options.items():
        out[rule] = out.get(rule, {}) | dict(opts)
    return out


def _check_segment_rules(cfg: FederationConfig) -> None:
    """Encrypted segments can only be added: every rule that may meet one must be ``mean``."""
    from dmsc_fed.segmentation.spec import SegmentPrivacy

    seg = cfg.segmentation
    assert seg is not None
    default = segment_rule(cfg)
    task = SegmentPrivacy(dp=cfg.privacy.dp, encryption=cfg.privacy.encryption)
    if default != "mean" and seg.privacy.default.over(task).encryption != "off":
        raise ConfigError(
            f"segments are encrypted by default, so the server can only add them (rule 'mean'), not apply {default!r}: "
            "set a rule per unencrypted segment in [segmentation.aggregation.segments] instead"
        )
    for name in sorted(set(seg.aggregation.segments) | set(seg.privacy.segments)):
        named = seg.rule_for(name, fallback=default)
        if named != "mean" and seg.privacy_for(name).over(task).encryption != "off":
            raise ConfigError(f"segment {name!r} is encrypted, so it can only be added (rule 'mean'), not {named!r}")


def strategy_for(cfg: FederationConfig) -> type[WeightedFedAvg]:
    """The strategy class of task ``cfg``, checked: importable, options accepted, fits the privacy settings."""
    if cfg.segmentation is not None:
        from dmsc_fed.segmentation.spec import RULE_OPTIONS
        from strategies.segmented import SegmentedFedAvg

        _check_segment_rules(cfg)
        for rule, opts in rule_options(cfg).items():
            unknown = sorted(set(opts) - RULE_OPTIONS[rule])
            if unknown:
                raise ConfigError(f"segment rule {rule!r} does not take option(s) {unknown}")
        return SegmentedFedAvg
    cls = resolve_strategy(cfg.strategy.name)
    check_options(cls, cfg.strategy.options)
    cls.check_config(cfg)
    if cfg.privacy.encryption != "off" and cls.__name__ == "FedAttFedAvg":
        from strategies.encrypted_attention import EncryptedFedAtt

        if float(cast(float, cfg.strategy.options.get("noise_std", 0.0))) != 0.0:
            raise ConfigError("fedatt's server noise (noise_std) is not available with encryption on: set it to 0")
        return EncryptedFedAtt
    if cfg.privacy.encryption != "off" and cls is not WeightedFedAvg:
        raise ConfigError(
            f"strategy {cfg.strategy.name!r} aggregates plaintext updates; with encryption on the server can only "
            "add ciphertexts (strategy 'fedavg')"
        )
    return cls
