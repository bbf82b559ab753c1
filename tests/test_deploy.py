"""End to end on loopback: a real SuperLink behind the Fleet proxy, real SuperNodes, TLS, node auth.

Everything listens on 127.0.0.1 on free ports; every process is started in its own
session and stopped by PID in ``finally``, whatever the outcome. One federation carries
every boundary check, so the suite starts Flower once.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from pollen.client.device import DeviceError, device_number, supernode_command
from pollen.certs import make_certificates
from pollen.config import load_config
from pollen.flower_processes import (CONNECTION, SUPERLINK_LOG, FlowerError, ProcessTree, console_script, free_port,
                                     offline_env, write_app, write_connection)
from pollen.run_folder import RunFolder
from pollen.server.deploy import (PROXY_LOG, REQUEST_MARGIN_BYTES, Deployment, DeploymentError,
                                  default_max_request_bytes, dense_update_bytes, superlink_command)
from pollen.server.fleet_proxy import ProxySettings, RequestLimits

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


def outsider_app(folder: Path, marker: Path) -> Path:
    """A small Flower App whose ServerApp, should it ever run on the server, leaves ``marker``."""
    write_app(folder, "outsider_app:server", "outsider_app:client", {})
    (folder / "outsider_app.py").write_text(f"""
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    Path({str(marker)!r}).write_text("ran on the server")
""")
    return folder


def outsider_flwr(home: Path, args: list[str], cwd: Path) -> subprocess.Popen:
    """A ``flwr`` call from someone holding only ca.pem, with their own FLWR_HOME."""
    return subprocess.Popen([console_script("flwr"), *args, "--format", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=offline_env(home), cwd=cwd)


def test_registered_devices_train_while_outsiders_and_oversize_requests_are_refused(tmp_path):
    """One federation, every boundary: the Control API only on 127.0.0.1, node auth, request size."""
    certs = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"], devices=2)
    rogue = make_certificates(tmp_path / "rogue", ["localhost"], devices=1)  # a key nobody registered
    data = device_data(tmp_path, 3)
    config = load_config(TINY, ["federation.rounds=2", "federation.num_clients=2",
                                "federation.clients_per_round=2", "train.local_epochs=1"])
    port = free_port()
    processes: list[ProcessTree] = []
    deployment = Deployment(config, tmp_path / "run", certs.folder, host="127.0.0.1", port=port)
    outsider = tmp_path / "outsider"  # their FLWR_HOME: the devices' address and ca.pem, nothing else
    write_connection(outsider, f"127.0.0.1:{port}", certs.ca_cert)
    marker = tmp_path / "outsider-ran"
    try:
        deployment.start()
        assert len(deployment.node_ids) == 2
        superlink_args = deployment.superlink.popen.args
        assert superlink_args[superlink_args.index("--host") + 1] == "127.0.0.1"
        assert deployment.internal_port != port
        run_id = deployment.submit()
        for i in range(2):
            processes.append(pollen_client(tmp_path, f"device-{i}", port, certs.ca_cert,
                                           certs.device_keys[i], data[i]))
        intruder = pollen_client(tmp_path, "intruder", port, certs.ca_cert, rogue.device_keys[0], data[2])
        processes.append(intruder)

        attempts = {"ls": outsider_flwr(outsider, ["ls", CONNECTION], tmp_path),
                    "stop": outsider_flwr(outsider, ["stop", str(run_id), CONNECTION], tmp_path),
                    "run": outsider_flwr(outsider, ["run", str(outsider_app(tmp_path / "app", marker)), CONNECTION],
                                         tmp_path)}
        outputs = {name: call.communicate(timeout=WAIT)[0] for name, call in attempts.items()}
        replies = {name: json.loads(out[out.index("{"):]) for name, out in outputs.items()}
        limit = deployment.limits.max_request_bytes
        assert limit == default_max_request_bytes(config)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", timeout=60,
                          verify=ssl.create_default_context(cafile=certs.ca_cert)) as anyone:
            oversize = anyone.post("/v1/fleet/push-object", content=bytes(limit + 1),
                                   headers={"content-type": "application/protobuf"})
            docs = anyone.get("/docs")
        # The server's own flwr, through the internal address, still sees and controls its run.
        own = deployment.flwr(["ls", CONNECTION], time.monotonic() + 60)
        status = deployment.wait(timeout=WAIT)

        assert all(reply["success"] is False for reply in replies.values()), replies
        assert not marker.exists()
        assert (oversize.status_code, oversize.content) == (413, b"")
        assert (docs.status_code, docs.content) == (404, b"")
        assert [int(run["run-id"]) for run in own["runs"]] == [run_id]
        proxy_log = deployment.proxy.tail(100_000)
        for route in ("list-runs", "stop-run", "start-run"):
            assert f"404: POST /v1/control/{route} from 127.0.0.1" in proxy_log
        assert f"413: POST /v1/fleet/push-object from 127.0.0.1 (over {limit} bytes)" in proxy_log
        assert "429: " not in proxy_log  # no rate refusal: the default is ample for three SuperNodes on one address

        # The federation finished unharmed: every round, both devices, nothing stopped.
        run = RunFolder(deployment.folder)
        records = run.records()
        assert status["status"] == "finished:completed"
        assert [r.round for r in records] == [0, 1, 2]
        assert all(r.clients == 2 and r.failed == 0 and r.rejected == 0 for r in records[1:])
        assert all(r.uplink_bytes > 0 and r.downlink_bytes > 0 for r in records[1:])
        assert status["network-traffic"]["total-bytes"] > 0
        assert run.checkpoint.is_file() and (run.logs / SUPERLINK_LOG).is_file() and (run.logs / PROXY_LOG).is_file()
        # The ServerApp learnt which key each node is, and the devices the class count of the server's data.
        assert json.loads(run.devices.read_text()) == {str(node): key.name for key, node in deployment.node_ids.items()}
        assert config.data.num_classes == 0 and run.read_config().data.num_classes == 10
        # The intruder never became a node: the SuperLink turned its key away and it gave up.
        assert intruder.popen.wait(timeout=WAIT) != 0
        assert "Failed to activate SuperNode" in intruder.tail(400)
        assert "No SuperNode found with the given public key" in deployment.superlink.tail(100_000)
    finally:
        for process in processes:
            process.stop()
        deployment.stop()
    assert not any(p.running() or p.alive() for p in [*processes, deployment.superlink, deployment.proxy])


def test_superlink_command_has_tls_and_node_auth_unless_insecure(tmp_path):
    command = superlink_command("127.0.0.1", 9999, tmp_path, node_auth=True)
    assert command[command.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.pem")
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    insecure = superlink_command("127.0.0.1", 9999, None, node_auth=False)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_the_max_request_size_is_the_models_dense_update_plus_a_margin():
    from pollen.data import num_classes
    from pollen.models import initial_arrays

    for overrides in ([], ["model.trainable=full", "model.quantize=none"]):
        config = load_config(TINY, overrides)
        arrays = initial_arrays(config.model, num_classes(config.data), config.seed)
        dense = dense_update_bytes(config)
        raw = sum(array.nbytes for array in arrays.values())
        assert raw <= dense < raw + 512 * len(arrays) + 1024  # fp32 values and their envelope
        assert default_max_request_bytes(config) == dense + REQUEST_MARGIN_BYTES
    full = load_config(TINY, ["model.trainable=full", "model.quantize=none"])
    assert dense_update_bytes(full) > dense_update_bytes(load_config(TINY))


class Started(Exception):
    """Stops Deployment.start at its first process, in tests that only look at what would run."""


def first_process(monkeypatch, deployment: Deployment) -> dict:
    seen = {}

    def start(command, log, env, cwd=None, name=None):
        seen.update(command=command, log=log, env=env)
        raise Started

    monkeypatch.setattr(ProcessTree, "start", start)
    with pytest.raises(Started):
        deployment.start()
    return seen


def test_the_superlink_listens_on_127_0_0_1_only_without_legacy_grpc_apis(tmp_path, monkeypatch):
    import tomllib

    certs = make_certificates(tmp_path / "certs", ["fl.example.org", "127.0.0.1"], devices=1)
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    port = free_port()
    deployment = Deployment(load_config(TINY), tmp_path / "run", certs.folder, port=port,
                            limits=RequestLimits(max_request_bytes=10))
    seen = first_process(monkeypatch, deployment)
    command = seen["command"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == str(deployment.internal_port) != str(port)
    assert not {"FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"} & set(seen["env"])
    flwr_config = tomllib.loads((deployment.flwr_home / "config.toml").read_text())
    assert flwr_config["superlink"][CONNECTION]["address"] == deployment.internal_address


def test_the_proxy_faces_devices_with_the_server_certificate_and_insecure_stays_local(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], devices=1)
    config, limits = load_config(TINY), RequestLimits(max_request_bytes=123, requests_per_second=3, burst=9)
    tls = Deployment(config, tmp_path / "a", certs.folder, port=9093, limits=limits, internal_port=9200)
    assert tls.host == "0.0.0.0" and tls.local_host == "127.0.0.1"
    assert tls.proxy_settings() == ProxySettings("0.0.0.0", 9093, "https://127.0.0.1:9200", limits,
                                                 certs.folder.resolve() / "server.pem",
                                                 certs.folder.resolve() / "server.key",
                                                 certs.folder.resolve() / "ca.pem")
    insecure = Deployment(config, tmp_path / "b", None, port=9093, limits=limits, internal_port=9200)
    assert insecure.host == "127.0.0.1"
    assert insecure.proxy_settings() == ProxySettings("127.0.0.1", 9093, "http://127.0.0.1:9200", limits)
    assert Deployment(config, tmp_path / "c", None, host="10.1.2.3").host == "10.1.2.3"


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
    with pytest.raises(DeploymentError, match="nothing: no such folder"):
        Deployment(config, tmp_path / "run", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeploymentError, match="ca.pem: missing"):
        Deployment(config, tmp_path / "run", tmp_path / "empty")
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


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, monkeypatch):
    config = load_config(TINY)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        public = Deployment(config, tmp_path / "a", None, port=port)
        with pytest.raises(DeploymentError) as refused:
            first_process(monkeypatch, public)  # raises before the first process would start
        assert str(refused.value).startswith(f"--port {port} on 127.0.0.1: already in use")
        internal = Deployment(config, tmp_path / "b", None, port=free_port(), internal_port=port)
        with pytest.raises(DeploymentError, match=f"internal port {port} on 127.0.0.1: already in use"):
            internal.check_ports()
    assert "\n" not in str(refused.value)
    public.check_ports()  # free again


def test_a_superlink_that_exits_at_start_is_reported_at_once_with_the_reason_from_its_log(tmp_path, monkeypatch):
    from pollen.server import deploy

    flower_command = deploy.superlink_command
    monkeypatch.setattr(deploy, "superlink_command", lambda *args, **kwargs: [*flower_command(*args, **kwargs),
                                                                               "--no-such-flag"])
    deployment = Deployment(load_config(TINY), tmp_path / "run", None, port=free_port())
    try:
        with pytest.raises(FlowerError) as failed:
            deployment.start(timeout=WAIT)  # the reason, not the timeout, ends it
    finally:
        deployment.stop()
    message = str(failed.value)
    assert "the SuperLink exited with code 2" in message and "unrecognized arguments: --no-such-flag" in message
    assert str(deployment.superlink.log) in message and "\n" not in message
    assert deployment.proxy is None


def test_a_fleet_proxy_that_exits_at_start_is_reported_with_the_reason_from_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(ProxySettings, "command", lambda self, command=ProxySettings.command: [*command(self),
                                                                                               "--no-such-flag"])
    deployment = Deployment(load_config(TINY), tmp_path / "run", None, port=free_port(),
                            limits=RequestLimits(max_request_bytes=1000))
    try:
        with pytest.raises(FlowerError) as failed:
            deployment.start(timeout=WAIT)
        superlink_ran = deployment.superlink.running()
    finally:
        deployment.stop()
    message = str(failed.value)
    assert message.startswith("the Fleet proxy exited with code 2 before listening on 127.0.0.1:")
    assert "unrecognized arguments: --no-such-flag" in message and "\n" not in message
    assert superlink_ran  # the proxy's failure, not the SuperLink's, is what was reported


class ClosingListener:
    """Something else on a port: it accepts each connection and closes it at once."""

    def __init__(self) -> None:
        import threading

        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.done.is_set():
            try:
                connection, _ = self.socket.accept()
                connection.close()
            except OSError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.socket.close()


def test_a_superlink_whose_port_was_taken_after_the_check_is_reported_with_its_reason(tmp_path, monkeypatch):
    """The port answers (someone else), so only the SuperLink's own exit can tell what happened."""
    from pollen.server import deploy

    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], devices=1)
    other = ClosingListener()
    monkeypatch.setattr(deploy, "port_problem", lambda host, port: None)  # taken between check and bind
    deployment = Deployment(load_config(TINY), tmp_path / "run", certs.folder, port=free_port(),
                            internal_port=other.port)
    try:
        with pytest.raises(DeploymentError) as failed:
            deployment.start(timeout=WAIT)
    finally:
        deployment.stop()
        other.close()
    message = str(failed.value)
    assert "the SuperLink exited with code" in message and "address already in use" in message
    assert "\n" not in message and deployment.node_ids == {}


