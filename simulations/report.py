"""What a run shows a person in the terminal: a line per round, a table, the log (the plot: server/plot.py).

Everything here fits the console's width, in a terminal and in a pipe (where rich takes
$COLUMNS, else 80): the round lines and the round table keep the columns that fit, giving
up the least important first (``IMPORTANCE``), and leave out those empty for the whole run;
``rounds.jsonl`` keeps every field. Text is wrapped at spaces, continuation lines indented.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from rich import box
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

from pollen.run_folder import RoundRecord, round_trip_ratio
from pollen.wording import byte_size


def time_to_accuracy(records: list[RoundRecord], target: float) -> float | None:
    """Simulated seconds until central accuracy first reaches ``target`` (None: never, or no clock)."""
    entry = first_reaching(records, target)
    return None if entry is None else entry.simulated_seconds


def first_reaching(records: list[RoundRecord], target: float) -> RoundRecord | None:
    """The first round whose central accuracy reaches ``target`` (None: never, or the run has no clock)."""
    for entry in records:
        if entry.simulated_seconds is None:
            return None
        if entry.accuracy >= target:
            return entry
    return None


def print_whole(console: Console, renderable: RenderableType) -> None:
    """Print a table uncut. Written to a file or a pipe, rich assumes 80 columns and would
    shorten every number to "0.9…", and pads lines with spaces; a terminal keeps its own width."""
    if console.is_terminal:
        console.print(renderable)
        return
    needed = console.measure(renderable, options=console.options.update_width(10_000)).maximum
    guessed = console.width
    console.width = max(guessed, needed)
    try:
        with console.capture() as capture:
            console.print(renderable)
    finally:
        console.width = guessed
    console.file.write("".join(line.rstrip() + "\n" for line in capture.get().splitlines()))


def metric_text(value: float) -> str:
    """A loss in six characters: four decimals below 10, fewer above ("2.3026", "12.346", "123456")."""
    if not math.isfinite(value) or abs(value) >= 1e6:
        return f"{value:.0e}" if math.isfinite(value) else str(value)
    return f"{value:.{max(0, 5 - len(str(int(abs(value)))))}f}"


def traffic_summary(records: list[RoundRecord]) -> str:
    """Both directions and the round trip of a run, as the last line of ``pollen simulate`` shows them."""
    up = sum(entry.uplink_bytes for entry in records)
    down = sum(entry.downlink_bytes for entry in records)
    dense = sum(entry.dense_uplink_bytes for entry in records)
    trip = round_trip_ratio(records)
    return (f"uplink {byte_size(up)} ({dense / max(up, 1):.0f}x smaller than dense fp32), "
            f"downlink {byte_size(down)}, round trip {byte_size(up + down)}"
            + ("" if trip is None else f" ({trip:.0f}x smaller than dense fp32 both ways)"))


# The columns of a round line and of the round table, in the order they are shown: accuracy,
# loss and macro F1 on the held-out split; train = the clients' mean loss; up and down = bytes
# on the wire; ratio = the uplink's against dense fp32, trip = the round trip's
# (``round_trip_ratio``); s = wall seconds, sim s = the device model's clock.
COLUMNS = ("round", "acc", "loss", "F1", "train", "clients", "up", "down", "ratio", "trip", "s", "sim s")
# The order they are kept in when the width is short: the last is given up first.
IMPORTANCE = ("round", "acc", "loss", "F1", "clients", "up", "down", "ratio", "sim s", "trip", "train", "s")
GAP = 2  # spaces between two columns, in a round line and in the table


def round_row(entry: RoundRecord) -> list[str]:
    """One round's cells, in ``COLUMNS`` order ("-": not measured this round)."""
    return [
        str(entry.round),
        f"{entry.accuracy:.4f}",
        metric_text(entry.loss),
        f"{entry.f1:.4f}",
        "-" if entry.train_loss is None else metric_text(entry.train_loss),
        f"{entry.clients}" + (f" (-{entry.rejected + entry.failed})" if entry.rejected + entry.failed else ""),
        byte_size(entry.uplink_bytes),
        byte_size(entry.downlink_bytes),
        "-" if entry.compression is None else f"{entry.compression:.0f}x",
        "-" if (trip := round_trip_ratio([entry])) is None else f"{trip:.0f}x",
        f"{entry.round_seconds:.1f}",
        "-" if entry.simulated_seconds is None else f"{entry.simulated_seconds:.0f}",
    ]


def fitting(widths: Mapping[str, int], room: int) -> tuple[str, ...]:
    """The columns of ``widths`` (name: characters) that fit ``room`` characters ``GAP`` apart, in
    ``COLUMNS`` order: the least important are given up first, the first column never."""
    kept = [name for name in IMPORTANCE if name in widths]
    while len(kept) > 1 and sum(widths[name] for name in kept) + GAP * (len(kept) - 1) > room:
        kept.pop()
    return tuple(name for name in COLUMNS if name in kept)


def round_table(records: list[RoundRecord], title: str = "Rounds", width: int | None = None) -> Table:
    """Every round, a row each, with the columns that hold a value in some round and fit ``width``
    characters (None: no limit); the columns are ``COLUMNS``'."""
    rows = [dict(zip(COLUMNS, round_row(entry))) for entry in records]
    widths = {name: max(len(name), *(len(row[name]) for row in rows))
              for name in COLUMNS if not rows or any(row[name] != "-" for row in rows)}
    shown = fitting(widths, width) if width else tuple(widths)
    # No borders: a rule under the header, and GAP between columns (a space before each cell but the
    # first, and the blank separator), as in a round line.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 0, 0, GAP - 1))
    for name in shown:
        table.add_column(name, justify="left" if name == COLUMNS[0] else "right")
    for row in rows:
        table.add_row(*(row[name] for name in shown))
    return table


