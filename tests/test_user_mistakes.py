"""A user's mistake is one line naming the file or key and the problem, and exit code 2; --debug shows more."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollen.cli import is_pollen_error, main
from pollen.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = "simulations/configs/tiny.yaml"


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("pollen: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("text, problem", [
    ("federation:\n  rounds: [1\n", "line 3"),  # the flow sequence never closes
    ("federation:\n\trounds: 1\n", "tab character"),
    ("federation: rounds: 1\n", "mapping values are not allowed"),
])
def test_a_config_file_that_is_not_yaml_is_named_with_its_line(tmp_path, capsys, text, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    err = one_line_error(["simulate", str(path)], capsys)
    assert str(path) in err and "not valid YAML" in err and problem in err


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes("seed: 1  # caf\u00e9\n".encode("latin-1"))
    err = one_line_error(["simulate", str(path)], capsys)
    assert str(path) in err and "not UTF-8" in err and "0xe9" in err


def test_a_device_file_that_is_not_yaml_is_named(tmp_path, capsys):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("examples_per_second: 10\nprofiles:\n\t- name: x\n")
    err = one_line_error(["simulate", TINY, "--set", f"simulation.devices={fleet}",
                          "--output", str(tmp_path / "run")], capsys)
    assert str(fleet) in err and "tab character" in err


def test_an_override_that_is_not_yaml_is_named(capsys):
    err = one_line_error(["simulate", TINY, "--set", "federation.rounds=[1"], capsys)
    assert "--set 'federation.rounds=[1'" in err and "not valid YAML" in err


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("federation.server_momentum=.nan", "federation.server_momentum"),
    ("simulation.deadline_seconds=.inf", "simulation.deadline_seconds"),
    ("strategy.eta=-.inf", "strategy.eta"),
])
def test_nan_and_infinity_are_refused_in_every_number(override, key, capsys):
    err = one_line_error(["simulate", TINY, "--set", override], capsys)
    assert f"{key}: must be a finite number" in err


def test_every_float_key_refuses_nan():
    from pollen.config import Config, run_config_of

    floats = [key for key, value in run_config_of(Config()).items() if isinstance(value, float)]
    assert len(floats) > 10
    for key in floats:
        with pytest.raises(ConfigError, match=f"^{key}: must be a finite number"):
            load_config(overrides=[f"{key}=.nan"])


def test_an_unknown_key_suggests_the_nearest_and_says_where_it_was_written(tmp_path, capsys):
    err = one_line_error(["simulate", TINY, "--set", "federation.round=3"], capsys)
    assert err == "pollen: config error: federation.round: unknown key in --set; did you mean federation.rounds?\n"
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  rounds: 3\n  clients_per_rnd: 2\n")
    err = one_line_error(["simulate", str(path)], capsys)
    assert err == (f"pollen: config error: federation.clients_per_rnd: unknown key in {path}; "
                   "did you mean federation.clients_per_round?\n")


def test_pollen_errors_are_told_apart_from_bugs():
    from pollen.certs import CertificateError
    from pollen.data_files import DataError
    from pollen.flower_processes import FlowerError
    from pollen.server.checkpoint import CheckpointError

    for error in (ConfigError("x"), DataError("x"), CertificateError("x"), CheckpointError("x"), FlowerError("x"),
                  FileNotFoundError(2, "No such file")):
        assert is_pollen_error(error), error
    assert not is_pollen_error(ValueError("a bug")) and not is_pollen_error(KeyError("a bug"))


def pollen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pollen.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_the_command_prints_one_line_and_debug_the_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: .inf\n")
    plain = pollen("simulate", str(path))
    assert plain.returncode == 2
    assert plain.stderr == "pollen: config error: train.lr: must be a finite number, got inf\n"
    debug = pollen("--debug", "simulate", str(path))
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().endswith("ConfigError: train.lr: must be a finite number, got inf")
