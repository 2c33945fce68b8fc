"""The ``dmsc-fed`` command line.

Every :class:`~dmsc_fed.errors.DmscError` becomes one line on stderr and its
exit code; a user mistake never shows a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dmsc_fed import cli_control
from dmsc_fed.config import FederationConfig, load_config
from dmsc_fed.errors import DmscError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dmsc_fed.launcher.runs import RunEvents

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated, privacy-preserving training on Flower.")
config_app = typer.Typer(no_args_is_help=True, help="Check federation config files.")
keys_app = typer.Typer(no_args_is_help=True, help="Create a federation's key material.")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(cli_control.tasks_app, name="tasks")
app.add_typer(cli_control.models_app, name="models")
app.command("coordinator")(cli_control.coordinator)
app.command("sites")(cli_control.sites)

console = Console()


def _version(value: bool) -> None:
    if value:
        from dmsc_fed import __version__

        console.print(f"dmsc-fed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Federated, privacy-preserving training on Flower."""


err_console = Console(stderr=True, soft_wrap=True)


@config_app.command("validate")
def config_validate(file: Annotated[Path, typer.Argument(help="Federation config (TOML).")]) -> None:
    """Print the resolved config, or the errors naming each bad field."""
    cfg = load_config(path=file)
    check_task(cfg)
    console.print_json(cfg.model_dump_json())


def check_task(cfg: FederationConfig, *, for_run: bool = False) -> None:
    """Checks that need the model or the server's components, before anything starts.

    The strategy must resolve (and, for a run, fit the privacy settings and the
    segmentation mode; the core names the ``strategies`` package by string only:
    the layering rule); a segmentation spec must fit the model and the sites.
    """
    registry = importlib.import_module("strategies.registry")
    if for_run:  # also: the strategy fits the privacy settings and the segmentation mode can run
        registry.strategy_for(cfg)
    else:
        cls = registry.resolve_strategy(cfg.strategy.name)
        registry.check_options(cls, cfg.strategy.options)
        cls.check_config(cfg)
    if cfg.segmentation is None:
        return
    from dmsc_fed.segmentation.task import plan_task
    from dmsc_fed.training import model_for

    shapes = [(k, tuple(v.shape)) for k, v in model_for(cfg).state_dict().items()]
    plan_task(cfg, shapes=shapes, members=[s.name for s in cfg.sites], fallback=registry.segment_rule(cfg))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@contextlib.contextmanager
def _progress(rounds: int) -> Iterator[RunEvents]:
    """A rich progress bar plus one line per round (round, loss, accuracy)."""
    from dmsc_fed.launcher.runs import RunEvents

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("starting", total=rounds)

        def on_round(row: dict[str, Any]) -> None:
            progress.console.print(
                f"round {row['round']:>3}/{rounds}  loss {_fmt(row['loss'])}  accuracy {_fmt(row['accuracy'])}  "
                f"sites {len(row['train_sites'])}  rejected {len(row['rejected'])}  ({row['seconds']:.1f}s)"
            )
            progress.update(bar, completed=row["round"])

        yield RunEvents(on_stage=lambda msg: progress.update(bar, description=msg[:60]), on_round=on_round)
        progress.update(bar, description="done")


