from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmsc_fed.errors import SnapshotError
from dmsc_fed.snapshots import FORMAT, SnapshotStore, fingerprint_of

FP = fingerprint_of(config_json='{"name": "t"}')
LOGGER = "dmsc_fed.snapshots"


def store(tmp_path: Path, **kw: Any) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snap", fingerprint=kw.pop("fingerprint", FP), **kw)


def model(value: float) -> dict[str, np.ndarray]:
    return {"fc.weight": np.full((2, 3), value, dtype=np.float32), "fc.bias": np.array([value], dtype=np.float32)}


def save_rounds(s: SnapshotStore, *rounds: int) -> None:
    for r in rounds:
        s.save(round=r, arrays=model(float(r)), state={"round": r})


def npz_of(s: SnapshotStore, rnd: int) -> Path:
    return s.directory / f"round-{rnd:06d}.npz"


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING)


# ---------------------------------------------------------------------- round trip


def test_round_trip_float32_uint8_and_nested_state(tmp_path: Path) -> None:
    s = store(tmp_path)
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "fc.weight": rng.standard_normal((4, 5)).astype(np.float32),
        "ct-00000": rng.integers(0, 256, size=1000, dtype=np.uint8),
        "ct-weight": np.array([3.25], dtype=np.float64),
    }
    state = {
        "reports": [{"round": 1, "loss": 0.125, "sites": ["a", "b"]}, {"round": 2, "loss": None}],
        "rng": {"bit_generator": "PCG64", "state": {"state": 2**127 + 12345, "inc": 7}},
        "privacy": {"epsilon": 1.5, "spent": [0.1, 0.2], "enabled": True},
        "note": "é ünïcode",
    }
    path = s.save(round=3, arrays=arrays, state=state)
    assert path == s.directory / "round-000003.json"

    snap = s.latest()
    assert snap is not None
    assert snap.round == 3
    assert snap.fingerprint == FP
    assert snap.path == path
    assert snap.state == state
    assert set(snap.arrays) == set(arrays)
    for name, arr in arrays.items():
        assert snap.arrays[name].dtype == arr.dtype
        assert snap.arrays[name].shape == arr.shape
        np.testing.assert_array_equal(snap.arrays[name], arr)
    assert snap.created > 0

    manifest = json.loads(path.read_text())
    assert manifest["format"] == FORMAT
    assert manifest["npz"] == "round-000003.npz"
    data = (s.directory / manifest["npz"]).read_bytes()
    assert manifest["bytes"] == len(data)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()


def test_names_with_dots_colons_and_slashes_round_trip(tmp_path: Path) -> None:
    s = store(tmp_path)
    names = ["fc.weight", "seg:block-0:ct:00000", "seg:block-0:weight", "member/h1/layers.0.bias", "x.npy"]
    s.save(round=1, arrays={n: np.arange(i + 1, dtype=np.float32) for i, n in enumerate(names)}, state={})
    snap = s.latest()
    assert snap is not None
    assert sorted(snap.arrays) == sorted(names)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(snap.arrays[n], np.arange(i + 1, dtype=np.float32))


def test_newer_snapshot_wins(tmp_path: Path) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2, 3)
    snap = s.latest()
    assert snap is not None and snap.round == 3
    np.testing.assert_array_equal(snap.arrays["fc.bias"], [3.0])
    assert snap.state == {"round": 3}


def test_empty_or_missing_directory_gives_none(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.latest() is None
    assert s.rounds() == []
    assert not s.directory.exists()  # created on first save only


def test_directory_created_with_parents_on_first_save(tmp_path: Path) -> None:
    s = SnapshotStore(tmp_path / "a" / "b" / "snap", fingerprint=FP)
    s.save(round=1, arrays=model(1.0), state={})
    assert (tmp_path / "a" / "b" / "snap" / "round-000001.json").is_file()


def test_keep_two_prunes_older(tmp_path: Path) -> None:
    s = store(tmp_path, keep=2)
    save_rounds(s, 1, 2, 3, 4)
    assert s.rounds() == [3, 4]
    assert sorted(p.name for p in s.directory.iterdir()) == [
        "round-000003.json",
        "round-000003.npz",
        "round-000004.json",
        "round-000004.npz",
    ]
    snap = s.latest()
    assert snap is not None and snap.round == 4


def test_prune_counts_only_good_snapshots_and_removes_older_bad_ones(tmp_path: Path) -> None:
    s = store(tmp_path, keep=2)
    save_rounds(s, 1, 2)
    npz = npz_of(s, 2)
    npz.write_bytes(npz.read_bytes()[:100])  # round 2 is now bad
    save_rounds(s, 3)
    assert s.rounds() == [1, 2, 3]  # good ones: 3 and 1; bad 2 sits between them
    save_rounds(s, 4)
    assert s.rounds() == [3, 4]
    assert not npz_of(s, 2).exists() and not npz_of(s, 1).exists()


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="keep"):
        SnapshotStore(tmp_path, fingerprint=FP, keep=0)
    with pytest.raises(SnapshotError, match="fingerprint"):
        SnapshotStore(tmp_path, fingerprint="")


