"""Cost of dmsc-fed's privacy steps: CKKS-encrypted aggregation and DP-SGD, against plaintext.

What is measured, side by side in one run, on one thread (``torch.set_num_threads(1)``,
TenSEAL contexts with ``n_threads=1``):

1. **Encrypted aggregation** (``dmsc_fed.privacy.he``) for flat float32 updates of about
   10k, 100k and 1M parameters and 10 sites. Each site weights its update (normalized
   sample counts) and encrypts it; the server adds the 10 encrypted updates
   (``aggregate``: deserialize, add in place, serialize); a site decrypts the sum.
   Compared with: bytes of the float32 update, and the plaintext server aggregation, a
   numpy weighted sum of the 10 float32 vectors (Flower's FedAvg arithmetic). The
   decrypted average is checked against the float64 plaintext weighted average.
2. **DP-SGD step** on the CNN for 8x8 digits (``build_model(cnn, 64 features, 10
   classes, image (1, 8, 8))``), batches of 32 random inputs: a plain ``torch.optim.SGD``
   training loop against the same loop after Opacus's
   ``PrivacyEngine().make_private(noise_multiplier=1.0, max_grad_norm=1.0)``, over the
   same data, warm-up and setup excluded. The headline uses fixed batches of 32
   (``poisson_sampling=False``) so both loops see identical batches, and the per-sample
   gradient mode ``dmsc_fed.privacy.dp`` trains with (``GRAD_SAMPLE_MODE``, expanded
   weights); the Poisson-sampled loop and Opacus's default mode (``"hooks"``) are
   reported alongside.
3. **Targets**, each printed with the measured figure and PASS/FAIL.

Times are CPU seconds of this (single-threaded) process, i.e. time on one dedicated
core, the minimum over ``--repeats``; wall-clock seconds are printed too but on a shared
machine they mostly measure the other tenants.

Usage::

    python benchmarks/privacy_overhead.py [--quick] [--profile add-128] [--sites 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dmsc_fed.privacy.dp import GRAD_SAMPLE_MODE

T = TypeVar("T")

SIZES = (10_000, 100_000, 1_000_000)
TARGET_BYTES_RATIO = 9.0
TARGET_AGG_RATIO = 300.0
TARGET_SITE_S_PER_1M = 2.0
TARGET_DP_RATIO = 2.5
TARGET_REL_ERR = 1e-6

_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress line on stderr, with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Timing:
    """Best CPU and wall seconds per call."""

    cpu: float
    wall: float


def timed(fn: Callable[[], T], *, repeats: int, number: int = 1) -> tuple[Timing, T]:
    """Run ``fn`` ``number`` times per repeat; best CPU and wall time per call, and the last result."""
    best_cpu = best_wall = float("inf")
    result: Any = None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(number):
            result = fn()
        best_cpu = min(best_cpu, (time.process_time() - c0) / number)
        best_wall = min(best_wall, (time.perf_counter() - w0) / number)
    return Timing(best_cpu, best_wall), result


# --------------------------------------------------------------------------- HE
@dataclass(frozen=True)
class HERow:
    """Encrypted against plaintext aggregation for one model size."""

    params: int
    sites: int
    chunks: int
    plain_bytes: int
    enc_bytes: int
    plain_agg: Timing
    enc_agg: Timing
    encrypt: Timing  # one site's update (median over the sites)
    decrypt: Timing  # the aggregate, at one site
    rel_err: float

    @property
    def bytes_ratio(self) -> float:
        """Encrypted over float32 bytes of one update."""
        return self.enc_bytes / self.plain_bytes

    @property
    def agg_ratio(self) -> float:
        """Encrypted over plaintext server aggregation, CPU time."""
        return self.enc_agg.cpu / self.plain_agg.cpu

    @property
    def site_cpu(self) -> float:
        """Encrypt + decrypt CPU seconds per update at a site."""
        return self.encrypt.cpu + self.decrypt.cpu

    @property
    def site_cpu_per_1m(self) -> float:
        """Encrypt + decrypt CPU seconds per 1M parameters."""
        return self.site_cpu * 1e6 / self.params


def plain_weighted_sum(weights: Sequence[float], updates: Sequence[np.ndarray]) -> np.ndarray:
    """FedAvg's arithmetic on float32 vectors: ``sum_i w_i * x_i``."""
    acc = updates[0] * np.float32(weights[0])
    for w, x in zip(weights[1:], updates[1:], strict=True):
        acc += x * np.float32(w)
    return acc


