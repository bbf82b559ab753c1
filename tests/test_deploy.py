"""End to end on loopback: a real SuperLink and real SuperNodes, TLS and node authentication.

Everything listens on 127.0.0.1 on free ports; every process is started in its own
session and stopped by PID in ``finally``, whatever the outcome.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pollen.client.device import DeviceError, device_number, supernode_command
from pollen.certs import make_certificates
from pollen.config import load_config
from pollen.flower_processes import SUPERLINK_LOG, ProcessTree, free_port, offline_env
from pollen.run_folder import RunFolder
from pollen.server.deploy import Deployment, DeploymentError, superlink_command

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"
WAIT = 600  # seconds: a bound on every wait, generous for a loaded 2-core machine


def device_data(folder: Path, devices: int) -> list[Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images * 16).clip(0, 255).astype(np.uint8), digits.target
    paths = []
    for i in range(devices):
        path = folder / f"device-{i}.npz"
        np.savez(path, images=images[i::devices][:200], labels=labels[i::devices][:200])
        paths.append(path)
    return paths


def pollen_client(tmp: Path, name: str, port: int, ca: Path, key: Path, data: Path) -> ProcessTree:
    command = [sys.executable, "-m", "pollen.cli", "client", "--server", f"127.0.0.1:{port}",
               "--ca", str(ca), "--key", str(key), "--data", str(data), "--local-port", str(free_port())]
    return ProcessTree.start(command, tmp / "logs" / f"{name}.log", offline_env(tmp / name), cwd=tmp)


def test_two_devices_finish_two_rounds_and_an_unregistered_key_is_refused(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"], devices=2)
    rogue = make_certificates(tmp_path / "rogue", ["localhost"], devices=1)  # a key nobody registered
    data = device_data(tmp_path, 3)
    config = load_config(TINY, ["federation.rounds=2", "federation.num_clients=2",
                                "federation.clients_per_round=2", "train.local_epochs=1"])
    port = free_port()
    processes: list[ProcessTree] = []
    deployment = Deployment(config, tmp_path / "run", certs.folder, host="127.0.0.1", port=port)
    try:
        deployment.start()
        assert len(deployment.node_ids) == 2
        deployment.submit()
        for i in range(2):
            processes.append(pollen_client(tmp_path, f"device-{i}", port, certs.ca_cert,
                                           certs.device_keys[i], data[i]))
        intruder = pollen_client(tmp_path, "intruder", port, certs.ca_cert, rogue.device_keys[0], data[2])
        processes.append(intruder)
        status = deployment.wait(timeout=WAIT)

        run = RunFolder(deployment.folder)
        records = run.records()
        assert [r.round for r in records] == [0, 1, 2]
        assert all(r.clients == 2 and r.failed == 0 and r.rejected == 0 for r in records[1:])
        assert all(r.uplink_bytes > 0 and r.downlink_bytes > 0 for r in records[1:])
        assert status["network-traffic"]["total-bytes"] > 0
        assert run.checkpoint.is_file() and (run.logs / SUPERLINK_LOG).is_file()
        # The intruder never became a node: the SuperLink turned its key away and it gave up.
        assert intruder.popen.wait(timeout=WAIT) != 0
        assert "Failed to activate SuperNode" in intruder.tail(400)
        assert "No SuperNode found with the given public key" in deployment.superlink.tail(100_000)
    finally:
        for process in processes:
            process.stop()
        deployment.stop()
    assert not any(p.running() or p.alive() for p in [*processes, deployment.superlink])


def test_superlink_command_has_tls_and_node_auth_unless_insecure(tmp_path):
    command = superlink_command("127.0.0.1", 9999, tmp_path, node_auth=True)
    assert command[command.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.pem")
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    insecure = superlink_command("127.0.0.1", 9999, None, node_auth=False)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_the_app_carries_the_whole_run_config(tmp_path):
    import tomllib

    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    from pollen.config import config_from_run_config, run_config_of
    from pollen.flower_processes import write_app
    from pollen.server.deploy import CLIENTAPP, SERVERAPP

    config = load_config(TINY, ["federation.rounds=7", "strategy.eta=0.1", "federation.strategy=fedadam"])
    app = write_app(tmp_path / "app", SERVERAPP, CLIENTAPP, run_config_of(config))
    load_and_validate(app / "pyproject.toml")  # the components import
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "pollen.server.app:app",
                                                            "clientapp": "pollen.client.app:app"}
    run_config = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    assert config_from_run_config(run_config) == config and run_config == run_config_of(config)


def test_deployment_refuses_missing_certificates_or_a_certificate_for_another_host(tmp_path):
    config = load_config(TINY)
    with pytest.raises(DeploymentError, match="ca.pem: missing"):
        Deployment(config, tmp_path / "run", tmp_path / "nothing")
    certs = make_certificates(tmp_path / "certs", ["fl.example.org"], devices=1)
    with pytest.raises(DeploymentError, match="not valid for 127.0.0.1"):
        Deployment(config, tmp_path / "run", certs.folder)
    (certs.device_public_keys[0]).unlink()
    make_certificates(tmp_path / "ok", ["127.0.0.1"], devices=1)
    for key in (tmp_path / "ok" / "devices").glob("*.pub"):
        key.unlink()
    with pytest.raises(DeploymentError, match="no device public keys"):
        Deployment(config, tmp_path / "run", tmp_path / "ok")


def test_supernode_command_for_a_device(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["localhost"], devices=2)
    data = tmp_path / "d.npz"
    command = supernode_command("fl.example.org:9093", data, certs.ca_cert, certs.device_keys[0], 9100)
    assert command[command.index("--superlink") + 1] == "fl.example.org:9093"
    assert command[command.index("--root-certificates") + 1] == str(certs.ca_cert.resolve())
    assert command[command.index("--auth-supernode-private-key") + 1] == str(certs.device_keys[0].resolve())
    node_config = command[command.index("--node-config") + 1]
    assert f'data-path="{data.resolve()}"' in node_config
    assert f"partition-id={device_number(certs.device_keys[0])}" in node_config
    assert device_number(certs.device_keys[0]) != device_number(certs.device_keys[1])
    with pytest.raises(DeviceError, match="HOST:PORT"):
        supernode_command("fl.example.org", data, certs.ca_cert, certs.device_keys[0])
    with pytest.raises(DeviceError, match="--ca"):
        supernode_command("h:1", data, tmp_path / "none.pem", certs.device_keys[0])
    with pytest.raises(DeviceError, match="not a device private key"):
        supernode_command("h:1", data, certs.ca_cert, certs.ca_cert)