def _report(cfg: FederationConfig, result: dict[str, Any], *, baseline: dict[str, Any] | None) -> None:
    """Print the final accuracy table and, with DP, each site's privacy spend."""
    table = Table(title=f"{cfg.name}: test accuracy on the sites' held-out splits")
    for col, justify in (("model", "left"), ("accuracy", "right"), ("loss", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    fm = result["final_metrics"]
    privacy = " + ".join(
        x for x in ("DP" if cfg.privacy.dp == "on" else "", "HE" if cfg.privacy.encryption != "off" else "") if x
    )
    name = f"federated ({result['rounds_completed']} rounds{', ' + privacy if privacy else ''})"
    table.add_row(name, _fmt(fm.get("accuracy")), _fmt(fm.get("loss")))
    tasks = (result.get("segmentation") or {}).get("tasks") or {}
    if tasks:  # business mode: each task over the sites holding it
        for task, row in tasks.items():
            table.add_row(f"  {task} (federated)", _fmt(row.get("accuracy")), _fmt(row.get("loss")))
            pooled = ((baseline or {}).get("tasks") or {}).get(task)
            if pooled is not None:
                table.add_row(f"  {task} (centralized)", _fmt(pooled.get("accuracy")), _fmt(pooled.get("loss")))
    elif baseline is not None:
        table.add_row(
            "centralized (pooled data, no privacy)", _fmt(baseline.get("accuracy")), _fmt(baseline.get("loss"))
        )
    console.print(table)
    binary = {k: fm[k] for k in ("precision", "recall", "f1", "auc") if fm.get(k) is not None}
    if binary:  # a binary task: counts summed over the sites, not averaged (threshold 0.5)
        console.print("  federated, all sites' test splits: " + "  ".join(f"{k} {v:.4f}" for k, v in binary.items()))
    if cfg.privacy.dp == "on":
        for site, info in result["sites"].items():
            console.print(
                f"  {site}: epsilon {info.get('epsilon', 0.0):.3f} at delta {cfg.privacy.delta:g}"
                + (f"  (stopped: {info['stopped']})" if info.get("stopped") else "")
            )
    if result.get("ended_early"):
        console.print(f"[yellow]ended early:[/] {result['ended_early']}")


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Federation config (TOML).")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/NAME-TIMESTAMP).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Turn off TLS and SuperNode authentication.")] = False,
) -> None:
    """Run a federation locally: a SuperLink and one SuperNode per site on 127.0.0.1."""
    from dmsc_fed.baseline import centralized_baseline
    from dmsc_fed.data import describe_site
    from dmsc_fed.launcher.local import LocalFederation
    from dmsc_fed.privacy import dp
    from dmsc_fed.runfiles import write_json

    cfg = load_config(path=config)
    check_task(cfg, for_run=True)
    out = out or _default_out(cfg.name)
    console.print(
        f"[bold]dmsc-fed[/] run [cyan]{cfg.name}[/]: {len(cfg.sites)} sites, {cfg.rounds} rounds, "
        f"model {cfg.model.name}, dataset {cfg.dataset.name} -> {out}"
    )
    started = time.time()
    for site in cfg.sites:  # every site's data and DP settings must work before any process starts
        declared = describe_site(cfg=cfg, site=site.name)
        if cfg.privacy.dp == "on":
            dp.plan(cfg, num_train=declared.num_train)
    with _progress(cfg.rounds) as events:
        result = LocalFederation(cfg=cfg, out=out, insecure=insecure, events=events).run()
    baseline = centralized_baseline(cfg=cfg)
    seg = cfg.segmentation
    per_task = {}
    if seg is not None and seg.business is not None:
        for task in seg.business.heads:
            res = centralized_baseline(cfg=cfg, task=task)
            per_task[task] = {"accuracy": res.accuracy, "loss": res.loss}
    summary = result | {
        "centralized_baseline": {"accuracy": baseline.accuracy, "loss": baseline.loss}
        | ({"tasks": per_task} if per_task else {}),
        "wall_seconds": round(time.time() - started, 1),
        "secure_transport": not insecure,
    }
    write_json(out / "summary.json", summary)
    _report(cfg, summary, baseline=summary["centralized_baseline"])
    console.print(f"run directory: {out}  ({summary['wall_seconds']}s)")


