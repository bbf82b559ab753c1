"""Run a simulated federation on Flower's simulation engine (Ray), through ``flwr run``.

A private SuperLink in simulation mode starts on a free local port with its own
FLWR_HOME (so it never meets another SuperLink on this machine); ``flwr run`` submits a
generated Flower App whose ServerApp is ``pollen.simulations.ray_app:app`` and ClientApp
``pollen.client.app:app``, with the whole Pollen config as run config and the client
resources as federation config. The SuperLink's environment tells the ServerApp the
run folder (``RunFolder.environment``). Ray starts on this machine, or joins the
cluster at ``simulation.ray_address``. Progress comes from the records the ServerApp
appends.

When the run ends, fails or is interrupted, the SuperLink, ``flwr run`` and every
process they started (the ServerApp and Ray's processes) are stopped by PID.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pollen.config import Config, run_config_of
from pollen.flower_processes import (CONNECTION, SUPERLINK_LOG, FlowerError, ProcessTree, console_script, free_port,
                                     offline_env, wait_until_ready, write_app, write_connection)
from pollen.run_folder import RoundRecord, RunFolder
from pollen.wording import counted

SERVERAPP, CLIENTAPP = "pollen.simulations.ray_app:app", "pollen.client.app:app"
FLWR_LOG = "flwr-run.log"  # in the run folder's logs/
STARTUP_SECONDS = 60.0
POLL_SECONDS = 0.5


def run_on_ray(config: Config, folder: RunFolder, on_round: Callable[[RoundRecord], None] | None = None,
               timeout: float | None = None, processes: list[ProcessTree] | None = None) -> list[RoundRecord]:
    """Run ``config`` on Flower's engine; the records land in ``folder`` as in process.

    ``processes`` collects every process tree the run started (all stopped at the end).
    """
    folder = RunFolder(folder.path.resolve())
    with tempfile.TemporaryDirectory(prefix="pollen-ray-") as scratch:
        scratch = Path(scratch)
        port = free_port()
        write_connection(scratch / "flwr-home", f"127.0.0.1:{port}", None)
        env = {**offline_env(scratch / "flwr-home"), **RunFolder.environment(folder.path)}
        if config.simulation.ray_address:
            env["RAY_ADDRESS"] = config.simulation.ray_address
        app = write_app(scratch / "app", SERVERAPP, CLIENTAPP, ray_run_config(config))
        processes = processes if processes is not None else []
        try:
            superlink = ProcessTree.start(
                [console_script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port)], folder.logs / SUPERLINK_LOG, env, scratch)
            processes.append(superlink)
            wait_until_ready("127.0.0.1", port, superlink, STARTUP_SECONDS)
            runner = ProcessTree.start([console_script("flwr"), "run", str(app), CONNECTION, "--stream",
                                        *federation_config(config)], folder.logs / FLWR_LOG, env, scratch)
            processes.append(runner)
            follow(folder, runner, processes, on_round, timeout)
        finally:
            for process in processes:
                process.stop()
        records = folder.records()
        if len(records) != config.federation.rounds + 1:
            raise FlowerError(f"the Ray run ended after {max(len(records) - 1, 0)} of "
                              f"{counted(config.federation.rounds, 'round')}; see {folder.logs / FLWR_LOG} "
                              f"and {folder.logs / SUPERLINK_LOG}")
        return records


def ray_run_config(config: Config) -> dict:
    """The run config, with the paths the ServerApp reads made absolute (it runs elsewhere)."""
    run_config = run_config_of(config)
    if config.simulation.devices:
        run_config["simulation.devices"] = str(Path(config.simulation.devices).resolve())
    return run_config


def federation_config(config: Config) -> list[str]:
    sim = config.simulation
    settings = {"num-supernodes": config.federation.num_clients, "backend": "ray",
                "client-resources-num-cpus": sim.client_cpus,
                "client-resources-num-gpus": sim.client_gpus}
    return [arg for key, value in settings.items()
            for arg in ("--federation-config", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")]


def follow(folder: RunFolder, runner: ProcessTree, processes: list[ProcessTree],
           on_round: Callable[[RoundRecord], None] | None, timeout: float | None) -> None:
    """Report rounds as the ServerApp writes them, until ``flwr run --stream`` returns."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while True:
        for process in processes:
            process.remember_children()
        done = not runner.running()
        records = folder.records()
        for entry in records[seen:]:
            if on_round:
                on_round(entry)
        seen = max(seen, len(records))
        if done:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the Ray run took longer than {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
