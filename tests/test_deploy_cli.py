"""The deployment commands: certs, server, client and export refuse bad input with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
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


def test_client_becomes_an_offline_supernode_without_importing_the_server(tmp_path):
    from pollen.flower_processes import OFFLINE

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
main(["client", "--server", "127.0.0.1:1", "--insecure", "--data", {str(data)!r}])
"""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["server"] == []
    assert report["command"][0].endswith("flower-supernode") and "--insecure" in report["command"]
    assert {name: report["env"][name] for name in OFFLINE} == OFFLINE


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
    assert main(["server", "--resume", str(run.path), "--insecure", "--set", "federation.rounds=5"]) == 1
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
    assert main(["server", "--insecure", "--output", str(tmp_path / "a")]) == 1
    warning = " ".join(capsys.readouterr().out.split())
    assert seen["deployment"].host == "127.0.0.1"
    assert "--insecure" in warning and "listening on 127.0.0.1 only; pass --host" in warning
    assert main(["server", "--insecure", "--host", "0.0.0.0", "--output", str(tmp_path / "b")]) == 1
    assert seen["deployment"].host == "0.0.0.0"
    assert "listening on 0.0.0.0: anyone who reaches it may join" in " ".join(capsys.readouterr().out.split())


def test_server_request_limits_come_from_flags_and_bad_ones_are_named(tmp_path, monkeypatch, capsys):
    from pollen.server.fleet_proxy import RequestLimits

    seen = refused_deployment(monkeypatch)
    main(["server", "--insecure", "--output", str(tmp_path / "a")])
    assert seen["deployment"].limits == RequestLimits()  # the size is the model's, set when it starts
    main(["server", "--insecure", "--output", str(tmp_path / "b"), "--max-request-bytes", "5000",
          "--rate-limit", "2.5", "--rate-burst", "7"])
    assert seen["deployment"].limits == RequestLimits(5000, 2.5, 7)
    for flag, value in (("--max-request-bytes", "0"), ("--rate-limit", "0"), ("--rate-burst", "-1")):
        message = exit_message(capsys, ["server", "--insecure", "--output", str(tmp_path / "c"), flag, value])
        assert message.startswith(f"pollen server: {flag}: must be") and message.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["server", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {RequestLimits.requests_per_second:g})" in help_text
    assert f"(default {RequestLimits.burst})" in help_text
