"""The ServerApp's rounds on any backend's Grid, seen through the simulated device fleet.

Kept apart from the backends: the Ray ServerApp imports this while Flower's engine
loads the ClientApp in another thread of the same process, so nothing here may import
``pollen.client``.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import Grid

from pollen.config import Config
from pollen.run_folder import RoundRecord, RunFolder
from pollen.server.app import run_federation
from pollen.simulations.devices import device_grid


def simulated_federation(grid: Grid, config: Config, folder: RunFolder,
                         on_round: Callable[[RoundRecord], None] | None = None,
                         resume: bool = False) -> list[RoundRecord]:
    """Run the rounds on ``grid`` (node ids 1..N) wrapped in the device model of ``config``."""
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.participants.write_text("")
    sim = config.simulation
    devices = device_grid(grid, config.federation.num_clients, config.seed, sim.devices, sim.deadline_seconds,
                          min_online=config.federation.clients_per_round,
                          local_epochs=config.train.local_epochs, log_path=folder.participants)
    return run_federation(devices, config, folder, on_round, round_fields=devices.record_fields, resume=resume)
