from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from dmsc_fed.config import DATASET_TASKS
from dmsc_fed.data import Scaler, describe_site, fit_scaler, load_site_data, pooled_data, site_task
from dmsc_fed.data.sources import BUNDLED_SHAPES, CLINICAL_TASKS, load_bundled, make_clinical
from dmsc_fed.errors import ConfigError, DataError, ModelError
from dmsc_fed.models import MultiTaskNet, build_model, profile_layers, task_view
from dmsc_fed.training import evaluate, model_for, train
from tests.conftest import make_config

SITES = [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}]


def _business(holders: dict[str, list[str]], heads: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {
        "mode": "business",
        "business": {
            "backbone": ["backbone"],
            "heads": heads or {task: [f"heads.{task}"] for task in holders},
            "holders": holders,
        },
    }


def _clinical(**overrides: Any) -> Any:
    data: dict[str, Any] = {
        "sites": SITES,
        "dataset": {"name": "clinical"},
        "model": {"name": "multitask", "hidden": [32, 32]},
    }
    data.update(overrides)
    return make_config(**data)


def _scaler(cfg: Any) -> Scaler:
    stats = [describe_site(cfg=cfg, site=s.name).stats for s in cfg.sites]
    return fit_scaler([s for s in stats if s is not None])


def _business_cfg() -> Any:
    return _clinical(segmentation=_business({"diagnosis": ["a", "b"], "readmission": ["c", "d"]}))


# --- the synthetic clinical data ------------------------------------------------------------


def test_clinical_data_is_deterministic_and_shaped() -> None:
    a, b = make_clinical(), load_bundled(name="clinical")
    np.testing.assert_array_equal(a.x, b.x)
    assert a.tasks is not None and b.tasks is not None
    for task in CLINICAL_TASKS:
        np.testing.assert_array_equal(a.tasks[task], b.tasks[task])
    assert a.x.shape == (2400, 16) and a.x.dtype == np.float32 and np.isfinite(a.x).all()
    assert a.task_names == ("diagnosis", "readmission") == DATASET_TASKS["clinical"]
    np.testing.assert_array_equal(a.y, a.labels("diagnosis"))
    assert dict(a.task_classes or {}) == {"diagnosis": 2, "readmission": 2}
    other = make_clinical(seed=1)
    assert not np.array_equal(other.x, a.x)


def test_clinical_data_does_not_depend_on_the_run_seed() -> None:
    raw = make_clinical()
    for seed in (1, 2):
        for task in CLINICAL_TASKS:
            pooled = pooled_data(cfg=make_config(seed=seed, dataset={"name": "clinical"}), task=task)
            assert pooled.num_train + pooled.num_test == 2400
            assert int(pooled.y_train.sum() + pooled.y_test.sum()) == int(raw.labels(task).sum())


def test_both_tasks_are_present_with_the_stated_balance() -> None:
    raw = make_clinical()
    diagnosis, readmission = raw.labels("diagnosis"), raw.labels("readmission")
    assert set(np.unique(diagnosis)) == set(np.unique(readmission)) == {0, 1}
    assert 0.4 <= diagnosis.mean() <= 0.6
    assert 0.25 <= readmission.mean() <= 0.30
    # shared latent factors: the tasks are related but not the same labels
    corr = np.corrcoef(diagnosis, readmission)[0, 1]
    assert 0.05 < abs(corr) < 0.6


def test_raw_data_rejects_unknown_task() -> None:
    with pytest.raises(DataError, match=r"no task 'mortality' \(its tasks: \['diagnosis', 'readmission'\]\)"):
        make_clinical().labels("mortality")


def test_clinical_shape_table_matches_the_data() -> None:
    shape, raw = BUNDLED_SHAPES["clinical"], make_clinical()
    assert shape.num_features == raw.x.shape[1] and shape.num_classes == raw.num_classes
    assert shape.task_classes == dict(raw.task_classes or {})


# --- which task a site holds -----------------------------------------------------------------


def test_site_task_outside_business_mode_is_none() -> None:
    cfg = _clinical()
    assert site_task(cfg=cfg, site="a") is None
    data = load_site_data(cfg=cfg, site="a", scaler=_scaler(cfg))
    assert data.task == "diagnosis" and data.num_classes == 2


def test_site_task_in_business_mode() -> None:
    cfg = _business_cfg()
    assert [site_task(cfg=cfg, site=s) for s in "abcd"] == ["diagnosis", "diagnosis", "readmission", "readmission"]


def test_business_sites_load_the_labels_of_their_task() -> None:
    cfg, plain = _business_cfg(), _clinical()
    scaler = _scaler(cfg)
    raw = make_clinical()
    index = {tuple(np.round(r, 3)): i for i, r in enumerate(scaler.apply(raw.x))}
    assert len(index) == raw.x.shape[0]
    for site, task in [("a", "diagnosis"), ("c", "readmission")]:
        data = load_site_data(cfg=cfg, site=site, scaler=scaler)
        assert data.task == task and data.num_classes == 2
        for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
            rows = [index[tuple(np.round(r, 3))] for r in x]
            np.testing.assert_array_equal(y, raw.labels(task)[rows])
        # the site holds the same patients as outside business mode
        same = load_site_data(cfg=plain, site=site, scaler=scaler)
        np.testing.assert_array_equal(
            np.sort(np.concatenate([data.x_train, data.x_test]), axis=0),
            np.sort(np.concatenate([same.x_train, same.x_test]), axis=0),
        )


def test_pooled_data_per_task() -> None:
    cfg = _business_cfg()
    diagnosis = pooled_data(cfg=cfg, task="diagnosis")
    readmission = pooled_data(cfg=cfg, task="readmission")
    everyone = pooled_data(cfg=cfg)
    assert diagnosis.task == "diagnosis" and readmission.task == "readmission" and everyone.task == "diagnosis"
    sizes = [describe_site(cfg=cfg, site=s) for s in "abcd"]
    assert diagnosis.num_train == sizes[0].num_train + sizes[1].num_train
    assert readmission.num_train == sizes[2].num_train + sizes[3].num_train
    assert everyone.num_train == sum(s.num_train for s in sizes)
    # outside business mode a task keyword relabels every site's rows
    plain = pooled_data(cfg=_clinical(), task="readmission")
    assert plain.num_train + plain.num_test == 2400 and 0.25 <= plain.y_train.mean() <= 0.32
    with pytest.raises(ConfigError, match="has no task 'mortality'"):
        pooled_data(cfg=cfg, task="mortality")
    with pytest.raises(ConfigError, match="has no tasks"):
        pooled_data(cfg=make_config(), task="diagnosis")


def _raw_business(holders: dict[str, list[str]], dataset: str = "clinical") -> Any:
    """A config whose business section skips the load-time check (as a hand-built config might)."""
    cfg = make_config(sites=SITES, dataset={"name": dataset}, model={"name": "mlp"})
    from dmsc_fed.segmentation import parse_segmentation

    spec = parse_segmentation(data=_business(holders))
    return cfg.model_copy(update={"segmentation": spec})


@pytest.mark.parametrize(
    ("holders", "site", "needle"),
    [
        (
            {"diagnosis": ["a", "b", "c", "d"], "readmission": ["c"]},
            "c",
            r"site 'c' holds tasks \['diagnosis', 'readmission'\].*tasks of dataset 'clinical': "
            r"\['diagnosis', 'readmission'\]",
        ),
        ({"diagnosis": ["a", "b"], "mortality": ["c", "d"]}, "c", r"site 'c' holds task 'mortality', which the"),
        ({"diagnosis": ["a", "b"], "readmission": ["c"]}, "d", r"site 'd' holds no task"),
    ],
)
def test_site_task_errors_name_the_site_task_and_dataset_tasks(
    holders: dict[str, list[str]], site: str, needle: str
) -> None:
    cfg = _raw_business(holders)
    with pytest.raises(ConfigError, match=needle):
        site_task(cfg=cfg, site=site)
    with pytest.raises(ConfigError, match=needle):
        load_site_data(cfg=cfg, site=site)


def test_site_task_on_a_dataset_without_tasks() -> None:
    cfg = _raw_business({"diagnosis": ["a", "b", "c", "d"]}, dataset="breast_cancer")
    with pytest.raises(ConfigError, match=r"dataset 'breast_cancer' has no tasks.*\['clinical'\]"):
        site_task(cfg=cfg, site="a")
    with pytest.raises(ConfigError, match="not a member"):
        site_task(cfg=_business_cfg(), site="zz")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            {"segmentation": _business({"diagnosis": ["a", "b"], "mortality": ["c", "d"]})},
            r"task 'mortality' is not a task of dataset 'clinical' \(its tasks: \['diagnosis', 'readmission'\]\)",
        ),
        (
            {"segmentation": _business({"diagnosis": ["a", "b", "c"], "readmission": ["c", "d"]})},
            r"site 'c' holds tasks \['diagnosis', 'readmission'\]",
        ),
        ({"segmentation": _business({"diagnosis": ["a", "b"], "readmission": ["c"]})}, "site 'd' holds no task"),
        ({"dataset": {"name": "breast_cancer"}}, r"model 'multitask' needs a dataset with tasks \(\['clinical'\]\)"),
        ({"model": {"name": "multitask", "hidden": []}}, "needs at least one hidden layer"),
    ],
)
def test_config_load_checks_business_tasks(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _clinical(**overrides)


# --- the multi-task model ---------------------------------------------------------------------


def test_model_for_builds_every_head() -> None:
    net = model_for(_business_cfg(), seed=0)
    assert isinstance(net, MultiTaskNet) and net.tasks == ("diagnosis", "readmission")
    names = list(net.state_dict())
    assert names == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.2.weight",
        "backbone.2.bias",
        "heads.diagnosis.weight",
        "heads.diagnosis.bias",
        "heads.readmission.weight",
        "heads.readmission.bias",
    ]
    x = torch.randn(5, 16)
    torch.testing.assert_close(net(x), net(x, "diagnosis"))  # generic code gets the first task
    assert net(x, "readmission").shape == (5, 2)
    with pytest.raises(ModelError, match="no head 'mortality'"):
        net(x, "mortality")


