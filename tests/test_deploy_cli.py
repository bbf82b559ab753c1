"""The deployment commands: certs, server, client and export refuse bad input with a clear message."""

from __future__ import annotations

import argparse
import json
import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_certs import reissued

from pollen.cli import deploy as deploy_cli
from pollen.cli import main
from pollen.flower_processes import free_port


TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """`pollen server` sets the thread count of this process and of the Flower processes it starts."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # and put back as it was after the test
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


def test_export_and_distill_name_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "no config.yaml" in exit_message(capsys, ["export", str(tmp_path)])
    message = exit_message(capsys, ["distill", str(tmp_path)])
    assert message.startswith("pollen distill: ") and "no config.yaml" in message and message.count("\n") == 1


@pytest.mark.parametrize("options, threads, log_level", [
    ([], None, "WARNING"),  # None: the rule's count for a model not known yet
    (["--threads", "3", "-v"], "3", "INFO"),
])
def test_client_becomes_an_offline_supernode_without_importing_the_server(tmp_path, options, threads, log_level):
    from pollen.flower_processes import OFFLINE
    from pollen.threads import default_threads

    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    # os.execvpe replaced: report what would run, with which environment, and what was imported.
    code = f"""
import json, os, sys
def report(path, command, env):
    print(json.dumps({{"command": command, "env": env,
                      "server": sorted(m for m in sys.modules if m.startswith("pollen.server"))}}))
    sys.exit(0)
