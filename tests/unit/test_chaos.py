"""Fault injection at a site (clients/chaos.py): schedules, the env gate, each fault against the
server's validation and signature checks, and the hook in handle_train."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from clients.chaos import ALLOW_ENV, PADDING_KEY, Chaos, Fault, finish_train
from clients.context import SiteContext
from clients.privacy import sign_reply
from dmsc_fed.errors import ConfigError, PrivacyError
from dmsc_fed.privacy.policy import SitePolicy
from dmsc_fed.privacy.signing import (
    SIGNATURE_KEY,
    Binding,
    create_signing_key,
    load_signing_key,
    load_verify_key,
    sign,
    verify,
)
from dmsc_fed.security.provision import SiteKeys
from strategies.validation import check_reply, specs_of
from tests.conftest import make_config

TASK = "t/1"
STALE = re.compile(r"round 2\b.*\b3\b")  # "bound to round 2, not 3" (or "stale update: ... round 2, this is round 3")


@pytest.fixture
def keys(tmp_path: Path):
    create_signing_key(private=tmp_path / "a.key", public=tmp_path / "a.pub")
    return load_signing_key(tmp_path / "a.key"), load_verify_key(tmp_path / "a.pub")


@pytest.fixture
def allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_ENV, "1")


def _binding(server_round: int, task: str = TASK) -> Binding:
    return Binding(task=task, round=server_round, site="a", stage="train")


def _reply(offset: float = 0.0) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": Array((np.arange(12, dtype=np.float32).reshape(4, 3) / 10 + offset).astype(np.float32)),
                    "b": Array(np.ones(3, dtype=np.float32)),
                    "steps": Array(np.array([7], dtype=np.int64)),
                }
            ),
            "metrics": MetricRecord({"num-examples": 10, "loss": 0.5}),
        }
    )


def _arrays(content: RecordDict) -> ArrayRecord:
    return content.array_records["arrays"]


def _values(content: RecordDict, key: str) -> np.ndarray:
    return _arrays(content)[key].numpy()


SPECS = specs_of(_arrays(_reply()))


def _signer(key: Ed25519PrivateKey) -> Callable[[RecordDict, Binding], RecordDict]:
    def signer(content: RecordDict, binding: Binding) -> RecordDict:
        sign(content, binding=binding, key=key)
        return content

    return signer


def _finish(schedule: str, server_round: int, keys, state: Path, reply: RecordDict | None = None, task: str = TASK):
    return finish_train(
        _reply() if reply is None else reply,
        chaos=Chaos.parse(schedule),
        binding=_binding(server_round, task),
        sign=_signer(keys[0]),
        state_dir=state,
    )


def _wire(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


# --- schedules --------------------------------------------------------------------------------------------------


def test_parse_full_schedule() -> None:
    chaos = Chaos.parse("2:nan,3:shape,4:oversized,5:stale,6:replay,7:slow=45,8:scale=1e4")
    assert chaos.mode_for(1) is None and chaos.mode_for(9) is None
    assert chaos.mode_for(2) == Fault("nan")
    assert chaos.mode_for(3) == Fault("shape")
    assert chaos.mode_for(4) == Fault("oversized")
    assert chaos.mode_for(5) == Fault("stale")
    assert chaos.mode_for(6) == Fault("replay")
    assert chaos.mode_for(7) == Fault("slow", 45.0)
    assert chaos.mode_for(8) == Fault("scale", 1e4)
    assert [Fault("slow", 45.0).label, Fault("scale", 1e4).label, Fault("nan").label] == [
        "slow=45",
        "scale=10000",
        "nan",
    ]


def test_parse_every_round_with_override() -> None:
    chaos = Chaos.parse(" *:slow=0.5 , 3 : nan ")
    assert chaos.mode_for(1) == Fault("slow", 0.5)
    assert chaos.mode_for(3) == Fault("nan")
    assert chaos.mode_for(100) == Fault("slow", 0.5)


@pytest.mark.parametrize(
    ("schedule", "bad"),
    [
        ("2:boom", "boom"),
        ("2:nan,3:Nan", "Nan"),
        ("x:nan", "x:nan"),
        ("0:nan", "0:nan"),
        ("-1:nan", "-1:nan"),
        ("2", "'2'"),
        ("2:", "2:"),
        ("2:nan,2:shape", "2:shape"),
        ("*:nan,*:shape", "*:shape"),
        ("2:slow", "slow"),
        ("2:slow=abc", "slow=abc"),
        ("2:slow=-1", "slow=-1"),
        ("2:scale=inf", "scale=inf"),
        ("2:scale=nan", "scale=nan"),
        ("2:nan=3", "nan=3"),
        ("2:nan,", "empty item"),
    ],
)
def test_parse_rejects_bad_items(schedule: str, bad: str) -> None:
    with pytest.raises(ConfigError, match="chaos") as err:
        Chaos.parse(schedule)
    assert bad in str(err.value)


# --- the env gate -----------------------------------------------------------------------------------------------


def test_no_chaos_key_means_no_chaos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    assert Chaos.from_node_config({"site-name": "a"}) is None
    assert Chaos.from_node_config({"site-name": "a", "chaos": ""}) is None


@pytest.mark.parametrize("env", [None, "0", "yes", ""])
def test_env_gate_refuses(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv(ALLOW_ENV, raising=False)
    else:
        monkeypatch.setenv(ALLOW_ENV, env)
    with pytest.raises(PrivacyError, match="chaos injection requested by node config but DMSC_FED_ALLOW_CHAOS"):
        Chaos.from_node_config({"site-name": "a", "chaos": "2:nan"})


def test_env_gate_allows(allowed: None) -> None:
    chaos = Chaos.from_node_config({"site-name": "a", "chaos": "2:nan"})
    assert chaos is not None and chaos.mode_for(2) == Fault("nan")
    with pytest.raises(ConfigError, match="boom"):
        Chaos.from_node_config({"chaos": "2:boom"})


# --- faults -----------------------------------------------------------------------------------------------------


def test_honest_rounds_of_a_chaos_site_pass(keys, tmp_path: Path) -> None:
    out = _finish("5:nan", 2, keys, tmp_path)
    assert check_reply(out, max_examples=10, expected_arrays=SPECS) is None
    assert verify(out, expected=_binding(2), key=keys[1]) is None
    assert _wire(out) == _wire(_finish_plain(keys, 2))


def _finish_plain(keys, server_round: int) -> RecordDict:
    return _signer(keys[0])(_reply(), _binding(server_round))


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("nan", "non-finite"), ("shape", "shape"), ("oversized", "unexpected parameter|oversized")],
)
def test_content_faults_are_signed_and_rejected_by_validation(keys, tmp_path: Path, mode: str, reason: str) -> None:
    out = _finish(f"2:{mode}", 2, keys, tmp_path)
    assert verify(out, expected=_binding(2), key=keys[1]) is None  # a valid signature: rejected for the real reason
    problem = check_reply(out, max_examples=10, expected_arrays=SPECS)
    assert problem is not None and re.search(reason, problem), problem
    assert "'w'" in problem or mode == "oversized"  # the first floating array is the one changed


def test_nan_keeps_shape_and_dtype(keys, tmp_path: Path) -> None:
    values = _values(_finish("2:nan", 2, keys, tmp_path), "w")
    assert values.shape == (4, 3) and values.dtype == np.float32
    assert 0 < np.isnan(values).sum() < values.size


def test_shape_drops_one_row(keys, tmp_path: Path) -> None:
    out = _finish("2:shape", 2, keys, tmp_path)
    assert _values(out, "w").shape == (3, 3)
    assert _values(out, "w").tolist() == _values(_reply(), "w")[:3].tolist()
    assert _values(out, "b").shape == (3,)


def test_oversized_adds_4_mib(keys, tmp_path: Path) -> None:
    pad = _arrays(_finish("*:oversized", 2, keys, tmp_path))[PADDING_KEY]
    assert pad.dtype == "float32" and pad.numpy().nbytes == 4 * 1024 * 1024


def test_scale_multiplies_floating_arrays(keys, tmp_path: Path) -> None:
    out = _finish("2:scale=1e4", 2, keys, tmp_path)
    honest = _reply()
    np.testing.assert_allclose(_values(out, "w"), _values(honest, "w") * 1e4, rtol=1e-6)
    np.testing.assert_allclose(_values(out, "b"), _values(honest, "b") * 1e4)
    assert _values(out, "steps").tolist() == [7]  # integer arrays untouched
    assert _arrays(out)["w"].dtype == "float32"
    assert check_reply(out, max_examples=10, expected_arrays=SPECS) is None  # finite: it passes validation
    assert verify(out, expected=_binding(2), key=keys[1]) is None


def test_stale_claims_the_previous_round(keys, tmp_path: Path) -> None:
    out = _finish("3:stale", 3, keys, tmp_path)
    reason = verify(out, expected=_binding(3), key=keys[1])
    assert reason is not None and STALE.search(reason), reason
    assert verify(out, expected=_binding(2), key=keys[1]) is None  # a genuine signature, for the old round
    assert check_reply(out, max_examples=10, expected_arrays=SPECS) is None


def test_replay_sends_the_earlier_signed_reply(keys, tmp_path: Path) -> None:
    schedule = "3:replay"
    first = _finish(schedule, 1, keys, tmp_path, reply=_reply(1.0))
    second = _finish(schedule, 2, keys, tmp_path, reply=_reply(2.0))
    assert list((tmp_path / "chaos").rglob("round-*.pb"))
    out = _finish(schedule, 3, keys, tmp_path, reply=_reply(3.0))
    assert _wire(out) == _wire(second) != _wire(first)  # the latest earlier round, byte for byte
    assert out.config_records[SIGNATURE_KEY]["signature"] == second.config_records[SIGNATURE_KEY]["signature"]
    reason = verify(out, expected=_binding(3), key=keys[1])
    assert reason is not None and STALE.search(reason), reason
    assert verify(out, expected=_binding(2), key=keys[1]) is None


def test_replay_without_an_earlier_reply_is_stale(keys, tmp_path: Path) -> None:
    _finish("3:replay", 2, keys, tmp_path, task="other/9")  # another task's reply is never replayed
    out = _finish("3:replay", 3, keys, tmp_path)
    reason = verify(out, expected=_binding(3), key=keys[1])
    assert reason is not None and STALE.search(reason), reason
    assert _values(out, "w").tolist() == _values(_reply(), "w").tolist()


def test_slow_sleeps(keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("clients.chaos.time.sleep", slept.append)
    out = _finish("7:slow=45", 7, keys, tmp_path)
    assert slept == [45.0]
    assert verify(out, expected=_binding(7), key=keys[1]) is None
    _finish("7:slow=45", 6, keys, tmp_path)
    assert slept == [45.0]


def test_injection_is_logged(keys, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dmsc_fed.site"):
        _finish("2:nan", 2, keys, tmp_path)
    assert any(r.name == "dmsc_fed.site" and "chaos: injecting nan in round 2" in r.message for r in caplog.records)


def test_no_chaos_is_exactly_sign_reply(keys, tmp_path: Path) -> None:
    site = SiteContext(
        name="a",
        data_path=None,
        keys=SiteKeys(
            directory=tmp_path,
            ca_cert=tmp_path / "ca.crt",
            supernode_key=tmp_path / "supernode.key",
            signing_key=tmp_path / "a.key",
            he_secret=tmp_path / "he-secret.ctx",
        ),
        policy=SitePolicy(),
        state_dir=tmp_path / "state",
        device=None,
        threads=0,
    )
    cfg = make_config()
    expected = sign_reply(_reply(), cfg=cfg, site=site, binding=_binding(2))
    reply = _reply()
    out = finish_train(
        reply,
        chaos=None,
        binding=_binding(2),
        sign=lambda c, b: sign_reply(c, cfg=cfg, site=site, binding=b),
        state_dir=site.state_dir,
    )
    assert out is reply
    assert _wire(out) == _wire(expected)
    assert not (tmp_path / "state").exists()  # nothing stored without chaos


# --- the hook in handle_train -----------------------------------------------------------------------------------


def _train_request(server_round: int) -> RecordDict:
    from dmsc_fed.training import model_for
    from dmsc_fed.wire import CONFIG_KEY, ROUND_KEY, TASK_ID_KEY, TASK_KEY

    cfg = make_config(model={"name": "logreg"}, dataset={"name": "breast_cancer", "scaling": "local"})
    config = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: TASK, ROUND_KEY: server_round})
    return RecordDict({"arrays": ArrayRecord(model_for(cfg, seed=0).state_dict()), CONFIG_KEY: config})


def test_handle_train_fails_closed_without_the_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.site import handle_train

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(PrivacyError, match=ALLOW_ENV):
        handle_train(_train_request(1), {"site-name": "a", "state-dir": str(tmp_path), "chaos": "1:nan"})


def test_handle_train_injects_and_is_otherwise_unchanged(tmp_path: Path, allowed: None) -> None:
    from clients.site import handle_train

    request = _train_request(1)
    specs = specs_of(_arrays(request))
    node = {"site-name": "a", "state-dir": str(tmp_path)}
    honest = handle_train(_train_request(1), node)
    quiet = handle_train(_train_request(1), node | {"chaos": "5:nan"})
    assert [a.data for a in _arrays(honest).values()] == [a.data for a in _arrays(quiet).values()]  # bit for bit
    n = int(honest.metric_records["metrics"]["num-examples"])  # type: ignore[arg-type]
    assert check_reply(honest, max_examples=n, expected_arrays=specs) is None
    faulty = handle_train(_train_request(1), node | {"chaos": "1:nan"})
    assert "non-finite" in (check_reply(faulty, max_examples=n, expected_arrays=specs) or "")
