"""What pollen simulate prints fits 80 columns, in a pipe and in a terminal: nothing cut, nothing wrapped;
in a pipe, no colour codes and no trailing spaces."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from pollen.run_folder import RoundRecord
from pollen.simulations.report import (COLUMNS, IMPORTANCE, ConsoleLog, RoundLines, fitting,
                                       log_on, metric_text, note_lines, print_whole, print_wrapped, round_line,
                                       round_row, round_table, traffic_summary, wrapped)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ESSENTIAL = ("round", "acc", "loss", "F1", "clients", "up", "down", "ratio")


def record(number: int, clock: bool = False, rejected: list[dict] = (), **changes) -> RoundRecord:
    """A round of the default run's size: 10 clients, 44 kB up, 1.3 MB down."""
    values = dict(round=number, accuracy=0.9612, loss=0.1345, precision=0.95, recall=0.95, f1=0.9598,
                  train_loss=None if number == 0 else 0.2101, clients=0 if number == 0 else 10 - len(rejected),
                  rejected=len(rejected), failed=0, uplink_bytes=0 if number == 0 else 44_312,
                  downlink_bytes=0 if number == 0 else 1_312_000, dense_uplink_bytes=0 if number == 0 else 8_130_000,
                  compression=None if number == 0 else 183.5, round_seconds=14.2, wall_seconds=14.2 * number,
                  simulated_seconds=95.0 * number if clock else None, rejected_updates=list(rejected))
    return RoundRecord(**{**values, **changes})


REJECTED = [{"client": "partition 3", "reason": "update norm 48.1 is above 10 x the round's median norm 1.9 "
                                                "(federation.max_norm_ratio); the update is dropped [bold]"},
            {"client": "partition 7", "reason": "a payload of 812 bytes does not decode: index 44012 is out of "
                                                "range for a tensor of 4096 values"}]
RUNS = {
    "ordinary": [record(n) for n in range(21)],
    "device profile": [record(n, clock=True) for n in range(21)],
    "rejected clients": [record(0)] + [record(n, rejected=REJECTED) for n in range(1, 21)],
}


def printed(render, terminal: bool, width: int = 80) -> list[str]:
    """The lines ``render(console)`` prints on a ``width``-column console, colour codes removed."""
    out = io.StringIO()
    render(Console(file=out, width=width, force_terminal=terminal))
    return ANSI.sub("", out.getvalue()).splitlines()


def whole_run(records: list[RoundRecord]):
    def render(console: Console) -> None:
        clients = max(entry.clients + entry.rejected + entry.failed for entry in records)
        lines = RoundLines.fitting(console.width, len(records) - 1, clients,
                                   clock=records[-1].simulated_seconds is not None)
        console.print(lines.header(), highlight=False)
        for entry in records[1:]:
            console.print(round_line(entry, lines))
        print_whole(console, round_table(records, title="Per-round results", width=console.width))
        print_wrapped(console, f"final accuracy {records[-1].accuracy:.4f}, macro F1 {records[-1].f1:.4f}, "
                               f"{traffic_summary(records)}, {records[-1].wall_seconds:.0f} s")
    return render


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
@pytest.mark.parametrize("run", list(RUNS))
def test_a_whole_run_fits_80_columns_without_trailing_spaces(run, terminal):
    lines = printed(whole_run(RUNS[run]), terminal)
    assert lines and all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert terminal or all(line == line.rstrip() for line in lines)  # a pipe or file has no trailing spaces
    assert not any("…" in line for line in lines)  # nothing cut short
    header, table_header = lines[0], next(line for line in lines[1:] if line.startswith("round"))
    for name in ESSENTIAL:
        assert name in header.split() and name in table_header.split(), (name, header, table_header)
    assert ("sim" in header) == ("sim" in table_header) == (run == "device profile")
    assert "44.3 kB" in lines[1] and "1.31 MB" in lines[1] and "184x" in lines[1]
    if run == "rejected clients":
        notes = [line for line in lines if line.startswith("  ")]
        assert notes[0].startswith("  rejected partition 3: update norm 48.1")
        assert any(line.startswith("    ") for line in notes)  # a long reason goes on, indented
        assert "[bold]" in " ".join(notes)  # a reason is text: its brackets are not markup


def test_a_pipe_gets_no_colour_codes():
    out = io.StringIO()
    whole_run(RUNS["rejected clients"])(Console(file=out, width=80))
    assert "\x1b" not in out.getvalue()


def test_a_wide_console_shows_every_column_and_a_narrow_one_the_most_important():
    wide = printed(whole_run(RUNS["device profile"]), terminal=False, width=200)
    assert wide[0].split() == ["round", "acc", "loss", "F1", "train", "clients", "up", "down", "ratio", "trip",
                               "s", "sim", "s"]
    narrow = printed(whole_run(RUNS["ordinary"]), terminal=False, width=50)
    assert all(len(line) <= 50 for line in narrow)
    assert narrow[0].split() == ["round", "acc", "loss", "F1", "clients", "up"]


