"""Benchmark the codec: bytes on the wire vs the entropy bound, speed, and what it does to a federation.

    python benchmarks/codec.py                 # wire + speed (about a minute)
    python benchmarks/codec.py --federation    # + default federation per setting (long)
    python benchmarks/codec.py --federation --set federation.rounds=10
    python benchmarks/codec.py --payloads      # + what lossless coding could still save (a default run)

Prints one JSON object:
  wire        per setting and update size: bits/param on the wire (Flower's serialized
              ArrayRecord) and in the blob alone, the bound H(p) + p*b for the density
              p actually kept, their ratio, the ratio vs the dense fp32 record, and
              encode/decode seconds and throughput;
  epoch       one local epoch of the default task vs encoding + decoding its update;
  federation  per setting: final accuracy, its gap to the dense run in points, and
              uplink/downlink MB until the run first reached the target accuracy
              (``--target`` x the dense run's final accuracy);
  payloads    every top-k payload one federation sends (``--set`` applies), per
              direction: bytes of its value fields and of its Rice-coded index gaps
              against their order-0 empirical entropy (a lower bound for a coder
              that treats symbols independently, the cost of its table left out) and
              against LZMA (xz's raw stream, preset 9e) of one byte per value level;
              and the run's round trip vs dense if both streams reached that entropy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import lzma
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from pollen.bits import best_rice_parameter, packed_size, rice_encode, unpack
from pollen.client.app import local_data
from pollen.client.training import train_locally
from pollen.codec import Identity, TopK, TOPK_STYPE, codec_of, decode, decode_sparse, encode, layout_of, wire_bytes
from pollen.config import load_config
from pollen.data import num_classes
from pollen.models import initial_arrays, load_model

SETTINGS = {
    "8-bit 10%": TopK(density=0.1),
    "8-bit 1%": TopK(density=0.01),
    "8-bit 0.1%": TopK(density=0.001),
    "8-bit 0.1% model-wide": TopK(density=0.001, scope="model"),
    "4-bit 1%": TopK(density=0.01, bits=4),
    "4-bit 1% block 64 stochastic": TopK(density=0.01, bits=4, block=64, stochastic=True),
    "sign 1%": TopK(density=0.01, bits=1),
    "sign 0.1% model-wide": TopK(density=0.001, bits=1, scope="model"),
}

# Federation runs: (uplink codec overrides, downlink overrides)
RUNS = {
    "dense both ways": (["codec.name=identity"], ["downlink.name=identity"]),
    "8-bit 1%, dense down": ([], ["downlink.name=identity"]),
    "8-bit 1%, delta down": ([], []),
    "4-bit 1%, delta down": (["codec.bits=4"], []),
    "8-bit 0.1% model-wide, delta down 10%": (["codec.density=0.001", "codec.scope=model"],
                                              ["downlink.density=0.1"]),
    "sign 0.1% model-wide, delta down 10%": (["codec.density=0.001", "codec.scope=model", "codec.bits=1"],
                                             ["downlink.density=0.1"]),
}


def entropy_bits(density: float, value_bits: int) -> float:
    """H(p) + p*b: bits per parameter to say which entries are kept and their values."""
    if density in (0.0, 1.0):
        return density * value_bits
    return -(density * math.log2(density) + (1 - density) * math.log2(1 - density)) + density * value_bits


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def wire(update: dict[str, np.ndarray], label: str) -> list[dict]:
    size = sum(v.size for v in update.values())
    dense = wire_bytes(encode(update, Identity()))
    rows = []
    for name, codec in SETTINGS.items():
        encode_s, record = timed(lambda: encode(update, codec, seed=1))
        decode_s, out = timed(lambda: decode(record, layout_of(update), codec))
        kept = sum(int(np.count_nonzero(v)) for v in out.values())
        blob = len(record["update"].data)
        bound = entropy_bits(kept / size, codec.bits)
        rows.append({
            "update": label, "params": size, "setting": name, "kept": kept,
            "bits_per_param_wire": round(8 * wire_bytes(record) / size, 5),
            "bits_per_param_blob": round(8 * blob / size, 5),
            "entropy_bound_bits_per_param": round(bound, 5),
            "wire_over_bound": round(8 * wire_bytes(record) / size / bound, 4),
            "blob_over_bound": round(8 * blob / size / bound, 4),
            "ratio_vs_dense_fp32": round(dense / wire_bytes(record), 1),
            "encode_seconds": round(encode_s, 4), "decode_seconds": round(decode_s, 4),
            "encode_mparams_per_s": round(size / encode_s / 1e6, 1),
            "decode_mparams_per_s": round(size / decode_s / 1e6, 1),
        })
    return rows


def epoch_vs_codec(config) -> dict:
    """One local epoch of the default task on a client of average size vs its codec time."""
    model = load_model(config.model, num_classes(config.data), config.seed)
    sizes = [len(local_data(config, {"partition-id": i})) for i in range(config.federation.num_clients)]
    typical = int(np.argsort(sizes)[len(sizes) // 2])
    data = local_data(config, {"partition-id": typical})
    start = initial_arrays(config.model, num_classes(config.data), config.seed)
    one_epoch = dataclasses.replace(config.train, local_epochs=1)
    epoch_s, _ = timed(lambda: train_locally(model, data, one_epoch), repeat=2)
    update = {k: (p.detach().numpy() - start[k]).astype(np.float32)
              for k, p in model.named_parameters() if p.requires_grad}
    codec = TopK(density=config.codec.density, bits=config.codec.bits)
    codec_s, _ = timed(lambda: decode(encode(update, codec), layout_of(update), codec))
    return {"examples": len(data), "epoch_seconds": round(epoch_s, 3),
            "encode_decode_seconds": round(codec_s, 4),
            "codec_share_of_epoch": round(codec_s / epoch_s, 5)}


def federation(config_overrides: list[str], target: float, runs: list[str]) -> dict:
    from pollen.run_folder import RunFolder
    from pollen.simulations.run import simulate

    results = {}
    for label, (up, down) in RUNS.items():
        if label not in runs and label != "dense both ways":
            continue
        config = load_config(None, config_overrides + up + down)
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            _, records = simulate(config, RunFolder(folder))
        results[label] = {"records": records, "wall_seconds": round(time.perf_counter() - started, 1)}
    goal = target * results["dense both ways"]["records"][-1].accuracy
    dense_final = results["dense both ways"]["records"][-1].accuracy
    out = {"target_accuracy": round(goal, 4)}
    for label, result in results.items():
        records = result["records"]
        up = np.cumsum([r.uplink_bytes for r in records]) / 1e6
        down = np.cumsum([r.downlink_bytes for r in records]) / 1e6
        reached = next((i for i, r in enumerate(records) if r.accuracy >= goal), None)
        rounds = records[1:]
        out[label] = {
            "final_accuracy": round(records[-1].accuracy, 4),
            "points_below_dense": round(100 * (dense_final - records[-1].accuracy), 2),
            "accuracy_by_round": [round(r.accuracy, 4) for r in records],
            "uplink_bytes_per_round": round(sum(r.uplink_bytes for r in rounds) / len(rounds)),
            "downlink_bytes_per_round": round(sum(r.downlink_bytes for r in rounds) / len(rounds)),
            "uplink_ratio_vs_dense": round(sum(r.dense_uplink_bytes for r in rounds)
                                           / sum(r.uplink_bytes for r in rounds), 1),
            "rounds_to_target": reached,
            "uplink_mb_to_target": None if reached is None else round(float(up[reached]), 4),
            "downlink_mb_to_target": None if reached is None else round(float(down[reached]), 4),
            "wall_seconds": result["wall_seconds"],
        }
    dense_down = out["dense both ways"]["downlink_bytes_per_round"]
    for label in results:
        out[label]["downlink_ratio_vs_dense"] = round(dense_down / max(out[label]["downlink_bytes_per_round"], 1), 1)
    return out


def order0_entropy_bytes(symbols: np.ndarray) -> float:
    """Bytes of ``symbols`` coded at their own empirical distribution (no table)."""
    if symbols.size == 0:
        return 0.0
    counts = np.unique(symbols, return_counts=True)[1]
    share = counts / symbols.size
    return float(-(counts * np.log2(share)).sum() / 8)


RAW_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]  # xz's stream without its container


def payload_streams(array, layout) -> dict:
    """Bytes of one top-k payload's value and index streams, as sent and at their bounds."""
    codec = codec_of(array)
    indices, _ = decode_sparse(ArrayRecord({"update": array}), layout, codec)
    blob, kept = bytes(array.data), indices.size
    value_bytes = packed_size(kept * codec.bits)
    levels = unpack(blob[len(blob) - 4 - value_bytes:len(blob) - 4], kept, codec.bits)  # before the CRC-32
    size = sum(math.prod(shape) for shape in layout.values())
    gaps = np.diff(indices, prepend=-1) - 1
    index_bytes = 0 if kept == size else sum(map(len, rice_encode(gaps, best_rice_parameter(gaps))))
    return {
        "blob": len(blob), "values": value_bytes, "values_entropy": order0_entropy_bytes(levels),
        "values_lzma": len(lzma.compress(levels.astype(np.uint8).tobytes(), format=lzma.FORMAT_RAW, filters=RAW_LZMA)),
        "index": index_bytes, "index_entropy": 0.0 if kept == size else order0_entropy_bytes(gaps),
    }