@app.command("submit")
def submit(
    config: Annotated[Path, typer.Argument(help="Federation config (TOML).")],
    server: Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")],
    keys: Annotated[Path | None, typer.Option(help="The server/ folder of 'dmsc-fed keys init'.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory on the SuperLink's machine.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (testing only).")] = False,
) -> None:
    """Submit a task to a SuperLink started with 'dmsc-fed server' and follow it to the end."""
    from dmsc_fed.launcher.remote import submit_run
    from dmsc_fed.runfiles import write_json

    cfg = load_config(path=config)
    check_task(cfg, for_run=True)
    out = out or _default_out(cfg.name)
    with _progress(cfg.rounds) as events:
        result = submit_run(cfg=cfg, server=server, keys=keys, out=out, insecure=insecure, events=events)
    write_json(out / "summary.json", result | {"secure_transport": not insecure})
    _report(cfg, result, baseline=None)
    console.print(f"run directory: {out}")


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@app.command("server")
def server(
    port: Annotated[int, typer.Option(help="Port of the SuperLink (Fleet, Control and Runtime APIs).")] = 9092,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for all interfaces.")] = "127.0.0.1",
    keys: Annotated[Path | None, typer.Option(help="The server/ folder of 'dmsc-fed keys init'.")] = None,
    state: Annotated[Path, typer.Option(help="Directory for the SuperLink database and logs.")] = Path(
        "superlink-state"
    ),
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS and no SuperNode authentication (testing only).")
    ] = False,
) -> None:
    """Start the coordinator's SuperLink for a multi-machine deployment and keep it running."""
    from dmsc_fed.launcher.remote import serve

    serve(host=host, port=port, keys=keys, state=state, insecure=insecure, say=console.print)


@app.command("client")
def client(
    server: Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")],
    site: Annotated[str, typer.Option(help="This site's name in the federation config.")],
    keys: Annotated[
        Path | None, typer.Option(help="This site's folder (sites/SITE) from 'dmsc-fed keys init'.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="This site's CSV file (for csv datasets).")] = None,
    policy: Annotated[Path | None, typer.Option(help="This site's privacy policy (TOML).")] = None,
    port: Annotated[int, typer.Option(help="Local port of the SuperNode's runtime API.")] = 9094,
    state: Annotated[Path, typer.Option(help="Directory for the site's privacy ledger and logs.")] = Path(
        "supernode-state"
    ),
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (testing only).")] = False,
    chaos: Annotated[
        str | None,
        typer.Option(hidden=True, help="Chaos testing only: a fault schedule such as '2:nan,3:slow=90'."),
    ] = None,
) -> None:
    """Start this site's SuperNode and keep it running; it trains on the data given here only."""
    from dmsc_fed.launcher.remote import join

    join(
        server=server,
        site=site,
        keys=keys,
        data=data,
        policy=policy,
        port=port,
        state=state,
        insecure=insecure,
        say=console.print,
        chaos=chaos,
    )


@keys_app.command("init")
def keys_init(
    out: Annotated[Path, typer.Option(help="Directory to create the key material in.")],
    sites: Annotated[str, typer.Option(help="Comma-separated site names.")],
    host: Annotated[
        list[str] | None, typer.Option(help="Address sites use to reach the SuperLink (repeatable).")
    ] = None,
    he_profile: Annotated[str, typer.Option(help="CKKS parameter profile.")] = "add-128",
) -> None:
    """Create a federation's keys: TLS, SuperNode keys, signing keys, CKKS contexts."""
    from dmsc_fed.security.provision import provision

    names = [s.strip() for s in sites.split(",") if s.strip()]
    provision(out=out, sites=names, hosts=host or [], he_profile=he_profile)
    console.print(f"key material for {names} in {out}: give server/ to the coordinator and sites/SITE to each site")


@keys_app.command("add-site")
def keys_add_site(
    out: Annotated[Path, typer.Option(help="The directory 'dmsc-fed keys init' created.")],
    site: Annotated[str, typer.Option(help="The new site's name.")],
) -> None:
    """Add a site to an existing federation without touching the other sites' keys."""
    from dmsc_fed.security.provision import add_site

    made = add_site(out=out, site=site)
    console.print(f"key material for {site} in {made}; restart 'dmsc-fed server' to register its SuperNode key")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dmsc-fed`` console script."""
    try:
        app(args=argv, standalone_mode=False)
    except DmscError as err:
        err_console.print(Text("error: ", style="bold red") + Text(str(err)), highlight=False)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        err_console.print("[bold red]error:[/] interrupted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
