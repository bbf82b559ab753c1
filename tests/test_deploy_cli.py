"""The deployment commands: certs, server, client and export refuse bad input with a clear message."""

from __future__ import annotations

import pytest

from pollen.cli import main


def exit_message(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_certs_command_writes_the_set_and_adds_the_local_names(tmp_path, capsys):
    from pollen.certs import server_names_of

    assert main(["certs", str(tmp_path / "c"), "--server-name", "fl.example.org", "--devices", "2"]) == 0
    assert server_names_of(tmp_path / "c" / "server.pem") == ["fl.example.org", "localhost", "127.0.0.1"]
    assert len(list((tmp_path / "c" / "devices").glob("*.key"))) == 2
    assert "--force" in exit_message(capsys, ["certs", str(tmp_path / "c"), "--server-name", "x.org"])


def test_client_checks_its_data_and_keys_before_starting_a_supernode(tmp_path, capsys):
    main(["certs", str(tmp_path / "c"), "--server-name", "localhost", "--devices", "1"])
    key, ca = tmp_path / "c" / "devices" / "device-0.key", tmp_path / "c" / "ca.pem"
    (tmp_path / "d.csv").write_text("1,2,3\n")
    assert "square image" in exit_message(capsys, ["client", "--server", "127.0.0.1:1", "--ca", str(ca),
                                                   "--key", str(key), "--data", str(tmp_path / "d.csv")])
    assert "--ca and --key are required" in exit_message(
        capsys, ["client", "--server", "127.0.0.1:1", "--data", str(tmp_path / "d.csv")])


def test_server_needs_certificates_or_an_explicit_insecure(tmp_path, capsys):
    assert "--certs DIR is required" in exit_message(capsys, ["server", "--output", str(tmp_path / "run")])
    assert "not a run folder" in exit_message(capsys, ["server", "--resume", str(tmp_path), "--insecure"])


def test_export_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "no config.yaml" in exit_message(capsys, ["export", str(tmp_path)])
