"""Segmentation: the layer planners' quality and speed, and block rounds against full-model FedAvg.

Two parts, run together by default (``--part planners|rounds|all``).

Part 1, planners: tabu search against the exact solver
-------------------------------------------------------

What is measured, for chains of 10, 25, 50, 100 and 200 layers, ``--instances`` random
instances per size (seeded, so every run sees the same instances):

1. **Instances.** Layer compute costs ~ lognormal(0, 1) (a few heavy layers among many
   light ones, as convolutions among activations); activation bytes per cut ~
   lognormal(0, 1) scaled so that one cut costs 2%, 10% or 50% of a balanced stage's
   time (light, medium, heavy communication, in turn); ``K`` stages, ``K`` drawn in
   ``2 .. K_max(L)``, on heterogeneous sites of capacity 1, 1.5 (CPU pool) or 4, 8
   (GPU pool), each times uniform(0.8, 1.2); cost weights 1, bandwidth 1, latency 0.1
   per cut (:mod:`dmsc_fed.segmentation.costs`).
2. **Exact solver** (:func:`dmsc_fed.segmentation.solve_exact`): the optimum, its time
   and its number of threshold rounds (Pareto points visited).
3. **Tabu search** (:func:`dmsc_fed.segmentation.solve_tabu`) with the default rules
   of :class:`dmsc_fed.segmentation.TabuSpec` (300 iterations, tenure 7, neighbourhood
   1024) and seed = instance number: its time and its quality, ``tabu cost / exact
   cost - 1`` in percent.
4. **Target**, printed with the measured figures and PASS/FAIL: at 200 layers, the
   tabu plan is within 1% of the optimum on every instance, in under 1 s each.

Times are CPU seconds of this process (the planners are single-threaded numpy), the
minimum over ``--repeats``; wall-clock seconds are printed too, but on a shared machine
they mostly measure the other tenants. The target is judged on CPU seconds.

Part 2, rounds: block segmentation against full-model FedAvg
-------------------------------------------------------------

The shipped block example (``examples/blocks/config.toml``: digits CNN, 4 sites, two in
the GPU pool and two in the CPU pool, 8 blocks, replication 2, 4 local epochs) is run
for ``--rounds`` rounds (default 3, ``--quick`` 1) four times, side by side: **block**
(the config as shipped) and **FedAvg** (the same config without its
``[segmentation]`` section: every site trains and returns the whole model), each in
plaintext (``privacy.encryption = "off"``) and with CKKS (``"ckks"``).

Everything runs in this process through the real code paths, without Flower
processes: key material from :func:`dmsc_fed.security.provision.provision`; the join
phase is :func:`server.join.discover_sites` answered by the sites' own
:func:`clients.site.handle_join`; the strategy is built by the server's own
``server.loop.build_strategy`` (its segment layout planned over the sites that joined),
with :func:`server.loop.signature_check` as reply check; the task config record is the
one ``run_federation`` sends (task, task id, federated scaler, segment layout). Each
round is what Flower's ``Strategy.start`` does: ``configure_train``, one
:func:`clients.site.handle_train` per message (every site signs its reply),
``aggregate_train`` on the replies, then ``configure_evaluate``,
:func:`clients.site.handle_evaluate`, ``aggregate_evaluate``. A rejected or refused
reply is printed and makes the exit status 1.

Per round and variant:

* **Bytes uploaded**: over the sites, the bytes of the arrays of their replies
  (``sum(a.numpy().nbytes ...)``: float32 values or CKKS ciphertext bytes; metrics and
  signatures not counted). **Bytes downloaded**: the arrays of every training
  message, i.e. the global model record times the sites. Round 1 sends the plaintext
  initial model in every variant; under CKKS the global model travels encrypted from
  round 2 on (whole under FedAvg, the blocks' ciphertexts beside zeroed plaintext
  tensors in block mode).
* **Site time**: CPU seconds of one ``handle_train`` call (one thread:
  ``torch.set_num_threads(1)``, ``device = "cpu"``, TenSEAL contexts single-threaded),
  the minimum over ``--repeats`` calls on the same message (training is seeded; the
  last reply is the one aggregated), mean and max over the sites, split by wrapping, for the duration of the run, the
  functions ``handle_train`` calls: *open* (``open_global``: the global model, CKKS
  decryption included), *train* (``fit``), *seal* (``encrypter`` and ``seal_update``
  or ``seal_segments``: encryption included), *sign* (``sign_reply``), and *other*
  (the rest: task parsing, data loading, model building, validation score).
* **Server time**: CPU seconds of ``aggregate_train`` on the real replies, signature
  verification and reply validation included.
* **Accuracy** after each round: ``aggregate_evaluate``'s accuracy on the sites' test
  splits, weighted by test size; it shows what training each block at two sites of
  four trades against training everything everywhere.

Ratios are block over FedAvg. CPU seconds, not wall seconds, because the machine is
shared; an untimed warm-up call runs first so that one-off imports are not counted.

Usage::

    python benchmarks/segmentation.py [--part planners|rounds|all] [--quick] [--instances 10] [--repeats 3]
        [--seed 0] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from dmsc_fed.segmentation import Chain, CostWeights, LayerPlan, TabuSpec, make_chain, solve_exact, solve_tabu

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict

    from dmsc_fed.config import FederationConfig

T = TypeVar("T")

SIZES = (10, 25, 50, 100, 200)
MAX_STAGES = {10: 4, 25: 6, 50: 8, 100: 8, 200: 8}
COMM_SHARES = (0.02, 0.1, 0.5)
CAPACITIES = (1.0, 1.5, 4.0, 8.0)
TARGET_LAYERS = 200
TARGET_GAP_PCT = 1.0
TARGET_SECONDS = 1.0

REPO = Path(__file__).resolve().parents[1]
BLOCKS_CONFIG = REPO / "examples" / "blocks" / "config.toml"
MODES = ("fedavg", "block")
ENCRYPTIONS = ("off", "ckks")
MODE_NAMES = {"fedavg": "FedAvg", "block": "block"}
ENCRYPTION_NAMES = {"off": "plaintext", "ckks": "CKKS"}
PHASES = ("open", "train", "seal", "sign")
#: (module, function, phase): what ``handle_train`` calls, timed while the rounds run.
TIMED_CALLS = (
    ("clients.site", "open_global", "open"),
    ("clients.site", "fit", "train"),
    ("clients.site", "encrypter", "seal"),
    ("clients.site", "seal_update", "seal"),
    ("clients.segments", "seal_segments", "seal"),
    ("clients.site", "sign_reply", "sign"),
)

_T0 = time.monotonic()


def say(msg: str) -> None:
    """Progress line on stderr, with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def random_chain(*, layers: int, stages: int, comm_share: float, rng: np.random.Generator) -> Chain:
    """One random instance (see the module docstring)."""
    compute = rng.lognormal(0.0, 1.0, layers)
    capacities = rng.choice(CAPACITIES, stages) * rng.uniform(0.8, 1.2, stages)
    balanced_stage = compute.sum() / capacities.sum()
    activations = rng.lognormal(0.0, 1.0, layers - 1) * comm_share * balanced_stage
    return make_chain(
        compute=compute,
        activation_bytes=activations,
        capacities=capacities,
        weights=CostWeights(compute=1.0, communication=1.0, latency=1.0),
        bandwidth=1.0,
        cut_latency=0.1,
    )


