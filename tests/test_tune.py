"""pollen tune: Optuna trials over run-config keys, pruning, a resumable study, the report."""

from __future__ import annotations

import io

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import pollen.simulations.tune as tune_module
from pollen.config import ConfigError, load_config
from pollen.simulations.tune import load_tune, open_study, pareto_front, run_tune

BASE = {"run": "tiny.yaml", "set": {"federation.rounds": 3, "federation.num_clients": 4,
                                    "federation.clients_per_round": 2, "train.local_epochs": 1,
                                    "data.test_size": 200}}


pytestmark = pytest.mark.usefixtures("one_thread")


def tune_file(tmp_path, **values):
    import shutil

    shutil.copy("simulations/configs/tiny.yaml", tmp_path / "tiny.yaml")
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({**BASE, **values}))
    return path


def test_a_study_runs_its_budget_writes_the_report_and_best_yaml_runs_as_is(tmp_path):
    tune = load_tune(tune_file(tmp_path, trials=3, pruner="none", seed=1,
                               space={"train.lr": {"low": "1e-3", "high": 5.0e-2, "log": True},
                                      "codec.density": {"choices": [0.05, 0.2]}}))
    lines = []
    report = run_tune(tune, tmp_path / "out", on_trial=lines.append)
    assert len(lines) == 3 and all(line.startswith("trial ") for line in lines)
    assert all((tmp_path / "out" / name).is_file() for name in report.files)
    assert report.best is not None and report.best.value == max(t.value for t in report.study.trials)
    best = load_config(tmp_path / "out" / "best.yaml")
    assert best.train.lr == report.best.params["train.lr"] and best.codec.density == report.best.params["codec.density"]
    assert best.federation.rounds == 3  # the base's overrides are kept
    rows = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial,state,objective")
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "…" not in table and all(len(line) <= 80 and line == line.rstrip() for line in table.splitlines())


def test_a_rerun_carries_on_the_stored_study_up_to_the_new_budget(tmp_path):
    path = tune_file(tmp_path, trials=2, pruner="none", sampler="random", space={"train.lr": {"low": 0.001, "high": 0.05}})
    first = run_tune(load_tune(path), tmp_path / "out")
    values = [t.value for t in first.study.trials]
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "trials": 3}))
    again = run_tune(load_tune(path), tmp_path / "out")
    assert len(again.study.trials) == 3 and [t.value for t in again.study.trials[:2]] == values


