"""Time-to-accuracy on slow links: dense fp32 vs compressed updates on 1 Mbit/s uplinks.

The same federation (default model, same partitions, sampling and seeds) runs three times
on the device fleet of ``simulations/configs/devices-slow-uplink.yaml``: sending dense
fp32 updates, top-k 1% with 8-bit values, and the same top-k ranked by salience. Prints
JSON: per codec the simulated device time to reach each accuracy target, final accuracy
and uplink MB, and the speed-up of each compressed run over dense at every target both
reached.

    python benchmarks/time_to_accuracy.py [--rounds 12] [--targets 0.5 0.7 0.8]
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
from pollen.simulations.report import time_to_accuracy  # noqa: E402
from pollen.simulations.run import run_in_process  # noqa: E402

TOPK = ["codec.name=topk", "codec.density=0.01", "codec.bits=8"]
CODECS = {"dense": ["codec.name=identity"], "topk-1%-8bit": [*TOPK, "codec.select=magnitude"],
          "topk-1%-8bit-salience": [*TOPK, "codec.select=salience"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    runs = {}
    for name, codec in CODECS.items():
        config = load_config(overrides=[
            f"federation.rounds={args.rounds}", "model.image_size=32",
            f"simulation.devices={ROOT / 'simulations/configs/devices-slow-uplink.yaml'}", *codec])
        with tempfile.TemporaryDirectory() as folder:
            records = run_in_process(config, Path(folder))
        runs[name] = {
            "seconds_to": {str(t): time_to_accuracy(records, t) for t in args.targets},
            "final_accuracy": round(records[-1].accuracy, 4),
            "simulated_minutes": round(records[-1].simulated_seconds / 60, 2),
            "uplink_mb": round(sum(r.uplink_bytes for r in records) / 1e6, 3),
            "downlink_mb": round(sum(r.downlink_bytes for r in records) / 1e6, 3),
            "mean_simulated_round_seconds": round(records[-1].simulated_seconds / args.rounds, 2),
        }
    dense = runs["dense"]
    speedup = {name: {t: round(dense["seconds_to"][t] / run["seconds_to"][t], 2)
                      for t in dense["seconds_to"] if dense["seconds_to"][t] and run["seconds_to"][t]}
               for name, run in runs.items() if name != "dense"}
    print(json.dumps({"devices": "1 Mbit/s up, 10 Mbit/s down, 100 examples/s", "rounds": args.rounds,
                      "clients": "100, 10 per round", "runs": runs,
                      "time_to_accuracy_speedup_compressed_vs_dense": speedup}, indent=2))


if __name__ == "__main__":
    main()