def timed(fn: Callable[[], T], *, repeats: int) -> tuple[float, float, T]:
    """(min CPU seconds, min wall seconds, last result) over ``repeats`` calls."""
    cpu, wall = [], []
    result: T | None = None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    assert result is not None
    return min(cpu), min(wall), result


@dataclass(frozen=True)
class Instance:
    """One instance and both planners' figures."""

    layers: int
    stages: int
    comm_share: float
    exact_cost: float
    exact_rounds: int
    exact_cpu_s: float
    exact_wall_s: float
    tabu_cost: float
    tabu_cpu_s: float
    tabu_wall_s: float

    @property
    def gap_pct(self) -> float:
        """Tabu cost over the optimum, minus one, in percent."""
        return 100.0 * (self.tabu_cost / self.exact_cost - 1.0)


def run_size(*, layers: int, instances: int, repeats: int, seed: int) -> list[Instance]:
    """All instances of one chain length."""
    rng = np.random.default_rng([seed, layers])
    tabu = TabuSpec()
    out: list[Instance] = []
    for i in range(instances):
        stages = int(rng.integers(2, MAX_STAGES[layers] + 1))
        share = COMM_SHARES[i % len(COMM_SHARES)]
        chain = random_chain(layers=layers, stages=stages, comm_share=share, rng=rng)

        def run_exact(chain: Chain = chain) -> LayerPlan:
            return solve_exact(chain=chain)

        def run_tabu(chain: Chain = chain, i: int = i) -> LayerPlan:
            return solve_tabu(
                chain=chain, iterations=tabu.iterations, tenure=tabu.tenure, neighbourhood=tabu.neighbourhood, seed=i
            )

        e_cpu, e_wall, exact = timed(run_exact, repeats=repeats)
        t_cpu, t_wall, found = timed(run_tabu, repeats=repeats)
        out.append(
            Instance(
                layers=layers,
                stages=stages,
                comm_share=share,
                exact_cost=exact.cost.total,
                exact_rounds=exact.iterations,
                exact_cpu_s=e_cpu,
                exact_wall_s=e_wall,
                tabu_cost=found.cost.total,
                tabu_cpu_s=t_cpu,
                tabu_wall_s=t_wall,
            )
        )
    return out


