"""CKKS encryption of updates (dmsc_fed.privacy.he): add-only aggregation, key separation, fail-closed checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dmsc_fed.errors import PrivacyError
from dmsc_fed.privacy import he

ts = pytest.importorskip("tenseal")

PROFILE = he.get_profile(he.DEFAULT_PROFILE)
SLOTS = PROFILE.slots


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return he.create_contexts(profile=PROFILE)


@pytest.fixture(scope="module")
def sec(keys):
    return he.load_secret_context(keys[0])


@pytest.fixture(scope="module")
def pub(keys):
    return he.load_public_context(keys[1])


# ------------------------------------------------------------------ aggregation math


def test_two_sites_hand_computed(sec, pub):
    # 0.25 * [1, 2, 3] + 0.75 * [3, 2, 1] = [2.5, 2.0, 1.5]
    a = he.encrypt(ctx=sec, values=0.25 * np.array([1.0, 2.0, 3.0]))
    b = he.encrypt(ctx=sec, values=0.75 * np.array([3.0, 2.0, 1.0]))
    got = he.decrypt(ctx=sec, chunks=he.aggregate(ctx=pub, updates=[a, b]), length=3)
    np.testing.assert_allclose(got, [2.5, 2.0, 1.5], rtol=0, atol=1e-7)


def test_weighted_average_over_several_ciphertexts(sec, pub):
    rng = np.random.default_rng(7)
    length = int(3.5 * SLOTS)
    xs = [rng.normal(0.0, 0.1, length).astype(np.float32) for _ in range(4)]
    w = np.array([120.0, 30.0, 250.0, 100.0])  # sample counts, normalized before weighting
    wn = w / w.sum()
    expected = sum(wi * x.astype(np.float64) for wi, x in zip(wn, xs, strict=True)) / wn.sum()

    updates = [he.encrypt(ctx=sec, values=wi * x.astype(np.float64)) for wi, x in zip(wn, xs, strict=True)]
    assert all(len(u) == 4 for u in updates)  # 3.5 ciphertexts' worth -> 4 chunks
    got = he.decrypt(ctx=sec, chunks=he.aggregate(ctx=pub, updates=updates), length=length) / wn.sum()

    assert got.shape == (length,)
    assert np.max(np.abs(got - expected)) <= 1e-6 * np.max(np.abs(expected))
    assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)


def test_single_site_aggregate_round_trips(sec, pub):
    x = np.linspace(-3.0, 3.0, 10)
    out = he.aggregate(ctx=pub, updates=[he.encrypt(ctx=sec, values=x)])
    np.testing.assert_allclose(he.decrypt(ctx=sec, chunks=out, length=10), x, atol=1e-7)


def test_aggregate_never_copies_ciphertexts(sec, pub, monkeypatch):
    def no_copy(self):
        raise AssertionError("CKKSVector.copy() called")

    monkeypatch.setattr(ts.CKKSVector, "copy", no_copy)
    chunks = he.encrypt(ctx=sec, values=np.ones(SLOTS + 1))
    out = he.aggregate(ctx=pub, updates=[chunks, chunks, chunks])
    np.testing.assert_allclose(he.decrypt(ctx=sec, chunks=out, length=SLOTS + 1), 3.0, atol=1e-7)


def test_values_near_the_bound_round_trip(sec):
    x = np.full(5, 0.99 * PROFILE.max_abs)
    np.testing.assert_allclose(he.decrypt(ctx=sec, chunks=he.encrypt(ctx=sec, values=x), length=5), x, rtol=1e-9)


# ------------------------------------------------------------------- key separation


def test_public_context_holds_no_key(pub, sec):
    assert not he.has_secret_key(pub)
    assert not pub.is_private()
    assert he.has_secret_key(sec)
    with pytest.raises(ValueError):
        pub.secret_key()


def test_public_context_can_neither_encrypt_nor_decrypt(sec, pub):
    with pytest.raises(PrivacyError):
        he.encrypt(ctx=pub, values=np.ones(3))
    chunks = he.encrypt(ctx=sec, values=np.ones(3))
    with pytest.raises(PrivacyError, match="secret"):
        he.decrypt(ctx=pub, chunks=chunks, length=3)


def test_load_public_context_rejects_secret_bytes(keys):
    with pytest.raises(PrivacyError, match="never hold the secret key"):
        he.load_public_context(keys[0])


def test_load_secret_context_rejects_public_bytes(keys):
    with pytest.raises(PrivacyError, match="no secret key"):
        he.load_secret_context(keys[1])


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x00" * 64, bytes(range(256)) * 4])
@pytest.mark.parametrize("loader", [he.load_secret_context, he.load_public_context])
def test_unreadable_context_bytes(loader, data):
    with pytest.raises(PrivacyError):
        loader(data)


def test_truncated_context_bytes(keys):
    with pytest.raises(PrivacyError, match="unreadable"):
        he.load_secret_context(keys[0][: len(keys[0]) // 2])


def test_non_ckks_context_rejected():
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=1032193, n_threads=1)
    with pytest.raises(PrivacyError, match="BFV scheme, not CKKS"):
        he.load_secret_context(bfv.serialize(save_secret_key=True))


def test_fresh_keys_differ():
    s1, _ = he.create_contexts(profile=PROFILE)
    s2, _ = he.create_contexts(profile=PROFILE)
    assert s1 != s2


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("k", "r"), [(0, 1), (1, 0), (2, 5), (3, SLOTS - 1)])
def test_chunk_count_and_size(sec, k, r):
    length = k * SLOTS + r
    chunks = he.encrypt(ctx=sec, values=np.ones(length))
    assert len(chunks) == math.ceil(length / SLOTS)
    assert all(len(c) <= he.ciphertext_bytes_limit(PROFILE) for c in chunks)


def test_bytes_per_slot_within_nine_times_float32(sec):
    [chunk] = he.encrypt(ctx=sec, values=np.ones(SLOTS))
    assert len(chunk) / SLOTS <= 9 * 4


def test_digits_cnn_update_within_nine_times_float32(sec):
    # The 9,258-parameter CNN for 8x8 digits: 5 chunks of 2048 slots, the last one padded.
    chunks = he.encrypt(ctx=sec, values=np.ones(9258))
    assert len(chunks) == 5
    assert sum(map(len, chunks)) <= 9 * 4 * 9258


def test_bytes_limit_is_raw_ciphertext_plus_slack():
    # two polynomials of N 64-bit words, one data prime
    raw = 2 * PROFILE.poly_modulus_degree * 8
    assert raw < he.ciphertext_bytes_limit(PROFILE) < 1.1 * raw


# -------------------------------------------------------------------------- tampering


@pytest.mark.parametrize("where", [1 / 3, 1 / 2, 2 / 3, 0.99])
def test_flipped_payload_byte_fails_or_decrypts_differently(sec, where):
    """A flipped byte in the ciphertext body either breaks deserialization or, since the
    polynomials are stored in NTT form, changes every decrypted value. (A few header
    bytes, e.g. reserved fields, are ignored by the parser; signatures catch those.)"""
    x = np.linspace(-1.0, 1.0, SLOTS)
    [chunk] = he.encrypt(ctx=sec, values=x)
    reference = he.decrypt(ctx=sec, chunks=[chunk], length=SLOTS)
    tampered = bytearray(chunk)
    tampered[int(where * len(chunk))] ^= 0x01
    try:
        got = he.decrypt(ctx=sec, chunks=[bytes(tampered)], length=SLOTS)
    except PrivacyError:
        return
    assert not np.array_equal(got, reference)


# ------------------------------------------------------------------ fail-closed checks


def test_aggregate_rejects_mismatched_chunk_counts(sec, pub):
    a = he.encrypt(ctx=sec, values=np.ones(SLOTS + 1))
    b = he.encrypt(ctx=sec, values=np.ones(1))
    with pytest.raises(PrivacyError, match="chunk counts"):
        he.aggregate(ctx=pub, updates=[a, b])


def test_aggregate_rejects_secret_context(sec):
    chunks = he.encrypt(ctx=sec, values=np.ones(3))
    with pytest.raises(PrivacyError, match="secret key"):
        he.aggregate(ctx=sec, updates=[chunks, chunks])


def test_aggregate_rejects_no_updates(pub):
    with pytest.raises(PrivacyError):
        he.aggregate(ctx=pub, updates=[])


@pytest.mark.parametrize("bad", [b"garbage", b"", "not bytes"])
def test_aggregate_rejects_unreadable_chunk(sec, pub, bad):
    good = he.encrypt(ctx=sec, values=np.ones(3))
    with pytest.raises(PrivacyError, match="site 1, chunk 0"):
        he.aggregate(ctx=pub, updates=[good, [bad]])


def test_aggregate_rejects_oversized_chunk(sec, pub):
    [good] = he.encrypt(ctx=sec, values=np.ones(3))
    with pytest.raises(PrivacyError, match="larger than"):
        he.aggregate(ctx=pub, updates=[[good], [good + b"\x00" * he.ciphertext_bytes_limit(PROFILE)]])


def test_unpadded_chunk_rejected(sec, pub):
    # a valid CKKS vector of 2 values, not a chunk packed to the full slots by encrypt()
    short = ts.ckks_vector(sec, [1.0, 2.0]).serialize()
    good = he.encrypt(ctx=sec, values=np.ones(2))
    with pytest.raises(PrivacyError, match="malformed"):
        he.aggregate(ctx=pub, updates=[good, [short]])
    with pytest.raises(PrivacyError, match="malformed"):
        he.decrypt(ctx=sec, chunks=[short], length=2)


def test_aggregate_rejects_other_parameters(sec, pub):
    other = he.get_profile("add-128-8k")
    other_sec = he.load_secret_context(he.create_contexts(profile=other)[0])
    good = he.encrypt(ctx=sec, values=np.ones(3))
    foreign = he.encrypt(ctx=other_sec, values=np.ones(3))
    with pytest.raises(PrivacyError):
        he.aggregate(ctx=pub, updates=[good, foreign])


@pytest.mark.parametrize(
    "values",
    [
        np.array([1.0, np.nan]),
        np.array([np.inf, 0.0]),
        np.array([-np.inf]),
        np.zeros(0),
        np.ones((2, 2)),
        np.array([1 + 1j]),
        np.array([PROFILE.max_abs]),
        np.array([0.0, -2 * PROFILE.max_abs]),
    ],
    ids=["nan", "inf", "-inf", "empty", "2d", "complex", "at-bound", "over-bound"],
)
def test_encrypt_rejects_bad_values(sec, values):
    with pytest.raises(PrivacyError):
        he.encrypt(ctx=sec, values=values)


def test_decrypt_rejects_wrong_chunk_count(sec):
    chunks = he.encrypt(ctx=sec, values=np.ones(SLOTS + 1))
    with pytest.raises(PrivacyError, match="do not hold"):
        he.decrypt(ctx=sec, chunks=chunks[:1], length=SLOTS + 1)
    with pytest.raises(PrivacyError, match="do not hold"):
        he.decrypt(ctx=sec, chunks=chunks, length=1)
    with pytest.raises(PrivacyError):
        he.decrypt(ctx=sec, chunks=chunks, length=0)


def test_decrypt_rejects_garbage_chunk(sec):
    with pytest.raises(PrivacyError, match="ciphertext 0"):
        he.decrypt(ctx=sec, chunks=[b"garbage"], length=3)


# --------------------------------------------------------------------------- profiles


def test_unknown_profile_lists_known_names():
    with pytest.raises(PrivacyError) as err:
        he.get_profile("rot-256")
    for name in he.PROFILES:
        assert name in str(err.value)


def test_default_profile_describes_itself_as_json():
    d = json.loads(json.dumps(he.get_profile(he.DEFAULT_PROFILE).describe()))
    assert d["name"] == he.DEFAULT_PROFILE
    assert d["slots"] == d["poly_modulus_degree"] // 2
    assert d["security_level"] == 128
    assert sum(d["coeff_mod_bit_sizes"]) <= he.MAX_MODULUS_BITS_128[d["poly_modulus_degree"]]


def test_max_abs_is_data_bits_minus_headroom_minus_scale():
    # one 60-bit data prime, scale 2**40, 2 bits of headroom -> 2**18
    assert PROFILE.max_abs == 2.0**18


@pytest.mark.parametrize(
    ("n", "bits", "scale"),
    [(4096, (60, 50), 40), (2048, (30, 24), 20), (4096, (60,), 40), (4096, (60, 40), 58), (8192, (61, 60), 40)],
    ids=["insecure", "small-n", "no-special-prime", "no-headroom", "prime-too-big"],
)
def test_invalid_profiles_rejected(n, bits, scale):
    with pytest.raises(PrivacyError):
        he.HEProfile(name="x", poly_modulus_degree=n, coeff_mod_bit_sizes=bits, scale_bits=scale)


# ----------------------------------------------------------------------------- layout


def test_layout_size_and_order():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7.0, 8.0, 9.0])}
    vector, layout = he.flatten(arrays)
    assert layout.size == 9
    assert [e[0] for e in layout.entries] == ["w", "b"]
    np.testing.assert_array_equal(vector, [0, 1, 2, 3, 4, 5, 7, 8, 9])
    assert vector.dtype == np.float64


def test_unflatten_size_mismatch():
    _, layout = he.flatten({"w": np.zeros((2, 3))})
    with pytest.raises(PrivacyError, match="layout of 6"):
        he.unflatten(np.zeros(5), layout)
    with pytest.raises(PrivacyError):
        he.unflatten(np.zeros((2, 3)), layout)


def test_unflatten_rounds_integer_arrays():
    _, layout = he.flatten({"steps": np.array([3], dtype=np.int64)})
    assert he.unflatten(np.array([2.6]), layout)["steps"].tolist() == [3]


def test_flatten_rejects_non_real():
    with pytest.raises(PrivacyError):
        he.flatten({"z": np.array([1 + 2j])})


def test_layout_rejects_duplicate_names():
    with pytest.raises(PrivacyError, match="duplicate"):
        he.Layout(entries=(("a", (1,), "float32"), ("a", (2,), "float32")))


_dtypes = st.sampled_from([np.float32, np.float64, np.int64])
_arrays = _dtypes.flatmap(
    lambda dt: hnp.arrays(
        dt,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        elements=(
            st.integers(-(2**40), 2**40)
            if dt is np.int64
            else st.floats(allow_nan=False, allow_infinity=False, width=32 if dt is np.float32 else 64)
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), _arrays, max_size=5))
def test_flatten_unflatten_round_trip(arrays):
    vector, layout = he.flatten(arrays)
    assert vector.shape == (layout.size,)
    back = he.unflatten(vector, layout)
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype
        assert back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)
