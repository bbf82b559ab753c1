"""Revoking and adding devices while the server runs, on loopback: real SuperLink, proxy and SuperNodes.

Every process listens on 127.0.0.1 on a free port and is stopped by PID in ``finally``.
One small federation carries the whole story, so Flower starts twice (the run, then a restart).
"""

from __future__ import annotations

import time

from flwr.supercore.constant import NodeStatus
from test_deploy import TINY, WAIT, device_data, pollen_client

from pollen.certs import add_devices, make_certificates, revoke_devices
from pollen.config import load_config
from pollen.flower_processes import ProcessTree, free_port
from pollen.run_folder import RunFolder
from pollen.server.deploy import Deployment


def wait_for_nodes(deployment: Deployment, node_ids: list[int], status: str) -> None:
    deadline = time.monotonic() + WAIT
    while any(deployment.nodes().get(node_id) != status for node_id in node_ids):
        assert time.monotonic() < deadline, f"nodes {node_ids} not {status} within {WAIT} s"
        time.sleep(2)  # each look is a `flwr` process: not too often


def test_a_revoked_device_is_unregistered_by_the_running_server_and_never_registered_again(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], devices=2)
    data = device_data(tmp_path, 2)
    # One device a round: the federation can finish with whichever devices are left.
    config = load_config(TINY, ["federation.rounds=2", "federation.num_clients=2",
                                "federation.clients_per_round=1", "train.local_epochs=1"])
    port = free_port()
    deployment = Deployment(config, tmp_path / "run", certs.folder, host="127.0.0.1", port=port)
    restarted = Deployment(config, tmp_path / "restarted", certs.folder, host="127.0.0.1", port=port)
    devices: list[ProcessTree] = []
    changes: list[str] = []
    try:
        deployment.start()
        node = {key.name: node_id for key, node_id in deployment.node_ids.items()}
        devices = [pollen_client(tmp_path, f"device-{i}", port, certs.ca_cert, certs.device_keys[i], data[i])
                   for i in range(2)]
        wait_for_nodes(deployment, [node["device-0"], node["device-1"]], NodeStatus.ONLINE)
        # The operator, while both devices are connected: one out before the run, one more in during it.
        revoke_devices(certs.folder, ["device-1"])
        revoked = deployment.sync_devices()  # what each poll of `wait` does
        nodes_after_revoking = deployment.nodes()
        deployment.submit()
        add_devices(certs.folder, 1)
        status = deployment.wait(timeout=WAIT, on_change=changes.append)
        nodes = deployment.nodes()
        devices[1].popen.wait(timeout=WAIT)  # its next heartbeat is refused: its SuperNode stops
        kept_running = devices[0].running()
        deployment.stop()

        restarted.start()
        restarted_names = sorted(key.name for key in restarted.node_ids)
    finally:
        for device in devices:
            device.stop()
        deployment.stop()
        restarted.stop()
    assert not any(p.running() or p.alive() for p in [*devices, deployment.superlink, deployment.proxy,
                                                        restarted.superlink, restarted.proxy])

    added = {key.name: node_id for key, node_id in deployment.node_ids.items()}["device-2"]
    assert revoked == [f"device-1: unregistered (node {node['device-1']}); its requests are refused from now on"]
    assert nodes_after_revoking[node["device-1"]] == NodeStatus.UNREGISTERED
    assert changes == [f"device-2: registered (node {added})"]  # noticed by the first poll
    assert nodes[node["device-1"]] == NodeStatus.UNREGISTERED
    assert nodes[node["device-0"]] == NodeStatus.ONLINE and nodes[added] == NodeStatus.REGISTERED
    assert sorted(key.name for key in deployment.node_ids) == ["device-0", "device-2"]
    assert kept_running
    # The federation finished with the device that is left: every round had its one update.
    records = RunFolder(deployment.folder).records()
    assert status["status"] == "finished:completed"
    assert [r.round for r in records] == [0, 1, 2]
    assert all(r.clients == 1 and r.failed == 0 for r in records[1:])
    # A restarted server registers what devices/ holds now, and never the revoked key.
    assert restarted_names == ["device-0", "device-2"]
