import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pollen.cli import main
from pollen.run_folder import RoundRecord, RunFolder
from pollen.server.plot import plot_run
from pollen.simulations.report import first_reaching, print_whole, round_line, round_table, time_to_accuracy

TINY = "simulations/configs/tiny.yaml"
ROOT = Path(__file__).resolve().parent.parent


def record(round_number, accuracy, simulated):
    return RoundRecord(round=round_number, accuracy=accuracy, loss=1.0, precision=0.5, recall=0.5, f1=0.5,
                       train_loss=None, clients=3, rejected=0, failed=0, uplink_bytes=1000,
                       downlink_bytes=2000, dense_uplink_bytes=9000, compression=9.0,
                       round_seconds=1.0, wall_seconds=float(round_number), simulated_seconds=simulated)


def test_time_to_accuracy_reads_the_simulated_clock():
    records = [record(0, 0.1, 0.0), record(1, 0.5, 40.0), record(2, 0.8, 95.0), record(3, 0.85, 150.0)]
    assert time_to_accuracy(records, 0.8) == 95.0
    assert time_to_accuracy(records, 0.1) == 0.0
    assert time_to_accuracy(records, 0.9) is None
    assert time_to_accuracy([record(0, 0.9, None)], 0.5) is None  # no device model, no clock
    assert first_reaching(records, 0.6) is records[2] and first_reaching(records, 0.9) is None
    assert round_line(records[2]).split()[-1] == "95"  # the sim s column, last


def test_a_wide_table_is_printed_uncut_into_a_file_without_trailing_spaces():
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Variants")  # as compare and tune print theirs
    for name in ("variant", *(f"seed {n}" for n in range(10))):
        table.add_column(name, justify="right")
    table.add_row("sparse-fedavg-topk", *(f"0.{9700 + n}" for n in range(10)))
    cut, whole = io.StringIO(), io.StringIO()
    Console(file=cut).print(table)  # what rich does alone at its 80-column guess
    print_whole(Console(file=whole), table)
    assert "0.9709" not in cut.getvalue()
    assert "0.9700" in whole.getvalue() and "0.9709" in whole.getvalue() and "…" not in whole.getvalue()
    assert all(line == line.rstrip() for line in whole.getvalue().splitlines())


def test_the_round_table_fits_the_width_it_is_given():
    import io

    from rich.console import Console

    records = [record(0, 0.1234, None), record(1, 0.9700, 12.5)]
    out = io.StringIO()
    print_whole(Console(file=out, width=50), round_table(records, width=50))
    assert "0.9700" in out.getvalue() and all(len(line) <= 50 for line in out.getvalue().splitlines())


def test_the_plot_gains_a_simulated_time_panel(tmp_path):
    import matplotlib.image

    with_clock = plot_run([record(0, 0.1, 0.0), record(1, 0.5, 40.0)], tmp_path / "a.png")
    without = plot_run([record(0, 0.1, None), record(1, 0.5, None)], tmp_path / "b.png")
    assert matplotlib.image.imread(with_clock).shape[1] > matplotlib.image.imread(without).shape[1]


def test_simulate_with_devices_prints_simulated_time(tmp_path, capsys):
    assert main(["simulate", TINY, "--set", "federation.rounds=1", "--set",
                 "simulation.devices=simulations/configs/devices-slow-uplink.yaml",
                 "--output", str(tmp_path)]) == 0
    assert "simulated device time" in " ".join(capsys.readouterr().out.split())  # lines wrap at the width
    assert RunFolder(tmp_path).records()[-1].simulated_seconds > 0
    assert (tmp_path / "participants.jsonl").read_text().count("sampled") == 1


def test_a_bad_device_file_is_a_config_error(tmp_path, capsys):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("examples_per_second: 10\nprofiles:\n  - {name: x, share: 1, compute_speed: 1, "
                     "uplink_mbps: 1, downlink_mbps: 1, availability: 2}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", TINY, "--set", f"simulation.devices={fleet}", "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "availability" in capsys.readouterr().err


def restore_ctrl_c() -> None:
    """In the child: Ctrl-C's default action, whatever the parent had (a shell's background
    job ignores SIGINT, and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_cleanly_and_keeps_the_finished_rounds(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pollen.cli", "simulate", TINY, "--set", "federation.rounds=200",
         "--set", "train.local_epochs=1", "--output", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=restore_ctrl_c)
    try:
        deadline = time.monotonic() + 240
        rounds = tmp_path / "rounds.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            if rounds.exists() and len(rounds.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out
    said = " ".join(out.split())  # lines wrap at the width
    assert "stopped by Ctrl-C" in said and "pollen simulate --resume" in said
    kept = [json.loads(line) for line in rounds.read_text().splitlines()]
    assert 2 <= len(kept) < 201 and [entry["round"] for entry in kept] == list(range(len(kept)))
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "checkpoint.pt").stat().st_size > 0


@pytest.mark.parametrize("override", ["simulation.backend=spark", "simulation.client_state=cloud",
                                      "simulation.deadline_seconds=-1"])
def test_bad_simulation_settings_name_the_key(override, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", TINY, "--set", override])
    assert override.split("=")[0] in capsys.readouterr().err
