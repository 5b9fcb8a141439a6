"""The only reader of argv: `distqat <command> [options] [--section.field VALUE ...]` -> Config -> role.

Options after the command's own are config overrides (`--diloco.batch-size-per-step 16`, the docs'
`--diloco-batch-size-per-step 16`, `--device cpu`, `--initial-peers ADDR`). Every DistQatError ends the
command with its one-line message and exit code 1, after every process it started has been stopped.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from distqat.config import Config, load_config
from distqat.errors import DistQatError

# torchvision and hivemind use torch.jit.script at import; torch 2.14 warns about it on every start.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DistQat: distributed quantization-aware training on unreliable, heterogeneous machines.",
)

ConfigOption = typer.Option(None, "--config", "--config-path", "-c", help="YAML config (default: configs/demo.yaml)")
MaxStepsOption = typer.Option(0, "--max-steps", min=0, help="stop after this many trainer steps in total (0: never)")
SummaryOption = typer.Option(
    None, "--summary", help="write the run summary JSON here (default: <log dir>/summary.json)"
)
ResumeOption = typer.Option(
    False,
    "--resume",
    help="continue from the newest valid checkpoint of every stage (and its step count); without it a run "
    "ignores checkpoints written before it started",
)


def _load(config_path: Path | None, ctx: typer.Context) -> Config:
    # `--disable-quant` (any command): LSQ quantisers and `codes` boundaries off, whatever the config says.
    args = ["--quant.enable=false" if arg == "--disable-quant" else arg for arg in ctx.args]
    return load_config(config_path, args)


def _run(body: Callable[[threading.Event], Any]) -> Any:
    """Run a command with SIGTERM/SIGINT turned into a stop event; report DistQatErrors as one line."""
    from distqat.launch import install_shutdown_handlers

    stop = threading.Event()
    install_shutdown_handlers(stop)
    try:
        return body(stop)
    except DistQatError as error:
        typer.echo(f"distqat: error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _role(name: str, config_path: Path | None, ctx: typer.Context, body: Callable[[Config, threading.Event], None]):
    def run(stop: threading.Event) -> None:
        from distqat.runtime import setup_role_process

        config = _load(config_path, ctx)
        logger = setup_role_process(name)
        try:
            body(config, stop)
        except DistQatError as error:
            logger.error("%s", error)
            raise

    _run(run)


def _finish_launch(summary: dict[str, Any] | None, stop: threading.Event) -> None:
    from distqat.launchers import console, print_summary

    if summary is not None:
        print_summary(summary)
    elif not stop.is_set():
        console.print("[yellow]no summary was written (see monitor.log)[/]")


# --- launchers -------------------------------------------------------------------------------------------


@app.command(context_settings=OVERRIDES)
def local(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    max_steps: int = MaxStepsOption,
    summary: Path = SummaryOption,
    num_servers: int = typer.Option(None, "--num-servers", min=1, help="servers to start (default: world_size)"),
    resume: bool = ResumeOption,
) -> None:
    """Run the whole swarm on this machine: monitor, stage servers, client and trainers."""
    from distqat.launchers import run_local

    def body(stop: threading.Event) -> None:
        config = _load(config_path, ctx)
        _finish_launch(run_local(config, stop, max_steps, summary, num_servers, resume=resume), stop)

    _run(body)


@app.command(context_settings=OVERRIDES)
def coordinator(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    max_steps: int = MaxStepsOption,
    summary: Path = SummaryOption,
    resume: bool = ResumeOption,
) -> None:
    """Run the monitor and the client here; servers join from other machines."""
    from distqat.launchers import run_coordinator

    def body(stop: threading.Event) -> None:
        config = _load(config_path, ctx)
        _finish_launch(run_coordinator(config, stop, max_steps, summary, resume=resume), stop)

    _run(body)


@app.command(context_settings=OVERRIDES)
def servers(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    num_servers: int = typer.Option(1, "--num-servers", min=1, help="stage servers to start on this machine"),
    stage: str = typer.Option(None, "--stage", help="serve this stage (default: each takes the neediest)"),
) -> None:
    """Start stage servers on this machine that join a swarm (--initial-peers)."""
    from distqat.launchers import run_servers

    _run(lambda stop: run_servers(_load(config_path, ctx), stop, num_servers, stage))


@app.command(context_settings=OVERRIDES)
def baseline(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    max_steps: int = typer.Option(100, "--max-steps", min=0, help="steps to train (0: until Ctrl+C)"),
    summary: Path = SummaryOption,
    save_state: Path = typer.Option(
        None, "--save-state", help="write the trained stages here (safetensors + manifest.json; `distqat export` input)"
    ),
) -> None:
    """Train the same model, data and optimiser in this one process (what the swarm is measured against)."""
    from distqat.distributed.trainer import run_baseline

    def body(config: Config, stop: threading.Event) -> None:
        _finish_launch(run_baseline(config, max_steps, stop, summary, save_state), stop)

    _role("baseline", config_path, ctx, body)


@app.command("dry-run", context_settings=OVERRIDES)
def dry_run_command(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    json_path: Path = typer.Option(None, "--json", help="also write the report as JSON here"),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="samples in the sample batch"),
) -> None:
    """Build every stage on CPU, run one sample batch forward and backward, print stages and boundary sizes."""
    import json

    from distqat.dry_run import dry_run, format_report

    def body(stop: threading.Event) -> None:
        config = _load(config_path, ctx)
        report = dry_run(config, batch_size)
        typer.echo(format_report(report, f"dry run of {config_path or 'the default config'} (CPU, batch {batch_size})"))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report.to_json(), indent=2))

    _run(body)


@app.command("export", context_settings=OVERRIDES)
def export_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        help="stage-state folder (`distqat baseline --save-state`), or a swarm's checkpoint folder with --config",
    ),
    out: Path = typer.Option(..., "--out", help="folder to write the integer model to"),
    config_path: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="the run's config, for a swarm checkpoint folder (a stage-state folder has its own)",
    ),
) -> None:
    """Export a quantisation-aware trained model: integer weights, steps, zero points, and a JSON manifest."""
    from distqat.quant.export import export_checkpoint

    def body(stop: threading.Event) -> None:
        config = _load(config_path, ctx) if config_path is not None else None
        manifest = export_checkpoint(checkpoint, out, config)
        typer.echo(f"exported {checkpoint} to {out} (manifest: {manifest})")

    _run(body)


@app.command(context_settings=OVERRIDES)
def status(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="print the swarm as JSON (for scripts)"),
    timeout: float = typer.Option(20.0, "--timeout", min=1.0, help="seconds to join the swarm and read it"),
) -> None:
    """Print the live swarm once: stages with their replicas, trainers, alerts (needs --initial-peers)."""
    from rich.console import Console

    from distqat.observability.status import print_status

    def body(stop: threading.Event) -> None:
        import logging

        logging.basicConfig(level=logging.ERROR)  # hivemind's warnings would clutter a table meant for a glance
        print_status(_load(config_path, ctx), as_json, timeout, Console(highlight=False))

    _run(body)


@app.command(context_settings=OVERRIDES)
def plot(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    log_dir: Path = typer.Option(None, "--log-dir", help="the run's log dir (default: the config's)"),
) -> None:
    """Draw (again) the PNG plots of a run from its metrics.jsonl, into <log dir>/plots."""
    from distqat.observability.plots import plot_run

    def body(stop: threading.Event) -> None:
        directory = log_dir or _load(config_path, ctx).resolved_log_dir
        if not (directory / "metrics.jsonl").is_file():
            raise DistQatError(f"{directory / 'metrics.jsonl'}: no such file (is --log-dir the run's log dir?)")
        for path in plot_run(directory):
            typer.echo(str(path))

    _run(body)


@app.command("failover-demo", context_settings=OVERRIDES)
def failover_demo(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    kill: list[str] = typer.Option(
        None, "--kill", help="uid of a server to SIGKILL, repeatable (default: the first stage's replica 0)"
    ),
    kill_at_step: int = typer.Option(20, "--kill-at-step", min=1, help="kill when a trainer reaches this step"),
    restart_after: float = typer.Option(
        10.0, "--restart-after", help="seconds after the kill a new server starts (negative: none)"
    ),
    replicas: int = typer.Option(2, "--replicas", min=1, help="servers per stage at the start"),
    trainers: int = typer.Option(1, "--trainers", min=1, help="trainers (the other replicas are spares)"),
    max_steps: int = typer.Option(0, "--max-steps", min=0, help="steps of each run (default: kill step + 40)"),
    runs: int = typer.Option(1, "--runs", min=1, help="repeat the whole demo; figures get a median and a max"),
    json_path: Path = typer.Option(None, "--json", help="write the figures as JSON here"),
) -> None:
    """Kill servers of a live local swarm at a chosen step, start a new one, print the failover timeline."""
    import json

    from distqat.failover import FailoverPlan, aggregate, figures_table, run_once, timeline
    from distqat.launchers import console
    from distqat.swarm.uids import make_uid

    def body(stop: threading.Event) -> None:
        config = _load(config_path, ctx)
        plan = FailoverPlan(
            kill=kill or [make_uid(config.model_pipeline.stage_names[0], 0)],
            kill_at_step=kill_at_step,
            restart_after=restart_after,
            replicas=replicas,
            trainers=trainers,
            max_steps=max_steps or kill_at_step + 40,
        )
        results = []
        for index in range(runs):
            run = run_once(config, plan, stop, index)
            console.print(timeline(run))
            results.append(run.figures)
        console.print(figures_table(results))
        if json_path is not None:
            summary = aggregate(results)
            report = {**summary["median"], "runs": results, **summary}
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2))

    _run(body)


# --- roles (what the launchers start; also runnable by hand) ---------------------------------------------


@app.command(context_settings=OVERRIDES)
def monitor(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    log_dir: Path = typer.Option(None, "--log-dir", help="default: the config's log dir"),
    max_steps: int = MaxStepsOption,
    summary: Path = SummaryOption,
    started_at: float = typer.Option(None, "--started-at", help="unix time the run started (for startup_s)"),
    first_step: int = typer.Option(0, "--first-step", min=0, help="the step a resumed run continues from"),
) -> None:
    """Bootstrap the DHT, write initial_peers.txt, log the swarm's metrics."""
    from distqat.distributed.monitor import run_monitor

    _role(
        "monitor",
        config_path,
        ctx,
        lambda config, stop: run_monitor(
            config, stop, log_dir or config.resolved_log_dir, max_steps, summary, started_at, first_step
        ),
    )