def ms(seconds: float) -> str:
    """Milliseconds, for the table."""
    return f"{seconds * 1000:.0f}"


def print_report(rows: Sequence[Instance], loads: tuple[float, float]) -> bool:
    """The table and the target; returns whether the target passed."""
    print()
    print("Layer segmentation: tabu search against the exact solver (times: CPU ms, median / max; wall max)")
    print(f"load average while measuring: {loads[0]:.1f} at start, {loads[1]:.1f} at end (busy cores: wall >> CPU)")
    print()
    head = (
        f"{'layers':>6} {'inst':>4} {'K':>5}  {'exact ms':>11} {'wall':>6} {'rounds':>6}  "
        f"{'tabu ms':>11} {'wall':>6}  {'gap % mean':>10} {'gap % max':>9} {'optimal':>7}"
    )
    print(head)
    print("-" * len(head))
    for layers in sorted({r.layers for r in rows}):
        group = [r for r in rows if r.layers == layers]
        e_cpu = [r.exact_cpu_s for r in group]
        t_cpu = [r.tabu_cpu_s for r in group]
        gaps = [r.gap_pct for r in group]
        ks = [r.stages for r in group]
        print(
            f"{layers:>6} {len(group):>4} {min(ks):>2}-{max(ks):<2}  "
            f"{ms(statistics.median(e_cpu)):>5} / {ms(max(e_cpu)):>4} {ms(max(r.exact_wall_s for r in group)):>6} "
            f"{max(r.exact_rounds for r in group):>6}  "
            f"{ms(statistics.median(t_cpu)):>5} / {ms(max(t_cpu)):>4} {ms(max(r.tabu_wall_s for r in group)):>6}  "
            f"{statistics.mean(gaps):>10.3f} {max(gaps):>9.3f} {sum(g <= 1e-7 for g in gaps):>4}/{len(group):<2}"
        )
    target = [r for r in rows if r.layers == TARGET_LAYERS]
    if not target:
        print(f"\nno {TARGET_LAYERS}-layer instances: target not judged")
        return True
    worst_gap = max(r.gap_pct for r in target)
    worst_cpu = max(r.tabu_cpu_s for r in target)
    ok = worst_gap <= TARGET_GAP_PCT and worst_cpu < TARGET_SECONDS
    print()
    print(f"{'target':<52} {'measured':>10} {'limit':>8}")
    print(
        f"{'tabu gap to the optimum at 200 layers, worst (%)':<52} {worst_gap:>10.3f} {TARGET_GAP_PCT:>8.1f}  "
        f"{'PASS' if worst_gap <= TARGET_GAP_PCT else 'FAIL'}"
    )
    print(
        f"{'tabu time at 200 layers, worst (CPU s)':<52} {worst_cpu:>10.3f} {TARGET_SECONDS:>8.1f}  "
        f"{'PASS' if worst_cpu < TARGET_SECONDS else 'FAIL'}"
    )
    print(f"target: within {TARGET_GAP_PCT:g}% of the optimum in under {TARGET_SECONDS:g} s at 200 layers: ", end="")
    print("PASS" if ok else "FAIL")
    return ok


# --------------------------------------------------------------------------- rounds
@dataclass(frozen=True)
class SiteRound:
    """One site's training call in one round."""

    site: str
    pool: str
    blocks: int  # segments the site trained (0: the whole model)
    upload_bytes: int
    cpu_s: float  # the whole handle_train call
    phases: dict[str, float]  # CPU seconds inside the functions of TIMED_CALLS, by phase

    @property
    def other_s(self) -> float:
        """CPU seconds of ``handle_train`` outside the timed functions."""
        return self.cpu_s - sum(self.phases.values())


