"""Encrypted FedAtt, both phases in-process with real sites (Opacus off, TenSEAL, signatures): the decrypted
result equals plaintext FedAtt on the same models, and the server never receives a parameter in phase 1."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message

from clients import attention
from clients.site import handle_train
from dmsc_fed.errors import ConfigError
from dmsc_fed.privacy.he import (
    ciphertext_bytes_limit,
    decrypt_model,
    get_profile,
    load_public_context,
    load_secret_context,
)
from dmsc_fed.security.provision import ServerKeys, SiteKeys, provision
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.wire import ATTENTION_DISTANCES, CT_WEIGHT, TASK_ID_KEY, TASK_KEY
from server.loop import signature_check
from strategies.aggregators import fedatt
from strategies.encrypted_attention import EncryptedFedAtt
from strategies.registry import strategy_for
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("flwr_identity")
SITES = ["a", "b", "c"]
TASK = "t/1"


class SiteGrid:
    """Delivers messages to the real site handlers, like a SuperLink would; copies phase-1 pairs before phase 2."""

    def __init__(self, nodes: dict[int, dict[str, str]], keep: Path) -> None:
        self.nodes = nodes
        self.keep = keep
        self.dropped: set[int] = set()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        for node in self.nodes.values():
            for path in (Path(node["state-dir"]) / node["site-name"]).rglob("*.npz"):
                shutil.copy(path, self.keep / f"{node['site-name']}.npz")
        return [
            Message(content=handle_train(m.content, self.nodes[m.metadata.dst_node_id]), reply_to=m)
            for m in messages
            if m.metadata.dst_node_id not in self.dropped
        ]


def _setup(tmp_path: Path) -> tuple[Any, EncryptedFedAtt, SiteGrid, ArrayRecord, Path]:
    keys = provision(out=tmp_path / "keys", sites=SITES)
    cfg = make_config(
        rounds=1,
        dataset={"name": "breast_cancer", "scaling": "local"},
        model={"name": "mlp", "hidden": [4]},
        strategy={"name": "fedatt", "options": {"step_size": 0.5}},
        privacy={"encryption": "ckks"},
    )
    from dmsc_fed.data import describe_site

    sites = {}
    nodes = {}
    for i, name in enumerate(SITES, start=1):
        d = describe_site(cfg=cfg, site=name)
        sites[i] = SiteInfo(name=name, node_id=i, num_train=d.num_train, num_test=d.num_test, device="cpu", version="t")
        nodes[i] = {"site-name": name, "keys-dir": str(keys / "sites" / name), "state-dir": str(tmp_path / "state")}
    server = ServerKeys.load(keys / "server")
    profile = get_profile(server.he_profile)
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    strat = EncryptedFedAtt.for_encrypted_model(
        initial=initial,
        public_context=load_public_context(server.he_public.read_bytes()),
        slots=profile.slots,
        max_chunk_bytes=ciphertext_bytes_limit(profile),
        sites=sites,
        min_sites=1,
        reply_check=signature_check(server, TASK),
        step_size=0.5,
    )
    keep = tmp_path / "keep"
    keep.mkdir()
    return cfg, strat, SiteGrid(nodes, keep), initial, keys


def _round(
    cfg: Any, strat: EncryptedFedAtt, grid: SiteGrid, initial: ArrayRecord
) -> tuple[ArrayRecord | None, list[Message]]:
    config = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: TASK})
    msgs = list(strat.configure_train(1, initial, config, grid))  # type: ignore[arg-type]
    replies = [Message(content=handle_train(m.content, grid.nodes[m.metadata.dst_node_id]), reply_to=m) for m in msgs]
    arrays, _ = strat.aggregate_train(1, replies)
    return arrays, replies


def test_encrypted_fedatt_equals_plaintext_fedatt(tmp_path: Path) -> None:
    cfg, strat, grid, initial, keys = _setup(tmp_path)
    assert strategy_for(cfg) is EncryptedFedAtt
    arrays, replies = _round(cfg, strat, grid, initial)
    for r in replies:  # phase 1: distances only, no parameters
        assert "arrays" not in r.content and len(r.content["metrics"][ATTENTION_DISTANCES]) == len(initial)
    assert arrays is not None and not strat.reports[-1].rejected
    assert arrays[CT_WEIGHT].numpy() == pytest.approx(np.ones(len(initial)))
    server = {k: a.numpy() for k, a in initial.items()}
    locals_ = []
    for name in SITES:
        with np.load(grid.keep / f"{name}.npz") as saved:
            locals_.append({k: saved[f"l{i}"] for i, k in enumerate(server)})
    expected = fedatt(server=server, updates=locals_, step_size=0.5)
    ctx = load_secret_context(SiteKeys.load(keys / "sites" / "a").he_secret.read_bytes())
    got = decrypt_model(values={k: a.numpy() for k, a in arrays.items()}, reference=server, ctx=ctx)
    for k in server:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-5)
    assert set(strat.last_attention) == set(SITES)
    assert not list((tmp_path / "state").rglob("*.npz"))  # sites deleted their saved pairs


def test_a_missing_share_renormalises_over_the_others(tmp_path: Path) -> None:
    cfg, strat, grid, initial, keys = _setup(tmp_path)
    grid.dropped = {3}
    arrays, _ = _round(cfg, strat, grid, initial)
    assert arrays is not None
    rejected = strat.reports[-1].rejected
    assert rejected == [{"site": "c", "stage": "attention", "reason": "no attention share in time"}]
    weight = arrays[CT_WEIGHT].numpy()
    alpha = strat.last_attention
    expected = [alpha["a"][k] + alpha["b"][k] for k in initial]
    np.testing.assert_allclose(weight, expected)
    server = {k: a.numpy() for k, a in initial.items()}
    ctx = load_secret_context(SiteKeys.load(keys / "sites" / "a").he_secret.read_bytes())
    got = decrypt_model(values={k: a.numpy() for k, a in arrays.items()}, reference=server, ctx=ctx)
    locals_ = []
    for name in ("a", "b"):
        with np.load(grid.keep / f"{name}.npz") as saved:
            locals_.append({k: saved[f"l{i}"] for i, k in enumerate(server)})
    for k in server:
        a, b = alpha["a"][k], alpha["b"][k]
        mix = (a * locals_[0][k] + b * locals_[1][k]) / (a + b)
        np.testing.assert_allclose(got[k], 0.5 * server[k] + 0.5 * mix, atol=1e-5)


def test_fedatt_noise_is_refused_with_encryption() -> None:
    cfg = make_config(strategy={"name": "fedatt", "options": {"noise_std": 0.1}}, privacy={"encryption": "ckks"})
    with pytest.raises(ConfigError, match="noise_std"):
        strategy_for(cfg)


def test_phase_two_without_phase_one_state_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no phase-1 state"):
        attention.share(
            state_dir=tmp_path, task_id=TASK, server_round=1, weights=[1.0], step_size=1.0, encrypt=lambda v: []
        )
