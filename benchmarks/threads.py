"""Wall time of `pollen simulate` at 1 thread, at every core, and at the default thread count.

Runs the tiny config and the default config (for ``--default-rounds`` rounds, 3 unless
told: the whole default run takes minutes a try) as a user runs them, a `pollen simulate`
process each, start-up included, one after another. Prints JSON: per config the rule's
thread count (pollen.threads.default_threads), per setting the wall seconds and final
accuracy, the ratios of all cores and of the default against 1 thread, and the load
average before and after (the cores may be shared: the ratios hold for that load only).

    python benchmarks/threads.py [--default-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pollen.config import load_config  # noqa: E402
from pollen.flower_processes import offline_env  # noqa: E402
from pollen.run_folder import RunFolder  # noqa: E402
from pollen.threads import available_cores, default_threads  # noqa: E402

TINY = ROOT / "simulations" / "configs" / "tiny.yaml"
TIMEOUT = 3600.0  # seconds: a bound against a hung run, far above any of these


def simulate(config: Path | None, overrides: list[str], threads: int | None, folder: Path) -> dict:
    """One `pollen simulate` process: its wall seconds (start-up included) and final accuracy."""
    command = [sys.executable, "-m", "pollen.cli", "simulate", *([str(config)] if config else []),
               *(f"--set={override}" for override in overrides), "--output", str(folder),
               *(["--threads", str(threads)] if threads else [])]
    # Neither an inherited OMP_NUM_THREADS nor MKL_NUM_THREADS: the command alone chooses.
    env = {name: value for name, value in offline_env().items() if name not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    return {"wall_seconds": round(seconds, 1), "final_accuracy": RunFolder(folder).records()[-1].accuracy}


def measure(name: str, config: Path | None, overrides: list[str], scratch: Path) -> dict:
    cores = available_cores()
    chosen = default_threads(load_config(config, overrides))
    settings = {"1 thread": 1, f"all {cores} cores": cores, f"default ({chosen})": None}
    runs = {label: simulate(config, overrides, threads, scratch / f"{name}-{index}")
            for index, (label, threads) in enumerate(settings.items())}
    one, every, default = (runs[label]["wall_seconds"] for label in settings)
    return {"config": str(config.relative_to(ROOT)) if config else "built-in default", "overrides": overrides,
            "default_threads": chosen, "runs": runs,
            "all_cores_vs_1_thread": round(every / one, 2), "default_vs_1_thread": round(default / one, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default-rounds", type=int, default=3, help="rounds of the default config (default 3)")
    args = parser.parse_args()
    before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        results = {"tiny": measure("tiny", TINY, [], Path(scratch)),
                   "default": measure("default", None, [f"federation.rounds={args.default_rounds}"], Path(scratch))}
    print(json.dumps({"cores": available_cores(), "load_average_1_5_15_min_before": [round(x, 2) for x in before],
                      "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()], **results}, indent=2))


if __name__ == "__main__":
    main()
