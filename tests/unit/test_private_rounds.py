"""A site's train handler and the server's encrypted strategy, run in-process with real
Opacus, TenSEAL and signatures (no Flower processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from clients.site import handle_join, handle_train
from dmsc_fed.errors import PrivacyError
from dmsc_fed.privacy.dp import LedgerEntry, PrivacyLedger
from dmsc_fed.privacy.he import decrypt, flatten, load_public_context, load_secret_context
from dmsc_fed.security.provision import ServerKeys, provision
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.wire import CONFIG_KEY, CT_WEIGHT, ROUND_KEY, TASK_ID_KEY, TASK_KEY, WEIGHT_TOTAL_KEY
from server.loop import signature_check
from strategies import EncryptedFedAvg, TaskFinished
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("flwr_identity")
SITES = ["a", "b", "c"]
TASK = "t/1"
PRIVACY = {"dp": "on", "target_epsilon": 3.0, "delta": 1e-5, "encryption": "ckks"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(out=tmp_path_factory.mktemp("keys") / "fed", sites=SITES)


def _cfg(**privacy):
    return make_config(rounds=3, dataset={"name": "breast_cancer", "scaling": "local"}, privacy=PRIVACY | privacy)


def _node(keys: Path, site: str, state: Path, **extra: str) -> dict[str, str]:
    return {"site-name": site, "keys-dir": str(keys / "sites" / site), "state-dir": str(state)} | extra


def _sites(cfg) -> dict[int, SiteInfo]:
    from dmsc_fed.data import describe_site

    out = {}
    for i, name in enumerate(SITES, start=1):
        d = describe_site(cfg=cfg, site=name)
        out[i] = SiteInfo(name=name, node_id=i, num_train=d.num_train, num_test=d.num_test, device="cpu", version="t")
    return out


def _message(cfg, arrays: ArrayRecord, server_round: int, total: int, node: int) -> Message:
    config = ConfigRecord(
        {TASK_KEY: cfg.to_json(), TASK_ID_KEY: TASK, ROUND_KEY: server_round, WEIGHT_TOTAL_KEY: total}
    )
    return Message(content=RecordDict({"arrays": arrays, CONFIG_KEY: config}), dst_node_id=node, message_type="train")


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _strategy(cfg, keys: Path, sites: dict[int, SiteInfo], initial: ArrayRecord) -> EncryptedFedAvg:
    from dmsc_fed.privacy.he import ciphertext_bytes_limit, get_profile

    server = ServerKeys.load(keys / "server")
    profile = get_profile(server.he_profile)
    return EncryptedFedAvg.for_encrypted_model(
        initial=initial,
        public_context=load_public_context(server.he_public.read_bytes()),
        slots=profile.slots,
        max_chunk_bytes=ciphertext_bytes_limit(profile),
        sites=sites,
        min_sites=1,
        reply_check=signature_check(server, TASK),
    )


def _round(cfg, keys, state, strategy, arrays, server_round, tamper=None):
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid(list(strategy.sites))))
    total = int(msgs[0].content[CONFIG_KEY][WEIGHT_TOTAL_KEY])
    replies = []
    for msg in msgs:
        node = msg.metadata.dst_node_id
        site = strategy.sites[node].name
        request = _message(cfg, arrays, server_round, total, node)
        content = handle_train(request.content, _node(keys, site, state))
        if tamper is not None:
            content = tamper(node, content)
        replies.append(Message(content=content, reply_to=request))
    return replies


def test_encrypted_signed_dp_round(keys: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    sites = _sites(cfg)
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    strategy = _strategy(cfg, keys, sites, initial)
    replies = _round(cfg, keys, tmp_path, strategy, initial, 1)

    # Nothing the server receives holds a plaintext parameter: only uint8 ciphertext chunks.
    for r in replies:
        arrays = r.content["arrays"]
        assert all(k.startswith("ct-") and a.dtype == "uint8" for k, a in arrays.items())
        assert r.content["metrics"]["epsilon"] > 0

    secret = load_secret_context((keys / "sites" / "a" / "he-secret.ctx").read_bytes())
    _, layout = flatten({k: v.numpy() for k, v in model_for(cfg).state_dict().items()})

    def plain(r):  # what each site sent, decrypted (only a holder of the secret key can do this)
        chunks = [r.content["arrays"][k].numpy().tobytes() for k in sorted(r.content["arrays"])]
        return decrypt(ctx=secret, chunks=chunks, length=layout.size)

    sent = [plain(r) for r in replies]
    weights = [float(r.content["metrics"]["weight"]) for r in replies]

    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None and strategy.reports[-1].rejected == []
    assert set(agg) == {*(f"ct-{i:05d}" for i in range(strategy.num_chunks)), CT_WEIGHT}
    chunks = [agg[k].numpy().tobytes() for k in sorted(agg) if k != CT_WEIGHT]
    got = decrypt(ctx=secret, chunks=chunks, length=layout.size) / float(agg[CT_WEIGHT].numpy()[0])
    # The sites applied w_i before encrypting: the plaintext weighted average is sum(sent) / sum(w).
    expected = np.sum(sent, axis=0) / sum(weights)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_tampered_forged_and_replayed_updates_are_rejected(keys: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    sites = _sites(cfg)
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    strategy = _strategy(cfg, keys, sites, initial)
    first = _round(cfg, keys, tmp_path, strategy, initial, 1)
    agg, _ = strategy.aggregate_train(1, first)
    assert agg is not None
    strategy.aggregate_evaluate(1, [])

    old = {r.metadata.src_node_id: r.content for r in first}

    def attack(node: int, content: RecordDict) -> RecordDict:
        if node == 1:  # bit flip in a ciphertext
            data = content["arrays"]["ct-00000"].numpy().copy()
            data[100] ^= 0x01
            content["arrays"]["ct-00000"] = Array(data)
        elif node == 2:  # site b resends its round-1 update in round 2
            return old[2]
        elif node == 3:  # node of site c sends site a's round-1 update
            return old[1]
        return content

    replies = _round(cfg, keys, tmp_path, strategy, agg, 2, tamper=attack)
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is None  # nothing valid to aggregate: the global model stays as it was
    reasons = {r["site"]: r["reason"] for r in strategy.reports[-1].rejected}
    assert "invalid signature" in reasons["a"]
    assert "replayed update: identical to the signed update received in round 1" in reasons["b"]
    assert "signed as site 'a' but sent by the node of site 'c'" in reasons["c"]


def test_site_over_budget_stops_and_the_run_goes_on(keys: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    sites = _sites(cfg)
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    # Site a already spent its whole task budget in earlier rounds of this task.
    PrivacyLedger(tmp_path / "a" / "privacy-ledger.json").record(
        LedgerEntry(task=TASK, round=0, noise_multiplier=0.5, sample_rate=1.0, steps=40)
    )
    strategy = _strategy(cfg, keys, sites, initial)
    replies = _round(cfg, keys, tmp_path, strategy, initial, 1)
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None
    report = strategy.reports[-1]
    assert report.train_sites == ["b", "c"]
    assert report.refused[0]["site"] == "a" and "privacy budget" in report.refused[0]["reason"]
    assert 1 in strategy.retired
    strategy.retired.update({2: "spent", 3: "spent"})
    with pytest.raises(TaskFinished, match="no site can train"):
        strategy.configure_train(2, agg, ConfigRecord(), Grid([1, 2, 3]))


def test_privacy_fails_closed(keys: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    request = _message(cfg, initial, 1, 500, 1).content
    # No key material: nothing can be encrypted or signed, so nothing is sent.
    with pytest.raises(PrivacyError, match="no key material"):
        handle_train(request, {"site-name": "a", "state-dir": str(tmp_path)})
    # A broken CKKS secret context.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (keys / "sites" / "a").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "he-secret.ctx").write_bytes(b"not a context")
    with pytest.raises(PrivacyError):
        handle_train(request, _node(keys, "a", tmp_path) | {"keys-dir": str(broken)})
    # An unreadable privacy ledger never resets the spend to zero.
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "privacy-ledger.json").write_text("garbage")
    with pytest.raises(PrivacyError, match="unreadable"):
        handle_train(request, _node(keys, "a", tmp_path / "bad"))
    # A target no noise can reach within the planned rounds.
    hopeless = _cfg(target_epsilon=1e-6, delta=1e-12)
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        handle_train(_message(hopeless, initial, 1, 500, 1).content, _node(keys, "a", tmp_path / "h"))


def test_weaker_task_is_refused_by_site_policy(keys: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("min_noise_multiplier = 2.0\nmax_epsilon = 1.0\nrequire_encryption = true\n")
    cfg = _cfg()  # asks for epsilon 3 > the site's 1
    request = RecordDict({CONFIG_KEY: ConfigRecord({TASK_KEY: cfg.to_json()})})
    reply = handle_join(request, _node(keys, "a", tmp_path, policy=str(policy)))
    assert "target epsilon 3 exceeds the site's maximum 1" in str(reply["join"]["refused"])
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    train_reply = handle_train(
        _message(cfg, initial, 1, 500, 1).content, _node(keys, "a", tmp_path, policy=str(policy))
    )
    assert "arrays" not in train_reply and "refused" in train_reply["status"]
