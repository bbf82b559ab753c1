"""Harness overhead: the in-process backend and Flower's Ray engine vs a plain torch loop.

All three do the same work per round on the same partitions and seeds: every sampled
client loads the global trainable arrays, trains locally (``client.training``), and
the server averages the results and evaluates them on the held-out split. The plain
loop does only that; the backends add messages, the ClientApp/ServerApp, the codec
(dense here), strategies, run records, checkpoints and the plot written at the end -
and Ray its SuperLink, actors and start-up. Prints JSON with wall seconds and the
ratios backend / plain loop, measured in this one run; the plot's share is timed on
its own too (``plot_seconds``: drawing it again from the same records), as it is one
fixed cost per run, whatever the number of clients and rounds.

    python benchmarks/overhead_backends.py [--clients 100] [--rounds 3] [--repeat 3] [--no-ray] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pollen.client.app import local_data  # noqa: E402
from pollen.client.training import train_locally  # noqa: E402
from pollen.config import Config, load_config  # noqa: E402
from pollen.data import load_dataset, num_classes  # noqa: E402
from pollen.metrics import evaluate  # noqa: E402
from pollen.models import initial_arrays, load_model, load_trainable, trainable_arrays  # noqa: E402


def plain_loop(config: Config) -> float:
    """The federation's local training and FedAvg, with nothing around them."""
    started = time.perf_counter()
    fed, train = config.federation, config.train
    model = load_model(config.model, num_classes(config.data), config.seed)
    _, test = load_dataset(config)
    global_arrays = initial_arrays(config.model, num_classes(config.data), config.seed)
    load_trainable(model, global_arrays)
    evaluate(model, test)
    for server_round in range(1, fed.rounds + 1):
        total, weight = {k: np.zeros_like(v) for k, v in global_arrays.items()}, 0
        for partition_id in range(fed.num_clients):  # every client, every round (as configured)
            data = local_data(config, {"partition-id": partition_id, "num-partitions": fed.num_clients})
            load_trainable(model, global_arrays)
            train_locally(model, data, train, seed=config.seed * 1_000_003 + server_round * 10_007 + partition_id)
            for name, value in trainable_arrays(model).items():
                total[name] += len(data) * value
            weight += len(data)
        global_arrays = {k: v / weight for k, v in total.items()}
        load_trainable(model, global_arrays)
        evaluate(model, test)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the plain loop and in process, best of each")
    parser.add_argument("--tiny", action="store_true", help="the tiny CNN on digits: harness cost at its most visible")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    config = load_config("simulations/configs/tiny.yaml" if args.tiny else None, overrides=[
        f"federation.num_clients={args.clients}", f"federation.clients_per_round={args.clients}",
        f"federation.rounds={args.rounds}", "train.local_epochs=1",
        *([] if args.tiny else ["model.image_size=32", "data.test_size=500"]), "data.min_partition_size=5", "codec.name=identity",
        "downlink.name=identity", "federation.strategy=fedavg",
        "federation.server_momentum=0", "federation.server_decay=0",  # the plain loop's FedAvg, as is
    ])
    from pollen.run_folder import RunFolder
    from pollen.server.plot import plot_run
    from pollen.simulations.ray_backend import run_on_ray
    from pollen.simulations.run import run_in_process

    # Warm the model, data and partition caches that every contender in this process shares.
    load_model(config.model, num_classes(config.data), config.seed)
    load_dataset(config)
    local_data(config, {"partition-id": 0, "num-partitions": args.clients})
    result: dict = {"clients": args.clients, "clients_per_round": args.clients, "rounds": args.rounds,
                    "model": f"{config.model.name} {config.model.trainable} {config.model.image_size}px"}
    # Plain loop and in-process run take turns, best of --repeat each: this machine's speed
    # drifts by more than the difference being measured.
    plain, inprocess, plot = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for attempt in range(args.repeat):
            plain.append(plain_loop(config))
            started = time.perf_counter()
            records = run_in_process(config, RunFolder(Path(folder) / f"inprocess-{attempt}"))
            inprocess.append(time.perf_counter() - started)
            started = time.perf_counter()
            plot_run(records, Path(folder) / "again.png")
            plot.append(time.perf_counter() - started)
        result["plain_loop_seconds"] = round(min(plain), 2)
        result["inprocess_seconds"] = round(min(inprocess), 2)
        result["inprocess_final_accuracy"] = round(records[-1].accuracy, 4)
        result["plot_seconds"] = round(min(plot), 2)
        if not args.no_ray:
            started = time.perf_counter()
            records = run_on_ray(config, RunFolder(Path(folder) / "ray"), timeout=3600)
            result["ray_seconds"] = round(time.perf_counter() - started, 2)
            # Without the SuperLink, Ray and actor start-up: from the first evaluation to the last.
            result["ray_rounds_seconds"] = round(records[-1].wall_seconds - records[0].wall_seconds, 2)
            result["ray_final_accuracy"] = round(records[-1].accuracy, 4)
    result["repeats"] = args.repeat
    result["inprocess_vs_plain"] = round(min(inprocess) / min(plain), 3)
    result["inprocess_without_plot_vs_plain"] = round((min(inprocess) - min(plot)) / min(plain), 3)
    plain = min(plain)
    if not args.no_ray:
        result["ray_vs_plain"] = round(result["ray_seconds"] / plain, 3)
        result["ray_rounds_vs_plain"] = round(result["ray_rounds_seconds"] / plain, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
