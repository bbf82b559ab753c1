"""``pollen`` command line: ``pollen simulate [CONFIG] [--set key=value ...]``, ``pollen compare CONFIG``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pollen.cli import deploy as deploy_cli
from pollen.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a simulated federation on this machine")
    sim.add_argument("config", nargs="?", help="YAML config (default: the built-in default run)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one key, e.g. --set federation.rounds=5 (repeatable)")
    sim.add_argument("--output", help="run folder (default: OUTPUT_DIR/<timestamp>)")
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's log")
    comp = commands.add_parser("compare", help="compare strategies and codecs on the same partitions and seeds")
    comp.add_argument("config", help="compare config, e.g. simulations/configs/compare.yaml")
    comp.add_argument("--output", help="report folder (default: the config's output_dir/<timestamp>)")
    comp.add_argument("--threads", type=int, help="torch threads (default: one per core; 1 suits small "
                      "models on a busy machine)")
    comp.add_argument("-v", "--verbose", action="store_true", help="show Flower's log")
    deploy_cli.add_commands(commands)  # certs, server, client, export: real devices
    args = parser.parse_args(argv)
    if args.command in deploy_cli.COMMANDS:
        return deploy_cli.run(parser, args)
    if args.command == "compare":
        return compare_command(parser, args.config, args.output, args.verbose, args.threads)
    try:
        config = load_config(args.config, args.overrides)
        check_strategy(config)
    except ConfigError as error:
        parser.exit(2, f"pollen: config error: {error}\n")
    return simulate_command(config, args.output, args.verbose)


def check_strategy(config) -> None:
    """Reject a bad strategy name or parameter before any model loads."""
    from pollen.strategies import check_strategy as check

    check(config)


def compare_command(parser: argparse.ArgumentParser, path: str, output: str | None, verbose: bool,
                    threads: int | None = None) -> int:
    from pathlib import Path

    import torch
    from rich.console import Console

    from pollen.simulations.compare import load_compare, run_compare
    from pollen.simulations.report import print_whole

    try:
        compare = load_compare(path)
    except ConfigError as error:
        parser.exit(2, f"pollen: config error: {error}\n")
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


def simulate_command(config, output: str | None, verbose: bool) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pollen.run_folder import RunFolder
    from pollen.simulations.report import print_whole, round_line, round_table
    from pollen.simulations.run import simulate

    torch.set_num_threads(os.cpu_count() or 1)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console()
    fed = config.federation
    console.print(f"[bold]pollen simulate[/]: {config.model.name} ({config.model.trainable}, "
                  f"{config.model.quantize} base) on {config.data.dataset}, {fed.num_clients} clients, "
                  f"{fed.clients_per_round} per round, {fed.rounds} rounds, codec {config.codec.name}"
                  + (f" density {config.codec.density} {config.codec.bits}-bit"
                     if config.codec.name == "topk" else ""))
    folder = RunFolder(output) if output else RunFolder.new(config.output_dir)
    interrupted = False
    with Progress(TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("rounds", total=fed.rounds)

        def on_round(entry) -> None:
            progress.console.print(round_line(entry))
            progress.update(task, completed=entry.round)

        try:
            folder, records = simulate(config, folder, on_round)
        except ConfigError as error:
            console.print(f"pollen: config error: {error}")
            return 2
        except KeyboardInterrupt:  # stop cleanly: every finished round is already on disk
            interrupted = True
            records = folder.records()
    if not records:
        console.print("stopped before the first evaluation; nothing was written")
        return 130
    print_whole(console, round_table(records, title="Per-round results"))
    final = records[-1]
    up = sum(r.uplink_bytes for r in records)
    dense = sum(r.dense_uplink_bytes for r in records)
    console.print(f"final accuracy {final.accuracy:.4f}, macro F1 {final.f1:.4f}, "
                  f"uplink {up / 1e6:.2f} MB on the wire ({dense / max(up, 1):.0f}x smaller than dense fp32), "
                  f"{final.wall_seconds:.0f} s"
                  + ("" if final.simulated_seconds is None
                     else f", {final.simulated_seconds / 60:.1f} min of simulated device time"))
    console.print(f"run record, plot and checkpoint: [bold]{folder}[/] "
                  f"({RunFolder.RECORDS}, {RunFolder.PLOT}, {RunFolder.CHECKPOINT})")
    if interrupted:
        console.print(f"[yellow]stopped by Ctrl-C after round {final.round} of {fed.rounds}[/]; "
                      "the rounds above are kept")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
