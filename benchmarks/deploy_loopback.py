"""Deployment on loopback vs simulation: time to the first round, bytes per round on the wire.

Starts a real SuperLink (TLS, node authentication) behind the Fleet proxy, as `pollen server`
does, and two `pollen client` SuperNodes on 127.0.0.1, runs the tiny config for a few
rounds, then the same config in process. A third device key, never connected, is revoked
during the run: how long the running server takes to unregister it.
Prints JSON. Usage: python benchmarks/deploy_loopback.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pollen.certs import make_certificates, revoke_devices
from pollen.config import load_config
from pollen.flower_processes import ProcessTree, free_port, offline_env
from pollen.run_folder import RunFolder
from pollen.server.deploy import Deployment
from pollen.simulations.run import run_in_process

TINY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "tiny.yaml"


def per_round(records) -> dict:
    rounds = records[1:]
    return {"uplink_bytes": sum(r.uplink_bytes for r in rounds) / len(rounds),
            "downlink_bytes": sum(r.downlink_bytes for r in rounds) / len(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = load_config(TINY, [f"federation.rounds={args.rounds}", "federation.num_clients=2",
                                "federation.clients_per_round=2", "train.local_epochs=1"])
    from sklearn.datasets import load_digits

    digits = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        certs = make_certificates(tmp / "certs", ["localhost", "127.0.0.1"], devices=3)
        port, clients = free_port(), []
        started = time.monotonic()
        first_round = [None]
        revoked: dict[str, float] = {}
        run = RunFolder(tmp / "run")
        deployment = Deployment(config, run.path, certs.folder, host="127.0.0.1", port=port)

        def watch() -> None:
            if first_round[0] is None and any(r.round == 1 for r in run.records()):
                first_round[0] = time.monotonic() - started
            if "at" not in revoked:
                revoke_devices(certs.folder, ["device-2"])
                revoked["at"] = time.monotonic()

        def unregistered(line: str) -> None:
            if line.startswith("device-2: unregistered"):
                revoked["seconds"] = time.monotonic() - revoked["at"]

        try:
            deployment.start()
            deployment.submit()
            started_up = time.monotonic() - started
            for i in range(2):
                data = tmp / f"device-{i}.npz"
                np.savez(data, images=(digits.images[i::2] * 16).astype(np.uint8), labels=digits.target[i::2])
                command = [sys.executable, "-m", "pollen.cli", "client", "--server", f"127.0.0.1:{port}",
                           "--ca", str(certs.ca_cert), "--key", str(certs.device_keys[i]), "--data", str(data),
                           "--local-port", str(free_port())]
                clients.append(ProcessTree.start(command, tmp / f"device-{i}.log", offline_env(tmp / f"home-{i}")))
            status = deployment.wait(timeout=1200, on_poll=watch, poll=0.5, on_change=unregistered)
            total = time.monotonic() - started
        finally:
            for client in clients:
                client.stop()
            deployment.stop()
        deployed = run.records()
        simulated = run_in_process(config, RunFolder(tmp / "sim"))
    traffic = status["network-traffic"]
    print(json.dumps({
        "rounds": args.rounds,
        "deployment": {
            "seconds_to_submitted": round(started_up, 1),  # SuperLink, keys registered, proxy open, run in
            "seconds_to_first_round": round(first_round[0], 1),
            "seconds_total": round(total, 1),
            "records_per_round": per_round(deployed),
            "flower_message_bytes_per_round": (traffic["inbound-bytes"] + traffic["outbound-bytes"]) / args.rounds,
            "final_accuracy": deployed[-1].accuracy,
            "fleet_proxy_limits": dataclasses.asdict(deployment.limits),
            # revoke_devices to `flwr supernode unregister` done, polling every 0.5 s
            "seconds_revoke_to_unregistered": round(revoked["seconds"], 1),
        },
        "simulation": {"records_per_round": per_round(simulated), "final_accuracy": simulated[-1].accuracy},
    }, indent=2))


if __name__ == "__main__":
    main()