# The widest cell each column of a live round line expects (round and clients depend on the run).
LINE_CELLS = {"acc": 6, "loss": 6, "F1": 6, "train": 6, "up": 7, "down": 7, "ratio": 5, "trip": 5,
              "s": 6, "sim s": 6}


@dataclass(frozen=True)
class RoundLines:
    """The layout of ``pollen simulate``'s live log: the columns that fit ``width`` and their widths,
    for a header and then one aligned ``round_line`` per round."""

    columns: tuple[str, ...]
    widths: Mapping[str, int]
    width: int

    @classmethod
    def fitting(cls, width: int, rounds: int, clients_per_round: int, clock: bool) -> RoundLines:
        """The lines of a run of ``rounds`` rounds and ``clients_per_round`` clients, ``clock``: with
        simulated device time (a device profile; without, that column is empty all along)."""
        cells = {**LINE_CELLS, "round": len(str(rounds)),
                 "clients": len(f"{clients_per_round} (-{clients_per_round})")}
        widths = {name: max(len(name), cells[name]) for name in COLUMNS if clock or name != "sim s"}
        columns = fitting(widths, width)
        return cls(columns, {name: widths[name] for name in columns}, width)

    def header(self) -> str:
        return aligned({name: name for name in self.columns}, self.widths)


def round_line(entry: RoundRecord, lines: RoundLines | None = None) -> str:
    """One finished round as ``lines`` show it (default: 80 characters wide, the columns its record fills),
    then a line per rejected or clipped client, as rich markup."""
    lines = lines or RoundLines.fitting(80, entry.round, entry.clients + entry.rejected + entry.failed,
                                        clock=entry.simulated_seconds is not None)
    cells = dict(zip(COLUMNS, round_row(entry)))
    row = aligned({name: cells[name] for name in lines.columns}, lines.widths)
    return "\n".join([row, *(escape(note) for note in note_lines(entry, lines.width))])  # reasons: text, not markup


def note_lines(entry: RoundRecord, width: int) -> list[str]:
    """``round_notes`` as they go under a round's line: indented, wrapped to ``width``, plain text."""
    return [wrapped(note, width, first="  ", rest="    ") for note in round_notes(entry)]


def round_notes(entry: RoundRecord) -> list[str]:
    """What the server turned away or decided in a round, a plain sentence each: every rejected or
    clipped client with its reason, a refused step, early stopping."""
    notes = [f"rejected {item['client']}: {item['reason']}" for item in entry.rejected_updates]
    notes += [f"clipped {item['client']}: {item['reason']}" for item in entry.clipped_weights]
    if entry.step_refused:
        notes.append(f"step refused, the global model stays: {entry.step_refused}")
    if entry.early_stop:
        notes.append(f"early stopping: {entry.early_stop}")
    return notes


def aligned(cells: Mapping[str, str], widths: Mapping[str, int]) -> str:
    """Cells ``GAP`` apart in columns of ``widths``: the round number to the left, so that a line
    starts with it (a note below starts with spaces), the numbers after it to the right."""
    first, *rest = cells
    line = (" " * GAP).join([cells[first].ljust(widths[first]), *(cells[name].rjust(widths[name]) for name in rest)])
    return line.rstrip()


def wrapped(text: str, width: int, first: str = "", rest: str = "  ") -> str:
    """``text`` broken at spaces into lines of at most ``width`` characters (a word longer than that, such
    as a path, stays whole), the first line led by ``first``, the others by ``rest``."""
    return "\n".join(textwrap.fill(line, width, initial_indent=first, subsequent_indent=rest,
                                   break_long_words=False, break_on_hyphens=False)
                     for line in text.splitlines() or [""])


def print_wrapped(console: Console, text: str) -> None:
    """Print plain ``text`` (no markup) on ``console``, wrapped to its width, continuation lines indented."""
    console.print(wrapped(text, console.width), markup=False, highlight=False, soft_wrap=True)


class ConsoleLog(logging.Handler):
    """Log records as plain "LEVEL: message" lines on standard error, wrapped to ``console``'s width.

    Written to ``sys.stderr`` as it is when a record comes: while a live progress bar runs
    in a terminal, rich has put a proxy there that prints above the bar; in a pipe or file
    the lines carry no colour codes (Flower's own handler colours them wherever it writes).
    """

    def __init__(self, console: Console, level: int) -> None:
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(wrapped(f"{record.levelname}: {record.getMessage()}", self.console.width) + "\n")
            sys.stderr.flush()
        except Exception:  # a log line must never stop a run
            self.handleError(record)


LOGGERS = ("flwr", "torch")  # whose records a command shows


@contextlib.contextmanager
def log_on(console: Console, level: int) -> Iterator[None]:
    """While the block runs, Flower's and torch's log records of ``level`` and above go through
    ``ConsoleLog`` (wrapped to ``console``'s width); the loggers' own console handlers are set aside
    and put back after."""
    handler = ConsoleLog(console, level)
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        streams = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        saved.append((logger, streams, logger.level))
        for stream in streams:
            logger.removeHandler(stream)
        logger.addHandler(handler)
        logger.setLevel(min(logger.level or logging.WARNING, level))
    try:
        yield
    finally:
        for logger, streams, old_level in saved:
            logger.removeHandler(handler)
            for stream in streams:
                logger.addHandler(stream)
            logger.setLevel(old_level)
