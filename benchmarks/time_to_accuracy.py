"""Time to accuracy on slow links, against the physical limit: dense fp32 both ways vs compressed runs.

The same federation (default model, same partitions, sampling and seed) runs on each
device fleet (``--fleets``; ``simulations/configs/devices-<name>.yaml``): dense fp32 in
both directions, and each compressed setting of ``RUNS``. For every accuracy target it
prints the simulated device time each run needs, and against dense:

    speedup         dense's time to the target / the run's
    limit           dense's time to the target / the compute-only time of those same rounds
                    (each round's slowest training without its bytes): no codec that keeps
                    the rounds can be faster, since it cannot make training shorter
    share_of_limit  speedup / limit

    python benchmarks/time_to_accuracy.py [--rounds 12] [--targets 0.4 0.6 0.7] \
        [--fleets slow-uplink iot] [--runs dense default no_budget budget density5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
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

RUNS = {
    "dense": ["codec.name=identity", "downlink.name=identity"],
    "default": [],  # top-k 1%, 8-bit up; the delta downlink, its change held to 20% of entries, 4-bit
    "no_budget": ["downlink.budget=1", "downlink.bits=8"],  # the delta downlink with no cap, 8-bit
    "budget": ["downlink.budget=0.1", "downlink.bits=4"],  # the global model changes in at most 10% of entries
    "density5": ["codec.density=0.05"],  # 5x the default's uplink entries: fewer rounds where bytes are cheap
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.6, 0.7])
    parser.add_argument("--fleets", nargs="+", default=["slow-uplink", "iot"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    names = ["dense"] + [name for name in args.runs if name != "dense"]
    report = {"rounds": args.rounds, "clients": "100, 10 per round", "fleets": {}}
    for fleet in args.fleets:
        runs = {}
        for name in names:
            config = load_config(overrides=[
                f"federation.rounds={args.rounds}", "model.image_size=32",
                f"simulation.devices={ROOT / 'simulations/configs' / f'devices-{fleet}.yaml'}",
                *args.overrides, *RUNS[name]])
            with tempfile.TemporaryDirectory() as folder:
                records = run_in_process(config, RunFolder(Path(folder)))
            reached = {t: first_reaching(records, t) for t in args.targets}
            runs[name] = {
                "seconds_to": {str(t): r and round(r.simulated_seconds, 1) for t, r in reached.items()},
                "rounds_to": {str(t): r and r.round for t, r in reached.items()},
                "compute_seconds_to": {str(t): r and round(r.simulated_compute_seconds, 1) for t, r in reached.items()},
                "final_accuracy": round(records[-1].accuracy, 4),
                "uplink_mb": round(sum(r.uplink_bytes for r in records) / 1e6, 3),
                "downlink_mb": round(sum(r.downlink_bytes for r in records) / 1e6, 3),
            }
            print(fleet, name, json.dumps(runs[name]), file=sys.stderr, flush=True)
        report["fleets"][fleet] = {"runs": runs, "against_dense": against_dense(runs, args.targets)}
    print(json.dumps(report, indent=2))


def against_dense(runs: dict, targets: list[float]) -> dict:
    """Per compressed run and target: speed-up over dense, the limit, and the share of it reached."""
    dense = runs["dense"]
    out = {}
    for name, run in runs.items():
        if name == "dense":
            continue
        out[name] = {}
        for t in map(str, targets):
            dense_seconds, dense_compute = dense["seconds_to"][t], dense["compute_seconds_to"][t]
            seconds = run["seconds_to"][t]
            if not (dense_seconds and dense_compute and seconds):
                out[name][t] = None  # a run never reached the target (or reached it in round 0)
                continue
            speedup, limit = dense_seconds / seconds, dense_seconds / dense_compute
            out[name][t] = {"speedup": round(speedup, 2), "limit": round(limit, 2),
                            "share_of_limit": round(speedup / limit, 3)}
    return out


if __name__ == "__main__":
    main()
