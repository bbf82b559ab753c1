"""Flower's simulation engine (Ray) through `flwr run`: small, bounded, and every process stopped."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pollen.config import config_from_run_config, load_config
from pollen.flower_processes import ProcessTree, write_app
from pollen.run_folder import RunFolder
from pollen.simulations.ray_backend import CLIENTAPP, FLWR_LOG, SERVERAPP, federation_config, ray_run_config, run_on_ray
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
SMALL = ["federation.rounds=2", "federation.num_clients=6", "federation.clients_per_round=3",
         "train.local_epochs=1", "simulation.devices=simulations/configs/devices-phones.yaml"]


def participants(folder):
    """Who was sampled, dropped and late each round (the clock can differ by a few encoded bytes)."""
    return [{key: value for key, value in json.loads(line).items() if key != "seconds"}
            for line in folder.participants.read_text().splitlines()]


def test_the_generated_flower_app_carries_the_whole_config(tmp_path):
    import tomllib

    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    config = load_config(TINY, SMALL + ["simulation.client_cpus=2", "simulation.client_gpus=0.5"])
    app = write_app(tmp_path / "app", SERVERAPP, CLIENTAPP, ray_run_config(config))
    load_and_validate(app / "pyproject.toml")  # the components import
    run_config = flatten_dict(tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    devices = Path(run_config["simulation.devices"])
    assert devices.is_absolute() and devices.is_file()  # the ServerApp runs in another directory
    assert config_from_run_config(run_config) == replace(
        config, simulation=replace(config.simulation, devices=str(devices)))
    assert federation_config(config) == [
        "--federation-config", "num-supernodes=6", "--federation-config", "backend='ray'",
        "--federation-config", "client-resources-num-cpus=2",
        "--federation-config", "client-resources-num-gpus=0.5"]


def test_ray_runs_the_same_partitions_sampling_and_devices_and_stops_everything(tmp_path):
    config = load_config(TINY, SMALL + ["simulation.backend=ray"])
    ray, in_process_folder = RunFolder(tmp_path / "ray"), RunFolder(tmp_path / "inprocess")
    processes: list[ProcessTree] = []
    try:
        records = run_on_ray(config, ray, timeout=400, processes=processes)
    except RuntimeError as error:
        log = ray.logs / FLWR_LOG
        pytest.fail(f"{error}\n{log.read_text()[-4000:] if log.exists() else ''}")
    assert [process.alive() for process in processes] == [[], []]  # the SuperLink and `flwr run`
    assert sum(len(process.known) for process in processes) >= 3  # and what they started
    _, in_process = simulate(load_config(TINY, SMALL), in_process_folder)
    assert participants(ray) == participants(in_process_folder)
    assert [r.simulated_seconds for r in records] == pytest.approx([r.simulated_seconds for r in in_process], rel=0.02)
    assert [r.clients for r in records] == [r.clients for r in in_process]
    assert [r.accuracy for r in records] == pytest.approx([r.accuracy for r in in_process], abs=0.02)