@app.command(context_settings=OVERRIDES)
def mirror(ctx: typer.Context, config_path: Path = ConfigOption) -> None:
    """Keep a CPU copy of every stage (pulled after each DiLoCo round), serve it to joiners, checkpoint it."""
    from distqat.distributed.mirror import run_mirror

    _role("mirror", config_path, ctx, run_mirror)


@app.command(context_settings=OVERRIDES)
def client(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    log_dir: Path = typer.Option(None, "--log-dir", help="default: the config's log dir"),
    max_steps: int = MaxStepsOption,
) -> None:
    """Keep one trainer per complete pipeline."""
    from distqat.distributed.client import run_client

    _role(
        "client",
        config_path,
        ctx,
        lambda config, stop: run_client(config, stop, log_dir or config.resolved_log_dir, max_steps),
    )


@app.command(context_settings=OVERRIDES)
def server(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    stage: str = typer.Option(None, "--stage", help="stage to serve (default: the one with the fewest replicas)"),
    expert_index: int = typer.Option(None, "--expert-index", min=0, help="replica index (default: smallest free)"),
    ready_file: Path = typer.Option(None, "--ready-file", help="write the server's uid here once it is announced"),
) -> None:
    """Host one stage replica."""
    from distqat.distributed.server import run_server

    _role("server", config_path, ctx, lambda config, stop: run_server(config, stop, stage, expert_index, ready_file))


@app.command(context_settings=OVERRIDES)
def trainer(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    index: int = typer.Option(0, "--index", min=0, help="trainer slot (sets its id and data order)"),
    max_steps: int = MaxStepsOption,
) -> None:
    """Train through the swarm's stages (the client starts these)."""
    from distqat.distributed.trainer import run_trainer

    _role("trainer", config_path, ctx, lambda config, stop: run_trainer(config, index, stop, max_steps))


@app.command("data-server", context_settings=OVERRIDES)
def data_server(
    ctx: typer.Context,
    config_path: Path = ConfigOption,
    log_dir: Path = typer.Option(None, "--log-dir", help="default: the config's log dir"),
    ready_file: Path = typer.Option(None, "--ready-file", help="write HOST:PORT here once batches are ready"),
) -> None:
    """Serve batches to this machine's trainers through shared memory (the client starts it)."""
    from distqat.distributed.data_server import run_data_server

    _role(
        "data_server",
        config_path,
        ctx,
        lambda config, stop: run_data_server(config, stop, log_dir or config.resolved_log_dir, ready_file),
    )


def main() -> None:
    app(prog_name="distqat")


if __name__ == "__main__":
    sys.exit(main())
