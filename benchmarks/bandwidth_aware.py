"""Bandwidth-aware compression against fixed densities, on a mixed fleet of phones with a round deadline.

The same federation (default model at 32x32, same partitions, sampling and seed) runs
on ``simulations/configs/devices-phones.yaml`` with ``simulation.deadline_seconds``:

    fixed      every client sends ``--density`` (default 1.0: every entry, at 8 bits); slow
               phones miss the deadline
    low        every client sends top-k at the default 1%
    fitted     ``codec.fit_deadline``: each client sends the largest density up to
               ``--density`` that its own uplink delivers by the deadline

For each run and seed it prints the share of replies that arrive in time (of those
not lost to a simulated dropout), the simulated seconds to each accuracy target, the
final accuracy and the uplink bytes; then their means over the seeds.

    python benchmarks/bandwidth_aware.py [--density 1.0] [--deadline 3] [--rounds 12] \
        [--targets 0.4 0.6 0.7] [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pollen.config import load_config  # noqa: E402
from pollen.run_folder import RunFolder  # noqa: E402
from pollen.simulations.report import first_reaching  # noqa: E402
from pollen.simulations.run import run_in_process  # noqa: E402


def runs(density: float) -> dict[str, list[str]]:
    return {"fixed": [f"codec.density={density}"], "low": ["codec.density=0.01"],
            "fitted": [f"codec.density={density}", "codec.fit_deadline=true"]}


def arrived_share(records) -> float:
    """Replies in time over replies that could have been (sampled, less simulated dropouts)."""
    arrived = sum(r.clients + r.rejected for r in records[1:])
    return arrived / max(1, arrived + sum(r.stragglers for r in records[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--deadline", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.6, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    report = {"fleet": "devices-phones.yaml", "deadline_seconds": args.deadline, "density": args.density,
              "rounds": args.rounds, "seeds": args.seeds, "runs": {}}
    for name, settings in runs(args.density).items():
        per_seed = []
        for seed in args.seeds:
            config = load_config(overrides=[
                f"seed={seed}", f"federation.rounds={args.rounds}", "model.image_size=32",
                f"simulation.devices={ROOT / 'simulations/configs/devices-phones.yaml'}",
                f"simulation.deadline_seconds={args.deadline}", *args.overrides, *settings])
            with tempfile.TemporaryDirectory() as folder:
                records = run_in_process(config, RunFolder(Path(folder)))
            reached = {str(t): first_reaching(records, t) for t in args.targets}
            per_seed.append({
                "seed": seed, "arrived_share": round(arrived_share(records), 4),
                "stragglers": sum(r.stragglers for r in records),
                "seconds_to": {t: r and round(r.simulated_seconds, 1) for t, r in reached.items()},
                "final_accuracy": round(records[-1].accuracy, 4),
                "uplink_mb": round(sum(r.uplink_bytes for r in records) / 1e6, 3),
                "simulated_seconds": round(records[-1].simulated_seconds, 1),
            })
            print(name, json.dumps(per_seed[-1]), file=sys.stderr, flush=True)
        report["runs"][name] = {"seeds": per_seed, "mean": means(per_seed, args.targets)}
    print(json.dumps(report, indent=2))


def means(per_seed: list[dict], targets: list[float]) -> dict:
    """Means over the seeds; a target's time only if every seed reached it."""
    mean = lambda key: round(statistics.fmean(s[key] for s in per_seed), 4)  # noqa: E731
    times = {}
    for t in map(str, targets):
        seconds = [s["seconds_to"][t] for s in per_seed]
        times[t] = round(statistics.fmean(seconds), 1) if all(seconds) else None
    return {"arrived_share": mean("arrived_share"), "final_accuracy": mean("final_accuracy"),
            "uplink_mb": mean("uplink_mb"), "seconds_to": times}


if __name__ == "__main__":
    main()
