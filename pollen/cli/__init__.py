"""``pollen`` command line: ``pollen simulate [CONFIG] [--set key=value ...]``, ``pollen compare CONFIG``.

A mistake of the user's (a bad config key or value, a file that is not YAML, a missing
checkpoint, ...) ends as one line, ``pollen: <what and where>``, and exit code 2 (1 when
Flower's processes failed); with ``pollen --debug`` its traceback is shown instead.

What a command prints fits the terminal's width (in a pipe, $COLUMNS or 80; see
``pollen.simulations.report``); Flower's and torch's log records go to standard error,
above a progress bar, warnings only unless ``-v``. Every command that trains takes
``--threads N``, by default ``pollen.threads.default_threads``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from importlib.metadata import version

from pollen.cli import deploy as deploy_cli
from pollen.cli.options import (add_tensorboard_option, add_threads_option, add_verbose_option, run_overrides,
                                use_threads)
from pollen.config import ConfigError, load_config
from pollen.flower_processes import FlowerError


DESCRIPTION = """Federated fine-tuning on Flower: simulate a federation on this machine, compare or tune
its settings, or run it on real devices.

A mistake (a bad config key or value, a file that is not YAML, a missing checkpoint, ...)
ends as one line, "pollen: <what and where>", and exit code 2 (1 when Flower's processes
failed); with --debug its traceback is shown instead. -v on any command shows Flower's
and torch's log at INFO."""

# Flower's log level without -v: many runs (compare, tune) keep its per-run notices out of the table's way.
QUIET = {"compare": logging.ERROR, "tune": logging.ERROR}


def command_parser() -> argparse.ArgumentParser:
    """The ``pollen`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="pollen", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pollen {version('pollen')}")
    parser.add_argument("--debug", action="store_true", help="show an error's traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a simulated federation on this machine")
    sim.add_argument("config", nargs="?", help="YAML config (default: the built-in default run)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one key, e.g. --set federation.rounds=5 (repeatable; default: none)")
    sim.add_argument("--output", metavar="DIR", help="run folder (default: OUTPUT_DIR/<timestamp>)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="go on from RUN_DIR's last checkpoint with its config.yaml (--set federation.rounds=N "
                          "runs it for longer; default: a new run)")
    add_run_options(sim)
    add_tensorboard_option(sim)
    comp = commands.add_parser("compare", help="compare strategies and codecs on the same partitions and seeds")
    comp.add_argument("config", help="compare config, e.g. simulations/configs/compare.yaml")
    comp.add_argument("--output", metavar="DIR", help="report folder (default: the config's output_dir/<timestamp>)")
    add_run_options(comp)
    add_tensorboard_option(comp)
    tune = commands.add_parser("tune", help="search run-config keys with Optuna, pruning weak federations")
    tune.add_argument("config", help="tune config, e.g. simulations/configs/tune.yaml")
    tune.add_argument("--output", metavar="DIR", help="study folder; the same folder again carries the study on "
                      "(default: the config's output_dir/<timestamp>)")
    add_run_options(tune)
    deploy_cli.add_commands(commands)  # certs, server, client, export, distill: real devices and their models
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from pollen.simulations.report import log_on

    parser = command_parser()
    args = parser.parse_args(argv)
    console = Console()
    level = logging.INFO if args.verbose else QUIET.get(args.command, logging.WARNING)
    try:
        with log_on(console, level):
            if args.command in deploy_cli.COMMANDS:
                return deploy_cli.run(parser, args)
            if args.command == "compare":
                return compare_command(args.config, args.output, args.threads, console, args.tensorboard)
            if args.command == "tune":
                return tune_command(args.config, args.output, args.threads, console)
            return simulate_from_args(args, console)
    except Exception as error:
        if args.debug or not is_pollen_error(error):
            raise
        prefix = "pollen: config error" if isinstance(error, ConfigError) else "pollen"
        # As the deploy commands: 2 for bad input, 1 for Flower processes that failed.
        parser.exit(1 if isinstance(error, FlowerError) else 2, f"{prefix}: {deploy_cli.one_line(error)}\n")


def add_run_options(command: argparse.ArgumentParser) -> None:
    add_threads_option(command)
    add_verbose_option(command)


def is_pollen_error(error: Exception) -> bool:
    """An error Pollen raises to explain itself (ConfigError, DataError, CheckpointError, FlowerError, ...)
    or a file that cannot be read or written; any other error is a bug and keeps its traceback."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] == "pollen"


def simulate_from_args(args: argparse.Namespace, console) -> int:
    from pollen.run_folder import RunFolder
    from pollen.tensorboard_log import require_tensorboard

    if args.resume:
        if args.config or args.output:
            raise ConfigError(f"--resume {args.resume}: the run goes on in its own folder with its own "
                              f"{RunFolder.CONFIG}; give no CONFIG or --output")
        folder = RunFolder(args.resume)
        if not folder.config_path.is_file():
            raise ConfigError(f"--resume {folder}: no {RunFolder.CONFIG}, not a run folder")
        config = folder.read_config(run_overrides(args))
    else:
        config = load_config(args.config, run_overrides(args))
        folder = RunFolder(args.output) if args.output else RunFolder.new(config.output_dir)
    check_strategy(config)
    require_tensorboard(config)
    return simulate_command(config, folder, args.threads, resume=bool(args.resume), console=console)


