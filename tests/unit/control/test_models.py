"""Model store: versions, lineage, best and latest, export, rollback (draft 6.2.4, 6.3.2, 6.3.7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import text

from dmsc_fed.control import (
    ContentHashMismatchError,
    ModelVersionRecord,
    Store,
    UnknownVersionError,
    content_hash,
    read_export,
)

from .conftest import FakeClock

SITES = ["a", "b", "c"]


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.weight": rng.normal(size=(3, 2)).astype(np.float32),
        "layer.0.bias": np.arange(2, dtype=np.float64),
    }


def add(
    store: Store, clock: FakeClock, rnd: int, acc: float, *, task: str | int = "hospital/1", **kw: Any
) -> ModelVersionRecord:
    args: dict[str, object] = {
        "task_id": task,
        "round": rnd,
        "arrays": weights(rnd),
        "metrics": {"accuracy": acc, "loss": 1 - acc},
        "sites": SITES,
        "epsilon": {"a": 0.5 * rnd, "b": 0.4 * rnd},
        "he_params": {"scheme": "ckks", "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60]},
    }
    args.update(kw)
    version = store.models.add_version(**args)  # type: ignore[arg-type]
    clock.advance(1)
    return version


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


def test_versions_record_everything_and_chain(store: Store, clock: FakeClock) -> None:
    t0 = clock.now
    v1 = add(store, clock, 1, 0.5)
    v2 = add(store, clock, 2, 0.8)
    v3 = add(store, clock, 3, 0.7)
    assert (v1.parent_id, v2.parent_id, v3.parent_id) == (None, v1.id, v2.id)
    assert v1.task_id == "hospital/1"
    assert v1.round == 1
    assert v1.content_hash == content_hash(weights(1))
    assert v1.format == "safetensors"
    assert v1.metrics == {"accuracy": 0.5, "loss": 0.5}
    assert v1.sites == ("a", "b", "c")
    assert v1.epsilon == {"a": 0.5, "b": 0.4}
    assert v1.he_params == {"scheme": "ckks", "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60]}
    assert v1.created_at == t0
    assert v1.rolled_back_from is None
    assert store.models.versions(task_id="hospital/1") == [v1, v2, v3]
    assert store.models.get(version_id=v2.id) == v2
    assert store.models.latest(task_id="hospital/1") == v3
    assert store.models.best(task_id="hospital/1") == v2
    assert store.models.best(task_id="hospital/1", metric="loss", mode="min") == v2
    assert store.models.best(task_id="hospital/1", metric="accuracy", mode="min") == v1
    assert store.models.best(task_id="hospital/1", metric="auc") is None
    assert_same(store.models.load(version_id=v2.id), weights(2))  # type: ignore[arg-type]
    events = store.events.events(kind="aggregation")
    assert [(e.payload["version_id"], e.payload["round"]) for e in events] == [(v1.id, 1), (v2.id, 2), (v3.id, 3)]


def test_tasks_are_separate_and_unknown_tasks_have_no_versions(store: Store, clock: FakeClock) -> None:
    a = add(store, clock, 1, 0.5, task="a/1")
    b = add(store, clock, 1, 0.6, task=7)
    assert b.task_id == "7"
    assert b.parent_id is None
    assert store.models.versions(task_id="a/1") == [a]
    assert store.models.latest(task_id=7) == b
    assert store.models.versions(task_id="nope") == []
    assert store.models.latest(task_id="nope") is None
    assert store.models.best(task_id="nope") is None


def test_rollback_adds_a_version_and_deletes_nothing(store: Store, clock: FakeClock) -> None:
    v1 = add(store, clock, 1, 0.5)
    v2 = add(store, clock, 2, 0.8)
    v3 = add(store, clock, 3, 0.3)  # a bad round
    back = store.models.rollback(task_id="hospital/1", version_id=v2.id)
    assert back.id not in (v1.id, v2.id, v3.id)
    assert (back.parent_id, back.rolled_back_from) == (v3.id, v2.id)
    assert (back.round, back.content_hash, back.metrics, back.sites, back.epsilon, back.he_params) == (
        v2.round,
        v2.content_hash,
        v2.metrics,
        v2.sites,
        v2.epsilon,
        v2.he_params,
    )
    assert store.models.latest(task_id="hospital/1") == back
    assert store.models.versions(task_id="hospital/1") == [v1, v2, v3, back]
    assert store.models.best(task_id="hospital/1") == v2  # ties go to the oldest
    assert_same(store.models.load(version_id=back.id), weights(2))  # type: ignore[arg-type]
    [event] = store.events.events(kind="fault")
    assert event.payload == {
        "action": "rollback",
        "version_id": back.id,
        "rolled_back_from": v2.id,
        "replaced": v3.id,
        "content_hash": v2.content_hash,
    }
    # training goes on from the rolled-back model
    v5 = add(store, clock, 4, 0.85)
    assert v5.parent_id == back.id
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM model_blobs")).scalar_one() == 4  # identical content stored once


def test_rollback_refuses_unknown_or_foreign_versions(store: Store, clock: FakeClock) -> None:
    other = add(store, clock, 1, 0.5, task="other/1")
    add(store, clock, 1, 0.5)
    with pytest.raises(UnknownVersionError, match="belongs to task 'other/1'"):
        store.models.rollback(task_id="hospital/1", version_id=other.id)
    with pytest.raises(UnknownVersionError, match="unknown model version 999"):
        store.models.rollback(task_id="hospital/1", version_id=999)
    assert len(store.models.versions(task_id="hospital/1")) == 1
    for call in (
        lambda: store.models.get(version_id=999),
        lambda: store.models.load(version_id=999),
        lambda: store.models.export(version_id=999, path="x.safetensors"),
    ):
        with pytest.raises(UnknownVersionError) as info:
            call()
        assert info.value.exit_code == 10


def test_export_and_read_back(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    v = add(store, clock, 2, 0.8)
    path = store.models.export(version_id=v.id, path=tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model") or p.name.startswith(".")) == [
        "model.safetensors"
    ]
    back = read_export(path=path)
    assert (back.content_hash, back.task_id, back.round, back.version_id) == (v.content_hash, "hospital/1", 2, v.id)
    assert_same(back.content, weights(2))  # type: ignore[arg-type]


def test_a_tampered_export_is_detected(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    v = add(store, clock, 2, 0.8)
    path = store.models.export(version_id=v.id, path=tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        metadata = fh.metadata()
    tampered = weights(2)
    tampered["layer.0.bias"][0] += 1
    save_file(tampered, str(path), metadata=metadata)
    with pytest.raises(ContentHashMismatchError, match="hashes to"):
        read_export(path=path)
    save_file(weights(2), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ContentHashMismatchError, match="not a dmsc-fed model export"):
        read_export(path=tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ContentHashMismatchError, match="not a readable"):
        read_export(path=tmp_path / "junk.safetensors")


def test_corrupted_stored_content_is_detected(store: Store, clock: FakeClock) -> None:
    v = add(store, clock, 1, 0.5)
    good = store.models.load(version_id=v.id)
    bad = dict(good)  # type: ignore[arg-type]
    bad["layer.0.bias"] = np.array([9.0, 9.0])
    from safetensors.numpy import save

    with store.engine.begin() as conn:
        conn.execute(text("UPDATE model_blobs SET data = :d"), {"d": save(bad)})
    with pytest.raises(ContentHashMismatchError, match=f"model version {v.id}"):
        store.models.load(version_id=v.id)


def test_encrypted_bytes_are_versioned_exported_and_rolled_back(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    ct1, ct2 = b"\x00ciphertext-one\xff" * 10, b"ciphertext-two"
    v1 = add(store, clock, 1, 0.5, arrays=ct1)
    add(store, clock, 2, 0.6, arrays=ct2)
    assert v1.format == "bytes"
    assert v1.size_bytes == len(ct1)
    assert v1.content_hash == content_hash(ct1)
    assert store.models.load(version_id=v1.id) == ct1
    back = read_export(path=store.models.export(version_id=v1.id, path=tmp_path / "ct.safetensors"))
    assert back.content == ct1
    rolled = store.models.rollback(task_id="hospital/1", version_id=v1.id)
    assert store.models.load(version_id=rolled.id) == ct1


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.5, -2.0], dtype=np.float16),
        np.array([[1, -2], [3, 4]], dtype=np.int64),
        np.array([True, False]),
        np.asarray(np.float32(3.25)),  # 0-d
        np.zeros((0, 4), dtype=np.float32),  # empty
        np.array([1.0, 2.0], dtype=">f8"),  # big-endian in, little-endian stored
        np.arange(6, dtype=np.int32).reshape(2, 3).T,  # not contiguous
    ],
)
def test_dtypes_and_shapes_round_trip(store: Store, clock: FakeClock, tmp_path: Path, array: np.ndarray) -> None:
    v = add(store, clock, 1, 0.5, arrays={"x": array})
    loaded = store.models.load(version_id=v.id)
    assert isinstance(loaded, dict)
    np.testing.assert_array_equal(loaded["x"], array)
    assert loaded["x"].shape == array.shape
    assert loaded["x"].dtype == array.dtype.newbyteorder("<")
    exported = read_export(path=store.models.export(version_id=v.id, path=tmp_path / "x.safetensors"))
    assert exported.content_hash == v.content_hash


@pytest.mark.parametrize(
    "kwargs",
    [
        {"round": -1},
        {"round": 1.0},
        {"task_id": ""},
        {"sites": ["a", "a"]},
        {"sites": ["a", ""]},
        {"metrics": {"accuracy": float("nan")}},
        {"metrics": {"accuracy": "high"}},
        {"epsilon": {"z": 1.0}},  # a site that did not take part
        {"epsilon": {"a": -1.0}},
        {"epsilon": {"a": float("inf")}},
        {"he_params": {"scale": float("nan")}},
        {"he_params": {"ctx": object()}},
        {"arrays": {}},
        {"arrays": {"x": np.array([1 + 1j])}},
    ],
)
def test_add_version_rejects_bad_input(store: Store, clock: FakeClock, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        add(store, clock, 1, 0.5, **kwargs)
    assert store.models.versions(task_id="hospital/1") == []


def test_best_rejects_unknown_mode(store: Store) -> None:
    with pytest.raises(ValueError, match="'max' or 'min'"):
        store.models.best(task_id="t", mode="median")  # type: ignore[arg-type]
