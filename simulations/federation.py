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
from pollen.server.checkpoint import load_checkpoint
from pollen.server.update_checks import simulated_clients
from pollen.simulations.devices import device_grid


def simulated_federation(grid: Grid, config: Config, folder: RunFolder,
                         on_round: Callable[[RoundRecord], None] | None = None,
                         resume: bool = False, clients_kept_state: bool = True) -> list[RoundRecord]:
    """Run the rounds on ``grid`` (node ids 1..N) wrapped in the device model of ``config``.

    ``resume``: go on from ``folder``'s checkpoint; the device model (its clock and
    availability draws) goes on from the participants log of the same round.
    ``clients_kept_state``: the clients hold their ``Context.state`` as of that round.
    """
    folder.path.mkdir(parents=True, exist_ok=True)
    sim = config.simulation
    devices = device_grid(grid, config.federation.num_clients, config.seed, sim.devices, sim.deadline_seconds,
                          min_online=config.federation.clients_per_round,
                          local_epochs=config.train.local_epochs, log_path=folder.participants)
    if resume:
        devices.resume(checkpoint_round(folder, config))
    else:
        folder.participants.write_text("")
    return run_federation(devices, config, folder, on_round, round_fields=devices.finish_round, resume=resume,
                          clients_kept_state=clients_kept_state, clients=simulated_clients(config))


def checkpoint_round(folder: RunFolder, config: Config) -> int:
    """The last round ``folder``'s checkpoint finished; refused if it is another config's."""
    return load_checkpoint(folder.checkpoint, config).round