def check_strategy(config) -> None:
    """Reject a bad strategy name or parameter before any model loads."""
    from pollen.strategies import check_strategy as check

    check(config)


def compare_command(path: str, output: str | None, threads: int | None = None, console=None,
                    tensorboard: bool = False) -> int:
    from pathlib import Path

    from rich.console import Console

    from pollen.simulations.compare import load_compare, run_compare
    from pollen.simulations.report import print_whole, print_wrapped
    from pollen.wording import counted

    compare = load_compare(path, {"tensorboard": True} if tensorboard else None)
    use_threads(threads, compare.base)
    console = console or Console()
    print_wrapped(console, f"pollen compare: {counted(len(compare.variants), 'variant')} x {counted(len(compare.seeds), 'seed')}, "
                           f"{counted(compare.base.federation.rounds, 'round')} each, target accuracy {compare.target_accuracy}")
    report = run_compare(compare, Path(output) if output else None,
                         on_run=lambda line: print_wrapped(console, line))
    print_whole(console, report.table)
    print_wrapped(console, f"report: {report.folder} ({', '.join(report.files)})")
    return 0


def tune_command(path: str, output: str | None, threads: int | None = None, console=None) -> int:
    from datetime import datetime
    from pathlib import Path

    from rich.console import Console

    from pollen.simulations.report import print_whole, print_wrapped
    from pollen.simulations.tune import load_tune, run_tune
    from pollen.wording import counted

    tune = load_tune(path)
    use_threads(threads, tune.base)
    folder = Path(output) if output else Path(tune.output_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    console = console or Console()
    print_wrapped(console, f"pollen tune: {counted(tune.trials, 'trial')} of {counted(tune.base.federation.rounds, 'round')}, "
                           f"{tune.sampler} sampler, {tune.pruner} pruner; study in {folder}")
    try:
        report = run_tune(tune, folder, on_trial=lambda line: print_wrapped(console, line))
    except KeyboardInterrupt:
        print_wrapped(console, f"interrupted: run the same command with --output {folder} to carry on")
        return 130
    print_whole(console, report.table)
    if report.best is not None:
        print_wrapped(console, f"best: trial {report.best.number}, {report.best.value:.4f}; run it with "
                               f"`pollen simulate {folder / 'best.yaml'}`")
    print_wrapped(console, f"report: {folder} ({', '.join(report.files)})")
    return 0


def simulate_command(config, folder, threads: int | None = None, resume: bool = False, console=None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pollen.run_folder import RunFolder, final_record
    from pollen.simulations.report import (RoundLines, print_whole, print_wrapped, round_line,
                                           round_table, traffic_summary)
    from pollen.server.plot import codec_label, downlink_label
    from pollen.simulations.run import simulate
    from pollen.wording import counted

    threads = use_threads(threads, config)
    console = console or Console()
    fed = config.federation
    print_wrapped(console, f"pollen simulate: {config.model.name} ({config.model.trainable}, "
                           f"{config.model.quantize} base) on {config.data.dataset}, {fed.num_clients} clients, "
                           f"{fed.clients_per_round} per round"
                           + (f" (up to {fed.most_sampled} sampled)" if fed.most_sampled > fed.clients_per_round else "")
                           + f", {counted(fed.rounds, 'round')}, up {codec_label(config.codec)}"
                           + (f", {downlink}" if (downlink := downlink_label(config.downlink)) else "")
                           + f", {counted(threads, 'torch thread')}")
    done = folder.records()[-1].round if resume and folder.records() else 0
    if resume:
        print_wrapped(console, f"resuming {folder} after round {done}")
    lines = RoundLines.fitting(console.width, fed.rounds, fed.most_sampled, clock=bool(config.simulation.devices))
    console.print(lines.header(), highlight=False)
    interrupted = False
    # In a pipe or file the bar would only print its last state: the round lines say it all there.
    with Progress(TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("rounds", total=fed.rounds, completed=done)

        def on_round(entry) -> None:
            console.print(round_line(entry, lines), highlight=False)
            progress.update(task, completed=entry.round)

        try:
            folder, records = simulate(config, folder, on_round, resume)
        except KeyboardInterrupt:  # stop cleanly: every finished round is already on disk
            interrupted = True
            records = folder.records()
    if not records:
        print_wrapped(console, "stopped before the first evaluation; nothing was written")
        return 130
    print_whole(console, round_table(records, title="Per-round results", width=console.width))
    final, kept = records[-1], final_record(records)
    print_wrapped(console, f"final accuracy {kept.accuracy:.4f}, macro F1 {kept.f1:.4f}"
                           + ("" if kept is final else f" (round {kept.round}'s model, kept by early stopping)")
                           + f", {traffic_summary(records)}, {final.wall_seconds:.0f} s"
                           + ("" if final.simulated_seconds is None
                              else f", {final.simulated_seconds / 60:.1f} min of simulated device time"))
    print_wrapped(console, f"run record, plot and checkpoint: {folder} "
                           f"({RunFolder.RECORDS}, {RunFolder.PLOT}, {RunFolder.CHECKPOINT})")
    if interrupted:
        print_wrapped(console, f"stopped by Ctrl-C after round {final.round} of {fed.rounds}; the rounds above "
                               f"are kept; go on with `pollen simulate --resume {folder}`")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
