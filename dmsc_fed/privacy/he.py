"""CKKS encryption of model updates for add-only aggregation (TenSEAL over Microsoft SEAL).

What it implements
------------------
The homomorphic-encryption part of the draft's data-layer privacy (draft-yang-dmsc-
distributed-model-03, section 6.4.1), with the CKKS scheme of Cheon, Kim, Kim and Song
("Homomorphic Encryption for Arithmetic of Approximate Numbers", ASIACRYPT 2017) as
implemented by Microsoft SEAL and wrapped by TenSEAL (Benaissa et al., "TenSEAL: A Library
for Encrypted Tensor Operations Using Homomorphic Encryption", 2021).

Protocol: every site flattens its update to one vector (:func:`flatten`), multiplies it by
its aggregation weight in plaintext, and encrypts it (:func:`encrypt`) under the
federation's secret key, which all sites share. The server, whose context holds *no key
at all*, adds the sites' ciphertexts chunk by chunk (:func:`aggregate`) and returns the
encrypted sum; the sites decrypt it (:func:`decrypt`) and divide by the sum of weights.
Only additions happen on ciphertexts: no multiplication, no rotation, so no
relinearization or Galois keys are needed and the modulus chain needs no rescaling levels.

Parameter choice (measured on a shared 2-core machine, one thread, TenSEAL 0.3.18)
--------------------------------------------------------------------------------
* **One data prime of 60 bits.** A fresh CKKS ciphertext is two polynomials of ``N``
  64-bit words per data prime, i.e. ``32 * L`` bytes per slot for ``L`` data primes
  (SEAL's zstd cannot squeeze 60-bit residues: 32.07 bytes per slot measured). Plaintext
  float32 is 4 bytes, so one prime (8x) is the only choice under the 9x budget. TenSEAL
  requires a second, "special" prime (it refuses a context without key switching), which
  ciphertexts do not carry. The scale ``2**40`` leaves ``60 - 40 - 2 = 18`` bits of
  headroom: the *sum* of the weighted updates must stay below ``2**18`` in magnitude
  (:attr:`HEProfile.max_abs`, the worst case of a constant vector); with non-negative
  weights that sum to 1 the sum is bounded by the largest site value, so :func:`encrypt`
  checks each site's values against that bound. The decoding error is about 1e-9
  absolute per site.
* **Symmetric (secret-key) encryption at the sites.** In CPU time on one core,
  public-key encryption costs 0.76-0.81 s per 1M values (it encrypts at the key level
  with both primes, then drops the special prime) and symmetric encryption
  ``(-(a*s) + m + e, a)`` 0.34-0.38 s, with 5-10x less noise (no ``u*e`` terms);
  decryption is 0.08-0.13 s. (Wall-clock figures on this shared machine were about 3x
  higher, which put public-key encryption alone over the 2 s target.) Symmetric RLWE
  encryption is as secure, all sites hold the secret key anyway, and the server never
  encrypts, so no public key is needed.
* **The server context holds no key.** ``make_context_public()`` is not supported on a
  symmetric TenSEAL context, so the server context is the site context serialized
  without secret, public, relinearization and Galois keys: under 100 bytes of encryption
  parameters and scale. Ciphertexts from the sites load into it (same parameter id) and
  add; it can neither encrypt nor decrypt, and :func:`load_public_context` refuses any
  bytes that contain a secret key.
* **N = 4096 by default.** Per slot, N = 4096, 8192 and 16384 cost the same to encrypt,
  decrypt, load and add within the noise of this machine (NTT work grows with
  ``log N``, per-call overhead shrinks with fewer chunks; the two cancel), so a larger
  N is not kept for speed. A ciphertext costs the full ``N/2`` slots whatever is packed
  in it, so a smaller N wastes less on the last, padded chunk: the 9,258-parameter CNN
  for 8x8 digits is 8.85x its float32 size with N = 4096 but 10.6x with N = 8192.
  128-bit security (Albrecht et al., "Homomorphic Encryption Security Standard", 2018;
  enforced again by SEAL) allows 109 modulus bits at N = 4096; the profile uses 100.

Profiles: ``add-128`` (default, N = 4096, moduli 60+40) and ``add-128-8k`` (N = 8192,
moduli 60+60, half as many chunks for large models), both with scale ``2**40``. Contexts
are created and loaded with ``n_threads=1``: TenSEAL's thread pool only serves tensor
operations, never a single vector's encryption.

Caveats
-------
* CKKS decryption results carry the encryption noise. Whoever holds a ciphertext *and*
  its exact decryption can recover the secret key (Li and Micciancio, "On the Security
  of Homomorphic Encryption on Approximate Numbers", EUROCRYPT 2021). Sites must
  therefore never send the full-precision output of :func:`decrypt` to the server.
* CKKS has no integrity protection. A flipped byte in a ciphertext's payload either
  fails to deserialize (protobuf framing, SEAL's range, size and scale checks, all
  raised as :class:`PrivacyError`) or, since the polynomials are stored in NTT form,
  turns every decrypted value into garbage (about 1e7). A handful of metadata bytes
  (reserved header fields, TenSEAL's stored encoding scale) do not affect decryption at
  all. Replies are signed elsewhere; this module only fails closed on bytes it cannot
  read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import PrivacyError

DEFAULT_PROFILE = "add-128"
SECURITY_LEVEL = 128
#: Largest total coefficient-modulus bit count for 128-bit classical security, per ring
#: dimension (HE Security Standard, ternary secret; SEAL's ``CoeffModulus::MaxBitCount``).
MAX_MODULUS_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: Bytes a SEAL ciphertext stores per coefficient and per prime, whatever the prime's size.
_WORD_BYTES = 8
#: Slack on top of the raw ciphertext size: SEAL header and parameter id, zstd's worst
#: case expansion (``src/256`` plus a frame header), TenSEAL's protobuf fields.
_FIXED_OVERHEAD = 4096
_HEADROOM_BITS = 2


def _tenseal() -> Any:
    """Import TenSEAL on first use (it takes about a second), with an install hint."""
    try:
        import tenseal
    except ImportError as err:  # pragma: no cover - tenseal is a declared dependency
        raise PrivacyError(
            f"homomorphic encryption needs TenSEAL ({err}); install it with: pip install tenseal"
        ) from None
    return tenseal


@dataclass(frozen=True)
class HEProfile:
    """CKKS parameters for an add-only workload with one 60-bit data prime.

    Attributes
    ----------
    name
        Registry name of the profile.
    poly_modulus_degree
        Ring dimension ``N``; a ciphertext holds ``N // 2`` values.
    coeff_mod_bit_sizes
        Bit sizes of the modulus chain; the last one is TenSEAL's special prime, which
        ciphertexts do not carry.
    scale_bits
        ``log2`` of the CKKS scale; values are encoded as ``round(x * 2**scale_bits)``.

    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_MODULUS_BITS_128:
            raise PrivacyError(
                f"HE profile {self.name!r}: poly_modulus_degree must be one of {list(MAX_MODULUS_BITS_128)}"
            )
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2 or not all(20 <= b <= 60 for b in bits):
            raise PrivacyError(
                f"HE profile {self.name!r}: coeff_mod_bit_sizes needs a data prime and a special prime, "
                f"each of 20 to 60 bits; got {list(bits)}"
            )
        if sum(bits) > MAX_MODULUS_BITS_128[n]:
            raise PrivacyError(
                f"HE profile {self.name!r}: {sum(bits)} modulus bits exceed the {MAX_MODULUS_BITS_128[n]} "
                f"allowed for {SECURITY_LEVEL}-bit security at N={n}"
            )
        if not 20 <= self.scale_bits <= self.data_bits - _HEADROOM_BITS - 1:
            raise PrivacyError(
                f"HE profile {self.name!r}: scale_bits must be in [20, {self.data_bits - _HEADROOM_BITS - 1}] "
                f"for {self.data_bits} data-modulus bits"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a ciphertext carries (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs(self) -> float:
        """Bound on the magnitude of any value and of any sum of values under encryption."""
        return float(2.0 ** (self.data_bits - _HEADROOM_BITS - self.scale_bits))

    def describe(self) -> dict[str, Any]:
        """The parameters as plain JSON, for ``summary.json``."""
        return {
            "name": self.name,
            "scheme": "CKKS",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "slots": self.slots,
            "security_level": SECURITY_LEVEL,
            "max_abs": self.max_abs,
            "site_encryption": "symmetric",
            "server_context": "parameters only, no keys",
        }


PROFILES: dict[str, HEProfile] = {
    p.name: p
    for p in (
        HEProfile(name="add-128", poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40), scale_bits=40),
        HEProfile(name="add-128-8k", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), scale_bits=40),
    )
}


