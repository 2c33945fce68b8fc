from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from dmsc_fed.config import ModelSpec
from dmsc_fed.errors import PrivacyError
from dmsc_fed.models import build_model
from dmsc_fed.privacy.dp import (
    LedgerEntry,
    PrivacyLedger,
    calibrate_noise,
    epsilon_of,
    sample_rate,
    steps_per_round,
    train_private,
)
from tests.conftest import make_config


@pytest.mark.parametrize(("name", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_reported_epsilon_equals_opacus_accountant(name: str, cls: type) -> None:
    # Two rounds of 30 steps at sigma 1.1, q 0.05, then one of 20 steps at sigma 0.9, q 0.1.
    ref = cls()
    for sigma, q, n in ((1.1, 0.05, 30), (1.1, 0.05, 30), (0.9, 0.1, 20)):
        for _ in range(n):
            ref.step(noise_multiplier=sigma, sample_rate=q)
    entries = [
        LedgerEntry(task="t", round=1, noise_multiplier=1.1, sample_rate=0.05, steps=30),
        LedgerEntry(task="t", round=2, noise_multiplier=1.1, sample_rate=0.05, steps=30),
        LedgerEntry(task="t", round=3, noise_multiplier=0.9, sample_rate=0.1, steps=20),
    ]
    assert epsilon_of(entries, delta=1e-5, accountant=name) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-6)


def test_ledger_survives_a_restart_and_fails_closed_when_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    assert ledger.epsilon(delta=1e-5, accountant="rdp") == 0.0
    entry = LedgerEntry(task="t", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50)
    ledger.record(entry)
    again = PrivacyLedger(path)  # a fresh process reads the same spend
    assert again.entries == [entry]
    assert again.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(ledger.epsilon(delta=1e-5, accountant="rdp"))
    path.write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        PrivacyLedger(path)


def test_calibrated_noise_meets_the_target() -> None:
    q, steps = 0.05, 300
    sigma = calibrate_noise(target_epsilon=3.0, delta=1e-5, rate=q, steps=steps, accountant="rdp")
    eps = epsilon_of([LedgerEntry("t", 1, sigma, q, steps)], delta=1e-5, accountant="rdp")
    assert 2.9 < eps <= 3.0
    with pytest.raises(PrivacyError, match="no noise multiplier reaches epsilon"):
        calibrate_noise(target_epsilon=1e-9, delta=1e-12, rate=1.0, steps=10_000, accountant="rdp")
    with pytest.raises(PrivacyError, match="unknown accountant"):
        calibrate_noise(target_epsilon=1.0, delta=1e-5, rate=0.1, steps=10, accountant="moments")


def test_steps_and_rate_follow_opacus() -> None:
    assert steps_per_round(num_train=100, batch_size=32, local_epochs=2) == 8  # ceil(100/32) = 4 batches per epoch
    assert sample_rate(num_train=100, batch_size=32) == pytest.approx(1 / 4)
    assert sample_rate(num_train=10, batch_size=32) == 1.0


def test_train_private_clips_adds_noise_and_counts_steps() -> None:
    cfg = make_config(local_epochs=2, batch_size=8, learning_rate=0.1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 30)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = build_model(spec=ModelSpec(name="logreg"), num_features=30, num_classes=2, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    fit, done = train_private(
        model=model,
        x=x,
        y=y,
        cfg=cfg,
        device=torch.device("cpu"),
        seed=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    assert done.steps == steps_per_round(num_train=40, batch_size=8, local_epochs=2)
    assert done.sample_rate == pytest.approx(sample_rate(num_train=40, batch_size=8))
    assert fit.num_examples == 40
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert set(model.state_dict()) == {"1.weight", "1.bias"}  # Opacus's wrapper did not leak into the keys
    json.dumps(fit.__dict__)


def test_empty_poisson_batches_still_take_a_noisy_step() -> None:
    # batch_size 1 on 20 samples: sample rate 1/20, so many Poisson batches are empty.
    cfg = make_config(local_epochs=3, batch_size=1, learning_rate=0.1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=20).astype(np.int64)
    model = build_model(spec=ModelSpec(name="cnn"), num_features=64, num_classes=10, image_shape=(1, 8, 8), seed=0)
    _, done = train_private(
        model=model,
        x=x,
        y=y,
        cfg=cfg,
        device=torch.device("cpu"),
        seed=3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    assert done.steps == 60
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_grad_sample_mode_matches_opacus_hooks(name: str) -> None:
    """The per-sample gradient mode we use gives the same clipped update as Opacus's default."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from dmsc_fed.privacy.dp import GRAD_SAMPLE_MODE

    shape = {"cnn": (64, 10, (1, 8, 8))}.get(name, (30, 2, None))
    x, y = torch.randn(16, shape[0], generator=torch.Generator().manual_seed(0)), torch.arange(16) % shape[1]
    params = []
    for mode in ("hooks", GRAD_SAMPLE_MODE):
        model = build_model(
            spec=ModelSpec(name=name), num_features=shape[0], num_classes=shape[1], image_shape=shape[2], seed=0
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
        private, popt, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            grad_sample_mode=mode,
        )
        popt.zero_grad()
        torch.nn.functional.cross_entropy(private(x), y).backward()
        popt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*params, strict=True))
