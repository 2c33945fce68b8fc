"""Configuration of a federation run: one frozen pydantic model, loaded from TOML.

Every section forbids unknown keys, so a typo is an error naming the key rather
than a silently ignored setting. :func:`load_config` turns pydantic's errors into a
:class:`~dmsc_fed.errors.ConfigError` that names the field, the value and why.

Example:
-------
>>> cfg = load_config(path=Path("examples/hospital/config.toml"))  # doctest: +SKIP
>>> cfg.rounds, [s.name for s in cfg.sites]  # doctest: +SKIP

"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmsc_fed.errors import ConfigError, invalid_settings
from dmsc_fed.segmentation.spec import SegmentationSpec

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
IMAGE_MODELS = ("cnn",)
IMAGE_DATASETS = ("digits",)
_STRATEGY_NAME = re.compile(r"^([A-Za-z0-9][\w-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSpec(_Frozen):
    """One data-holding site (a hospital, a bank).

    Attributes
    ----------
    name
        Unique site name; it is also the SuperNode's ``site-name`` node config.
    data_path
        The site's own CSV file, for ``dataset.name = "csv"``. On a real
        deployment the site passes it to ``dmsc-fed client --data`` instead.
    pool
        The resource pool the site belongs to (``cpu`` or ``gpu``).
    policy
        The site's privacy policy file, for local runs (a real site passes it
        to ``dmsc-fed client --policy``).

    """

    name: Annotated[str, Field(pattern=SITE_NAME_PATTERN)]
    data_path: Path | None = None
    pool: Literal["cpu", "gpu"] = "cpu"
    policy: Path | None = None


class DatasetSpec(_Frozen):
    """Which data each site trains on and how the bundled sets are split.

    ``breast_cancer`` and ``digits`` ship with scikit-learn and are split across
    the sites IID or by Dirichlet(``alpha``) label skew, deterministically by
    the run's seed. ``csv`` reads each site's own file.
    """

    name: Literal["breast_cancer", "digits", "csv"] = "breast_cancer"
    partitioning: Literal["iid", "dirichlet"] = "iid"
    alpha: Annotated[float, Field(gt=0.0, le=1000.0)] = 0.5
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    scaling: Literal["federated", "local"] = "federated"
    min_samples_per_site: Annotated[int, Field(ge=2)] = 10
    label_column: str | None = None
    feature_columns: list[str] | None = None
    num_classes: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _csv_needs_schema(self) -> DatasetSpec:
        if self.name == "csv":
            if not self.label_column:
                raise ValueError("dataset.name = 'csv' needs label_column")
            if not self.feature_columns:
                raise ValueError("dataset.name = 'csv' needs feature_columns (a list of column names)")
            if self.num_classes is None:
                raise ValueError("dataset.name = 'csv' needs num_classes")
            if self.label_column in self.feature_columns:
                raise ValueError(f"label_column {self.label_column!r} is also listed in feature_columns")
            if len(set(self.feature_columns)) != len(self.feature_columns):
                raise ValueError("feature_columns lists a column twice")
        elif self.label_column or self.feature_columns or self.num_classes:
            raise ValueError(
                f"label_column, feature_columns and num_classes apply to csv data only, not to {self.name!r}"
            )
        return self


class ModelSpec(_Frozen):
    """A model from the zoo (:mod:`dmsc_fed.models.zoo`), all Opacus-compatible."""

    name: Literal["logreg", "mlp", "cnn"] = "logreg"
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [32])
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class StrategySpec(_Frozen):
    """The server-side aggregation strategy.

    ``name`` is a registered strategy (``fedavg``, ``median``, ``trimmed-mean``,
    ``krum``) or a user's ``"package.module:Class"`` subclassing
    ``strategies.WeightedFedAvg``; ``options`` go to its constructor.
    """

    name: str = "fedavg"
    options: dict[str, float | int | bool | str] = Field(default_factory=dict)
    fraction_train: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    fraction_evaluate: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    min_sites: Annotated[int, Field(ge=1)] | None = None
    round_timeout_s: Annotated[float, Field(gt=0.0, le=86400.0)] = 600.0
    join_timeout_s: Annotated[float, Field(gt=0.0, le=86400.0)] = 300.0

    @field_validator("name")
    @classmethod
    def _name_or_import_path(cls, value: str) -> str:
        if _STRATEGY_NAME.match(value):
            return value
        raise ValueError(
            f"strategy {value!r} is neither a strategy name (e.g. 'fedavg') nor an import path 'package.module:Class'"
        )


class PrivacySpec(_Frozen):
    """Privacy settings the task asks for. A site's own policy can only tighten them.

    ``dp = "on"`` trains with DP-SGD (Opacus) at every site, with either a fixed
    ``noise_multiplier`` or a ``target_epsilon`` that each site reaches over the
    planned rounds (the site calibrates its own noise to its data size). Each
    site stops training once its next round would take its spend for this task
    past ``epsilon_budget`` (default: ``target_epsilon``). ``encryption = "ckks"``
    encrypts every update with TenSEAL CKKS before it leaves the site; the server
    only adds ciphertexts.
    """

    dp: Literal["off", "on"] = "off"
    noise_multiplier: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    target_epsilon: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    max_grad_norm: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    epsilon_budget: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    encryption: Literal["off", "ckks"] = "off"
    he_profile: str = "add-128"

    @model_validator(mode="after")
    def _dp_settings(self) -> PrivacySpec:
        given = [k for k in ("noise_multiplier", "target_epsilon", "epsilon_budget") if getattr(self, k) is not None]
        if self.dp == "off":
            if given:
                raise ValueError(f"{given} apply only with dp = 'on'")
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp = 'on' needs exactly one of noise_multiplier or target_epsilon")
        return self

    @property
    def budget(self) -> float | None:
        """The per-site epsilon budget of this task (None: only the site's policy bounds it)."""
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon


class FederationConfig(_Frozen):
    """Everything one federated training run needs, validated and frozen."""

    name: Annotated[str, Field(pattern=SITE_NAME_PATTERN)] = "federation"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 3
    local_epochs: Annotated[int, Field(ge=1, le=10_000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    sites: Annotated[list[SiteSpec], Field(min_length=1, max_length=10_000)]
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    segmentation: SegmentationSpec | None = None

    @field_validator("sites")
    @classmethod
    def _unique_site_names(cls, sites: list[SiteSpec]) -> list[SiteSpec]:
        seen: set[str] = set()
        for site in sites:
            if site.name in seen:
                raise ValueError(f"site name {site.name!r} appears twice")
            seen.add(site.name)
        return sites

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.model.name in IMAGE_MODELS and self.dataset.name not in IMAGE_DATASETS:
            raise ValueError(
                f"model {self.model.name!r} needs image data ({list(IMAGE_DATASETS)}), not {self.dataset.name!r}"
            )
        if self.strategy.min_sites is not None and self.strategy.min_sites > len(self.sites):
            raise ValueError(
                f"strategy.min_sites = {self.strategy.min_sites} is more than the {len(self.sites)} sites configured"
            )
        return self

    @property
    def min_sites(self) -> int:
        """Sites that must reply for a round to count (all by default)."""
        return self.strategy.min_sites or len(self.sites)

    def site_index(self, name: str) -> int:
        """Position of site ``name`` in :attr:`sites`; raises ConfigError if absent."""
        for i, site in enumerate(self.sites):
            if site.name == name:
                return i
        raise ConfigError(
            f"site {name!r} is not a member of federation {self.name!r} (members: {[s.name for s in self.sites]})"
        )

    def to_json(self) -> str:
        """Canonical JSON form, used on the wire and in the run directory."""
        return self.model_dump_json()


def parse_config(*, data: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> FederationConfig:
    """Validate a config mapping; relative site data paths resolve against ``base_dir``."""
    try:
        cfg = FederationConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(invalid_settings(err, source)) from None
    if base_dir is not None:
        sites = [
            s.model_copy(
                update={
                    key: (base_dir / value).resolve()
                    for key in ("data_path", "policy")
                    if (value := getattr(s, key)) is not None and not value.is_absolute()
                }
            )
            for s in cfg.sites
        ]
        cfg = cfg.model_copy(update={"sites": sites})
    return cfg


def load_config(*, path: Path) -> FederationConfig:
    """Load and validate a federation config from a TOML file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(data=data, source=str(path), base_dir=path.resolve().parent)


def config_from_json(text: str) -> FederationConfig:
    """Inverse of :meth:`FederationConfig.to_json` (used by the Flower apps)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"run config is not valid JSON: {err}") from None
    return parse_config(data=data, source="run config")