def get_profile(name: str) -> HEProfile:
    """The profile registered as ``name``; :class:`PrivacyError` listing the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise PrivacyError(f"unknown HE profile {name!r}; known profiles: {sorted(PROFILES)}") from None


def _raw_ciphertext_bytes(poly_modulus_degree: int, data_primes: int) -> int:
    return 2 * poly_modulus_degree * data_primes * _WORD_BYTES


def _bytes_limit(raw: int) -> int:
    return raw + raw // 128 + _FIXED_OVERHEAD


def ciphertext_bytes_limit(profile: HEProfile) -> int:
    """Upper bound on the size of one serialized chunk under ``profile``.

    Two polynomials of ``N`` 64-bit words per data prime, plus room for SEAL's header,
    zstd's worst-case expansion and TenSEAL's protobuf framing.
    """
    return _bytes_limit(_raw_ciphertext_bytes(profile.poly_modulus_degree, len(profile.coeff_mod_bit_sizes) - 1))


# --------------------------------------------------------------------------- contexts


def create_contexts(*, profile: HEProfile) -> tuple[bytes, bytes]:
    """Generate a fresh secret key under ``profile``.

    Returns
    -------
    tuple[bytes, bytes]
        ``(secret, public)``: the sites' context with the secret key, and the server's
        context with the same encryption parameters and scale but no key of any kind.

    """
    ts = _tenseal()
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            profile.poly_modulus_degree,
            coeff_mod_bit_sizes=list(profile.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            n_threads=1,
        )
        ctx.global_scale = 2.0**profile.scale_bits
        secret = ctx.serialize(
            save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        public = ctx.serialize(
            save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
    except Exception as err:
        raise PrivacyError(f"cannot create CKKS contexts for profile {profile.name!r}: {err}") from None
    return bytes(secret), bytes(public)


def has_secret_key(ctx: Any) -> bool:
    """Whether ``ctx`` (a TenSEAL context) holds a secret key; errs on the side of yes."""
    try:
        return bool(ctx.is_private()) or bool(ctx.has_secret_key())
    except Exception as err:
        raise PrivacyError(f"not a TenSEAL context: {err}") from None


def _load_context(data: bytes, what: str) -> Any:
    ts = _tenseal()
    if not isinstance(data, bytes | bytearray) or not data:
        raise PrivacyError(f"the {what} CKKS context is empty or not bytes")
    try:
        ctx = ts.context_from(bytes(data), n_threads=1)
        scheme = ctx.seal_context().data.first_context_data().parms().scheme().name
    except Exception as err:
        raise PrivacyError(f"the {what} CKKS context is unreadable: {err}") from None
    if scheme != "CKKS":
        raise PrivacyError(f"the {what} context uses the {scheme} scheme, not CKKS")
    try:
        scale = float(ctx.global_scale)
    except Exception as err:
        raise PrivacyError(f"the {what} CKKS context has no global scale: {err}") from None
    if not (math.isfinite(scale) and scale > 1.0):
        raise PrivacyError(f"the {what} CKKS context has no usable global scale ({scale})")
    return ctx


def load_secret_context(data: bytes) -> Any:
    """The sites' context (with the secret key) from the bytes of :func:`create_contexts`."""
    ctx = _load_context(data, "secret")
    if not has_secret_key(ctx):
        raise PrivacyError("the secret CKKS context holds no secret key; sites need the federation's secret context")
    return ctx


