"""How many threads torch trains with: one rule, ``default_threads(config)``, for every command.

torch starts one thread per core. The operations of a small model are too small to share
out: waking and joining the threads costs more than they save, and where other work keeps
the cores busy a thread mostly waits for another. On a loaded 2-core machine
(benchmarks/threads.py; README, "Output and threads") `pollen simulate` took 3.0x longer
on 2 threads than on 1 with the tiny config (12k parameters) and 5.5x longer with the
default one (EfficientNet-Lite0, 3.6M). So: one thread for a model under ``SMALL_MODEL``
parameters; otherwise half the cores, leaving the rest to Flower, data loading and
whatever else runs there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pollen.config import Config, ModelConfig

SMALL_MODEL = 1_000_000  # parameters, base and head: below this one thread is fastest anywhere

RULE = f"1 for a model under {SMALL_MODEL // 1_000_000}M parameters, else half the cores; 1 on 2 or 3 cores"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or a container limit it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(config: Config | None = None, cores: int | None = None) -> int:
    """Threads to train ``config``'s model on ``cores`` cores (default: this process's), as ``RULE`` says.

    ``config`` None: a model not known yet (a device learns it from the server), sized as a large one.
    """
    half = max(1, (cores or available_cores()) // 2)
    if half == 1 or config is None:  # the model's size would not change the answer: do not build it
        return half
    return 1 if model_parameters(config.model) < SMALL_MODEL else half


def model_parameters(model: ModelConfig) -> int:
    """Parameters of ``model.name``'s network (base and a two-class head), built without quantization or adapters."""
    from pollen.models import model_factory

    network, _ = model_factory(model.name)(2)
    return sum(parameter.numel() for parameter in network.parameters())


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that give the processes this one starts (Flower's ServerApp, a SuperNode's ClientApp)
    ``threads`` threads: torch, OpenMP and MKL read them when they start."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