def test_fitting_gives_up_the_least_important_columns_first():
    widths = {name: 6 for name in COLUMNS}
    assert fitting(widths, 10_000) == COLUMNS
    for count in range(1, len(COLUMNS) + 1):
        kept = fitting(widths, 6 * count + 2 * (count - 1))
        assert set(kept) == set(IMPORTANCE[:count]) and list(kept) == [c for c in COLUMNS if c in kept]
    assert fitting(widths, 3) == ("round",)  # never nothing


def test_the_table_leaves_out_columns_empty_all_run():
    table = round_table(RUNS["ordinary"])
    assert [column.header for column in table.columns] == [name for name in COLUMNS if name != "sim s"]
    assert "sim s" in [column.header for column in round_table(RUNS["device profile"]).columns]
    only_round_zero = [column.header for column in round_table([record(0)]).columns]
    assert "train" not in only_round_zero and "ratio" not in only_round_zero and "acc" in only_round_zero


def test_a_small_runs_traffic_is_not_zero_megabytes():
    small = [record(0), record(1, uplink_bytes=3_880, downlink_bytes=85, dense_uplink_bytes=66_000,
                                compression=17.0)]
    summary = traffic_summary(small)
    assert summary.startswith("uplink 3.88 kB (17x smaller than dense fp32), downlink 85 B, round trip 3.96 kB")
    row = dict(zip(COLUMNS, round_row(small[1])))
    assert (row["up"], row["down"]) == ("3.88 kB", "85 B")


@pytest.mark.parametrize("value, text", [(2.302585, "2.3026"), (12.34567, "12.346"), (123456.7, "123457"),
                                         (4.2e7, "4e+07"), (float("nan"), "nan")])
def test_a_loss_prints_in_six_characters(value, text):
    assert metric_text(value) == text


def test_each_rejected_client_is_a_note_indented_under_its_round_and_wrapped_to_the_width():
    notes = note_lines(record(3, rejected=REJECTED), 60)
    starts = [i for i, note in enumerate(notes) if note.startswith("  rejected partition")]
    assert starts == [0, 1] and "[bold]" in notes[0]  # plain text: the reason's brackets stay
    for note in notes:
        first, *rest = note.splitlines()
        assert first.startswith("  rejected ") and rest and all(line.startswith("    ") for line in rest)
        assert all(len(line) <= 60 for line in note.splitlines())


def test_wrapped_text_breaks_at_spaces_and_indents_what_follows():
    text = "final accuracy 0.9612, macro F1 0.9598, uplink 886 kB (184x smaller than dense fp32), downlink 26.2 MB"
    lines = wrapped(text, 40).splitlines()
    assert all(len(line) <= 40 for line in lines) and len(lines) > 2
    assert all(line.startswith("  ") for line in lines[1:]) and " ".join(lines).split() == text.split()
    path = "runs/" + "x" * 60
    assert wrapped(f"run folder: {path}", 40).splitlines() == ["run folder:", f"  {path}"]  # a path stays whole


def test_flowers_log_goes_to_stderr_plain_and_wrapped_and_its_handler_comes_back_after(capsys):
    from flwr.common.logger import FLOWER_LOGGER, console_handler, log

    with log_on(Console(width=60), logging.WARNING):
        assert console_handler not in FLOWER_LOGGER.handlers
        log(logging.INFO, "an info line, hidden")
        log(logging.WARNING, "a warning long enough to need a second line at sixty columns, said once")
    assert console_handler in FLOWER_LOGGER.handlers
    assert not any(isinstance(handler, ConsoleLog) for handler in FLOWER_LOGGER.handlers)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 2
    assert lines[0].startswith("WARNING: a warning long") and lines[1].startswith("  ")
    assert "\x1b" not in captured.err and all(len(line) <= 60 for line in lines)


def test_a_log_line_printed_under_a_live_progress_bar_lands_above_it():
    from rich.progress import Progress

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True)
    with log_on(console, logging.WARNING), Progress(console=console, transient=True) as progress:
        progress.add_task("rounds", total=3)
        logging.getLogger("flwr").warning("seen above the bar")
    text = ANSI.sub("", out.getvalue())
    assert "WARNING: seen above the bar" in text


def test_torch_log_shows_at_info_with_verbose_and_its_level_comes_back(capsys):
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    with log_on(Console(width=80), logging.INFO):
        torch_log.info("a torch notice")
    assert capsys.readouterr().err == "INFO: a torch notice\n" and torch_log.level == level
