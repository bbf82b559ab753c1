"""Robustness to hostile clients: final accuracy by strategy, attack and share of attackers.

    python benchmarks/byzantine.py --threads 1 [--config simulations/configs/tiny.yaml] [--seeds 0 1 2] \
        [--strategies ...] [--kinds ...] [--fractions 0.1 0.2] [--checks on off] [--set key=value ...]

For every strategy, the clean run (no attackers) and each attack kind at each share of
attackers (``simulation.attack``), with the server's update checks as configured
(``on``) and with the norm and direction checks off (``off``:
``federation.max_norm_ratio=0``, ``federation.min_cosine=-1``), each on every seed
(a seed fixes the partitions, the sampling and the attackers). Prints one JSON object:
a row per case with its final accuracy on each seed, their mean, and the points the
mean lost against the same strategy's clean mean, then the rows that meet the target
(at most 2 points lost).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from pollen.config import from_dict, load_config, to_dict, with_overrides
from pollen.run_folder import RunFolder
from pollen.simulations.run import simulate

STRATEGIES = ("sparse-fedavg", "fedavg", "fedmedian", "sparse-median", "sparse-trimmed-mean", "krum", "multikrum",
              "bulyan")
KINDS = ("sign-flip", "scale", "noise", "label-flip", "weight")


def strategy_settings(strategy: str, attackers_per_round: int, per_round: int) -> dict:
    """What a robust rule needs to know: how many of a round's clients may be hostile."""
    if strategy in ("krum", "multikrum"):
        settings = {"strategy.num_malicious_nodes": attackers_per_round}
        if strategy == "multikrum":
            settings["strategy.num_nodes_to_select"] = max(1, per_round - attackers_per_round)
        return settings
    if strategy == "bulyan":  # needs 4f + 3 replies a round
        return {"strategy.num_malicious_nodes": max(0, min(attackers_per_round, (per_round - 3) // 4))}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config (default: the built-in default run)")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--kinds", nargs="*", default=list(KINDS))
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.2])
    parser.add_argument("--checks", nargs="*", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    base = load_config(args.config, args.overrides)
    per_round = base.federation.clients_per_round
    rows, clean = [], {}
    cases = [(s, 0.0, "none", c) for s in args.strategies for c in args.checks]
    cases += [(s, f, k, c) for s in args.strategies for f in args.fractions for k in args.kinds for c in args.checks]
    for strategy, fraction, kind, checks in cases:
        overrides = {"federation.strategy": strategy, "simulation.attack.fraction": fraction,
                     **strategy_settings(strategy, round(fraction * per_round), per_round)}
        if kind != "none":
            overrides["simulation.attack.kind"] = kind
        if checks == "off":
            overrides.update({"federation.max_norm_ratio": 0.0, "federation.min_cosine": -1.0})
        started = time.perf_counter()
        runs = [final_round(from_dict(with_overrides(to_dict(base), {**overrides, "seed": seed})))
                for seed in args.seeds]
        accuracy = round(sum(r.accuracy for r, _ in runs) / len(runs), 4)
        if kind == "none":
            clean[strategy, checks] = accuracy
        row = {"strategy": strategy, "attack": kind, "fraction": fraction, "checks": checks,
               "final_accuracy": accuracy, "by_seed": [round(r.accuracy, 4) for r, _ in runs],
               "points_lost": round(100 * (clean[strategy, checks] - accuracy), 2),
               "rejected": sum(rejected for _, (rejected, _) in runs),
               "refused_steps": sum(refused for _, (_, refused) in runs),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"config": args.config or "default", "seeds": args.seeds, "rounds": base.federation.rounds,
                      "clients_per_round": per_round, "overrides": args.overrides, "threads": args.threads,
                      "rows": rows,
                      "within_2_points": [r for r in rows if r["attack"] != "none" and r["points_lost"] <= 2]},
                     indent=2))


def final_round(config):
    """The last round's record of one run, and (updates rejected, steps refused) over the run."""
    with tempfile.TemporaryDirectory() as folder:
        _, records = simulate(config, RunFolder(Path(folder) / "run"))
    return records[-1], (sum(r.rejected for r in records), sum(bool(r.step_refused) for r in records))


if __name__ == "__main__":
    main()
