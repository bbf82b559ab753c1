"""What a finished run shows a person: a table and a plot of its run record."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console, RenderableType  # noqa: E402
from rich.table import Table  # noqa: E402

from pollen.server.records import RoundRecord  # noqa: E402

MB = 1e6


def cumulative_uplink_mb(records: list[RoundRecord]) -> list[float]:
    total, out = 0, []
    for entry in records:
        total += entry.uplink_bytes
        out.append(total / MB)
    return out


def time_to_accuracy(records: list[RoundRecord], target: float) -> float | None:
    """Simulated seconds until central accuracy first reaches ``target`` (None: never, or no clock)."""
    for entry in records:
        if entry.simulated_seconds is None:
            return None
        if entry.accuracy >= target:
            return entry.simulated_seconds
    return None


def print_whole(console: Console, renderable: RenderableType) -> None:
    """Print a table uncut. Written to a file or a pipe, rich assumes 80 columns and would
    shorten every number to "0.9…"; a terminal keeps its own width."""
    if console.is_terminal:
        console.print(renderable)
        return
    needed = console.measure(renderable, options=console.options.update_width(10_000)).maximum
    guessed = console.width
    console.width = max(guessed, needed)
    try:
        console.print(renderable)
    finally:
        console.width = guessed


COLUMNS = ("round", "acc", "loss", "F1", "train", "clients", "up KB", "down KB", "ratio", "s", "sim s")


def round_table(records: list[RoundRecord], title: str = "Rounds") -> Table:
    """Accuracy, loss and macro F1 on the held-out split; train = clients' mean loss."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for entry in records:
        table.add_row(*round_row(entry))
    return table


def round_row(entry: RoundRecord) -> list[str]:
    return [
        str(entry.round),
        f"{entry.accuracy:.4f}",
        f"{entry.loss:.4f}",
        f"{entry.f1:.4f}",
        "-" if entry.train_loss is None else f"{entry.train_loss:.4f}",
        f"{entry.clients}" + (f" (-{entry.rejected + entry.failed})" if entry.rejected + entry.failed else ""),
        f"{entry.uplink_bytes / 1e3:.1f}",
        f"{entry.downlink_bytes / 1e3:.0f}",
        "-" if entry.compression is None else f"{entry.compression:.0f}x",
        f"{entry.round_seconds:.1f}",
        "-" if entry.simulated_seconds is None else f"{entry.simulated_seconds:.0f}",
    ]


def round_line(entry: RoundRecord) -> str:
    """One finished round as a line for the live log."""
    return "  ".join(f"{key} {value}" for key, value in zip(COLUMNS, round_row(entry)))


def plot_run(records: list[RoundRecord], path: Path, label: str = "run") -> Path:
    """Accuracy vs round, vs cumulative uplink MB and (with simulated devices) vs simulated time."""
    simulated = all(entry.simulated_seconds is not None for entry in records)
    fig, axes = plt.subplots(1, 3 if simulated else 2, figsize=(16 if simulated else 11, 4))
    by_round, by_bytes = axes[:2]
    rounds = [entry.round for entry in records]
    accuracy = [entry.accuracy for entry in records]
    by_round.plot(rounds, accuracy, marker="o", label=label)
    by_round.set(xlabel="round", ylabel="test accuracy", title="Accuracy by round")
    by_bytes.plot(cumulative_uplink_mb(records), accuracy, marker="o", label=label)
    by_bytes.set(xlabel="cumulative uplink (MB on the wire)", ylabel="test accuracy",
                 title="Accuracy by uplink traffic")
    if simulated:
        axes[2].plot([entry.simulated_seconds / 60 for entry in records], accuracy, marker="o", label=label)
        axes[2].set(xlabel="simulated time (min)", ylabel="test accuracy",
                    title="Accuracy by simulated device time")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
