"""Fuzz the server's accept-and-aggregate step at scale: the cases of tests/test_fuzz_server.py, many more of them.

    python benchmarks/fuzz_server.py [--cases 100000] [--max-seconds S] [--threads 1] > fuzz_server.json

Each case is one round of three to five honest clients and up to two hostile ones
(malformed payloads, bit flips, re-sealed mutations, hostile metrics, values up to
float32's limit, extreme weights, errors), aggregated by sparse-fedavg, fedavg,
sparse-median or fedmedian. The round must not raise, must aggregate every honest
update and keep the global model finite. Prints one JSON object: ``cases``,
``accepted`` (updates), ``rejected`` (by reason, numbers masked), ``clipped``,
``exceptions`` (must be 0: anything raised, or a property broken, with examples) and
``slowest_seconds`` (of one round). With ``--max-seconds`` it stops after that long and
reports the cases it ran (``stopped_early``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from pollen.flower_internals import TaskIdentity  # noqa: E402
from test_fuzz_server import fuzz_round, run_case  # noqa: E402


class OutOfTime(Exception):
    """--max-seconds has passed: end the run with the cases done so far."""


def reason_kind(reason: str) -> str:
    """A reason with its numbers masked, so rejections group by kind."""
    return re.sub(r"(?<![\w-])[-+]?\d[\d.e+-]*", "N", reason)[:80]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0: run every case)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # a warning per rejected reply, otherwise
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # messages built outside Flower
    counts = {"cases": 0, "accepted": 0, "clipped": 0}
    rejected, exceptions = collections.Counter(), []
    slowest = 0.0
    started = time.perf_counter()

    @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_round())
    def one_case(case):
        nonlocal slowest
        if args.max_seconds and time.perf_counter() - started > args.max_seconds:
            raise OutOfTime
        counts["cases"] += 1
        try:
            result = run_case(case)
        except Exception as error:  # the property or the server broke: record, keep going
            exceptions.append(f"{type(error).__name__}: {str(error)[:200]}")
            return
        counts["accepted"] += result["accepted"]
        counts["clipped"] += len(result["clipped"])
        rejected.update(reason_kind(item["reason"]) for item in result["rejections"])
        slowest = max(slowest, result["seconds"])

    try:
        one_case()
        stopped_early = False
    except OutOfTime:
        stopped_early = True
    json.dump({
        "cases": counts["cases"],
        "stopped_early": stopped_early,
        "seconds": round(time.perf_counter() - started, 1),
        "accepted": counts["accepted"],
        "clipped": counts["clipped"],
        "rejected": dict(rejected.most_common()),
        "exceptions": len(exceptions),
        "exception_examples": exceptions[:10],
        "slowest_seconds": round(slowest, 4),
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