def bench_he(*, size: int, sites: int, profile_name: str, repeats: int, seed: int) -> HERow:
    """Encrypt ``sites`` updates of ``size`` parameters, aggregate them both ways, decrypt and compare."""
    from dmsc_fed.privacy import he

    profile = he.get_profile(profile_name)
    secret, public = he.create_contexts(profile=profile)
    sec, pub = he.load_secret_context(secret), he.load_public_context(public)

    rng = np.random.default_rng(seed)
    xs = [rng.normal(0.0, 0.05, size).astype(np.float32) for _ in range(sites)]
    counts = rng.integers(100, 1000, sites).astype(np.float64)
    w = counts / counts.sum()

    plain_t, plain = timed(lambda: plain_weighted_sum(w.tolist(), xs), repeats=max(repeats, 3), number=5)

    enc_times: list[Timing] = []
    updates: list[list[bytes]] = []
    for wi, x in zip(w, xs, strict=True):
        weighted = wi * x.astype(np.float64)  # the site weights in plaintext, outside the timing
        t, chunks = timed(functools.partial(he.encrypt, ctx=sec, values=weighted), repeats=1)
        enc_times.append(t)
        updates.append(chunks)
    enc_t = Timing(statistics.median(t.cpu for t in enc_times), statistics.median(t.wall for t in enc_times))

    agg_t, summed = timed(lambda: he.aggregate(ctx=pub, updates=updates), repeats=repeats)
    dec_t, total = timed(lambda: he.decrypt(ctx=sec, chunks=summed, length=size), repeats=repeats)

    reference = sum(wi * x.astype(np.float64) for wi, x in zip(w, xs, strict=True))
    got = total / w.sum()
    rel_err = float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))
    plain_err = float(np.max(np.abs(plain - reference)) / np.max(np.abs(reference)))
    say(f"  {size:>9,} params: float32 plaintext aggregate itself is off by {plain_err:.1e} (relative)")
    return HERow(
        params=size,
        sites=sites,
        chunks=len(updates[0]),
        plain_bytes=size * 4,
        enc_bytes=sum(map(len, updates[0])),
        plain_agg=plain_t,
        enc_agg=agg_t,
        encrypt=enc_t,
        decrypt=dec_t,
        rel_err=rel_err,
    )


# --------------------------------------------------------------------------- DP
@dataclass(frozen=True)
class DPResult:
    """Per-step times of the plain and the DP-SGD training loops."""

    params: int
    batch: int
    steps: int
    mode: str
    plain: Timing
    dp: Timing
    dp_poisson: Timing
    dp_ew: Timing | None

    @property
    def ratio(self) -> float:
        """DP over plain step, CPU time, identical batches."""
        return self.dp.cpu / self.plain.cpu

    @property
    def ratio_poisson(self) -> float:
        """Poisson-sampled DP over plain step, CPU time."""
        return self.dp_poisson.cpu / self.plain.cpu

    @property
    def ratio_ew(self) -> float | None:
        """DP with Opacus's ``grad_sample_mode="ew"`` over plain step, CPU time."""
        return None if self.dp_ew is None else self.dp_ew.cpu / self.plain.cpu