def load_public_context(data: bytes) -> Any:
    """The server's context (no secret key) from the bytes of :func:`create_contexts`."""
    ctx = _load_context(data, "public")
    if has_secret_key(ctx):
        raise PrivacyError("the public CKKS context holds a secret key; the server must never hold the secret key")
    return ctx


def _ctx_geometry(ctx: Any) -> tuple[int, int, int, float]:
    """``(slots, data_primes, data_bits, scale)`` of a loaded context."""
    try:
        first = ctx.seal_context().data.first_context_data()
        n = int(first.parms().poly_modulus_degree())
        data_bits = int(first.total_coeff_modulus_bit_count())
        data_primes = int(first.chain_index()) + 1
        scale = float(ctx.global_scale)
    except Exception as err:
        raise PrivacyError(f"not a usable CKKS context: {err}") from None
    return n // 2, data_primes, data_bits, scale


# ------------------------------------------------------------------------ encryption


def _shape_problem(vec: Any, *, slots: int, scale: float) -> str | None:
    """Why a deserialized CKKS vector is not one fresh (or added) chunk of this context, or None."""
    if vec.size() != slots:
        return f"it holds {vec.size()} values, not {slots}"
    [ct] = vec.ciphertext()
    if ct.size() != 2:
        return f"it has {ct.size()} polynomials, not 2"
    if ct.scale != scale:
        return f"its scale {ct.scale} is not the context's {scale}"
    return None


