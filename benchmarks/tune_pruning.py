"""What pruning saves in ``pollen tune``: the same study with the pruner on and off.

    python benchmarks/tune_pruning.py [simulations/configs/tune.yaml] --threads 1 > tune_pruning.json

Runs the tune config twice from scratch, with its own pruner and with none, the same
sampler seed and budget, and prints one JSON object: for each, the rounds trained over
all trials, wall seconds, trials pruned, and the best trial's objective and values;
then the share of rounds and of time the pruner saved and the difference in the best
objective.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from optuna.trial import TrialState

from pollen.simulations.tune import load_tune, run_tune


def study_cost(tune, folder: Path) -> dict:
    started = time.perf_counter()
    report = run_tune(tune, folder, on_trial=lambda line: print(line, file=sys.stderr))
    trials = report.study.trials
    return {
        "pruner": tune.pruner,
        "trials": len(trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "rounds_trained": sum(t.user_attrs.get("rounds", 0) for t in trials),
        "seconds": round(time.perf_counter() - started, 1),
        "best_objective": None if report.best is None else report.best.value,
        "best_values": None if report.best is None else report.best.params,
        "best_trial": None if report.best is None else report.best.number,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="simulations/configs/tune.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    tune = load_tune(args.config)
    with tempfile.TemporaryDirectory() as folder:
        pruned = study_cost(tune, Path(folder) / "pruned")
        full = study_cost(dataclasses.replace(tune, pruner="none"), Path(folder) / "unpruned")
    print(json.dumps({
        "config": args.config, "threads": args.threads, "with_pruner": pruned, "without_pruner": full,
        "rounds_saved": round(1 - pruned["rounds_trained"] / full["rounds_trained"], 3),
        "time_saved": round(1 - pruned["seconds"] / full["seconds"], 3),
        "best_objective_difference": None if None in (pruned["best_objective"], full["best_objective"])
        else round(pruned["best_objective"] - full["best_objective"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