@dataclass(frozen=True)
class RoundRow:
    """One round of one variant."""

    mode: str
    encryption: str
    round: int
    download_bytes: int
    server_cpu_s: float
    accuracy: float | None
    loss: float | None
    sites: tuple[SiteRound, ...]
    problems: tuple[str, ...] = ()  # rejected or refused replies

    @property
    def upload_bytes(self) -> int:
        """Bytes of all the sites' reply arrays."""
        return sum(s.upload_bytes for s in self.sites)

    @property
    def site_mean_s(self) -> float:
        """Mean CPU seconds of one site's ``handle_train``."""
        return statistics.mean(s.cpu_s for s in self.sites) if self.sites else 0.0

    @property
    def site_max_s(self) -> float:
        """The slowest site's CPU seconds."""
        return max((s.cpu_s for s in self.sites), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived figures."""
        return asdict(self) | {
            "sites": [asdict(s) | {"other_s": s.other_s} for s in self.sites],
            "upload_bytes": self.upload_bytes,
            "site_mean_cpu_s": self.site_mean_s,
            "site_max_cpu_s": self.site_max_s,
        }


@dataclass
class PhaseClock:
    """CPU seconds spent inside the functions of :data:`TIMED_CALLS`, by phase."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def reset(self) -> None:
        """Start counting from zero."""
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _wrap(self, fn: Callable[..., T], phase: str) -> Callable[..., T]:
        @functools.wraps(fn)
        def timed_call(*args: Any, **kwargs: Any) -> T:
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.process_time() - c0

        return timed_call

    @contextlib.contextmanager
    def installed(self) -> Iterator[PhaseClock]:
        """Wrap the timed functions where ``handle_train`` looks them up; restore them on exit."""
        originals: list[tuple[Any, str, Any]] = []
        try:
            for module_name, name, phase in TIMED_CALLS:
                module = importlib.import_module(module_name)
                original = getattr(module, name)
                originals.append((module, name, original))
                setattr(module, name, self._wrap(original, phase))
            yield self
        finally:
            for module, name, original in reversed(originals):
                setattr(module, name, original)


class LocalGrid:
    """The Grid calls a round needs, answered in this process (the join through the sites' own handler)."""

    def __init__(self, nodes: dict[int, dict[str, str]]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        """Every site is connected."""
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Join queries only: each site answers with ``handle_join``."""
        from flwr.app import Message, MessageType

        from clients.site import handle_join

        replies = []
        for msg in messages:
            if msg.metadata.message_type != MessageType.QUERY:
                raise NotImplementedError(f"LocalGrid only answers join queries, not {msg.metadata.message_type!r}")
            content = handle_join(msg.content, self.nodes[msg.metadata.dst_node_id])
            replies.append(Message(content=content, reply_to=msg))
        return replies


def flower_identity() -> None:
    """Flower messages need a task identity outside a runtime (as the tests' ``flwr_identity`` fixture)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays of a message's content (0 if it carries none)."""
    from flwr.app import ArrayRecord

    from dmsc_fed.wire import ARRAYS_KEY

    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return 0
    return sum(int(a.numpy().nbytes) for a in arrays.values())


def variant_config(base: FederationConfig, *, mode: str, encryption: str, rounds: int) -> FederationConfig:
    """The shipped config with ``rounds`` rounds, ``encryption``, and for FedAvg no segmentation."""
    from dmsc_fed.config import parse_config

    data = base.model_dump(mode="json")
    data["rounds"] = rounds
    data["privacy"] = data["privacy"] | {"encryption": encryption}
    if mode == "fedavg":
        data["segmentation"] = None
    return parse_config(data=data, source=f"{BLOCKS_CONFIG} ({mode}, encryption {encryption})")


def node_config(*, site: str, keys: Path, state: Path) -> dict[str, str]:
    """What the site's SuperNode would be given: its name, key material and state directory, on CPU."""
    return {"site-name": site, "state-dir": str(state), "keys-dir": str(keys / "sites" / site), "device": "cpu"}


def run_variant(
    cfg: FederationConfig, *, mode: str, keys: Path, state: Path, run_id: int, clock: PhaseClock, repeats: int
) -> list[RoundRow]:
    """All rounds of one variant, in-process (see the module docstring)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.serverapp import Grid

    from clients.site import handle_evaluate, handle_train
    from dmsc_fed.data.scaling import fit_scaler
    from dmsc_fed.security.provision import ServerKeys
    from dmsc_fed.training import model_for
    from dmsc_fed.wire import SCALER_MEAN, SCALER_STD, SEGMENTS_KEY, TASK_ID_KEY, TASK_KEY
    from server.join import discover_sites
    from server.loop import build_strategy

    nodes = {i: node_config(site=s.name, keys=keys, state=state) for i, s in enumerate(cfg.sites, start=1)}
    local = LocalGrid(nodes)
    grid = cast(Grid, local)
    joined = discover_sites(grid=grid, cfg=cfg, timeout_s=cfg.strategy.join_timeout_s)
    server_keys = ServerKeys.load(keys / "server")
    task_id = f"{cfg.name}/{run_id}"
    initial = ArrayRecord(model_for(cfg, seed=cfg.seed).state_dict())
    strategy, _, layout = build_strategy(cfg, server_keys, initial, sites=joined.sites, task_id=task_id)
    task = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: task_id})
    if layout is not None:
        task[SEGMENTS_KEY] = layout.to_json()
    if joined.stats:
        scaler = fit_scaler(list(joined.stats.values()))
        task[SCALER_MEAN] = scaler.mean.tolist()
        task[SCALER_STD] = scaler.std.tolist()
    pools = {s.name: s.pool for s in cfg.sites}
    evaluate_config = ConfigRecord(dict(task))
    arrays = initial
    rows: list[RoundRow] = []
    for rnd in range(1, cfg.rounds + 1):
        say(f"{MODE_NAMES[mode]} {ENCRYPTION_NAMES[cfg.privacy.encryption]}: round {rnd}/{cfg.rounds}")
        msgs = list(strategy.configure_train(rnd, arrays, task, grid))
        replies: list[Message] = []
        sites: list[SiteRound] = []
        for msg in msgs:
            name = strategy.sites[msg.metadata.dst_node_id].name
            cpu, phases = float("inf"), dict(clock.seconds)
            for _ in range(repeats):  # the same message: seeded training, same update
                clock.reset()
                c0 = time.process_time()
                content = handle_train(msg.content, nodes[msg.metadata.dst_node_id])
                if time.process_time() - c0 < cpu:
                    cpu, phases = time.process_time() - c0, dict(clock.seconds)
            replies.append(Message(content=content, reply_to=msg))
            sites.append(
                SiteRound(
                    site=name,
                    pool=pools[name],
                    blocks=len(layout.of_site(name)) if layout is not None else 0,
                    upload_bytes=array_bytes(content),
                    cpu_s=cpu,
                    phases=phases,
                )
            )
        c0 = time.process_time()
        new, _ = strategy.aggregate_train(rnd, replies)
        server_cpu = time.process_time() - c0
        if new is not None:
            arrays = new
        evals = [
            Message(content=handle_evaluate(m.content, nodes[m.metadata.dst_node_id]), reply_to=m)
            for m in strategy.configure_evaluate(rnd, arrays, evaluate_config, grid)
        ]
        metrics = strategy.aggregate_evaluate(rnd, evals)
        report = strategy.reports[-1]
        problems = tuple(
            f"{r['site']} {r['stage']} {kind}: {r['reason']}"
            for kind, items in (("rejected", report.rejected), ("refused", report.refused))
            for r in items
        )
        rows.append(
            RoundRow(
                mode=mode,
                encryption=cfg.privacy.encryption,
                round=rnd,
                download_bytes=sum(array_bytes(m.content) for m in msgs),
                server_cpu_s=server_cpu,
                accuracy=float(cast(float, metrics["accuracy"])) if metrics and "accuracy" in metrics else None,
                loss=float(cast(float, metrics["loss"])) if metrics and "loss" in metrics else None,
                sites=tuple(sites),
                problems=problems,
            )
        )
    return rows


def warm_up(cfg: FederationConfig, *, keys: Path, state: Path) -> None:
    """One untimed encrypted training call and evaluation, so that one-off imports and set-up are not measured."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from clients.site import handle_evaluate, handle_train
    from dmsc_fed.training import model_for
    from dmsc_fed.wire import ARRAYS_KEY, CONFIG_KEY, ROUND_KEY, TASK_ID_KEY, TASK_KEY, WEIGHT_TOTAL_KEY

    site = cfg.sites[0].name
    config = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: "warm-up/0", ROUND_KEY: 1, WEIGHT_TOTAL_KEY: 10_000})
    arrays = ArrayRecord(model_for(cfg, seed=cfg.seed).state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
    node = node_config(site=site, keys=keys, state=state)
    handle_train(content, node)
    handle_evaluate(content, node)


@dataclass(frozen=True)
class RoundsResult:
    """Every variant's rounds, and what the reader needs to read them."""

    parameters: int
    block_count: int
    replication: int
    local_epochs: int
    he_profile: str
    repeats: int
    rows: list[RoundRow]
    loads: tuple[float, float]

    def of(self, mode: str, encryption: str) -> list[RoundRow]:
        """The rounds of one variant, in order."""
        return [r for r in self.rows if r.mode == mode and r.encryption == encryption]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "config": str(BLOCKS_CONFIG.relative_to(REPO)),
            "parameters": self.parameters,
            "block_count": self.block_count,
            "replication": self.replication,
            "local_epochs": self.local_epochs,
            "he_profile": self.he_profile,
            "site_repeats": self.repeats,
            "load_average": list(self.loads),
            "rounds": [r.to_dict() for r in self.rows],
            "ratios": {enc: ratios(self, enc) for enc in ENCRYPTIONS},
            "final_accuracy": {
                f"{mode}-{enc}": rows[-1].accuracy if (rows := self.of(mode, enc)) else None
                for mode in MODES
                for enc in ENCRYPTIONS
            },
        }


def run_rounds(*, rounds: int, repeats: int) -> RoundsResult:
    """Run the four variants (block and FedAvg, plaintext and CKKS) for ``rounds`` rounds.

    Each site's training call is timed ``repeats`` times on the same message (the minimum is kept).
    """
    import torch

    from dmsc_fed.config import load_config
    from dmsc_fed.security.provision import provision
    from dmsc_fed.training import model_for

    torch.set_num_threads(1)
    flower_identity()
    base = load_config(path=BLOCKS_CONFIG)
    seg = base.segmentation
    if seg is None or seg.block is None:
        raise SystemExit(f"{BLOCKS_CONFIG} has no [segmentation.block] section")
    load0 = os.getloadavg()[0]
    rows: list[RoundRow] = []
    with tempfile.TemporaryDirectory(prefix="dmsc-bench-") as tmp:
        work = Path(tmp)
        say("provisioning keys")
        keys = provision(out=work / "keys", sites=[s.name for s in base.sites], he_profile=base.privacy.he_profile)
        clock = PhaseClock()
        with clock.installed():
            say("warm-up")
            warm_up(variant_config(base, mode="fedavg", encryption="ckks", rounds=1), keys=keys, state=work / "warm-up")
            run_id = 0
            for encryption in ENCRYPTIONS:
                for mode in MODES:
                    run_id += 1
                    cfg = variant_config(base, mode=mode, encryption=encryption, rounds=rounds)
                    state = work / f"state-{mode}-{encryption}"
                    rows += run_variant(
                        cfg, mode=mode, keys=keys, state=state, run_id=run_id, clock=clock, repeats=repeats
                    )
    parameters = sum(int(v.numel()) for v in model_for(base, seed=base.seed).state_dict().values())
    return RoundsResult(
        parameters=parameters,
        block_count=seg.block.block_count or 0,
        replication=seg.block.replication,
        local_epochs=base.local_epochs,
        he_profile=base.privacy.he_profile,
        repeats=repeats,
        rows=rows,
        loads=(load0, os.getloadavg()[0]),
    )


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def ratios(result: RoundsResult, encryption: str) -> dict[str, float]:
    """Block over FedAvg, summed over the rounds (site time: per-round means summed)."""
    fed, block = result.of("fedavg", encryption), result.of("block", encryption)

    def total(rows: list[RoundRow], fn: Callable[[RoundRow], float]) -> float:
        return sum(fn(r) for r in rows)

    return {
        "upload": _ratio(total(block, lambda r: r.upload_bytes), total(fed, lambda r: r.upload_bytes)),
        "download": _ratio(total(block, lambda r: r.download_bytes), total(fed, lambda r: r.download_bytes)),
        "site_mean_cpu": _ratio(total(block, lambda r: r.site_mean_s), total(fed, lambda r: r.site_mean_s)),
        "site_max_cpu": _ratio(total(block, lambda r: r.site_max_s), total(fed, lambda r: r.site_max_s)),
        "server_cpu": _ratio(total(block, lambda r: r.server_cpu_s), total(fed, lambda r: r.server_cpu_s)),
    }


def kb(n: float) -> str:
    """Kilobytes (1000 bytes), for the table."""
    return f"{n / 1000:.1f}"


def acc(value: float | None) -> str:
    """An accuracy, or n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def print_rounds(result: RoundsResult) -> bool:
    """The tables of the rounds part; returns whether every reply was accepted."""
    first = result.rows[0] if result.rows else None
    block_rows = result.of("block", "off")
    sites = block_rows[0].sites if block_rows else ()
    rounds = max((r.round for r in result.rows), default=0)
    print()
    print(
        f"Block segmentation against full-model FedAvg, {rounds} round(s) in-process "
        f"({BLOCKS_CONFIG.relative_to(REPO)})"
    )
    print(
        f"digits CNN, {result.parameters:,} parameters ({kb(4 * result.parameters)} KB as float32), "
        f"{result.local_epochs} local epochs; {len(sites)} sites: "
        + ", ".join(f"{s.site} ({s.pool}, {s.blocks} blocks)" for s in sites)
    )
    print(
        f"block: {result.block_count} blocks, replication {result.replication}; CKKS profile {result.he_profile}; "
        f"CPU seconds on one thread (site: min of {result.repeats}); ratio = block / FedAvg"
    )
    print(f"load average while measuring: {result.loads[0]:.1f} at start, {result.loads[1]:.1f} at end")
    if first is None:
        return True

    def pairs() -> Iterator[tuple[str, int, RoundRow, RoundRow]]:
        for enc in ENCRYPTIONS:
            for f, b in zip(result.of("fedavg", enc), result.of("block", enc), strict=True):
                yield ENCRYPTION_NAMES[enc], f.round, f, b

    print()
    print("Bytes per round (KB = 1000 bytes; upload: every site's reply arrays; download: the global model x sites)")
    head = (
        f"{'':<10} {'round':>5}   {'upload FedAvg':>13} {'block':>8} {'ratio':>6}   "
        f"{'download FedAvg':>15} {'block':>8} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for enc, rnd, f, b in pairs():
        print(
            f"{enc:<10} {rnd:>5}   {kb(f.upload_bytes):>13} {kb(b.upload_bytes):>8} "
            f"{_ratio(b.upload_bytes, f.upload_bytes):>6.3f}   {kb(f.download_bytes):>15} {kb(b.download_bytes):>8} "
            f"{_ratio(b.download_bytes, f.download_bytes):>6.3f}"
        )

    print()
    print("CPU seconds per round (site: one handle_train; server: aggregate_train with signature checks)")
    head = (
        f"{'':<10} {'round':>5}   {'site mean FedAvg':>16} {'block':>6} {'ratio':>6}   "
        f"{'site max FedAvg':>15} {'block':>6} {'ratio':>6}   {'server FedAvg':>13} {'block':>6} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for enc, rnd, f, b in pairs():
        print(
            f"{enc:<10} {rnd:>5}   "
            f"{f.site_mean_s:>16.3f} {b.site_mean_s:>6.3f} {_ratio(b.site_mean_s, f.site_mean_s):>6.3f}   "
            f"{f.site_max_s:>15.3f} {b.site_max_s:>6.3f} {_ratio(b.site_max_s, f.site_max_s):>6.3f}   "
            f"{f.server_cpu_s:>13.4f} {b.server_cpu_s:>6.4f} {_ratio(b.server_cpu_s, f.server_cpu_s):>6.3f}"
        )

    print()
    print("Where a site's time goes (CPU s per site and round, mean over sites and rounds)")
    head = f"{'':<17} " + " ".join(f"{p:>6}" for p in (*PHASES, "other", "total"))
    print(head)
    print("-" * len(head))
    for enc in ENCRYPTIONS:
        for mode in MODES:
            calls = [s for r in result.of(mode, enc) for s in r.sites]
            if not calls:
                continue
            values = [statistics.mean(s.phases[p] for s in calls) for p in PHASES]
            values += [statistics.mean(s.other_s for s in calls), statistics.mean(s.cpu_s for s in calls)]
            print(f"{MODE_NAMES[mode] + ' ' + ENCRYPTION_NAMES[enc]:<17} " + " ".join(f"{v:>6.3f}" for v in values))

    print()
    print(f"Per site, round {rounds}: upload KB and handle_train CPU s (blocks: of the {result.block_count} it trains)")
    sub = "   ".join(f"{ENCRYPTION_NAMES[e]:<15}" for e in ENCRYPTIONS)
    print(f"{'':<19} {'upload KB':<33} {'CPU s':<33}")
    print(f"{'':<19} {sub}   {sub}")
    pair = f"{'FedAvg':>7} {'block':>7}"
    head = f"{'site':<7} {'pool':<4} {'blocks':>6} " + "   ".join([pair] * 4)
    print(head)
    print("-" * len(head))
    last = {(mode, enc): {s.site: s for s in result.of(mode, enc)[-1].sites} for mode in MODES for enc in ENCRYPTIONS}
    for s in sites:
        ups = "   ".join(
            f"{kb(last['fedavg', e][s.site].upload_bytes):>7} {kb(last['block', e][s.site].upload_bytes):>7}"
            for e in ENCRYPTIONS
        )
        cpus = "   ".join(
            f"{last['fedavg', e][s.site].cpu_s:>7.3f} {last['block', e][s.site].cpu_s:>7.3f}" for e in ENCRYPTIONS
        )
        print(f"{s.site:<7} {s.pool:<4} {s.blocks:>6} {ups}   {cpus}")

    print()
    print("Accuracy on the sites' test splits after each round (weighted by test size)")
    head = f"{'':<10} {'round':>5}   {'FedAvg':>7} {'block':>7} {'block - FedAvg':>14}"
    print(head)
    print("-" * len(head))
    for enc, rnd, f, b in pairs():
        diff = "n/a" if f.accuracy is None or b.accuracy is None else f"{b.accuracy - f.accuracy:+.4f}"
        print(f"{enc:<10} {rnd:>5}   {acc(f.accuracy):>7} {acc(b.accuracy):>7} {diff:>14}")

    print()
    print(f"Over the {rounds} round(s): block / FedAvg of the totals (site CPU: per-round figures summed)")
    head = (
        f"{'':<10} {'upload':>7} {'download':>8} {'site mean CPU':>13} {'site max CPU':>12} {'server CPU':>10}   "
        f"{'accuracy FedAvg':>15} {'block':>7}"
    )
    print(head)
    print("-" * len(head))
    for enc in ENCRYPTIONS:
        r = ratios(result, enc)
        print(
            f"{ENCRYPTION_NAMES[enc]:<10} {r['upload']:>7.3f} {r['download']:>8.3f} {r['site_mean_cpu']:>13.3f} "
            f"{r['site_max_cpu']:>12.3f} {r['server_cpu']:>10.3f}   "
            f"{acc(result.of('fedavg', enc)[-1].accuracy):>15} {acc(result.of('block', enc)[-1].accuracy):>7}"
        )
    problems = [
        f"{MODE_NAMES[r.mode]} {ENCRYPTION_NAMES[r.encryption]} round {r.round}: {p}"
        for r in result.rows
        for p in r.problems
    ]
    if problems:
        print()
        print("Replies left out (these figures do not describe full rounds):")
        for p in problems:
            print(f"  {p}")
    return not problems


def run_planners(*, sizes: Sequence[int], instances: int, repeats: int, seed: int) -> tuple[list[Instance], bool]:
    """Part 1: every planner instance, and whether the target passed."""
    load0 = os.getloadavg()[0]
    rows: list[Instance] = []
    for layers in sizes:
        say(f"planners: {layers} layers ...")
        rows += run_size(layers=layers, instances=instances, repeats=repeats, seed=seed)
    return rows, print_report(rows, (load0, os.getloadavg()[0]))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if the planners' target fails or a round left a reply out."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--part", choices=("planners", "rounds", "all"), default="all", help="what to measure")
    parser.add_argument(
        "--quick", action="store_true", help="planners: 3 instances per size; rounds: 1; one timing repeat"
    )
    parser.add_argument("--instances", type=int, default=10, help="instances per chain length")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timing repeats of planners and site calls (the minimum is reported)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the instances")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated chain lengths")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per variant (default 3, --quick 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    instances, repeats = (3, 1) if args.quick else (args.instances, args.repeats)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in MAX_STAGES]
    if unknown:
        parser.error(f"sizes must be among {sorted(MAX_STAGES)}, got {unknown}")
    ok = True
    out: dict[str, Any] = {}
    if args.part in ("planners", "all"):
        rows, planners_ok = run_planners(sizes=sizes, instances=instances, repeats=repeats, seed=args.seed)
        ok &= planners_ok
        out["planners"] = [asdict(r) | {"gap_pct": r.gap_pct} for r in rows]
    if args.part in ("rounds", "all"):
        result = run_rounds(rounds=rounds, repeats=repeats)
        ok &= print_rounds(result)
        out["rounds"] = result.to_dict()
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
