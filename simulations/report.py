"""What a run shows a person in the terminal: a line per round and a table (the plot: server/plot.py)."""

from __future__ import annotations

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

from pollen.run_folder import RoundRecord


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


COLUMNS = ("round", "acc", "loss", "F1", "train", "clients", "up KB", "down KB", "ratio", "trip", "s", "sim s")


def round_trip_ratio(records: list[RoundRecord]) -> float | None:
    """Dense fp32 both ways over the bytes sent both ways (None: nothing came back).

    The dense reference is each accepted update's dense fp32 arrays, once up and once
    down; downlink bytes sent to clients whose replies did not count are still charged.
    """
    dense = 2 * sum(entry.dense_uplink_bytes for entry in records)
    sent = sum(entry.uplink_bytes + entry.downlink_bytes for entry in records)
    return dense / sent if dense and sent else None


def traffic_summary(records: list[RoundRecord]) -> str:
    """Both directions and the round trip of a run, as the last line of ``pollen simulate`` shows them."""
    up = sum(entry.uplink_bytes for entry in records)
    down = sum(entry.downlink_bytes for entry in records)
    dense = sum(entry.dense_uplink_bytes for entry in records)
    trip = round_trip_ratio(records)
    return (f"uplink {up / 1e6:.2f} MB ({dense / max(up, 1):.0f}x smaller than dense fp32), "
            f"downlink {down / 1e6:.2f} MB, round trip {(up + down) / 1e6:.2f} MB"
            + ("" if trip is None else f" ({trip:.0f}x smaller than dense fp32 both ways)"))


def round_table(records: list[RoundRecord], title: str = "Rounds") -> Table:
    """Accuracy, loss and macro F1 on the held-out split; train = clients' mean loss;
    ratio = the uplink's against dense fp32, trip = the round trip's (``round_trip_ratio``)."""
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
        "-" if (trip := round_trip_ratio([entry])) is None else f"{trip:.0f}x",
        f"{entry.round_seconds:.1f}",
        "-" if entry.simulated_seconds is None else f"{entry.simulated_seconds:.0f}",
    ]


def round_line(entry: RoundRecord) -> str:
    """One finished round as a line for the live log, then a line per rejected or clipped client."""
    line = "  ".join(f"{key} {value}" for key, value in zip(COLUMNS, round_row(entry)))
    notes = [f"  rejected {item['client']}: {item['reason']}" for item in entry.rejected_updates]
    notes += [f"  clipped {item['client']}: {item['reason']}" for item in entry.clipped_weights]
    if entry.step_refused:
        notes.append(f"  step refused, the global model stays: {entry.step_refused}")
    if entry.early_stop:
        notes.append(f"  early stopping: {entry.early_stop}")
    return "\n".join([line, *(escape(note) for note in notes)])  # reasons are text, not rich markup
