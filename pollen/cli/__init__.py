"""``pollen`` command line: ``pollen simulate [CONFIG] [--set key=value ...]``, ``pollen compare CONFIG``.

A mistake of the user's (a bad config key or value, a file that is not YAML, a missing
checkpoint, ...) ends as one line, ``pollen: <what and where>``, and exit code 2 (1 when
Flower's processes failed); with ``pollen --debug`` its traceback is shown instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from importlib.metadata import version

from pollen.cli import deploy as deploy_cli
from pollen.config import ConfigError, load_config
from pollen.flower_processes import FlowerError


DESCRIPTION = """Federated fine-tuning on Flower: simulate a federation on this machine, compare or tune
its settings, or run it on real devices.

A mistake (a bad config key or value, a file that is not YAML, a missing checkpoint, ...)
ends as one line, "pollen: <what and where>", and exit code 2 (1 when Flower's processes
failed); with --debug its traceback is shown instead."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollen", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pollen {version('pollen')}")
    parser.add_argument("--debug", action="store_true", help="show an error's traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a simulated federation on this machine")
    sim.add_argument("config", nargs="?", help="YAML config (default: the built-in default run)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one key, e.g. --set federation.rounds=5 (repeatable)")
    sim.add_argument("--output", help="run folder (default: OUTPUT_DIR/<timestamp>)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="go on from RUN_DIR's last checkpoint with its config.yaml (--set federation.rounds=N "
                          "runs it for longer)")
    add_run_options(sim)
    comp = commands.add_parser("compare", help="compare strategies and codecs on the same partitions and seeds")
    comp.add_argument("config", help="compare config, e.g. simulations/configs/compare.yaml")
    comp.add_argument("--output", help="report folder (default: the config's output_dir/<timestamp>)")
    add_run_options(comp)
    tune = commands.add_parser("tune", help="search run-config keys with Optuna, pruning weak federations")
    tune.add_argument("config", help="tune config, e.g. simulations/configs/tune.yaml")
    tune.add_argument("--output", help="study folder; the same folder again carries the study on "
                      "(default: the config's output_dir/<timestamp>)")
    add_run_options(tune)
    deploy_cli.add_commands(commands)  # certs, server, client, export, distill: real devices and their models
    args = parser.parse_args(argv)
    try:
        if args.command in deploy_cli.COMMANDS:
            return deploy_cli.run(parser, args)
        if args.command == "compare":
            return compare_command(args.config, args.output, args.verbose, args.threads)
        if args.command == "tune":
            return tune_command(args.config, args.output, args.verbose, args.threads)
        return simulate_from_args(args)
    except Exception as error:
        if args.debug or not is_pollen_error(error):
            raise
        prefix = "pollen: config error" if isinstance(error, ConfigError) else "pollen"
        # As the deploy commands: 2 for bad input, 1 for Flower processes that failed.
        parser.exit(1 if isinstance(error, FlowerError) else 2, f"{prefix}: {deploy_cli.one_line(error)}\n")


def add_run_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--threads", type=int, help="torch threads (default: one per core; 1 suits small "
                         "models on a busy machine)")
    command.add_argument("-v", "--verbose", action="store_true", help="show Flower's log")


