"""Accuracy against the privacy spent: the default federation with client-level DP.

    python benchmarks/privacy.py --threads 1 [--sigmas 0 0.5 1 2] [--clip C] [--set key=value ...]

Without ``--clip`` the clipping norm is the median L2 norm of the updates that five
clients' local training makes from the initial model (what an honest update measures
on this task). Then one federation per noise multiplier (0 = no privacy), on the same
seed and partitions, and one JSON object: per sigma, the final and best central
accuracy and the epsilon each client has spent at the end, at ``privacy.delta``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pollen.client.training import train_locally
from pollen.config import from_dict, load_config, to_dict, with_overrides
from pollen.data import load_dataset, num_classes, partitions
from pollen.models import build_model, trainable_arrays
from pollen.privacy import l2_norm
from pollen.run_folder import RunFolder
from pollen.simulations.run import simulate


def median_update_norm(config, clients: int = 5) -> float:
    """The median norm of the change local training makes from the initial model, over a few clients."""
    train, _ = load_dataset(config)
    shares = partitions(config, config.federation.num_clients)
    norms = []
    for client in range(clients):
        model = build_model(config.model, num_classes(config.data), config.seed)
        before = trainable_arrays(model)
        train_locally(model, train.subset(shares[client]), config.train, seed=client)
        after = trainable_arrays(model)
        norms.append(l2_norm({n: after[n] - before[n] for n in before}))
    return float(np.median(norms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--clip", type=float, help="privacy.clip_norm (default: the median clean update norm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    config = load_config(None, args.overrides)
    clip = args.clip or median_update_norm(config)
    print(f"clip norm {clip:.4g}", file=sys.stderr)
    runs = []
    for sigma in args.sigmas:
        variant = from_dict(with_overrides(to_dict(config), {"privacy.noise_multiplier": sigma,
                                                              "privacy.clip_norm": clip}))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            _, records = simulate(variant, RunFolder(Path(folder) / "run"))
        runs.append({"noise_multiplier": sigma, "final_accuracy": records[-1].accuracy,
                     "best_accuracy": max(r.accuracy for r in records), "epsilon": records[-1].epsilon,
                     "rejected": sum(r.rejected for r in records), "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(runs[-1]), file=sys.stderr)
    print(json.dumps({"seed": config.seed, "rounds": config.federation.rounds, "clip_norm": clip,
                      "delta": config.privacy.delta,
                      "sample_rate": config.federation.clients_per_round / config.federation.num_clients,
                      "threads": args.threads, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
