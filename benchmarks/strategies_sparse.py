"""Benchmark sparse-aware aggregation against Flower's dense strategies on top-k updates.

    python benchmarks/strategies_sparse.py [--params 500000] [--clients 50] [--density 0.01]

One round of replies (random deltas, top-k encoded) goes through the server's uplink
acceptance and a strategy, twice per pair: into Flower's FedAvg (every update decoded
into a dense local model) and into SparseFedAvg (scatter-add of indices and values);
then into Flower's FedMedian and SparseMedian. Prints one JSON object with peak traced memory
and wall time of each aggregation, their ratios, and how many coordinates each
median moved (a plain median of top-k updates moves almost none).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
import tracemalloc

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pollen.codec import TopK, encode
from pollen.flower_internals import TaskIdentity
from pollen.server.uplink import RoundTraffic, accept_replies
from pollen.strategies import STRATEGIES, takes_sparse_deltas


class Nodes:
    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def aggregate(name: str, global_arrays: ArrayRecord, payloads: list[ArrayRecord], codec: TopK) -> dict:
    """Accept and aggregate one round as the server does; measure peak memory and time."""
    count = len(payloads)
    strategy = STRATEGIES[name](fraction_train=1.0, min_train_nodes=count, min_available_nodes=count,
                                fraction_evaluate=0.0)
    random.seed(0)
    messages = strategy.configure_train(1, global_arrays, ConfigRecord({}), Nodes(count))
    replies = [Message(RecordDict({"arrays": payload, "metrics": MetricRecord(
        {"num-examples": 10 + i, "train-loss": 1.0, "train-seconds": 0.1})}), reply_to=message)
        for i, (message, payload) in enumerate(zip(messages, payloads))]
    tracemalloc.start()
    started = time.perf_counter()
    accepted = accept_replies(replies, global_arrays, codec, sparse=takes_sparse_deltas(strategy),
                              traffic=RoundTraffic(), server_round=1)
    new, _ = strategy.aggregate_train(1, accepted)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    step = np.concatenate([(new[k].numpy() - global_arrays[k].numpy()).reshape(-1) for k in new.keys()])
    return {"seconds": seconds, "peak_bytes": peak, "moved": int(np.count_nonzero(np.abs(step) > 1e-6)), "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=500_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    rng = np.random.default_rng(0)
    shapes = {"block.weight": (args.params // 1000, 1000), "head.weight": (args.params % 1000 or 1,)}
    global_arrays = ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()})
    codec = TopK(density=args.density)
    payloads = [encode({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, codec)
                for _ in range(args.clients)]

    results = {name: aggregate(name, global_arrays, payloads, codec)
               for name in ("fedavg", "sparse-fedavg", "fedmedian", "sparse-median")}
    size = sum(int(np.prod(s)) for s in shapes.values())
    sent = {name: result.pop("step") for name, result in results.items()}
    print(json.dumps({
        "params": size, "clients": args.clients, "density": args.density,
        "aggregation": {name: {"seconds": round(r["seconds"], 4), "peak_mb": round(r["peak_bytes"] / 1e6, 2),
                               "coordinates_moved": r["moved"]} for name, r in results.items()},
        "fedavg_dense_over_sparse": {
            "memory": round(results["fedavg"]["peak_bytes"] / results["sparse-fedavg"]["peak_bytes"], 2),
            "time": round(results["fedavg"]["seconds"] / results["sparse-fedavg"]["seconds"], 2)},
        "median_dense_over_sparse": {
            "memory": round(results["fedmedian"]["peak_bytes"] / results["sparse-median"]["peak_bytes"], 2),
            "time": round(results["fedmedian"]["seconds"] / results["sparse-median"]["seconds"], 2)},
        "share_of_coordinates_moved": {name: round(r["moved"] / size, 4) for name, r in results.items()},
        "mean_abs_step": {name: float(np.abs(step).mean()) for name, step in sent.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