def bench_dp(*, steps: int, warmup: int, repeats: int, batch: int, seed: int, mode: str) -> DPResult:
    """Per-step time of plain SGD and of Opacus DP-SGD on the digits CNN."""
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dmsc_fed.config import ModelSpec
    from dmsc_fed.models import build_model

    def model() -> nn.Module:
        return build_model(
            spec=ModelSpec(name="cnn"), num_features=64, num_classes=10, image_shape=(1, 8, 8), seed=seed
        )

    gen = torch.Generator().manual_seed(seed)
    n = batch * steps
    data = TensorDataset(torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    loss_fn = nn.CrossEntropyLoss()

    def loop(net: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader[Any], limit: int) -> int:
        taken = 0
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            if len(yb):
                loss_fn(net(xb), yb).backward()
            opt.step()
            taken += 1
            if taken == limit:
                break
        return taken

    plain_net = model()
    loops: list[tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any]]] = [
        (plain_net, torch.optim.SGD(plain_net.parameters(), lr=0.05), DataLoader(data, batch_size=batch))
    ]
    reference = "hooks" if mode != "hooks" else "ew"
    variants = [(mode, False), (mode, True), (reference, False)]
    for grad_sample_mode, poisson in variants:
        dp_net = model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure RNG and accountant notices
            loops.append(
                PrivacyEngine().make_private(
                    module=dp_net,
                    optimizer=torch.optim.SGD(dp_net.parameters(), lr=0.05),
                    data_loader=DataLoader(data, batch_size=batch),
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    poisson_sampling=poisson,
                    grad_sample_mode=grad_sample_mode,
                )
            )
    # Interleaved repeats: every loop sees the same background load; best per loop kept.
    best = [Timing(float("inf"), float("inf")) for _ in loops]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's backward-hook notice on inputs without grad
        for net, opt, loader in loops:  # warm-up, outside the timing
            net.train()
            loop(net, opt, loader, warmup)
        for _ in range(repeats):
            for i, (net, opt, loader) in enumerate(loops):
                t, taken = timed(functools.partial(loop, net, opt, loader, steps), repeats=1)
                best[i] = Timing(min(best[i].cpu, t.cpu / taken), min(best[i].wall, t.wall / taken))
    plain, results = best[0], best[1:]
    return DPResult(
        params=sum(p.numel() for p in plain_net.parameters()),
        batch=batch,
        steps=steps,
        mode=mode,
        plain=plain,
        dp=results[0],
        dp_poisson=results[1],
        dp_ew=results[2] if len(results) > 2 else None,
    )


# ------------------------------------------------------------------------ report
def ms(seconds: float) -> str:
    """Seconds as milliseconds, three significant digits."""
    return f"{seconds * 1e3:.3g}"


