"""The ClientApp: fine-tune the trainable parts on local data, send back a compressed update."""

from __future__ import annotations

import dataclasses
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollen.client.attacks import CLAIMED_EXAMPLES, attack_of, flipped_labels, poisoned
from pollen.client.deadline import fitted_payload, uplink_budget
from pollen.client.error_feedback import ErrorFeedback
from pollen.client.global_copy import GlobalCopy
from pollen.client.training import train_locally
from pollen.codec import Identity, decode, dense_wire_bytes, encode, layout_of, wire_bytes
from pollen.config import Config, config_from_run_config
from pollen.data import Split, load_dataset, load_local_data, num_classes, partitions
from pollen.metrics import evaluate
from pollen.models import initial_arrays, load_model, load_trainable, trainable_arrays
from pollen.privacy import privatized

DATA_PATH = "data-path"  # node_config key set by `pollen client --data PATH`
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = config_from_run_config(context.run_config)
    model = load_model(config.model, num_classes(config.data), config.seed)
    data = local_data(config, context.node_config)
    # simulation.attack: a simulated client may be one of the run's attackers; a device never is.
    attack = None if DATA_PATH in context.node_config else attack_of(config, context.node_config)
    if attack == "label-flip" and data.labels.dim() == 1:
        data = dataclasses.replace(data, labels=flipped_labels(data.labels, num_classes(config.data)))
    round_config = msg.content["config"]  # what changes per round: its number, the downlink, FedProx's mu
    global_arrays = global_copy(config, context).receive(msg.content["arrays"], round_config)
    load_trainable(model, global_arrays)

    server_round = int(round_config.get("server-round", 0))
    seed = config.seed * 1_000_003 + server_round * 10_007 + int(context.node_config["partition-id"])
    started = time.perf_counter()
    # The round's learning rate comes from the server (train.lr_schedule); train.lr without one.
    settings = dataclasses.replace(config.train, lr=float(round_config.get("lr", config.train.lr)))
    run = train_locally(model, data, settings, proximal_mu=float(round_config.get("proximal-mu", 0.0)), seed=seed)
    seconds = time.perf_counter() - started

    local = trainable_arrays(model)
    feedback = ErrorFeedback(context.state, config.codec.feedback_max_age)
    # Clipped and noised first (privacy.*), so error feedback and the codec see only the private update.
    change = privatized({name: local[name] - global_arrays[name] for name in global_arrays}, config.privacy, seed)
    if attack:
        change = poisoned(change, attack, config.simulation.attack.scale, seed)
    update = feedback.add_residual(change, server_round)
    codec = config.codec.build()
    rms = run.gradient_rms if codec.uses_gradient_rms else None
    if config.codec.fit_deadline:  # as dense as still makes the round's deadline on this device's uplink
        budget = uplink_budget(round_config, len(data) * config.train.local_epochs)
        codec, payload = fitted_payload(update, codec, budget, config.codec.min_density, seed=seed, gradient_rms=rms)
    else:
        payload = encode(update, codec, seed=seed, gradient_rms=rms)
    if isinstance(codec, Identity):
        feedback.clear()  # a lossless payload leaves nothing behind
    else:
        feedback.keep(update, decode(payload, layout_of(global_arrays), codec), server_round)

    metrics = MetricRecord({
        "num-examples": CLAIMED_EXAMPLES if attack == "weight" else len(data),
        "train-loss": run.loss,
        "train-seconds": seconds,
        "encoded-bytes": wire_bytes(payload),
        "dense-bytes": dense_wire_bytes(layout_of(update)),
    })
    return Message(RecordDict({"arrays": payload, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    config = config_from_run_config(context.run_config)
    model = load_model(config.model, num_classes(config.data), config.seed)
    data = local_data(config, context.node_config)
    load_trainable(model, global_copy(config, context).receive(msg.content["arrays"], msg.content["config"]))
    result = evaluate(model, data)
    metrics = MetricRecord({"num-examples": len(data), "accuracy": result["accuracy"],
                            "loss": result["loss"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Name this node's partition, so a simulation server can address nodes by partition."""
    node = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"node": node}), reply_to=msg)


def global_copy(config: Config, context: Context) -> GlobalCopy:
    return GlobalCopy(context.state, lambda: initial_arrays(config.model, num_classes(config.data), config.seed),
                      config.downlink.build())


def local_data(config: Config, node_config: dict) -> Split:
    """This node's share of the training split (simulation: by ``partition-id``)."""
    if DATA_PATH in node_config:  # a deployed device: its own files, read as data.dataset is (pollen.data)
        return load_local_data(str(node_config[DATA_PATH]), config.model, num_classes(config.data),
                               config.data.max_length, config.data.augment)
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config.get("num-partitions", config.federation.num_clients))
    parts = partitions(config, num_partitions)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} outside 0..{len(parts) - 1}")
    train_split, _ = load_dataset(config)
    return train_split.subset(parts[partition_id])
