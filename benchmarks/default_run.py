"""Benchmark the default federation: compressed vs dense both ways vs centralized training.

    python benchmarks/default_run.py [--config PATH] [--parts ...] [--set key=value ...] > default_run.json

Runs the default configuration, or the YAML file ``--config`` names (e.g.
``simulations/configs/text.yaml``), in one process and on the same partitions and seeds
(``--parts`` picks some):
  compressed               the default run (top-k codec, compressed downlink),
  dense                    the same run with dense fp32 both ways,
  compressed_plain_fedavg  the default run with Flower's FedAvg as the strategy,
  centralized              a fine-tune of the same model and trainable parts on all
                           training data for the same number of sample passes (the
                           bound the federation approaches),
and prints one JSON object with accuracies, wall times, bytes on the wire each way and
both ways (the round trip), ratios and the resident bytes of the model with an fp32
and an int8 base. ``round_trip_ratio_vs_dense`` is the dense run's bytes both ways
over the compressed run's, both measured in this run. Each part is also
printed to stderr as it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time

import torch

from pollen.client.training import train_locally
from pollen.config import load_config
from pollen.data import load_dataset, num_classes
from pollen.metrics import evaluate
from pollen.models import build_model, resident_bytes
from pollen.run_folder import RunFolder, final_record, round_trip_ratio
from pollen.simulations.run import simulate


def federated(config, label: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        _, records = simulate(config, RunFolder(folder))
        wall = time.perf_counter() - started
    rounds = records[1:]
    up = sum(r.uplink_bytes for r in rounds)
    dense = sum(r.dense_uplink_bytes for r in rounds)
    down = sum(r.downlink_bytes for r in rounds)
    return {
        "label": label,
        "final_accuracy": final_record(records).accuracy,  # under early stopping, the kept round's model
        "final_macro_f1": final_record(records).f1,
        "best_accuracy": max(r.accuracy for r in records),
        "last_3_rounds_mean_accuracy": round(sum(r.accuracy for r in records[-3:]) / 3, 4),
        "accuracy_by_round": [round(r.accuracy, 4) for r in records],
        "loss_by_round": [round(r.loss, 4) for r in records],
        "wall_seconds": round(wall, 1),
        "uplink_bytes_per_round": up / len(rounds),
        "dense_uplink_bytes_per_round": dense / len(rounds),
        "uplink_ratio_vs_dense_fp32": dense / up,
        "uplink_bytes_last_round": rounds[-1].uplink_bytes,
        "downlink_bytes_per_round": down / len(rounds),
        "round_trip_bytes_per_round": (up + down) / len(rounds),
        # against the same updates' dense fp32 arrays once up and once down, in this run
        "round_trip_ratio_vs_dense_fp32": round_trip_ratio(rounds),
        "downlink_bytes_by_round": [r.downlink_bytes for r in rounds],
    }


def centralized(config, learning_rates: list[float]) -> dict:
    """All training data in one place, for as many sample passes as the federation made.

    One AdamW run over a thousand steps is less forgiving than a client's ten steps a
    round, so the bound is the best of a few learning rates (each reported).
    """
    train, test = load_dataset(config)
    fed = config.federation
    epochs = max(1, round(fed.rounds * fed.clients_per_round / fed.num_clients
                          * config.train.local_epochs))
    runs = {}
    for lr in learning_rates:
        model = build_model(config.model, num_classes(config.data), config.seed)
        started = time.perf_counter()
        settings = dataclasses.replace(config.train, local_epochs=epochs, lr=lr)
        loss = train_locally(model, train, settings, seed=config.seed).loss
        runs[str(lr)] = {"accuracy": evaluate(model, test)["accuracy"], "train_loss": loss,
                         "wall_seconds": round(time.perf_counter() - started, 1)}
    best = max(runs.values(), key=lambda run: run["accuracy"])
    return {"epochs": epochs, "accuracy": best["accuracy"], "by_learning_rate": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="PATH", help="a YAML config file (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--parts", nargs="*", default=["compressed", "dense", "compressed_plain_fedavg",
                                                        "centralized"],
                        choices=["compressed", "dense", "compressed_plain_fedavg", "centralized"])
    parser.add_argument("--central-lr", type=float, nargs="*", help="learning rates tried centrally "
                        "(default: the clients' and a third of it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 when other jobs share the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    compressed_label = (f"topk density={config.codec.density} bits={config.codec.bits}, "
                        f"{config.federation.strategy}, downlink {config.downlink.name} "
                        f"density={config.downlink.density} bits={config.downlink.bits}")
    parts = {
        "compressed": lambda: federated(config, compressed_label),
        "dense": lambda: federated(
            dataclasses.replace(config, codec=dataclasses.replace(config.codec, name="identity"),
                                downlink=dataclasses.replace(config.downlink, name="identity")),
            "identity (dense fp32 both ways)"),
        "compressed_plain_fedavg": lambda: federated(
            dataclasses.replace(config, federation=dataclasses.replace(config.federation, strategy="fedavg")),
            f"{compressed_label} with Flower's FedAvg as the strategy (plain mean; server momentum still on)"),
        "centralized": lambda: centralized(config, args.central_lr or [config.train.lr, config.train.lr / 3]),
    }
    result = {
        "config": {"model": dataclasses.asdict(config.model), "federation": dataclasses.asdict(config.federation),
                   "train": dataclasses.asdict(config.train), "codec": dataclasses.asdict(config.codec),
                   "downlink": dataclasses.asdict(config.downlink)},
    }
    for name in args.parts:
        result[name] = parts[name]()
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)  # progress, in case of a stop
    if "compressed" in result and "dense" in result:
        result["accuracy_gap_points"] = round(
            100 * (result["dense"]["final_accuracy"] - result["compressed"]["final_accuracy"]), 2)
        result["last_3_rounds_gap_points"] = round(100 * (
            result["dense"]["last_3_rounds_mean_accuracy"] - result["compressed"]["last_3_rounds_mean_accuracy"]), 2)
        # the dense run's own bytes both ways over the compressed run's
        result["round_trip_ratio_vs_dense"] = (result["dense"]["round_trip_bytes_per_round"]
                                               / result["compressed"]["round_trip_bytes_per_round"])
        result["downlink_ratio_vs_dense"] = (result["dense"]["downlink_bytes_per_round"]
                                             / result["compressed"]["downlink_bytes_per_round"])
    fp32_model = build_model(dataclasses.replace(config.model, quantize="none"), num_classes(config.data))
    int8_model = build_model(config.model, num_classes(config.data))
    result["resident_model_bytes"] = {"fp32": resident_bytes(fp32_model), "int8_base": resident_bytes(int8_model),
                                      "ratio": resident_bytes(fp32_model) / resident_bytes(int8_model)}
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