# ---------------------------------------------------------------------- bad snapshots fall back


def test_truncated_npz_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    npz = npz_of(s, 2)
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    np.testing.assert_array_equal(snap.arrays["fc.bias"], [1.0])
    text = warnings_text(caplog)
    assert "round-000002.json" in text and "round-000002.npz" in text
    assert "truncated" in text
    assert "falling back to an earlier snapshot" in text


def test_flipped_byte_is_a_checksum_mismatch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    npz = npz_of(s, 2)
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    assert npz.stat().st_size == len(data)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    text = warnings_text(caplog)
    assert "checksum mismatch" in text
    assert "round-000002.json" in text
    assert "falling back" in text


def test_npz_that_cannot_be_loaded_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    garbage = b"not a zip file at all" * 10
    npz_of(s, 2).write_bytes(garbage)
    manifest_path = s.directory / "round-000002.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    assert "cannot be loaded" in warnings_text(caplog)


def test_missing_npz_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    npz_of(s, 2).unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    assert "missing" in warnings_text(caplog)


def test_truncated_manifest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    manifest = s.directory / "round-000002.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    text = warnings_text(caplog)
    assert "round-000002.json" in text and "not valid JSON" in text


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"format": FORMAT + 1}, "format"),
        ({"format": None}, "format"),
        ({"round": 7}, "round 7"),
        ({"npz": "../elsewhere.npz"}, "arrays file"),
        ({"state": [1, 2]}, "state"),
    ],
)
def test_bad_manifest_fields_fall_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict[str, Any], reason: str
) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    path = s.directory / "round-000002.json"
    manifest = json.loads(path.read_text())
    manifest.update(change)
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    assert reason in warnings_text(caplog)


def test_manifest_missing_a_field_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    path = s.directory / "round-000002.json"
    manifest = json.loads(path.read_text())
    del manifest["sha256"]
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    assert "lacks field(s) sha256" in warnings_text(caplog)


def test_all_bad_gives_none_and_says_round_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    (s.directory / "round-000001.json").write_text("{")
    npz_of(s, 2).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert s.latest() is None
    assert s.rounds() == [1, 2]  # bad ones still count as on disk
    text = warnings_text(caplog)
    assert "round-000001.json" in text and "round-000002.json" in text
    assert "starting from round 1" in text


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    save_rounds(store(tmp_path), 1)
    other = store(tmp_path, fingerprint=fingerprint_of(config_json='{"name": "other"}'))
    with pytest.raises(SnapshotError, match="another task config") as info:
        other.latest()
    assert "round-000001.json" in str(info.value)
    assert info.value.exit_code == 11


def test_fingerprint_of() -> None:
    assert fingerprint_of(config_json="{}") == hashlib.sha256(b"{}").hexdigest()
    assert fingerprint_of(config_json="{}", extra="logreg") != fingerprint_of(config_json="{}")
    assert fingerprint_of(config_json='{"a": 1}') != fingerprint_of(config_json='{"a": 2}')


# ---------------------------------------------------------------------- refused saves


@pytest.mark.parametrize("rnd", [0, -1, True])
def test_round_below_one_is_refused(tmp_path: Path, rnd: Any) -> None:
    s = store(tmp_path)
    with pytest.raises(SnapshotError, match="rounds start at 1"):
        s.save(round=rnd, arrays=model(1.0), state={})
    assert not s.directory.exists()


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"loss": float("nan")}, "state['loss'] is nan"),
        ({"reports": [{"eps": float("inf")}]}, "state['reports'][0]['eps'] is inf"),
        ({"obj": object()}, "state['obj'] has type object"),
        ({"rng": np.int64(3)}, "type int64"),
        ({"by_site": {1: "a"}}, "JSON keys must be strings"),
    ],
)
def test_state_that_is_not_json_is_refused(tmp_path: Path, state: dict[str, Any], problem: str) -> None:
    s = store(tmp_path)
    save_rounds(s, 1)
    with pytest.raises(SnapshotError, match="round 2") as info:
        s.save(round=2, arrays=model(2.0), state=state)
    assert problem in str(info.value)
    assert s.rounds() == [1]
    assert not npz_of(s, 2).exists()


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"": np.zeros(1)}, "not a non-empty string"),
        ({"allow_pickle": np.zeros(1)}, "reserved"),
        ({"a\nb": np.zeros(1)}, "control character"),
        ({"objs": np.array([{"a": 1}], dtype=object)}, "needs pickle"),
    ],
)
def test_arrays_that_cannot_be_saved_plainly_are_refused(tmp_path: Path, arrays: dict[str, Any], problem: str) -> None:
    s = store(tmp_path)
    with pytest.raises(SnapshotError, match=problem):
        s.save(round=1, arrays=arrays, state={})
    assert s.rounds() == []