def encrypt(*, ctx: Any, values: NDArray[np.floating]) -> list[bytes]:
    """Encrypt a 1-D vector into serialized CKKS vectors of ``slots`` values each.

    The vector is cut into ``ceil(len / slots)`` chunks; the last one is padded with
    zeros. Fails closed: any failure raises :class:`PrivacyError` and nothing is returned.

    Parameters
    ----------
    ctx
        A context holding the secret key (:func:`load_secret_context`).
    values
        The (already weighted) update; finite, with magnitudes below the profile's
        ``max_abs``.

    """
    slots, _, data_bits, scale = _ctx_geometry(ctx)
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise PrivacyError(f"can only encrypt a non-empty 1-D vector, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise PrivacyError(f"can only encrypt real numbers, got dtype {arr.dtype}")
    x = arr.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise PrivacyError("refusing to encrypt non-finite values (NaN or infinity)")
    bound = 2.0 ** (data_bits - _HEADROOM_BITS) / scale
    peak = float(np.max(np.abs(x)))
    if peak >= bound:
        raise PrivacyError(f"values up to {peak:.3g} exceed the CKKS bound {bound:.3g} of this context")
    ts = _tenseal()
    k = -(-x.size // slots)
    padded = np.zeros(k * slots, dtype=np.float64)
    padded[: x.size] = x
    try:
        return [bytes(ts.ckks_vector(ctx, padded[i * slots : (i + 1) * slots]).serialize()) for i in range(k)]
    except Exception as err:
        raise PrivacyError(f"CKKS encryption failed: {err}") from None


def decrypt(*, ctx: Any, chunks: Sequence[bytes], length: int) -> NDArray[np.float64]:
    """Decrypt the chunks of one vector of ``length`` values.

    Raises
    ------
    PrivacyError
        If ``ctx`` holds no secret key, the chunk count is not ``ceil(length / slots)``,
        or a chunk cannot be deserialized or decrypted.

    """
    if not has_secret_key(ctx):
        raise PrivacyError("decryption needs the secret CKKS context")
    slots, _, _, scale = _ctx_geometry(ctx)
    if length <= 0:
        raise PrivacyError(f"cannot decrypt {length} values")
    expected = -(-length // slots)
    if len(chunks) != expected:
        raise PrivacyError(
            f"{len(chunks)} ciphertexts do not hold {length} values ({expected} of {slots} slots needed)"
        )
    ts = _tenseal()
    out = np.empty(expected * slots, dtype=np.float64)
    for i, chunk in enumerate(chunks):
        try:
            vec = ts.ckks_vector_from(ctx, bytes(chunk))
            problem = _shape_problem(vec, slots=slots, scale=scale)
            if problem is None:
                out[i * slots : (i + 1) * slots] = vec.decrypt()
        except Exception as err:
            raise PrivacyError(f"ciphertext {i} cannot be decrypted: {err}") from None
        if problem is not None:
            raise PrivacyError(f"ciphertext {i} is malformed: {problem}")
    if not np.isfinite(out).all():
        raise PrivacyError("decryption gave non-finite values")
    return out[:length]


def aggregate(*, ctx: Any, updates: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Server side: add the sites' encrypted updates chunk by chunk.

    For each chunk index the first site's ciphertext is deserialized as the accumulator
    and the others are added into it in place (never copied: a ``CKKSVector.copy()``
    costs as much as hundreds of additions).

    Parameters
    ----------
    ctx
        The server's context, which must not hold a secret key.
    updates
        One list of serialized chunks per site, all of the same length.

    Returns
    -------
    list[bytes]
        The serialized encrypted sum, one chunk per chunk index.

    """
    if has_secret_key(ctx):
        raise PrivacyError("refusing to aggregate with a context that holds the secret key")
    if not updates:
        raise PrivacyError("no encrypted updates to aggregate")
    counts = [len(u) for u in updates]
    if len(set(counts)) != 1 or counts[0] == 0:
        raise PrivacyError(f"sites sent different or empty chunk counts: {counts}")
    slots, data_primes, _, scale = _ctx_geometry(ctx)
    limit = _bytes_limit(_raw_ciphertext_bytes(2 * slots, data_primes))
    ts = _tenseal()

    def load(site: int, index: int) -> Any:
        chunk = updates[site][index]
        if not isinstance(chunk, bytes | bytearray) or len(chunk) > limit:
            raise PrivacyError(f"site {site}, chunk {index}: not bytes or larger than {limit} bytes")
        try:
            vec = ts.ckks_vector_from(ctx, bytes(chunk))
            problem = _shape_problem(vec, slots=slots, scale=scale)
        except Exception as err:
            raise PrivacyError(f"site {site}, chunk {index} cannot be deserialized: {err}") from None
        if problem is not None:
            raise PrivacyError(f"site {site}, chunk {index} is malformed: {problem}")
        return vec

    out: list[bytes] = []
    for index in range(counts[0]):
        acc = load(0, index)
        for site in range(1, len(updates)):
            try:
                acc.add_(load(site, index))
            except PrivacyError:
                raise
            except Exception as err:
                raise PrivacyError(f"site {site}, chunk {index} cannot be added: {err}") from None
        try:
            out.append(bytes(acc.serialize()))
        except Exception as err:
            raise PrivacyError(f"cannot serialize aggregated chunk {index}: {err}") from None
    return out


# ---------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Ordered ``(name, shape, dtype)`` of the arrays packed into one vector by :func:`flatten`."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    def __post_init__(self) -> None:
        names = [e[0] for e in self.entries]
        if len(set(names)) != len(names):
            raise PrivacyError(f"layout has duplicate array names: {names}")
        for name, shape, dtype in self.entries:
            if any(d < 0 for d in shape):
                raise PrivacyError(f"layout entry {name!r} has a negative dimension: {shape}")
            if np.dtype(dtype).kind not in "biuf":
                raise PrivacyError(f"layout entry {name!r} has non-real dtype {dtype}")

    @property
    def size(self) -> int:
        """Total number of values."""
        return sum(math.prod(shape) for _, shape, _ in self.entries)


def flatten(arrays: Mapping[str, NDArray[Any]]) -> tuple[NDArray[np.float64], Layout]:
    """Concatenate named real arrays (in mapping order) into one float64 vector."""
    entries: list[tuple[str, tuple[int, ...], str]] = []
    parts: list[NDArray[np.float64]] = []
    for name, array in arrays.items():
        a = np.asarray(array)
        if a.dtype.kind not in "biuf":
            raise PrivacyError(f"array {name!r} has non-real dtype {a.dtype}; cannot encrypt it")
        entries.append((str(name), tuple(int(d) for d in a.shape), a.dtype.name))
        parts.append(a.astype(np.float64).ravel())
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return vector, Layout(entries=tuple(entries))


def unflatten(vector: NDArray[np.floating], layout: Layout) -> dict[str, NDArray[Any]]:
    """Split ``vector`` back into the arrays of ``layout``, in their original dtypes.

    Integer and boolean arrays are rounded to the nearest integer first.
    """
    v = np.asarray(vector)
    if v.ndim != 1 or v.size != layout.size:
        raise PrivacyError(f"vector of shape {v.shape} does not fit the layout of {layout.size} values")
    out: dict[str, NDArray[Any]] = {}
    offset = 0
    for name, shape, dtype_name in layout.entries:
        dtype = np.dtype(dtype_name)
        n = math.prod(shape)
        part = v[offset : offset + n].reshape(shape)
        offset += n
        out[name] = (np.rint(part) if dtype.kind in "biu" else part).astype(dtype)
    return out


def decrypt_model(
    *, values: Mapping[str, NDArray[Any]], reference: Mapping[str, NDArray[Any]], ctx: Any
) -> dict[str, NDArray[Any]]:
    """The plaintext state dict of an encrypted global model (``ct-*`` chunks and ``ct-weight``).

    The decrypted sum is divided by its weight: one number for the whole model
    (FedAvg), or one per tensor of ``reference`` in its order (encrypted FedAtt, whose
    softmax weights differ per layer). ``reference`` gives names, shapes and dtypes.

    Raises
    ------
    PrivacyError
        A weight that is not positive and finite, a weight vector of the wrong length,
        or chunks that do not decrypt.

    """
    from dmsc_fed.wire import CT_PREFIX, CT_WEIGHT

    weight = np.asarray(values[CT_WEIGHT], dtype=np.float64).reshape(-1)
    if weight.size not in (1, len(reference)) or not (np.isfinite(weight).all() and (weight > 0).all()):
        raise PrivacyError(f"the encrypted global model carries an invalid weight {weight.tolist()[:4]!r}")
    chunks = [np.asarray(values[k]).tobytes() for k in sorted(values) if k.startswith(CT_PREFIX) and k != CT_WEIGHT]
    _, packing = flatten(reference)
    vector = decrypt(ctx=ctx, chunks=chunks, length=packing.size)
    out = unflatten(vector if weight.size > 1 else vector / weight[0], packing)
    if weight.size > 1:
        out = {k: (v / w).astype(v.dtype) for (k, v), w in zip(out.items(), weight, strict=True)}
    return out
