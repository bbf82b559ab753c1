"""Distillation: a student learns a finished run's soft labels on the server's own data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pollen.config import load_config
from pollen.run_folder import RunFolder
from pollen.server.distill import DistillError, distill_run, load_student
from pollen.simulations.run import simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("run") / "run"
    config = load_config("simulations/configs/tiny.yaml", ["federation.rounds=3", "data.test_size=400"])
    simulate(config, RunFolder(folder))
    yield folder
    torch.set_num_threads(threads)


def test_a_student_learns_the_teachers_soft_labels_and_is_written_with_its_measures(run):
    result = distill_run(run, student="tiny-cnn", epochs=40, seed=0)
    assert result.transfer_examples == 200 and result.evaluation_examples == 200
    chance = 0.1
    assert result.student["accuracy"] > 2 * chance  # it learned from soft labels alone
    assert result.student["latency_ms"] > 0 and result.teacher["parameters"] > 0
    saved = json.loads((run / "student" / "distill.json").read_text())
    assert saved["student"]["accuracy"] == result.student["accuracy"]
    student = load_student(run)
    images = torch.randn(4, 3, 8, 8)
    assert student(images).shape == (4, 10)
    assert "student tiny-cnn: accuracy" in result.summary()


def test_the_transfer_data_can_be_the_servers_own_images_whose_labels_are_ignored(run, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "unlabelled.npz", images=rng.random((64, 8, 8)), labels=np.zeros(64, dtype=np.int64))
    result = distill_run(run, student="tiny-cnn", data=str(tmp_path / "unlabelled.npz"), epochs=2)
    assert result.transfer_examples == 64 and result.evaluation_examples == 400


def test_bad_settings_and_folders_are_named(run, tmp_path):
    with pytest.raises(DistillError, match="must be positive"):
        distill_run(run, temperature=0)
    with pytest.raises(DistillError, match="no config.yaml"):
        distill_run(tmp_path)
    with pytest.raises(DistillError, match="--student nope"):
        distill_run(run, student="nope", epochs=1)


def test_the_distill_command_trains_a_student_and_says_bad_input_in_one_line(run, capsys):
    from pollen.cli import main

    assert main(["distill", str(run), "--student", "tiny-cnn", "--epochs", "2", "--temperature", "2",
                 "--image-size", "12"]) == 0
    assert "student tiny-cnn: accuracy" in capsys.readouterr().out
    saved = json.loads((run / "student" / "distill.json").read_text())
    assert (saved["epochs"], saved["temperature"]) == (2, 2.0)
    assert load_student(run)(torch.randn(2, 3, 12, 12)).shape == (2, 10)  # the student's own input size
    for args, message in ((["--student", "nope"], "--student nope"), (["--epochs", "0"], "must be positive"),
                          (["--image-size", "0"], "--image-size 0: must be positive"),
                          (["--data", str(run / "missing.npz")], "missing.npz")):
        with pytest.raises(SystemExit) as exit:
            main(["distill", str(run), "--epochs", "1", *args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("pollen distill: ") and message in err
        assert err.count("\n") == 1
