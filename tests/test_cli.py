import pytest

from pollen.cli import main

TINY = "simulations/configs/tiny.yaml"


def test_simulate_writes_record_plot_and_checkpoint(tmp_path, capsys):
    assert main(["simulate", TINY, "--set", "federation.rounds=1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "final accuracy" in out and str(tmp_path) in out
    assert {p.name for p in tmp_path.iterdir()} >= {"rounds.jsonl", "accuracy.png", "checkpoint.pt", "config.yaml"}
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 2


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
