from __future__ import annotations

from pathlib import Path

import pytest

from dmsc_fed.config import config_from_json, load_config
from dmsc_fed.errors import ConfigError
from tests.conftest import ROOT, make_config

GOOD = """
name = "h"
rounds = 2
[[sites]]
name = "a"
[[sites]]
name = "b"
"""


def test_hospital_example_loads() -> None:
    cfg = load_config(path=ROOT / "examples/hospital/config.toml")
    assert [s.name for s in cfg.sites] == ["st-mary", "general", "childrens"]
    assert cfg.dataset.partitioning == "dirichlet"
    assert cfg.model.name in ("logreg", "mlp")


def test_defaults_and_json_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cfg = load_config(path=p)
    assert cfg.rounds == 2 and cfg.min_sites == 2 and cfg.strategy.name == "fedavg"
    assert config_from_json(cfg.to_json()) == cfg


def test_config_is_frozen(cfg) -> None:
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        cfg.rounds = 5


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('colour = "red"\n', "colour: unknown key"),
        ("rounds = 0\n", "rounds = 0"),
        ('learning_rate = "fast"\n', "learning_rate = 'fast'"),
        ("[model]\nname = 'transformer'\n", "model.name = 'transformer'"),
        ("[model]\nname = 'cnn'\n", "needs image data"),
        ("[dataset]\nname = 'csv'\n", "needs label_column"),
        ("[dataset]\nalpha = -1.0\n", "dataset.alpha = -1.0"),
        ("[strategy]\nmin_sites = 5\n", "min_sites = 5"),
        ("[strategy]\nname = 'fed avg!'\n", "neither a strategy name"),
        ("[privacy]\ndp = 'maybe'\n", "privacy.dp = 'maybe'"),
        ("[privacy]\ndp = 'on'\n", "needs exactly one of noise_multiplier or target_epsilon"),
        ("[privacy]\nnoise_multiplier = 1.0\n", "apply only with dp = 'on'"),
        ("[privacy]\nencryption = 'paillier'\n", "privacy.encryption = 'paillier'"),
    ],
)
def test_bad_values_name_field_value_and_reason(tmp_path: Path, extra: str, needle: str) -> None:
    p = tmp_path / "c.toml"
    sites = '[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n'
    p.write_text(sites + extra if extra.startswith("[") else extra + sites)
    with pytest.raises(ConfigError) as err:
        load_config(path=p)
    assert needle in str(err.value)
    assert str(p) in str(err.value)


def test_duplicate_site_names() -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        make_config(sites=[{"name": "a"}, {"name": "a"}])


def test_site_name_pattern() -> None:
    with pytest.raises(ConfigError, match=r"sites\.0\.name"):
        make_config(sites=[{"name": "bad name"}])


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(path=tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path=p)


def test_relative_data_path_resolves_against_config_dir(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        'rounds = 1\n[dataset]\nname = "csv"\nlabel_column = "y"\nfeature_columns = ["a"]\nnum_classes = 2\n'
        '[[sites]]\nname = "s"\ndata_path = "data/s.csv"\n'
    )
    cfg = load_config(path=p)
    assert cfg.sites[0].data_path == (tmp_path / "data/s.csv").resolve()


def test_site_index_of_non_member(cfg) -> None:
    assert cfg.site_index("b") == 1
    with pytest.raises(ConfigError, match="not a member"):
        cfg.site_index("zzz")


def test_a_quorum_larger_than_the_sites_a_round_trains_on_is_refused() -> None:
    sites = [{"name": f"s{i}"} for i in range(10)]
    make_config(sites=sites, fault={"quorum": 10})  # every site trains by default
    with pytest.raises(ConfigError, match=r"fault.quorum = 3 is more than the 2 sites a round trains on"):
        make_config(sites=sites, strategy={"min_sites": 1, "fraction_train": 0.2}, fault={"quorum": 3})
    make_config(sites=sites, strategy={"min_sites": 3, "fraction_train": 0.2}, fault={"quorum": 3})