def test_a_federation_that_trails_is_pruned_after_the_warmup(tmp_path):
    tune = load_tune(tune_file(tmp_path, trials=3, pruner="median", warmup_rounds=1, sampler="grid",
                               space={"train.lr": {"choices": [0.05, 1.0e-7]}}))
    study = open_study(tune, tmp_path / "out")
    for lr in (0.05, 0.05, 1.0e-7):  # two good federations first: the median pruner needs them
        study.enqueue_trial({"train.lr": lr})
    report = run_tune(tune, tmp_path / "out")
    states = [t.state for t in report.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = report.study.trials[2]
    assert 1 <= pruned.user_attrs["rounds"] < 3 and report.best.params["train.lr"] == 0.05


def test_a_trial_cut_short_is_run_again_next_time(tmp_path, monkeypatch):
    tune = load_tune(tune_file(tmp_path, trials=2, pruner="none", sampler="random",
                               space={"train.lr": {"low": 0.001, "high": 0.05}}))
    simulate, calls = tune_module.simulate, []

    def interrupted_second(config, folder, on_round):
        calls.append(config.train.lr)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return simulate(config, folder, on_round)

    monkeypatch.setattr(tune_module, "simulate", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        run_tune(tune, tmp_path / "out")
    monkeypatch.setattr(tune_module, "simulate", simulate)
    report = run_tune(tune, tmp_path / "out")
    complete = [t for t in report.study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and complete[1].params["train.lr"] == calls[1]  # the cut trial, again


def test_an_mb_limit_keeps_the_best_within_it():
    assert pareto_front([(1.0, 0.5), (0.5, 0.6), (2.0, 0.9), (3.0, 0.8)]) == [(0.5, 0.6), (2.0, 0.9)]


@pytest.mark.parametrize("values, named", [
    ({"space": {"train.nope": {"low": 1, "high": 2}}}, "train.nope"),
    ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "space.train.lr: needs low < high"),
    ({"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "low > 0 on a log scale"),
    ({"space": {"train.lr": {"low": "fast", "high": 0.1}}}, "space.train.lr.low: expected a finite number"),
    ({"space": {"federation.strategy": {"choices": ["sparse-fedavg", "nope"]}}}, "nope"),
    ({"space": {"train.lr": {"low": 0.01, "high": 0.1}}, "sampler": "grid"}, "grid searches choices only"),
    ({"space": {"train.lr": {"choices": [0.1]}}, "pruner": "sometimes"}, "pruner: must be one of median"),
    ({"space": {"train.lr": {"choices": [0.1]}}, "trials": 0}, "trials: expected an integer of at least 1"),
    ({"space": {}}, "space: expected a mapping"),
    ({"space": {"train.lr": {"choices": [0.1]}}, "budget": 3}, "budget: unknown key"),
])
def test_a_bad_tune_config_is_one_line_naming_the_key(tmp_path, values, named):
    with pytest.raises(ConfigError, match=named) as error:
        load_tune(tune_file(tmp_path, **values))
    assert "\n" not in str(error.value)


def test_the_example_tune_config_loads():
    tune = load_tune("simulations/configs/tune.yaml")
    assert {p.key for p in tune.space} >= {"train.lr", "codec.density"} and tune.trials >= 10
    assert isinstance(optuna.samplers.TPESampler(), optuna.samplers.BaseSampler)


def test_the_default_task_tune_config_searches_the_built_in_default():
    from pollen.config import Config

    tune = load_tune("simulations/configs/tune-default.yaml")
    assert tune.base == Config()  # no `run:`: the run `pollen simulate` makes with no config
    assert {p.key for p in tune.space} == {"train.lr", "train.local_epochs", "federation.server_momentum",
                                          "federation.server_decay"}
    assert tune.warmup_rounds < tune.base.federation.rounds


def test_the_trials_table_of_the_default_task_study_fits_80_columns_with_every_header_whole():
    from rich.console import Console

    from pollen.simulations.tune import trials_table

    tune = load_tune("simulations/configs/tune-default.yaml")
    study = optuna.create_study(direction="maximize")
    for number in range(3):
        trial = study.ask()
        for param in tune.space:
            param.suggest(trial)
        trial.set_user_attr("total_mb", 7.5)
        trial.set_user_attr("rounds", 20)
        study.tell(trial, 0.95 + number / 1000)
    buffer = io.StringIO()
    Console(file=buffer, width=80, color_system=None).print(trials_table(tune, study.trials, study.best_trial))
    text = buffer.getvalue()
    assert "…" not in text and "momentum" in text and "epochs" in text and "decay" in text
    assert f"{study.best_trial.number}*" in text


def test_the_cli_runs_a_study_and_a_second_call_carries_it_on(tmp_path, capsys):
    from pollen.cli import main

    path = tune_file(tmp_path, trials=1, pruner="none", space={"train.lr": {"choices": [0.01]}})
    assert main(["tune", str(path), "--output", str(tmp_path / "out"), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "trial 0 complete" in printed and "best.yaml" in printed
    assert main(["tune", str(path), "--output", str(tmp_path / "out"), "--threads", "1"]) == 0
    assert "trial 1" not in capsys.readouterr().out  # the budget was already met


def test_the_cli_names_a_bad_tune_config_in_one_line(tmp_path, capsys):
    from pollen.cli import main

    path = tmp_path / "t.yaml"
    path.write_text("space: [\n")
    with pytest.raises(SystemExit) as stop:
        main(["tune", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pollen: config error:") and "t.yaml: not valid YAML" in err and err.count("\n") == 1