def print_report(
    *, he_rows: list[HERow], dp: DPResult | None, profile: dict[str, Any], loads: tuple[float, float]
) -> list[dict[str, Any]]:
    """Print the tables and the targets; return the targets as rows."""
    print()
    print(
        f"CKKS profile {profile['name']}: N={profile['poly_modulus_degree']}, "
        f"moduli {profile['coeff_mod_bit_sizes']} bits, scale 2^{profile['scale_bits']}, "
        f"{profile['slots']} slots, {profile['security_level']}-bit security; "
        f"{he_rows[0].sites if he_rows else 0} sites; times are CPU ms on one thread (wall ms in brackets)"
    )
    print(f"load average while measuring: {loads[0]:.1f} at start, {loads[1]:.1f} at end (busy cores: wall >> CPU)")
    head = (
        f"{'params':>10} {'chunks':>6} {'plain B':>10} {'enc B':>12} {'B ratio':>7} "
        f"{'plain agg':>16} {'enc agg':>18} {'agg ratio':>9} {'encrypt':>16} {'decrypt':>14} "
        f"{'enc+dec/1M':>10} {'rel err':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in he_rows:
        print(
            f"{r.params:>10,} {r.chunks:>6} {r.plain_bytes:>10,} {r.enc_bytes:>12,} {r.bytes_ratio:>7.2f} "
            f"{ms(r.plain_agg.cpu):>7} [{ms(r.plain_agg.wall):>6}] {ms(r.enc_agg.cpu):>8} [{ms(r.enc_agg.wall):>7}] "
            f"{r.agg_ratio:>9.1f} {ms(r.encrypt.cpu):>7} [{ms(r.encrypt.wall):>6}] "
            f"{ms(r.decrypt.cpu):>6} [{ms(r.decrypt.wall):>5}] {r.site_cpu_per_1m:>9.3f}s {r.rel_err:>8.1e}"
        )
    if dp is not None:
        print()
        print(f"DP-SGD on the digits CNN ({dp.params:,} params), batch {dp.batch}, {dp.steps} steps per loop:")
        print(f"  plain SGD step            {ms(dp.plain.cpu):>7} ms CPU [{ms(dp.plain.wall):>6} ms wall]")
        print(
            f"  Opacus DP-SGD step        {ms(dp.dp.cpu):>7} ms CPU [{ms(dp.dp.wall):>6} ms wall]  "
            f"ratio {dp.ratio:.2f}x (grad_sample_mode={dp.mode!r}, identical batches of {dp.batch})"
        )
        print(
            f"  Opacus, Poisson sampling  {ms(dp.dp_poisson.cpu):>7} ms CPU [{ms(dp.dp_poisson.wall):>6} ms wall]  "
            f"ratio {dp.ratio_poisson:.2f}x (batches of {dp.batch} on average, as dmsc_fed.privacy.dp trains)"
        )
        if dp.dp_ew is not None:
            print(
                f"  Opacus, other mode        {ms(dp.dp_ew.cpu):>7} ms CPU [{ms(dp.dp_ew.wall):>6} ms wall]  "
                f"ratio {dp.ratio_ew:.2f}x (for reference: {'hooks' if dp.mode != 'hooks' else 'ew'})"
            )

    targets: list[dict[str, Any]] = []

    def target(name: str, measured: float, limit: float, unit: str) -> None:
        targets.append({"target": name, "measured": measured, "limit": limit, "unit": unit, "pass": measured <= limit})

    for r in he_rows:
        target(f"encrypted bytes, {r.params:,} params", r.bytes_ratio, TARGET_BYTES_RATIO, "x float32")
    for r in he_rows:
        target(f"decrypted average error, {r.params:,} params", r.rel_err, TARGET_REL_ERR, "relative")
    big = max(he_rows, key=lambda r: r.params) if he_rows else None
    if big is not None:
        target(f"server aggregation, {big.sites} x {big.params:,} params", big.agg_ratio, TARGET_AGG_RATIO, "x plain")
        target("site encrypt + decrypt per 1M params", big.site_cpu_per_1m, TARGET_SITE_S_PER_1M, "s CPU")
    if dp is not None:
        target(f"DP-SGD step ({dp.mode})", dp.ratio, TARGET_DP_RATIO, "x plain step")
    print()
    print(f"{'target':<44} {'measured':>12} {'limit':>10}  unit")
    for t in targets:
        print(
            f"{t['target']:<44} {t['measured']:>12.3g} {t['limit']:>10.3g}  {t['unit']:<14} "
            f"{'PASS' if t['pass'] else 'FAIL'}"
        )
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if a target fails."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer DP steps (about a minute)")
    parser.add_argument("--profile", default=None, help="CKKS profile (default: dmsc_fed.privacy.he.DEFAULT_PROFILE)")
    parser.add_argument("--sites", type=int, default=10, help="sites per aggregation")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated parameter counts")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing (minimum taken)")
    parser.add_argument("--dp-steps", type=int, default=100, help="training steps per timed DP/plain loop")
    parser.add_argument(
        "--grad-sample-mode",
        default=GRAD_SAMPLE_MODE,
        choices=("hooks", "ew", "functorch"),
        help="Opacus per-sample gradient mode judged against the target (default: the one dmsc_fed.privacy.dp uses)",
    )
    parser.add_argument("--skip-dp", action="store_true", help="only the encryption part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else max(args.repeats, 1)
    dp_steps = min(args.dp_steps, 30) if args.quick else args.dp_steps
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.sites < 1 or not sizes or min(sizes) < 1 or max(sizes) > 20_000_000:
        parser.error("need at least one site and sizes between 1 and 20,000,000")

    import torch

    from dmsc_fed.privacy import he

    torch.set_num_threads(1)
    profile = he.get_profile(args.profile or he.DEFAULT_PROFILE)
    load0 = os.getloadavg()[0]

    he_rows = []
    for size in sizes:
        say(f"HE: {args.sites} sites x {size:,} params ({profile.name})")
        he_rows.append(
            bench_he(size=size, sites=args.sites, profile_name=profile.name, repeats=repeats, seed=args.seed)
        )
    dp = None
    if not args.skip_dp:
        say(f"DP: plain vs Opacus, {dp_steps} steps per loop")
        dp = bench_dp(steps=dp_steps, warmup=5, repeats=repeats, batch=32, seed=args.seed, mode=args.grad_sample_mode)
    targets = print_report(he_rows=he_rows, dp=dp, profile=profile.describe(), loads=(load0, os.getloadavg()[0]))
    if args.json is not None:
        payload = {
            "profile": profile.describe(),
            "he": [asdict(r) | {"bytes_ratio": r.bytes_ratio, "agg_ratio": r.agg_ratio} for r in he_rows],
            "dp": None
            if dp is None
            else asdict(dp) | {"ratio": dp.ratio, "ratio_poisson": dp.ratio_poisson, "ratio_ew": dp.ratio_ew},
            "targets": targets,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    say("done")
    return 0 if all(t["pass"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