def payload_headroom(config) -> dict:
    """One federation's payloads, both ways, against what a lossless coder could make of them."""
    from pollen.run_folder import RunFolder, round_trip_ratio
    from pollen.server import uplink
    from pollen.simulations.run import simulate

    sent = {"uplink": [], "downlink": []}
    sending = False
    count_sent, counted = uplink.RoundTraffic.count_sent, uplink.wire_bytes

    def wire_bytes_seen(record):  # every record the round's traffic counts, as it counts it
        sent["downlink" if sending else "uplink"].append(record)
        return counted(record)

    def count_sent_seen(self, messages):
        nonlocal sending
        sending = True
        try:
            count_sent(self, messages)
        finally:
            sending = False

    uplink.wire_bytes, uplink.RoundTraffic.count_sent = wire_bytes_seen, count_sent_seen
    try:
        with tempfile.TemporaryDirectory() as folder:
            _, records = simulate(config, RunFolder(folder))
    finally:
        uplink.wire_bytes, uplink.RoundTraffic.count_sent = counted, count_sent
    layout = layout_of(initial_arrays(config.model, num_classes(config.data), config.seed))
    rounds = records[1:]
    out = {"rounds": len(rounds), "final_accuracy": records[-1].accuracy}
    wire_bytes_by_direction = {"uplink": sum(r.uplink_bytes for r in rounds),
                               "downlink": sum(r.downlink_bytes for r in rounds)}
    saved_total = 0.0
    for direction, wire_records in sent.items():
        streams = [payload_streams(array, layout) for record in wire_records
                   for array in record.values() if array.stype == TOPK_STYPE]
        total = {key: sum(s[key] for s in streams) for key in streams[0]} if streams else {}
        wire = wire_bytes_by_direction[direction]
        saved = (total["values"] - min(total["values_entropy"], total["values_lzma"])
                 + total["index"] - total["index_entropy"]) if streams else 0.0
        saved_total += saved
        out[direction] = {"records": len(wire_records), "payloads": len(streams), "wire_bytes": wire,
                          **{f"{key}_bytes": round(value) for key, value in total.items()},
                          "lossless_saving_share_of_wire": round(saved / wire, 4) if wire else None}
    now = round_trip_ratio(rounds)
    sent_bytes = sum(wire_bytes_by_direction.values())
    out["round_trip_ratio_vs_dense"] = now
    out["round_trip_ratio_at_entropy"] = now * sent_bytes / (sent_bytes - saved_total) if now else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federation", action="store_true", help="also run the default federation per setting")
    parser.add_argument("--payloads", action="store_true",
                        help="also run one federation and measure its payloads' coding headroom")
    parser.add_argument("--target", type=float, default=0.95, help="share of the dense run's final accuracy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", nargs="*", choices=list(RUNS), default=list(RUNS),
                        help="federation runs (the dense one always runs: it sets the target)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 when other jobs share the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    config = load_config(None, args.overrides)
    rng = np.random.default_rng(0)
    default_layout = layout_of(initial_arrays(config.model, num_classes(config.data), config.seed))
    result = {
        "wire": wire({k: rng.normal(size=s).astype(np.float32) for k, s in default_layout.items()},
                     f"{config.model.name} {config.model.trainable} layout")
        + wire({"w": rng.normal(size=10_000_000).astype(np.float32)}, "10M parameters"),
        "epoch": epoch_vs_codec(config),
    }
    if args.federation:
        result["federation"] = federation(args.overrides, args.target, args.runs)
    if args.payloads:
        result["payloads"] = payload_headroom(config)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
