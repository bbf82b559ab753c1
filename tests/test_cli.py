import argparse

import pytest
import torch

from pollen.cli import command_parser, main
from pollen.config import load_config
from pollen.threads import SMALL_MODEL, default_threads, model_parameters, thread_environment

TINY = "simulations/configs/tiny.yaml"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_simulate_writes_record_plot_and_checkpoint(tmp_path, capsys, monkeypatch, restore_threads):
    monkeypatch.setenv("COLUMNS", "80")  # as a pipe of an 80-column terminal
    assert main(["simulate", TINY, "--set", "federation.rounds=1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "final accuracy" in out and str(tmp_path) in out and "1 torch thread" in out
    assert all(len(line) <= 80 and line == line.rstrip() for line in out.splitlines()), out
    assert "\x1b" not in out
    assert {p.name for p in tmp_path.iterdir()} >= {"rounds.jsonl", "accuracy.png", "checkpoint.pt", "config.yaml"}
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 2
    header = " ".join(out.split("round ")[0].split())
    assert "down no budget, 8-bit" in header  # tiny.yaml's, not the default
    assert ", 1 round, up" in header


def test_simulate_names_a_budgeted_downlink_in_its_header(tmp_path, capsys, monkeypatch, restore_threads):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["simulate", TINY, "--set", "federation.rounds=1", "--set", "downlink.budget=0.1", "--set",
                 "downlink.bits=2", "--output", str(tmp_path)]) == 0
    header = " ".join(capsys.readouterr().out.split("round ")[0].split())
    assert "up top-k 10%, 8-bit, down 10% budget, 2-bit" in header


@pytest.mark.parametrize("override, named", [
    ("federation.roundz=3", "federation.roundz"),
    ("codec.density=2", "codec.density"),
    ("model.trainable=everything", "model.trainable"),
])
def test_bad_settings_exit_with_the_key_named(override, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", TINY, "--set", override])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_missing_config_file_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "no/such/file.yaml"])
    assert "no/such/file.yaml" in capsys.readouterr().err


def test_version_and_help_read_like_plain_text(capsys):
    from importlib.metadata import version

    from pollen.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"pollen {version('pollen')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "simulate" in text and "tune" in text


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in command_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_command_has_plain_help_that_states_its_default():
    commands = subcommands()
    assert set(commands) == {"simulate", "compare", "tune", "certs", "server", "client", "export", "distill"}
    for name, command in commands.items():
        exclusive = {action for group in command._mutually_exclusive_groups for action in group._group_actions}
        options = {option for action in command._actions for option in action.option_strings}
        assert {"-v", "--verbose"} <= options, name
        assert ("--threads" in options) == (name != "certs"), name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            where = f"pollen {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and not any(mark in action.help for mark in ("`", "[bold", "**")), where
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.option_strings and not (flag or action.required or action in exclusive):
                assert "default" in action.help or "needed unless" in action.help, where
            if action.default not in (None, False, []):
                value = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
                assert f"default {value}" in action.help, where
        text = command.format_help()
        assert "``" not in text and "[/" not in text, name


def test_the_config_is_the_first_argument_wherever_a_command_takes_one():
    commands = subcommands()
    for name in ("simulate", "compare", "tune", "server"):
        positional = [action.dest for action in commands[name]._actions if not action.option_strings]
        assert positional == ["config"], name


@pytest.mark.parametrize("value, problem", [("0", "must be at least 1"), ("two", "expected a whole number")])
def test_threads_must_be_a_positive_count(value, problem, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["simulate", TINY, "--threads", value])
    assert stop.value.code == 2 and problem in capsys.readouterr().err


def test_the_thread_rule_gives_a_small_model_one_thread_and_a_large_one_half_the_cores():
    tiny, default = load_config(TINY), load_config()
    assert model_parameters(tiny.model) < SMALL_MODEL < model_parameters(default.model)
    assert default_threads(tiny, cores=8) == 1
    assert default_threads(default, cores=8) == 4 and default_threads(default, cores=64) == 32
    assert default_threads(None, cores=8) == 4  # a model not known yet
    assert default_threads(default, cores=2) == default_threads(None, cores=3) == 1
    assert default_threads(tiny) == 1  # on this machine, whatever its cores


def test_on_two_cores_the_rule_does_not_build_the_model(monkeypatch):
    import pollen.threads

    def never(model):
        raise AssertionError("built a model to learn what it could not change")

    monkeypatch.setattr(pollen.threads, "model_parameters", never)
    assert default_threads(load_config(), cores=2) == 1


def test_processes_started_for_a_run_get_the_thread_count_in_their_environment():
    assert thread_environment(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
