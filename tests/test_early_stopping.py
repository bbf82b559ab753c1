"""Early stopping keeps the best round's model; the learning rate follows its schedule round by round."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

import pollen.client.app as client_app
from pollen.config import ConfigError, EarlyStopping, TrainConfig, load_config
from pollen.run_folder import RunFolder, final_record
from pollen.schedules import learning_rate
from pollen.server.checkpoint import load_arrays
from pollen.server.early_stopping import EarlyStop
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
SMALL = ["federation.num_clients=4", "federation.clients_per_round=2", "train.local_epochs=1", "data.test_size=200"]


pytestmark = pytest.mark.usefixtures("one_thread")


def arrays(value):
    return ArrayRecord({"w": Array(np.full(2, value, dtype=np.float32))})


def test_the_run_stops_after_patience_rounds_without_a_gain_and_keeps_the_best():
    stop = EarlyStop(EarlyStopping(patience=2, min_delta=0.01), 0, 0.10, arrays(0))
    assert stop.after(1, 0.50, arrays(1)) is None and stop.best_round == 1
    assert stop.after(2, 0.505, arrays(2)) is None  # within min_delta: not a gain
    reason = stop.after(3, 0.40, arrays(3))
    assert reason and "kept round 1's model" in reason and "for 2 rounds" in reason
    assert stop.best_arrays["w"].numpy().tolist() == [1.0, 1.0]


def test_a_patience_of_one_reads_in_the_singular():
    stop = EarlyStop(EarlyStopping(patience=1), 0, 0.5, arrays(0))
    assert "for 1 round:" in stop.after(1, 0.4, arrays(1))


def test_patience_zero_never_stops():
    stop = EarlyStop(EarlyStopping(), 0, 0.9, arrays(0))
    assert all(stop.after(r, 0.1, arrays(r)) is None for r in range(1, 50))


def test_a_stopped_run_says_so_and_its_checkpoint_holds_the_best_rounds_model(tmp_path, monkeypatch):
    # A learning rate that only grows past round 2 makes later rounds worse than the best.
    config = load_config(TINY, [*SMALL, "federation.rounds=8", "federation.early_stopping.patience=2",
                                "federation.early_stopping.min_delta=0.5"])
    kept = {}
    import pollen.server.app as server_app

    original = server_app.EarlyStop.keep

    def remembering(self, server_round, accuracy, arrays):
        original(self, server_round, accuracy, arrays)
        kept[server_round] = {name: a.numpy().copy() for name, a in arrays.items()}

    monkeypatch.setattr(server_app.EarlyStop, "keep", remembering)
    folder = RunFolder(tmp_path / "run")
    _, records = simulate(config, folder)
    assert len(records) < 9 and records[-1].early_stop and "kept round" in records[-1].early_stop
    best_round = int(records[-1].early_stop.split("kept round ")[1].split("'")[0])
    assert records[-1].kept_round == best_round and folder.records()[-1].kept_round == best_round
    assert final_record(records) is records[best_round]  # the model the run ends with, not the last round's
    saved = load_arrays(folder.checkpoint)
    assert all(np.array_equal(saved[name], kept[best_round][name]) for name in saved)
    report = json.loads(folder.classes.read_text())
    assert len(report["confusion"]) == 10 and sum(map(sum, report["confusion"])) == 200
    assert folder.confusion.stat().st_size > 1000


def test_simulates_last_line_gives_the_kept_models_accuracy_after_an_early_stop(tmp_path, capsys):
    from pollen.cli import main

    # Patience 1 and an unreachable gain: the run stops after round 1 and keeps round 0's model.
    args = ["simulate", TINY, "--output", str(tmp_path / "run"), "--threads", "1",
            *[f"--set={o}" for o in (*SMALL, "federation.rounds=5", "federation.early_stopping.patience=1",
                                     "federation.early_stopping.min_delta=1")]]
    assert main(args) == 0
    printed = " ".join(capsys.readouterr().out.split())
    start = RunFolder(tmp_path / "run").records()[0]
    assert f"final accuracy {start.accuracy:.4f}, macro F1 {start.f1:.4f} (round 0's model, kept by early stopping)" in printed


def test_without_early_stopping_the_final_record_is_the_last_rounds():
    import dataclasses

    from pollen.run_folder import RoundRecord

    required = [f.name for f in dataclasses.fields(RoundRecord) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    records = [RoundRecord(**{**dict.fromkeys(required, 0), "round": r, "accuracy": 1.0 - r / 10}) for r in range(3)]
    assert final_record(records) is records[-1]  # the last round's, though an earlier one scored higher
    stopped = [*records[:2], dataclasses.replace(records[2], early_stop="...", kept_round=0)]
    assert final_record(stopped) is stopped[0]


@pytest.mark.parametrize("settings, expected", [
    ({}, [0.01] * 5),
    ({"lr_schedule": "cosine", "lr_min": 0.001}, [0.01, 0.0086819, 0.0055, 0.0023180, 0.001]),
    ({"lr_schedule": "step", "lr_step_rounds": 2, "lr_gamma": 0.5}, [0.01, 0.01, 0.005, 0.005, 0.0025]),
    ({"lr_schedule": "linear-warmup", "warmup_rounds": 4}, [0.0025, 0.005, 0.0075, 0.01, 0.01]),
])
def test_each_schedule_gives_its_learning_rate_by_round(settings, expected):
    train = TrainConfig(lr=0.01, **settings)
    assert [learning_rate(train, r, 5) for r in range(1, 6)] == pytest.approx(expected, rel=1e-4)


def test_clients_train_with_the_rate_the_server_sends_and_the_record_shows_it(tmp_path, monkeypatch):
    seen = []
    train_locally = client_app.train_locally

    def recording(model, data, settings, **kwargs):
        seen.append(settings.lr)
        return train_locally(model, data, settings, **kwargs)

    monkeypatch.setattr(client_app, "train_locally", recording)
    config = load_config(TINY, [*SMALL, "federation.rounds=3", "train.lr_schedule=step", "train.lr_step_rounds=1",
                                "train.lr_gamma=0.5", "train.lr=0.02"])
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    assert [r.lr for r in records] == [None, 0.02, 0.01, 0.005]
    assert seen == [0.02, 0.02, 0.01, 0.01, 0.005, 0.005]  # two clients a round
    _, constant = simulate(load_config(TINY, [*SMALL, "federation.rounds=1"]), RunFolder(tmp_path / "constant"))
    assert constant[-1].lr == 0.01  # recorded; not sent, since it never changes (tests/test_simulation.py)


def test_bad_schedule_and_early_stopping_settings_are_named():
    for override, named in (("train.lr_schedule=exp", "train.lr_schedule"), ("train.lr_min=1", "train.lr_min"),
                            ("train.lr_gamma=2", "train.lr_gamma"),
                            ("federation.early_stopping.patience=-1", "federation.early_stopping.patience")):
        with pytest.raises(ConfigError, match=named):
            load_config(TINY, [override])


def test_federated_evaluation_records_the_clients_spread(tmp_path):
    config = load_config(TINY, [*SMALL, "federation.rounds=1", "federation.fraction_evaluate=1.0"])
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    spread = records[-1].federated_spread
    assert spread and spread["worst"] <= spread["p10"] <= spread["mean"] <= 1.0
    assert records[0].federated_spread is None
