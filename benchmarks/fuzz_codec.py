"""Fuzz the update decoder: random and mutated payloads must be rejected with a reason or decode in bounds.

    python benchmarks/fuzz_codec.py [--cases 100000] [--seed 0] > fuzz_codec.json

Payloads are valid updates of a small model layout with bytes flipped, inserted,
deleted, truncated or spliced, plus pure random blobs; every other case gets a fresh
CRC-32 after the mutation, so the checks behind the CRC see it too. For every case the decoder
must either raise CodecError with a message, or return arrays of exactly the
layout's shapes with finite values. Peak memory per decode (tracemalloc, on a
sample) must stay within the layout's dense size plus a fixed allowance; the
slowest decode is reported to show there is no hang. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
import tracemalloc

import numpy as np
from flwr.app import Array, ArrayRecord

from pollen.codec import CodecError, TopK, decode, encode, sealed

LAYOUT = {"conv": (32, 16, 1, 1), "lora_A": (8, 64), "lora_B": (64, 8), "head": (10, 64), "bias": (10,)}
CODECS = [TopK(density=0.05), TopK(density=0.2, bits=4, block=16), TopK(density=0.1, bits=1),
          TopK(density=0.02, scope="model"), TopK(density=1.0, bits=8, block=64)]


def as_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({"update": Array(dtype="uint8", shape=(len(blob),), stype="pollen.topk", data=blob)})


def mutate(blob: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(blob)
    kind = rng.integers(6)
    if kind == 0:  # flip bits
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # overwrite a byte
        data[rng.integers(len(data))] = int(rng.integers(256))
    elif kind == 2:  # truncate
        del data[rng.integers(len(data)):]
    elif kind == 3:  # insert bytes
        at = rng.integers(len(data) + 1)
        data[at:at] = rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8).tobytes()
    elif kind == 4:  # delete a run
        at = rng.integers(len(data))
        del data[at:at + rng.integers(1, 9)]
    else:  # header bytes set to extremes (counts, lengths, rice parameter)
        at = rng.integers(min(len(data), 24))
        data[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    size = sum(int(np.prod(s)) for s in LAYOUT.values())
    memory_bound = 16 * size + 64 * 1024  # dense float32 output plus decoder temporaries
    valid = []
    for codec in CODECS:
        update = {k: rng.normal(size=s).astype(np.float32) for k, s in LAYOUT.items()}
        valid.append((codec, encode(update, codec, seed=1)["update"].data))
    outcomes, reasons = collections.Counter(), collections.Counter()
    crashes, worst_seconds, worst_memory = [], 0.0, 0
    started = time.perf_counter()
    for case in range(args.cases):
        codec, blob = valid[case % len(valid)]
        blob = rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8).tobytes() \
            if case % 10 == 9 else mutate(blob, rng)
        if case % 2 and len(blob) > 4:  # re-sealed, as a hostile sender would: the parser behind the CRC sees it
            blob = sealed(blob[:-4])
        measure = case % 100 == 0
        if measure:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            out = decode(as_record(blob), LAYOUT, codec)
            ok = all(out[k].shape == s and np.isfinite(out[k]).all() for k, s in LAYOUT.items())
            outcomes["decoded in bounds" if ok else "decoded out of bounds"] += 1
        except CodecError as error:
            outcomes["rejected"] += 1
            reasons[re.sub(r"\d+", "N", str(error).split(":")[0])[:70]] += 1
            if not str(error):
                crashes.append("CodecError without a reason")
        except Exception as error:  # anything else is a decoder bug
            outcomes["crashed"] += 1
            crashes.append(f"{type(error).__name__}: {error}")
        worst_seconds = max(worst_seconds, time.perf_counter() - t0)
        if measure:
            worst_memory = max(worst_memory, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    json.dump({
        "cases": args.cases,
        "seconds": round(time.perf_counter() - started, 2),
        "outcomes": dict(outcomes),
        "crashes": crashes[:20],
        "slowest_decode_ms": round(1000 * worst_seconds, 3),
        "peak_decode_memory_bytes": worst_memory,
        "memory_bound_bytes": memory_bound,
        "within_memory_bound": worst_memory <= memory_bound,
        "top_rejection_reasons": dict(reasons.most_common(15)),
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
