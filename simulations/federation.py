"""The ServerApp's rounds on any backend's Grid, seen through the simulated device fleet.

Kept apart from the backends: the Ray ServerApp imports this while Flower's engine
loads the ClientApp in another thread of the same process, so nothing here may import
``client``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.serverapp import Grid

from pollen.config import Config
from pollen.server.app import run_federation
from pollen.server.records import RoundRecord
from pollen.simulations.devices import device_grid

PARTICIPANTS = "participants.jsonl"  # per round: sampled, dropped and late clients


def simulated_federation(grid: Grid, config: Config, folder: Path,
                         on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
    """Run the rounds on ``grid`` (node ids 1..N) wrapped in the device model of ``config``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PARTICIPANTS).write_text("")
    sim = config.simulation
    devices = device_grid(grid, config.federation.num_clients, config.seed, sim.devices,
                          sim.deadline_seconds, min_online=config.federation.clients_per_round,
                          log_path=folder / PARTICIPANTS)
    return run_federation(devices, config, folder, on_round, round_fields=devices.record_fields)
