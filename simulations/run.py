"""Run one simulated federation: the same ServerApp and ClientApp on a simulation backend.

``inprocess`` hands every Message to the ClientApp in this process; ``ray`` runs the
same apps on Flower's simulation engine (see ``simulations.ray_backend``). Either way
the backend's Grid is wrapped in the device model, so a config gives the same
partitions, sampling, dropouts and simulated clock on both.
"""

from __future__ import annotations

from collections.abc import Callable

from pollen.client.app import app as client_app
from pollen.config import Config, run_config_of
from pollen.run_folder import RoundRecord, RunFolder
from pollen.simulations.client_state import client_states
from pollen.simulations.federation import simulated_federation
from pollen.simulations.inprocess import InProcessGrid


def simulate(config: Config, folder: RunFolder | None = None,
             on_round: Callable[[RoundRecord], None] | None = None) -> tuple[RunFolder, list[RoundRecord]]:
    """Run the federation on ``config.simulation.backend``; its record, plot and checkpoint go to ``folder``.

    Interrupted (Ctrl-C), the rounds finished so far stay in the run folder.
    """
    folder = folder or RunFolder.new(config.output_dir)
    if config.simulation.backend == "ray":
        from pollen.simulations.ray_backend import run_on_ray

        return folder, run_on_ray(config, folder, on_round)
    return folder, run_in_process(config, folder, on_round)


def run_in_process(config: Config, folder: RunFolder,
                   on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
    grid = InProcessGrid(client_app, config.federation.num_clients, run_config_of(config),
                         client_states(config.simulation.client_state))
    try:
        return simulated_federation(grid, config, folder, on_round)
    finally:
        grid.close()