def test_devices_json_names_each_registered_node_by_its_key_and_follows_changes(tmp_path, monkeypatch):
    from pollen.certs import add_devices, revoke_devices

    certs = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"], devices=2)
    deployment = Deployment(load_config(TINY), tmp_path / "run", certs.folder)
    deployment.folder.mkdir()
    issued = iter([101, 102, 300])
    monkeypatch.setattr(deployment, "register", lambda key, deadline: next(issued))
    monkeypatch.setattr(deployment, "flwr", lambda args, deadline: {"success": True})  # the unregister call
    devices = RunFolder(deployment.folder).devices
    deployment.sync_devices()  # as start() registers them
    assert json.loads(devices.read_text()) == {"101": "device-0", "102": "device-1"}
    revoke_devices(certs.folder, ["device-1"])
    add_devices(certs.folder, 1)
    deployment.sync_devices()
    assert json.loads(devices.read_text()) == {"101": "device-0", "300": "device-2"}


def test_the_server_app_names_a_deployments_nodes_by_their_device_keys(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from pollen.config import run_config_of
    from pollen.run_folder import FOLDER_ENV
    from pollen.server import app

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.devices.write_text(json.dumps({"101": "device-0", "300": "device-2"}))
    monkeypatch.setenv(FOLDER_ENV, str(run.path))
    seen = {}
    monkeypatch.setattr(app, "run_federation", lambda grid, config, folder, **kwargs: seen.update(kwargs))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config_of(load_config(TINY)))
    app.main(None, context)
    clients = seen["clients"]
    assert (clients.name(101), clients.name(300), clients.name(7)) == ("device-0", "device-2", "node 7")
    run.devices.unlink()  # a simulation's ServerApp under `flwr run`: no device keys, ids as they are
    app.main(None, context)
    assert seen["clients"].name(101) == "node 101"


def test_the_submitted_run_carries_the_class_count_devices_cannot_count(tmp_path, monkeypatch):
    import tomllib

    from flwr.common.config import flatten_dict

    from pollen.config import config_from_run_config

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "server.npz", images=rng.random((400, 8, 8)), labels=np.arange(400) % 5)

    def submitted(*overrides: str) -> int:
        config = load_config(TINY, [f"data.dataset={tmp_path / 'server.npz'}", *overrides])
        deployment = Deployment(config, tmp_path / "run", None)
        monkeypatch.setattr(deployment, "flwr", lambda args, deadline: {"success": True, "run-id": 5})
        assert deployment.submit() == 5 and deployment.config == config
        project = tomllib.loads((deployment.folder / "app" / "pyproject.toml").read_text())
        return config_from_run_config(flatten_dict(project["tool"]["flwr"]["app"]["config"])).data.num_classes

    assert submitted() == 5  # counted from the server's labels
    assert submitted("data.num_classes=12") == 12  # set: kept as it is
