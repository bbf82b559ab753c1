"""Run one simulated federation: the same ServerApp and ClientApp on a simulation backend.

``inprocess`` hands every Message to the ClientApp in this process; ``ray`` runs the
same apps on Flower's simulation engine (see ``simulations.ray_backend``). Either way
the backend's Grid is wrapped in the device model, so a config gives the same
partitions, sampling, dropouts and simulated clock on both.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from logging import WARNING

from flwr.common import log

from pollen.client.app import app as client_app
from pollen.config import Config, ConfigError, run_config_of
from pollen.run_folder import RoundRecord, RunFolder
from pollen.simulations.client_state import RUN_SUBFOLDER, client_states
from pollen.simulations.federation import checkpoint_round, simulated_federation
from pollen.simulations.inprocess import InProcessGrid


def simulate(config: Config, folder: RunFolder | None = None,
             on_round: Callable[[RoundRecord], None] | None = None,
             resume: bool = False) -> tuple[RunFolder, list[RoundRecord]]:
    """Run the federation on ``config.simulation.backend``; its record, plot and checkpoint go to ``folder``.

    Interrupted (Ctrl-C, or killed), the rounds finished so far stay in the run folder,
    and ``resume=True`` goes on from the last of them exactly as the uninterrupted run would.
    """
    folder = folder or RunFolder.new(config.output_dir)
    if config.simulation.backend == "ray":
        if resume:
            raise ConfigError("simulation.backend: a run on ray cannot be resumed (its clients' state "
                              "lives in Flower's engine); resume in-process runs")
        from pollen.simulations.ray_backend import run_on_ray

        return folder, run_on_ray(config, folder, on_round)
    return folder, run_in_process(config, folder, on_round, resume)


def run_in_process(config: Config, folder: RunFolder, on_round: Callable[[RoundRecord], None] | None = None,
                   resume: bool = False) -> list[RoundRecord]:
    """The federation on the in-process backend, the clients' states kept in the run folder until it ends.

    A finished run deletes them (for 100 clients of the default model they take
    ~100 MB): going on from it for more rounds is correct, but its clients start afresh.
    """
    kept = folder.path / RUN_SUBFOLDER
    clients_kept_state = not resume or kept.is_dir()
    if not clients_kept_state:
        log(WARNING, "%s: no client state (the run had finished): clients start afresh, residuals dropped", folder)
    resume_after = checkpoint_round(folder, config) if resume and clients_kept_state else None
    states = client_states(config.simulation.client_state, kept, resume_after)
    grid = InProcessGrid(client_app, config.federation.num_clients, run_config_of(config), states,
                         client_timeout=config.simulation.client_timeout_seconds)
    try:
        records = simulated_federation(grid, config, folder, on_round, resume, clients_kept_state)
    finally:
        grid.close()
    shutil.rmtree(kept, ignore_errors=True)  # only an interrupted run is resumed exactly
    return records
