"""Run one simulated federation: the same ServerApp and ClientApp on a simulation backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from client.app import app as client_app
from pollen.config import Config, to_flat
from server.app import new_run_folder, run_federation
from server.records import RoundRecord
from simulations.inprocess import InProcessGrid
from simulations.report import plot_run

PLOT = "accuracy.png"


def simulate(config: Config, folder: Path | None = None,
             on_round: Callable[[RoundRecord], None] | None = None) -> tuple[Path, list[RoundRecord]]:
    """Run the federation in process; write the run record and plot into ``folder``."""
    folder = folder or new_run_folder(config)
    grid = InProcessGrid(client_app, config.federation.num_clients, to_flat(config))
    records = run_federation(grid, config, folder, on_round)
    plot_run(records, folder / PLOT, label=f"{config.codec.name} {config.model.trainable}")
    return folder, records
