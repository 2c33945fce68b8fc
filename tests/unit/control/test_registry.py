"""Registry: pools, site upsert on reconnection, health transitions (draft 6.1.3, 6.3.8)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dmsc_fed.control import (
    HealthPolicy,
    SiteKeyMismatchError,
    Store,
    StoreError,
    UnknownPoolError,
    UnknownSiteError,
)

from .conftest import FakeClock


def _pools(store: Store) -> None:
    store.registry.define_pool(name="gpu", device="cuda", capacity=2, description="hospital GPUs")
    store.registry.define_pool(name="cpu", device="cpu", capacity=8)


def _site(store: Store, name: str, node_id: int, pool: str = "gpu", **kw: object) -> None:
    store.registry.register_site(name=name, node_id=node_id, software_version="0.1.0", pool=pool, **kw)  # type: ignore[arg-type]


def test_define_pool_upserts(store: Store) -> None:
    _pools(store)
    store.registry.define_pool(name="gpu", device="cuda", capacity=4)
    pools = {p.name: p for p in store.registry.pools()}
    assert sorted(pools) == ["cpu", "gpu"]
    assert pools["gpu"].capacity == 4
    assert pools["gpu"].description == ""
    assert pools["cpu"].sites == 0


def test_register_site_records_capabilities(store: Store, clock: FakeClock) -> None:
    _pools(store)
    rec = store.registry.register_site(
        name="hospital-a",
        node_id=2**64 - 1,  # Flower node ids are unsigned 64-bit
        software_version="0.1.0",
        pool="gpu",
        device="cuda",
        gpu_memory_mb=24576,
        cpu_cores=16,
        dataset_size=12000,
        key_fingerprint="sha256:aa",
    )
    assert rec.node_id == 2**64 - 1
    assert (rec.pool, rec.device, rec.gpu_memory_mb, rec.cpu_cores, rec.dataset_size) == (
        "gpu",
        "cuda",
        24576,
        16,
        12000,
    )
    assert rec.registered_at == rec.last_seen == clock.now
    assert rec.health == "online"
    assert store.registry.site(name="hospital-a") == rec
    assert [p.sites for p in store.registry.pools()] == [0, 1]  # cpu, gpu


def test_reconnection_updates_the_same_site(store: Store, clock: FakeClock) -> None:
    _pools(store)
    _site(store, "a", node_id=7)
    first = store.registry.site(name="a")
    clock.advance(100)
    _site(store, "a", node_id=8, pool="cpu")
    sites = store.registry.sites()
    assert len(sites) == 1
    again = sites[0]
    assert again.node_id == 8
    assert again.pool == "cpu"
    assert again.registered_at == first.registered_at
    assert again.last_seen == clock.now
    assert store.registry.site_by_node(node_id=8).name == "a"
    with pytest.raises(UnknownSiteError, match="node 7"):
        store.registry.site_by_node(node_id=7)


def test_a_node_id_moves_to_the_site_that_now_holds_it(store: Store) -> None:
    _pools(store)
    _site(store, "a", node_id=7)
    _site(store, "b", node_id=7)
    assert store.registry.site(name="a").node_id is None
    assert store.registry.site_by_node(node_id=7).name == "b"


def test_a_changed_key_is_refused_unless_rotation_is_allowed(store: Store) -> None:
    _pools(store)
    _site(store, "a", node_id=7, key_fingerprint="sha256:old")
    with pytest.raises(SiteKeyMismatchError, match="sha256:old"):
        _site(store, "a", node_id=9, key_fingerprint="sha256:new")
    with pytest.raises(SiteKeyMismatchError):
        _site(store, "a", node_id=9)  # dropping the key is a change too
    kept = store.registry.site(name="a")
    assert (kept.node_id, kept.key_fingerprint) == (7, "sha256:old")  # nothing changed
    _site(store, "a", node_id=9, key_fingerprint="sha256:new", allow_key_change=True)
    assert store.registry.site(name="a").key_fingerprint == "sha256:new"


def test_health_transitions_with_time_and_replies(store: Store, clock: FakeClock) -> None:
    # default policy: suspect after 30 s or 1 missed reply, offline after 120 s or 3 missed replies
    assert store.registry.policy == HealthPolicy(30.0, 120.0, 1, 3)
    _pools(store)
    _site(store, "a", node_id=1)

    def state() -> str:
        return store.registry.site(name="a").health

    assert state() == "online"
    clock.advance(29)
    assert state() == "online"
    clock.advance(1)
    assert state() == "suspect"
    clock.advance(90)
    assert state() == "offline"
    store.registry.heartbeat(site="a")
    assert state() == "online"
    store.registry.reply_missed(site="a")
    assert state() == "suspect"
    store.registry.reply_missed(site="a")
    store.registry.reply_missed(site="a")
    assert state() == "offline"
    assert store.registry.site(name="a").missed_replies == 3
    store.registry.heartbeat(site="a")  # a heartbeat alone does not forgive missed replies
    assert state() == "offline"
    store.registry.reply_received(site="a")
    assert state() == "online"
    assert store.registry.site(name="a").missed_replies == 0


def test_an_older_heartbeat_does_not_move_last_seen_back(store: Store, clock: FakeClock) -> None:
    _pools(store)
    _site(store, "a", node_id=1)
    seen = store.registry.site(name="a").last_seen
    store.registry.heartbeat(site="a", now=clock.now.replace(year=2024))
    assert store.registry.site(name="a").last_seen == seen


def test_healthy_counts_per_pool(store: Store, clock: FakeClock) -> None:
    _pools(store)
    store.registry.define_pool(name="empty", device="cpu", capacity=1)
    _site(store, "old", node_id=1, pool="gpu")
    clock.advance(200)
    _site(store, "a", node_id=2, pool="gpu")
    _site(store, "c", node_id=3, pool="cpu")
    _site(store, "d", node_id=4, pool="cpu")
    store.registry.reply_missed(site="d")  # suspect: not healthy
    assert store.registry.healthy_by_pool() == {"cpu": 1, "empty": 0, "gpu": 1}
    assert store.registry.healthy_count() == 2
    assert store.registry.healthy_count(pools=["gpu"]) == 1
    assert store.registry.healthy_count(pools=["gpu", "cpu", "gpu"]) == 2
    assert [s.name for s in store.registry.sites(pool="cpu")] == ["c", "d"]
    assert {s.name: s.health for s in store.registry.sites()} == {
        "a": "online",
        "c": "online",
        "d": "suspect",
        "old": "offline",
    }
    with pytest.raises(UnknownPoolError, match="tpu"):
        store.registry.healthy_count(pools=["tpu"])


def test_unknown_pool_and_site_are_clear_errors(store: Store) -> None:
    _pools(store)
    with pytest.raises(UnknownPoolError, match=r"'tpu'.*cpu, gpu"):
        _site(store, "a", node_id=1, pool="tpu")
    assert store.registry.sites() == []
    calls: list[Callable[[], object]] = [
        lambda: store.registry.heartbeat(site="ghost"),
        lambda: store.registry.reply_received(site="ghost"),
        lambda: store.registry.reply_missed(site="ghost"),
        lambda: store.registry.site(name="ghost"),
    ]
    for call in calls:
        with pytest.raises(UnknownSiteError, match="ghost") as info:
            call()
        assert isinstance(info.value, StoreError)
        assert info.value.exit_code == 10
    with pytest.raises(UnknownPoolError):
        store.registry.sites(pool="tpu")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": -1},
        {"node_id": 2**64},
        {"node_id": "7"},
        {"node_id": True},
        {"name": ""},
        {"software_version": " "},
        {"cpu_cores": -2},
        {"dataset_size": 1.5},
        {"gpu_memory_mb": True},
    ],
)
def test_register_site_rejects_bad_input(store: Store, kwargs: dict[str, object]) -> None:
    _pools(store)
    args: dict[str, object] = {"name": "a", "node_id": 1, "software_version": "0.1.0", "pool": "gpu"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        store.registry.register_site(**args)  # type: ignore[arg-type]
    assert store.registry.sites() == []


@pytest.mark.parametrize("capacity", [-1, 1.5, True])
def test_define_pool_rejects_bad_capacity(store: Store, capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        store.registry.define_pool(name="gpu", device="cuda", capacity=capacity)  # type: ignore[arg-type]


def test_health_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        HealthPolicy(suspect_after_s=60, offline_after_s=30)