os.execvpe = report
from pollen.cli import main
main(["client", "--server", "127.0.0.1:1", "--insecure", "--data", {str(data)!r}, *{options!r}])
"""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE and k != "FLWR_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["server"] == []
    assert report["command"][0].endswith("flower-supernode") and "--insecure" in report["command"]
    assert {name: report["env"][name] for name in OFFLINE} == OFFLINE
    threads = threads or str(default_threads(None))
    assert report["env"]["OMP_NUM_THREADS"] == report["env"]["MKL_NUM_THREADS"] == threads
    assert report["env"]["FLWR_LOG_LEVEL"] == log_level


def test_server_resume_goes_on_in_the_run_folder_with_its_saved_config(tmp_path, monkeypatch):
    from pollen.config import load_config
    from pollen.run_folder import RunFolder
    from pollen.server import deploy

    run = RunFolder(tmp_path / "run")
    run.write_config(load_config(None, ["federation.rounds=3"]))
    seen = {}

    class Refused(deploy.Deployment):
        def start(self, timeout: float = 60.0) -> None:
            seen.update(config=self.config, folder=self.folder, resume=self.resume)
            raise deploy.DeploymentError("not started in this test")

    monkeypatch.setattr(deploy, "Deployment", Refused)
    assert main(["server", "--resume", str(run.path), "--insecure", "--set", "federation.rounds=5",
                 "--port", str(free_port())]) == 1
    assert seen["folder"] == run.path.resolve() and seen["resume"] is True
    assert seen["config"] == run.read_config(["federation.rounds=5"])


def refused_deployment(monkeypatch) -> dict:
    """Replaces the Deployment `pollen server` makes by one that records itself and starts nothing."""
    from pollen.server import deploy

    seen = {}

    class Refused(deploy.Deployment):
        def start(self, timeout: float = 60.0) -> None:
            seen["deployment"] = self
            raise deploy.DeploymentError("not started in this test")

    monkeypatch.setattr(deploy, "Deployment", Refused)
    return seen


def test_insecure_server_listens_on_127_0_0_1_unless_host_says_otherwise_and_warns_so(tmp_path, monkeypatch, capsys):
    seen = refused_deployment(monkeypatch)
    port = str(free_port())
    assert main(["server", "--insecure", "--output", str(tmp_path / "a"), "--port", port]) == 1
    warning = " ".join(capsys.readouterr().out.split())
    assert seen["deployment"].host == "127.0.0.1"
    assert "--insecure" in warning and "listening on 127.0.0.1 only; pass --host" in warning
    assert main(["server", "--insecure", "--host", "0.0.0.0", "--output", str(tmp_path / "b"), "--port", port]) == 1
    assert seen["deployment"].host == "0.0.0.0"
    assert "listening on 0.0.0.0: anyone who reaches it may join" in " ".join(capsys.readouterr().out.split())


def test_server_takes_its_config_first_and_the_old_config_option_still(tmp_path, monkeypatch, capsys):
    from pollen.config import load_config

    seen = refused_deployment(monkeypatch)
    port = str(free_port())
    assert main(["server", str(TINY), "--insecure", "--output", str(tmp_path / "a"), "--port", port]) == 1
    assert seen["deployment"].config == load_config(TINY)
    assert "deprecated" not in capsys.readouterr().err
    # The evaluation's process inherits the thread count: one for the tiny model.
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    assert main(["server", "--config", str(TINY), "--set", "federation.rounds=2", "--insecure",
                 "--output", str(tmp_path / "b"), "--port", port]) == 1
    assert seen["deployment"].config == load_config(TINY, ["federation.rounds=2"])
    assert "--config is deprecated; give the config as the first argument" in capsys.readouterr().err
    assert "give the config once" in exit_message(capsys, ["server", str(TINY), "--config", str(TINY), "--insecure"])


def test_server_request_limits_come_from_flags_and_bad_ones_are_named(tmp_path, monkeypatch, capsys):
    from pollen.server.fleet_proxy import RequestLimits

    seen = refused_deployment(monkeypatch)
    port = str(free_port())
    main(["server", "--insecure", "--output", str(tmp_path / "a"), "--port", port])
    assert seen["deployment"].limits == RequestLimits()  # the size is the model's, set when it starts
    main(["server", "--insecure", "--output", str(tmp_path / "b"), "--max-request-bytes", "5000",
          "--rate-limit", "2.5", "--rate-burst", "7", "--port", port])
    assert seen["deployment"].limits == RequestLimits(5000, 2.5, 7)
    capsys.readouterr()
    for flag, value in (("--max-request-bytes", "0"), ("--rate-limit", "0"), ("--rate-burst", "-1")):
        message = exit_message(capsys, ["server", "--insecure", "--output", str(tmp_path / "c"), flag, value])
        assert message.startswith(f"pollen server: {flag}: must be") and message.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["server", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {RequestLimits.requests_per_second:g})" in help_text
    assert f"(default {RequestLimits.burst})" in help_text


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """What a failing command says: exactly one line on stderr, nothing on stdout, a non-zero exit."""
    try:
        returned = main(argv)
    except SystemExit as stop:
        returned = stop.code
    captured = capsys.readouterr()
    assert returned == code and captured.out == "", captured
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


def test_certs_revoke_add_and_renew_each_confirm_in_one_line(tmp_path, capsys):
    folder = tmp_path / "c"
    main(["certs", str(folder), "--server-name", "fl.example.org", "--devices", "3"])
    capsys.readouterr()
    ca = (folder / "ca.pem").read_bytes()
    assert main(["certs", str(folder), "--revoke", "device-0", "--revoke", "device-2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"revoked device-0, device-2: keys moved to {folder / 'revoked'};") and out.count("\n") == 1
    assert sorted(p.name for p in (folder / "revoked").iterdir()) == ["device-0.key", "device-0.pub",
                                                                        "device-2.key", "device-2.pub"]
    error = one_line_error(capsys, ["certs", str(folder), "--revoke", "device-9"])
    assert error.startswith("pollen certs: --revoke device-9: no ") and error.endswith("known devices: device-1\n")
    assert main(["certs", str(folder), "--add-devices", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("added device-3, device-4 in ") and out.count("\n") == 1
    assert main(["certs", str(folder), "--renew-server"]) == 0  # keeps the names it had
    out = capsys.readouterr().out
    assert out.startswith(f"renewed {folder / 'server.pem'} (valid for fl.example.org, localhost, 127.0.0.1 until")
    assert out.count("\n") == 1 and (folder / "ca.pem").read_bytes() == ca
    assert "--server-name HOST is required" in one_line_error(capsys, ["certs", str(tmp_path / "new")])
    assert "not allowed with argument" in exit_message(capsys, ["certs", str(folder), "--renew-server",
                                                                "--add-devices", "1"])


def test_server_on_a_port_in_use_says_so_before_anything_else(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        error = one_line_error(capsys, ["server", "--insecure", "--port", str(port), "--output", str(tmp_path / "r")],
                               code=1)
    assert error.startswith(f"pollen server: --port {port} on 127.0.0.1: already in use")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.log"))


def test_server_with_a_certs_folder_without_certificates_says_which_file_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    error = one_line_error(capsys, ["server", "--certs", str(tmp_path / "empty"), "--output", str(tmp_path / "r")],
                           code=1)
    assert error.startswith(f"pollen server: {(tmp_path / 'empty').resolve() / 'ca.pem'}: missing; create")
    error = one_line_error(capsys, ["server", "--certs", str(tmp_path / "none"), "--output", str(tmp_path / "r")],
                           code=1)
    assert error.startswith(f"pollen server: --certs {(tmp_path / 'none').resolve()}: no such folder")


def test_server_warns_of_a_certificate_about_to_expire_and_refuses_an_expired_one(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "c"
    main(["certs", str(folder), "--server-name", "127.0.0.1", "--devices", "1"])
    now = datetime.datetime.now(datetime.timezone.utc)
    reissued(folder, "server.pem", now + datetime.timedelta(days=5, hours=1))
    seen = refused_deployment(monkeypatch)
    capsys.readouterr()
    argv = ["server", "--certs", str(folder), "--output", str(tmp_path / "r"), "--port", str(free_port())]
    assert main(argv) == 1
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert warnings == [f"WARNING: {folder.resolve() / 'server.pem'} expires in 5 days "
                        f"({(now + datetime.timedelta(days=5, hours=1)):%Y-%m-%d} UTC); renew it with "
                        f"`pollen certs {folder.resolve()} --renew-server`"]
    assert "deployment" in seen
    reissued(folder, "server.pem", now - datetime.timedelta(minutes=1))
    error = one_line_error(capsys, argv, code=1)
    assert error.startswith(f"pollen server: {folder.resolve() / 'server.pem'}: expired on ")
    assert "--renew-server" in error


def test_export_of_a_damaged_checkpoint_names_the_file(tmp_path, capsys):
    from pollen.config import load_config, save_config
    from pollen.run_folder import RunFolder

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    save_config(load_config(Path(__file__).parents[1] / "simulations" / "configs" / "tiny.yaml"), run.config_path)
    torch.save({"round": 1, "arrays": {"w": torch.zeros(3)}}, run.checkpoint)
    whole = run.checkpoint.read_bytes()
    run.checkpoint.write_bytes(whole[: len(whole) // 2])  # truncated, as by a full disk
    error = one_line_error(capsys, ["export", str(run.path)])
    assert error.startswith(f"pollen export: {run.checkpoint}: unreadable checkpoint, damaged or truncated (")
    torch.save({"round": 1, "arrays": {"w": torch.zeros(3)}}, run.checkpoint)  # another model's arrays
    error = one_line_error(capsys, ["export", str(run.path)])
    assert error.startswith(f"pollen export: {run.checkpoint}: does not fit the model of {run.config_path}")


def test_with_debug_the_error_is_raised_instead_of_printed(tmp_path):
    from pollen.server.checkpoint import CheckpointError

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    args = argparse.Namespace(command="export", run=str(tmp_path), format="onnx", output=None, prune=None,
                              finetune_rounds=0, threads=None, verbose=False, debug=True)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        deploy_cli.run(argparse.ArgumentParser(), args)
    args.debug = False
    with pytest.raises(SystemExit):
        deploy_cli.run(argparse.ArgumentParser(prog="pollen"), args)
