"""The ServerApp: run the rounds, evaluate centrally, write the run record and checkpoints."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from pollen.codec import Codec, TopK, codec_from_config
from pollen.config import Config, from_flat, to_flat
from pollen.data import load_dataset
from pollen.metrics import evaluate
from pollen.models import initial_arrays, load_model, load_trainable
from pollen.server.checkpoint import ResumedRounds, forget_client_versions, load_checkpoint, restore_rng, save_checkpoint
from pollen.server.records import RoundRecord, RunRecord, read_records
from pollen.strategies import RoundTraffic, ServerMomentum, make_strategy
from pollen.server.broadcast import Broadcast

NUM_CLASSES = 10
CHECKPOINT = "checkpoint.pt"
# Set by `pollen server` (server/deploy.py) in the SuperLink's environment, which the ServerApp
# inherits: where this run writes, and whether it goes on from that folder's checkpoint.
RUN_FOLDER, RESUME = "POLLEN_RUN_FOLDER", "POLLEN_RESUME"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_flat(context.run_config)
    folder = os.environ.get(RUN_FOLDER)
    # A new Flower run starts every client with an empty Context: nobody keeps its global copy.
    run_federation(grid, config, Path(folder) if folder else new_run_folder(config),
                   resume=os.environ.get(RESUME) == "1", clients_kept_state=False)


def new_run_folder(config: Config, name: str = "") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(config.output_dir) / (f"{stamp}-{name}" if name else stamp)
    suffix = 1
    while folder.exists():
        folder = folder.with_name(f"{folder.name}-{suffix}")
        suffix += 1
    return folder


def codec_of(config: Config) -> Codec:
    return codec_from_config(to_flat(config), prefix="codec.")


def downlink_of(config: Config, initial: dict[str, np.ndarray]) -> Broadcast | None:
    """The server side of downlink compression, or None for dense fp32 arrays every round."""
    if config.downlink.name == "identity":
        return None
    return Broadcast(TopK(density=config.downlink.density, bits=config.downlink.bits), initial)


def run_federation(grid: Grid, config: Config, folder: Path,
                   on_round: Callable[[RoundRecord], None] | None = None,
                   round_fields: Callable[[int], dict] | None = None,
                   resume: bool = False, clients_kept_state: bool = True) -> list[RoundRecord]:
    """Run ``config.federation.rounds`` rounds on ``grid``; return one record per round (0 = start).

    ``round_fields(round)`` adds what only the backend knows to each record (simulated time).
    ``resume`` goes on from ``folder``'s checkpoint (server/checkpoint.py); ``clients_kept_state``
    says whether the clients still hold what they kept in ``Context.state`` since then.
    """
    random.seed(config.seed)  # Flower's strategies sample clients with `random`
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_flat(config), sort_keys=False))

    model = load_model(config.model, NUM_CLASSES, config.seed)
    _, test_split = load_dataset(config.data.dataset, config.model.image_size,
                                 config.data.test_size, config.seed)
    fed = config.federation
    start = initial_arrays(config.model, NUM_CLASSES, config.seed)
    strategy = make_strategy(
        fed.strategy, codec_of(config), config.strategy.settings, downlink_of(config, start),
        ServerMomentum(fed.server_learning_rate, fed.server_momentum, fed.server_decay, fed.rounds),
        fraction_train=fed.clients_per_round / fed.num_clients,
        min_train_nodes=fed.clients_per_round,
        min_available_nodes=fed.clients_per_round,
        fraction_evaluate=fed.fraction_evaluate,
        min_evaluate_nodes=max(1, round(fed.fraction_evaluate * fed.num_clients)),
    )
    resumed = load_checkpoint(folder / CHECKPOINT, to_flat(config)) if resume else None
    if resumed:
        strategy = resumed.strategy
        if not clients_kept_state:
            forget_client_versions(strategy)
    earlier = [r for r in read_records(folder) if r.round <= resumed.round] if resumed else []
    record = RunRecord(folder)
    for entry in earlier:
        record.append(entry)
    history: list[RoundRecord] = list(earlier)
    started = time.perf_counter() - (earlier[-1].wall_seconds if earlier else 0.0)
    last = [started]

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_trainable(model, {name: array.numpy() for name, array in arrays.items()})
        metrics = evaluate(model, test_split)
        traffic = strategy.traffic.get(server_round, RoundTraffic())
        train = strategy.train_metrics.get(server_round)
        now = time.perf_counter()
        entry = RoundRecord(
            round=server_round, **metrics,
            train_loss=float(train["train-loss"]) if train else None,
            clients=traffic.accepted, rejected=traffic.rejected, failed=traffic.failed,
            uplink_bytes=traffic.uplink, downlink_bytes=traffic.downlink,
            dense_uplink_bytes=traffic.dense_uplink,
            compression=traffic.dense_uplink / traffic.uplink if traffic.uplink else None,
            round_seconds=now - last[0], wall_seconds=now - started,
            **(round_fields(server_round) if round_fields else {}),
        )
        last[0] = now
        record.append(entry)
        history.append(entry)
        save_checkpoint(folder / CHECKPOINT, server_round, arrays, strategy, to_flat(config))
        if on_round:
            on_round(entry)
        return MetricRecord(metrics)

    initial = ArrayRecord({name: Array(value) for name, value in start.items()})
    train_config = ConfigRecord({
        "lr": config.train.lr,
        "local-epochs": config.train.local_epochs,
        "batch-size": config.train.batch_size,
        "weight-decay": config.train.weight_decay,
        "adam-eps": config.train.adam_eps,
    })
    runner = strategy
    if resumed:
        restore_rng(resumed.rng)
        initial, runner = resumed.arrays, ResumedRounds(strategy, resumed.round)
    runner.start(grid, initial, num_rounds=fed.rounds, train_config=train_config,
                 evaluate_fn=evaluate_round)
    return history