# ---------------------------------------------------------------------- crashes, temp files, overwrite, modes


def test_leftover_temp_file_ignored_then_cleaned(tmp_path: Path) -> None:
    s = store(tmp_path)
    save_rounds(s, 1)
    leftovers = [s.directory / ".round-000002.npz.abc123.tmp", s.directory / ".round-000002.json.x9.tmp"]
    for p in leftovers:
        p.write_bytes(b"half written")
    snap = s.latest()
    assert snap is not None and snap.round == 1
    assert s.rounds() == [1]
    save_rounds(s, 2)
    assert not any(p.exists() for p in leftovers)
    assert not list(s.directory.glob("*.tmp")) and not list(s.directory.glob(".*"))


def _fail_on(monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Make os.replace in the store raise when it would commit a file ending in ``suffix`` (a crash)."""
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(suffix):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_crash_between_npz_and_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path)
    save_rounds(s, 1)
    with monkeypatch.context() as m:
        _fail_on(m, ".json")
        with pytest.raises(SnapshotError, match="round 2"):
            save_rounds(s, 2)
    assert npz_of(s, 2).exists()  # the arrays made it, the commit marker did not
    assert s.rounds() == [1]
    snap = s.latest()
    assert snap is not None and snap.round == 1
    assert not list(s.directory.glob("*.tmp")) and not list(s.directory.glob(".*"))
    # the rerun of round 2 succeeds
    save_rounds(s, 2)
    snap = s.latest()
    assert snap is not None and snap.round == 2


def test_crash_while_writing_npz_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path)
    save_rounds(s, 1)
    with monkeypatch.context() as m:
        _fail_on(m, ".npz")
        with pytest.raises(SnapshotError, match="previous snapshots are left"):
            save_rounds(s, 2)
    assert not npz_of(s, 2).exists()
    snap = s.latest()
    assert snap is not None and snap.round == 1


def test_overwrite_same_round(tmp_path: Path) -> None:
    s = store(tmp_path)
    save_rounds(s, 1)
    s.save(round=2, arrays=model(2.0), state={"v": 1})
    s.save(round=2, arrays=model(20.0), state={"v": 2})
    snap = s.latest()
    assert snap is not None and snap.round == 2
    np.testing.assert_array_equal(snap.arrays["fc.bias"], [20.0])
    assert snap.state == {"v": 2}
    assert s.rounds() == [1, 2]
    assert len(list(s.directory.glob("round-000002*.npz"))) == 1  # the replaced arrays are gone
    s.save(round=2, arrays=model(200.0), state={"v": 3})
    snap = s.latest()
    assert snap is not None
    np.testing.assert_array_equal(snap.arrays["fc.bias"], [200.0])
    assert len(list(s.directory.glob("round-000002*.npz"))) == 1


def test_crashed_overwrite_keeps_the_old_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path)
    s.save(round=2, arrays=model(2.0), state={"v": 1})
    with monkeypatch.context() as m:
        _fail_on(m, ".json")
        with pytest.raises(SnapshotError):
            s.save(round=2, arrays=model(20.0), state={"v": 2})
    snap = s.latest()
    assert snap is not None and snap.round == 2
    np.testing.assert_array_equal(snap.arrays["fc.bias"], [2.0])
    assert snap.state == {"v": 1}


def test_files_are_mode_0600(tmp_path: Path) -> None:
    s = store(tmp_path)
    save_rounds(s, 1)
    s.save(round=1, arrays=model(5.0), state={})  # the overwrite side too
    files = list(s.directory.iterdir())
    assert {p.suffix for p in files} == {".json", ".npz"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_an_altered_state_in_a_valid_manifest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    save_rounds(s, 1, 2)
    manifest = s.directory / "round-000002.json"
    doc = json.loads(manifest.read_text())
    doc["state"]["tampered"] = True  # still valid JSON, still the right npz
    manifest.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = s.latest()
    assert snap is not None and snap.round == 1
    assert "state_sha256" in warnings_text(caplog)