def is_pollen_error(error: Exception) -> bool:
    """An error Pollen raises to explain itself (ConfigError, DataError, CheckpointError, FlowerError, ...)
    or a file that cannot be read or written; any other error is a bug and keeps its traceback."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] == "pollen"


def simulate_from_args(args: argparse.Namespace) -> int:
    from pollen.run_folder import RunFolder

    if args.resume:
        if args.config or args.output:
            raise ConfigError(f"--resume {args.resume}: the run goes on in its own folder with its own "
                              f"{RunFolder.CONFIG}; give no CONFIG or --output")
        folder = RunFolder(args.resume)
        if not folder.config_path.is_file():
            raise ConfigError(f"--resume {folder}: no {RunFolder.CONFIG}, not a run folder")
        config = folder.read_config(args.overrides)
    else:
        config = load_config(args.config, args.overrides)
        folder = RunFolder(args.output) if args.output else RunFolder.new(config.output_dir)
    check_strategy(config)
    return simulate_command(config, folder, args.verbose, args.threads, resume=bool(args.resume))


def check_strategy(config) -> None:
    """Reject a bad strategy name or parameter before any model loads."""
    from pollen.strategies import check_strategy as check

    check(config)


def compare_command(path: str, output: str | None, verbose: bool, threads: int | None = None) -> int:
    from pathlib import Path

    import torch
    from rich.console import Console

    from pollen.simulations.compare import load_compare, run_compare
    from pollen.simulations.report import print_whole

    compare = load_compare(path)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if not verbose:  # many runs: keep Flower's per-run notices out of the table's way
        logging.getLogger("flwr").setLevel(logging.ERROR)
    console = Console()
    console.print(f"[bold]pollen compare[/]: {len(compare.variants)} variants x {len(compare.seeds)} seeds, "
                  f"{compare.base.federation.rounds} rounds each, target accuracy {compare.target_accuracy}")
    report = run_compare(compare, Path(output) if output else None,
                         on_run=lambda line: console.print(line))
    print_whole(console, report.table)
    console.print(f"report: [bold]{report.folder}[/] ({', '.join(report.files)})")
    return 0


def tune_command(path: str, output: str | None, verbose: bool, threads: int | None = None) -> int:
    from datetime import datetime
    from pathlib import Path

    import torch
    from rich.console import Console

    from pollen.simulations.report import print_whole
    from pollen.simulations.tune import load_tune, run_tune

    tune = load_tune(path)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if not verbose:  # many runs: keep Flower's per-run notices out of the table's way
        logging.getLogger("flwr").setLevel(logging.ERROR)
    folder = Path(output) if output else Path(tune.output_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    console = Console()
    console.print(f"[bold]pollen tune[/]: {tune.trials} trials of {tune.base.federation.rounds} rounds, "
                  f"{tune.sampler} sampler, {tune.pruner} pruner; study in {folder}")
    try:
        report = run_tune(tune, folder, on_trial=lambda line: console.print(line, markup=False))
    except KeyboardInterrupt:
        console.print(f"interrupted: run the same command with --output {folder} to carry on")
        return 130
    print_whole(console, report.table)
    if report.best is not None:
        console.print(f"best: trial {report.best.number}, {report.best.value:.4f}; run it with "
                      f"`pollen simulate {folder / 'best.yaml'}`")
    console.print(f"report: [bold]{folder}[/] ({', '.join(report.files)})")
    return 0


def simulate_command(config, folder, verbose: bool, threads: int | None = None, resume: bool = False) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pollen.run_folder import RunFolder
    from pollen.simulations.report import print_whole, round_line, round_table, traffic_summary
    from pollen.simulations.run import simulate

    torch.set_num_threads(threads or os.cpu_count() or 1)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console()
    fed = config.federation
    console.print(f"[bold]pollen simulate[/]: {config.model.name} ({config.model.trainable}, "
                  f"{config.model.quantize} base) on {config.data.dataset}, {fed.num_clients} clients, "
                  f"{fed.clients_per_round} per round, {fed.rounds} rounds, codec {config.codec.name}"
                  + (f" density {config.codec.density} {config.codec.bits}-bit"
                     if config.codec.name == "topk" else ""))
    done = folder.records()[-1].round if resume and folder.records() else 0
    if resume:
        console.print(f"resuming {folder} after round {done}")
    interrupted = False
    with Progress(TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("rounds", total=fed.rounds, completed=done)

        def on_round(entry) -> None:
            progress.console.print(round_line(entry))
            progress.update(task, completed=entry.round)

        try:
            folder, records = simulate(config, folder, on_round, resume)
        except KeyboardInterrupt:  # stop cleanly: every finished round is already on disk
            interrupted = True
            records = folder.records()
    if not records:
        console.print("stopped before the first evaluation; nothing was written")
        return 130
    print_whole(console, round_table(records, title="Per-round results"))
    final = records[-1]
    console.print(f"final accuracy {final.accuracy:.4f}, macro F1 {final.f1:.4f}, {traffic_summary(records)}, "
                  f"{final.wall_seconds:.0f} s"
                  + ("" if final.simulated_seconds is None
                     else f", {final.simulated_seconds / 60:.1f} min of simulated device time"))
    console.print(f"run record, plot and checkpoint: [bold]{folder}[/] "
                  f"({RunFolder.RECORDS}, {RunFolder.PLOT}, {RunFolder.CHECKPOINT})")
    if interrupted:
        console.print(f"[yellow]stopped by Ctrl-C after round {final.round} of {fed.rounds}[/]; "
                      f"the rounds above are kept; go on with `pollen simulate --resume {folder}`")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
