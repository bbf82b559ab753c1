"""Run one simulated federation: the same ServerApp and ClientApp on a simulation backend.

``inprocess`` hands every Message to the ClientApp in this process; ``ray`` runs the
same apps on Flower's simulation engine (see ``simulations.ray_backend``). Either way
the backend's Grid is wrapped in the device model, so a config gives the same
partitions, sampling, dropouts and simulated clock on both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pollen.client.app import app as client_app
from pollen.config import Config, to_flat
from pollen.server.app import new_run_folder
from pollen.server.records import RoundRecord, RunRecord, read_records
from pollen.simulations.client_state import client_states
from pollen.simulations.federation import PARTICIPANTS, simulated_federation
from pollen.simulations.inprocess import InProcessGrid
from pollen.simulations.report import plot_run

PLOT = "accuracy.png"
__all__ = ["PARTICIPANTS", "PLOT", "simulate", "simulated_federation"]


def simulate(config: Config, folder: Path | None = None,
             on_round: Callable[[RoundRecord], None] | None = None) -> tuple[Path, list[RoundRecord]]:
    """Run the federation on ``config.simulation.backend``; write record, plot into ``folder``.

    Interrupted (Ctrl-C), the rounds finished so far stay in the run record and plot.
    """
    folder = folder or new_run_folder(config)
    try:
        if config.simulation.backend == "ray":
            from pollen.simulations.ray_backend import run_on_ray

            records = run_on_ray(config, folder, on_round)
        else:
            records = run_in_process(config, folder, on_round)
    finally:
        written = read_records(folder) if (folder / RunRecord.FILENAME).exists() else []
        if written:
            plot_run(written, folder / PLOT, label=f"{config.codec.name} {config.model.trainable}")
    return folder, records


def run_in_process(config: Config, folder: Path,
                   on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
    grid = InProcessGrid(client_app, config.federation.num_clients, to_flat(config),
                         client_states(config.simulation.client_state))
    try:
        return simulated_federation(grid, config, folder, on_round)
    finally:
        grid.close()
