"""Population scale in process: 10,000 virtual clients, 100 sampled per round.

Runs the default model (EfficientNet-Lite0, int8 base, LoRA + head) with clients'
state spilled to disk, once with the full population and once with a tenth of it,
each in a fresh process so peak RSS is its own. Prints JSON: wall seconds per round,
peak RSS, bytes of client state on disk, what that state would take as dense fp32
in RAM for the whole population, and the per-round time ratio between the two
population sizes (1.0 = a round costs the same whatever the population).

    python benchmarks/scale_population.py [--population 10000] [--per-round 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(population: int, per_round: int, rounds: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import logging

    import torch

    from pollen.client.app import app as client_app
    from pollen.config import load_config, run_config_of
    from pollen.data import num_classes
    from pollen.models import initial_arrays
    from pollen.run_folder import RunFolder
    from pollen.simulations.client_state import SpilledStates
    from pollen.simulations.federation import simulated_federation
    from pollen.simulations.inprocess import InProcessGrid

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    config = load_config(overrides=[
        f"federation.num_clients={population}", f"federation.clients_per_round={per_round}",
        f"federation.rounds={rounds}", "model.image_size=32", "train.local_epochs=1",
        "data.partition=sampled", "data.min_partition_size=16", "data.test_size=500",
        "simulation.client_state=disk",
    ])
    states = SpilledStates()
    started = time.perf_counter()
    grid = InProcessGrid(client_app, population, run_config_of(config), states)
    setup = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        records = simulated_federation(grid, config, RunFolder(folder))
        on_disk = states.bytes_on_disk()
        with_state = sum(1 for _ in states.folder.iterdir())
    grid.close()
    trainable = sum(a.size for a in initial_arrays(config.model, num_classes(config.data), config.seed).values())
    per_round = [r.round_seconds for r in records[1:]]
    return {
        "population": population,
        "clients_per_round": config.federation.clients_per_round,
        "rounds": rounds,
        "trainable_params": int(trainable),
        "grid_setup_seconds": round(setup, 4),
        "seconds_per_round": [round(s, 2) for s in per_round],
        # Round 1 also loads the model and draws every client's partition, once per process.
        "steady_seconds_per_round": round(sum(per_round[1:]) / max(len(per_round) - 1, 1), 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "clients_with_state": with_state,
        "client_state_on_disk_mib": round(on_disk / 2**20, 1),
        "dense_fp32_state_for_whole_population_gib": round(population * trainable * 4 / 2**30, 2),
        "final_accuracy": round(records[-1].accuracy, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.population, args.per_round, args.rounds)))
        return
    runs = []
    for population in (args.population, args.population // 10):
        out = subprocess.run([sys.executable, __file__, "--child", "--population", str(population),
                              "--per-round", str(args.per_round), "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    large, small = runs
    print(json.dumps({
        "large": large, "small": small,
        "round_time_ratio_large_vs_small": round(large["steady_seconds_per_round"] / small["steady_seconds_per_round"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