def test_multitask_needs_tasks_and_other_models_take_clinical() -> None:
    from dmsc_fed.config import ModelSpec

    with pytest.raises(ModelError, match="needs a dataset with tasks"):
        build_model(spec=ModelSpec(name="multitask"), num_features=16, num_classes=2)
    mlp = model_for(_clinical(model={"name": "mlp"}))
    assert mlp(torch.randn(3, 16)).shape == (3, 2)


def test_dropout_goes_into_the_backbone() -> None:
    net = model_for(_clinical(model={"name": "multitask", "hidden": [8], "dropout": 0.2}))
    assert isinstance(net, MultiTaskNet)
    assert any(isinstance(m, nn.Dropout) for m in net.backbone)


def test_task_view_shares_parameters_and_trains_backbone_and_its_head_only() -> None:
    net = model_for(_business_cfg(), seed=0)
    assert isinstance(net, MultiTaskNet)
    view = task_view(model=net, task="readmission")
    assert list(view.state_dict()) == [k for k in net.state_dict() if not k.startswith("heads.diagnosis")]
    shared = [*net.backbone.parameters(), *net.heads["readmission"].parameters()]
    assert all(p is q for p, q in zip(list(view.parameters()), shared, strict=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(view.parameters(), lr=0.5)
    loss = nn.functional.cross_entropy(view(torch.randn(8, 16)), torch.randint(0, 2, (8,)))
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {k for k in changed if k.startswith("backbone.")} == {k for k in after if k.startswith("backbone.")}
    assert {k for k in changed if k.startswith("heads.")} == {"heads.readmission.weight", "heads.readmission.bias"}
    with pytest.raises(ModelError, match="no head 'mortality'"):
        task_view(model=net, task="mortality")
    with pytest.raises(ModelError, match="needs the 'multitask' model"):
        task_view(model=nn.Linear(2, 2), task="diagnosis")


def test_multitask_net_and_view_pass_the_opacus_validator() -> None:
    net = model_for(_clinical(model={"name": "multitask", "hidden": [16, 8], "dropout": 0.1}))
    assert ModuleValidator.validate(net, strict=True) == []
    assert ModuleValidator.validate(task_view(model=net, task="diagnosis"), strict=True) == []


def test_layer_profile_refuses_the_multitask_net() -> None:
    with pytest.raises(ModelError, match="needs a chain"):
        profile_layers(model=model_for(_clinical()), example=torch.randn(1, 16))


@pytest.fixture
def one_thread() -> Any:
    """Tiny models train fastest on one thread (and do not fight parallel test runs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_centralized_sanity_training_on_both_tasks(one_thread: None) -> None:
    cfg = _clinical(optimizer="adam", learning_rate=0.01, local_epochs=15, batch_size=64)
    net = model_for(cfg, seed=0)
    accuracy = {}
    for task in ("diagnosis", "readmission"):
        data = pooled_data(cfg=cfg, task=task)
        view = task_view(model=net, task=task)
        train(model=view, x=data.x_train, y=data.y_train, cfg=cfg, device=torch.device("cpu"), seed=0)
        accuracy[task] = evaluate(model=view, x=data.x_test, y=data.y_test, device=torch.device("cpu")).accuracy
    assert accuracy["diagnosis"] > 0.75
    majority = 1.0 - float(pooled_data(cfg=cfg, task="readmission").y_test.mean())
    assert accuracy["readmission"] > majority + 0.05


def test_dp_training_of_a_view_updates_backbone_and_its_head_only(one_thread: None) -> None:
    from dmsc_fed.privacy.dp import train_private

    cfg = _clinical(model={"name": "multitask", "hidden": [16]}, local_epochs=1, batch_size=64)
    net = model_for(cfg, seed=0)
    data = pooled_data(cfg=cfg, task="readmission")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _, dp_round = train_private(
        model=task_view(model=net, task="readmission"),
        x=data.x_train[:256],
        y=data.y_train[:256],
        cfg=cfg,
        device=torch.device("cpu"),
        seed=0,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    after = net.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == ["backbone.0.bias", "backbone.0.weight", "heads.readmission.bias", "heads.readmission.weight"]
    assert dp_round.steps >= 1


def test_business_config_survives_the_json_roundtrip() -> None:
    from dmsc_fed.config import config_from_json

    cfg = _business_cfg()
    assert config_from_json(cfg.to_json()) == cfg
