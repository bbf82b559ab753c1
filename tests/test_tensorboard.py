"""--tensorboard: every round's scalars as TensorBoard events in the run folder, the same values as rounds.jsonl."""

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pollen.cli import main
from pollen.config import config_from_run_config, load_config, run_config_of
from pollen.run_folder import RoundRecord, RunFolder
from pollen.simulations.compare import load_compare, run_compare
from pollen.tensorboard_log import EXTRA, SCALARS, TensorBoardLog, TensorBoardMissing, require_tensorboard

TINY = "simulations/configs/tiny.yaml"


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run folder's event files: tag -> [(step, value)] in the order written."""
    events = EventAccumulator(str(path))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(records: list[RoundRecord]) -> dict[str, list[tuple[int, float]]]:
    """What rounds.jsonl says each tag should hold, read by hand rather than through SCALARS."""
    points = {
        "eval/accuracy": [(r.round, r.accuracy) for r in records],
        "eval/loss": [(r.round, r.loss) for r in records],
        "eval/macro_f1": [(r.round, r.f1) for r in records],
        "train/loss": [(r.round, r.train_loss) for r in records if r.train_loss is not None],
        "traffic/uplink_bytes": [(r.round, r.uplink_bytes) for r in records],
        "traffic/downlink_bytes": [(r.round, r.downlink_bytes) for r in records],
        "traffic/round_trip_ratio": [(r.round, 2 * r.dense_uplink_bytes / (r.uplink_bytes + r.downlink_bytes))
                                     for r in records if r.dense_uplink_bytes],
    }
    return {tag: values for tag, values in points.items() if values}


def assert_events_hold(folder: RunFolder) -> None:
    records = folder.records()
    got, want = scalars(folder.path), expected(records)
    assert set(got) == set(want) == set(SCALARS)
    for tag, points in want.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in points], tag  # each round once, in order
        assert [value for _, value in got[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_simulate_with_tensorboard_writes_the_records_as_scalars(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["simulate", TINY, "--set", "federation.rounds=2", "--output", str(run), "--tensorboard"]) == 0
    folder = RunFolder(run)
    assert [r.round for r in folder.records()] == [0, 1, 2]
    assert load_config(folder.config_path).tensorboard
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert_events_hold(folder)


def test_a_resumed_run_writes_each_round_once(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["simulate", TINY, "--set", "federation.rounds=2", "--output", str(run), "--tensorboard"]) == 0
    # The run's own config.yaml carries tensorboard: true, so the resumed run goes on writing events.
    assert main(["simulate", "--resume", str(run), "--set", "federation.rounds=3"]) == 0
    folder = RunFolder(run)
    assert [r.round for r in folder.records()] == [0, 1, 2, 3]
    assert_events_hold(folder)


def test_a_run_without_events_resumed_with_tensorboard_gets_them_for_every_round(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["simulate", TINY, "--set", "federation.rounds=1", "--output", str(run)]) == 0
    assert not list(run.glob("events.out.tfevents.*"))
    assert main(["simulate", "--resume", str(run), "--set", "federation.rounds=2", "--tensorboard"]) == 0
    folder = RunFolder(run)
    assert [r.round for r in folder.records()] == [0, 1, 2]
    assert_events_hold(folder)


def test_the_log_begins_afresh_with_the_rounds_kept(tmp_path):
    records = [RoundRecord(round=n, accuracy=0.1 * n, loss=2.0 - n, precision=0.5, recall=0.5, f1=0.2 * n,
                           train_loss=None if n == 0 else 1.5, clients=3, rejected=0, failed=0,
                           uplink_bytes=100 * n, downlink_bytes=300 * n, dense_uplink_bytes=4000 * n,
                           compression=None, round_seconds=1.0, wall_seconds=float(n)) for n in range(4)]
    first = TensorBoardLog(tmp_path)
    for record in records:
        first.append(record)  # rounds 0-3 on disk, as a process killed after round 3 leaves them
    first.close()
    again = TensorBoardLog(tmp_path, kept=records[:2])  # the checkpoint held round 1 only
    again.append(records[2])
    again.close()
    got = scalars(tmp_path)
    assert got["eval/accuracy"] == [(0, 0.0), (1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert got["train/loss"] == [(1, 1.5), (2, 1.5)]  # round 0 trained nothing: no point
    assert got["traffic/round_trip_ratio"] == [(1, 20.0), (2, 20.0)]  # 2 x 4000n / 400n; nothing sent in round 0


def test_compare_with_tensorboard_gives_each_run_its_own_folder_of_events(tmp_path, one_thread):
    path = tmp_path / "compare.yaml"
    path.write_text(f"run: {Path(TINY).resolve()}\nset: {{federation.rounds: 1}}\nseeds: [0]\n"
                    "variants:\n  dense: {codec.name: identity}\n  topk: {}\n")
    assert not any(config.tensorboard for _, config in load_compare(path).variants)
    compare = load_compare(path, {"tensorboard": True})
    assert compare.base.tensorboard and all(config.tensorboard for _, config in compare.variants)
    report = run_compare(compare, tmp_path / "report")
    for label in ("dense", "topk"):
        folder = RunFolder(report.folder / "runs" / label / "seed-0")
        assert_events_hold(folder)
    dense, topk = (scalars(report.folder / "runs" / label / "seed-0") for label in ("dense", "topk"))
    assert dense["traffic/uplink_bytes"][1][1] > topk["traffic/uplink_bytes"][1][1]  # separate runs, not one


def test_the_server_app_reads_the_key_from_flowers_run_config():
    config = load_config(TINY, ["tensorboard=true"])
    assert run_config_of(config)["tensorboard"] is True
    assert config_from_run_config(run_config_of(config)).tensorboard


@pytest.fixture
def without_tensorboard(monkeypatch):
    """As if the tensorboard package were not installed: torch's SummaryWriter cannot be imported."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_without_the_package_a_run_asking_for_it_is_refused_naming_the_extra(without_tensorboard):
    require_tensorboard(load_config(TINY))  # not asked for: nothing needed
    with pytest.raises(TensorBoardMissing, match=r"^tensorboard: .*pip install 'pollen\[tensorboard\]'$"):
        require_tensorboard(load_config(TINY, ["tensorboard=true"]))


@pytest.mark.parametrize("command", [
    ["simulate", TINY, "--tensorboard"],
    ["simulate", TINY, "--set", "tensorboard=true"],
    ["server", "--insecure", "--tensorboard", "--set", "output_dir=OUT"],
    ["compare", "COMPARE", "--tensorboard"],
])
def test_without_the_package_the_commands_stop_at_start_in_one_line(command, tmp_path, capsys, without_tensorboard):
    compare = tmp_path / "compare.yaml"
    compare.write_text(f"run: {Path(TINY).resolve()}\nseeds: [0]\nvariants: {{a: {{}}}}\n")
    command = [str(compare) if part == "COMPARE" else part.replace("OUT", str(tmp_path / "runs")) for part in command]
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--output", str(tmp_path / "run")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"pollen: config error: tensorboard: needs the tensorboard package: {EXTRA}"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # nothing ran
