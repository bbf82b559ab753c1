"""The ServerApp: the federation's rounds, ``run_federation``, and one round, ``run_round``.

A round, top to bottom: the strategy samples and configures clients (with the round's
learning rate); the broadcast replaces the dense global arrays in each message by what
that node lacks; the Grid delivers the messages and waits; every reply is checked,
decoded, counted and screened (server/uplink.py, server/update_checks.py); the strategy
aggregates; the server's momentum step is applied (unless the strategy has an optimizer
of its own); the broadcast advances the global arrays by the encoded step. Those three
run under a guard that refuses a new model that is not finite or moves too far, keeping
the previous one. The new model is evaluated on the held-out split, and the round is
recorded and checkpointed; early stopping may end the run there, with its best round's
model. Flower's strategies are used through their own ``configure_train``,
``aggregate_train``, ``configure_evaluate`` and ``aggregate_evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from torch import nn

from pollen.codec import Codec
from pollen.config import Config, config_from_run_config
from pollen.data import Split, load_dataset, num_classes
from pollen.metrics import class_report, evaluate, spread
from pollen.models import initial_arrays, load_model, load_trainable
from pollen.privacy import epsilon
from pollen.run_folder import RoundRecord, RunFolder
from pollen.schedules import learning_rate
from pollen.server.broadcast import Broadcast
from pollen.server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from pollen.server.early_stopping import EarlyStop
from pollen.server.momentum import ServerMomentum
from pollen.server.over_selection import OverSelection
from pollen.server.plot import plot_confusion, plot_run, run_label
from pollen.server.update_checks import KnownClients, StepGuard, UpdateChecks
from pollen.server.uplink import RoundTraffic, accept_evaluations, accept_replies
from pollen.strategies import has_server_optimizer, make_strategy, takes_sparse_deltas

REPLY_TIMEOUT = 3600.0  # seconds a round waits for its replies, as Flower's Strategy.start does
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    folder, resume = RunFolder.from_environment(config)
    log(INFO, "Pollen run folder: %s", folder.path.resolve())
    # A deployment (server/deploy.py) writes which device key each node is: its records name device-3.
    names = json.loads(folder.devices.read_text()) if folder.devices.is_file() else {}
    clients = KnownClients(names={int(node_id): name for node_id, name in names.items()})
    # A new Flower run starts every client with an empty Context: nobody keeps its global copy.
    run_federation(grid, config, folder, resume=resume, clients_kept_state=False, clients=clients)


def run_federation(grid: Grid, config: Config, folder: RunFolder,
                   on_round: Callable[[RoundRecord], None] | None = None,
                   round_fields: Callable[[int], dict] | None = None,
                   resume: bool = False, clients_kept_state: bool = True,
                   clients: KnownClients | None = None) -> list[RoundRecord]:
    """Run the rounds of ``config`` on ``grid``; return one record per round (0 = the start).

    ``round_fields(round)`` adds what only the backend knows to each record (simulated
    time). ``resume`` goes on from ``folder``'s checkpoint; ``clients_kept_state`` says
    whether the clients still hold what they kept in ``Context.state`` since then.
    ``clients``: the nodes' names and sizes where known (a simulation's partitions,
    ``simulated_clients``); otherwise claims are judged by the round's median.
    """
    folder.write_config(config)
    model = load_model(config.model, num_classes(config.data), config.seed)
    _, test_split = load_dataset(config)  # the held-out split, or data.test_path
    state = resumed_state(config, folder, clients_kept_state) if resume else new_state(config)
    records = [r for r in folder.records() if r.round <= state.round] if resume else []
    folder.start_records(records, tensorboard=config.tensorboard)
    codec = config.codec.build()
    checks = UpdateChecks.of(config, clients)
    started = time.perf_counter() - (records[-1].wall_seconds if records else 0.0)
    try:
        if state.round == 0:
            outcome = RoundOutcome(RoundTraffic(), None, None)
            records.append(record_round(0, state, outcome, model, test_split, started, started, round_fields))
            save_checkpoint(folder.checkpoint, state, config)
            folder.append(records[-1])
        stopper = EarlyStop(config.federation.early_stopping, state.round, records[-1].accuracy, state.arrays)
        for server_round in range(state.round + 1, config.federation.rounds + 1):
            round_started = time.perf_counter()
            lr = learning_rate(config.train, server_round, config.federation.rounds)
            outcome = run_round(server_round, state, grid, codec, checks,
                                lr=None if config.train.lr_schedule == "constant" else lr)  # sent if it changes
            # Evaluate, record; stop early with the best round's model; checkpoint.
            record = record_round(server_round, state, outcome, model, test_split, started, round_started,
                                  round_fields)
            early_stop = stopper.after(server_round, record.accuracy, state.arrays)
            record = dataclasses.replace(record, lr=lr, epsilon=epsilon(config.privacy, config.federation, server_round),
                                         early_stop=early_stop, kept_round=stopper.best_round if early_stop else None)
            if record.early_stop:
                state.arrays = stopper.best_arrays
            records.append(record)
            state.round = server_round
            save_checkpoint(folder.checkpoint, state, config)  # before the record: a recorded round is resumable
            folder.append(record)
            log(INFO, "round %d: accuracy %.4f, %d updates accepted, %d rejected%s", server_round,
                record.accuracy, outcome.traffic.accepted, outcome.traffic.rejected,
                f", step refused: {outcome.step_refused}" if outcome.step_refused else "")
            if on_round:
                on_round(record)
            if record.early_stop:
                log(INFO, "early stopping: %s", record.early_stop)
                break
        if records and records[-1].round == state.round:
            write_class_report(folder, model, state, test_split, num_classes(config.data))
    finally:
        folder.end_records()
        if records:
            plot_run(records, folder.plot, label=run_label(config))
    return records


@dataclass
class RoundOutcome:
    traffic: RoundTraffic
    train_metrics: MetricRecord | None  # the strategy's aggregate of the clients' training metrics
    federated_metrics: MetricRecord | None  # the clients' own evaluation (fraction_evaluate > 0)
    step_refused: str | None = None  # why the round's new global model was refused (it kept the previous one)
    client_accuracies: list[float] | None = None  # each evaluating client's own accuracy


def run_round(server_round: int, state: ServerState, grid: Grid, codec: Codec,
              checks: UpdateChecks | None = None, lr: float | None = None) -> RoundOutcome:
    """One round of training on ``grid``: ``state`` ends holding the new global arrays (or the old ones, refused).

    ``lr``: the clients' learning rate this round (None: their ``train.lr``).
    """
    checks = checks or UpdateChecks.of(Config())
    traffic = RoundTraffic()
    # Select and configure clients: the strategy samples nodes (more of them if many have been
    # failing, federation.over_select) and writes their messages.
    state.selection.configure(state.strategy)
    settings = ConfigRecord({} if lr is None else {"lr": lr})
    messages = list(state.strategy.configure_train(server_round, state.arrays, settings, grid))
    # Address the downlink (each node gets what it lacks of the global arrays), send, wait.
    replies = exchange(messages, state, grid, traffic)
    # Accept replies: check, decode, count and screen every update; bad ones are dropped with their reason.
    replies = accept_replies(replies, state.arrays, codec, checks, sparse=takes_sparse_deltas(state.strategy),
                             traffic=traffic, server_round=server_round)
    state.selection.count(len(messages), traffic.accepted)
    # Guarded from here: if a step raises, or the new model is not finite or moves too far,
    # the round is refused and the model, the strategy's and the momentum's state stay.
    train_metrics = None
    with StepGuard(state, checks, server_round) as guard:
        # Aggregate with the strategy, as it would aggregate dense local models.
        proposed, train_metrics = state.strategy.aggregate_train(server_round, replies)
        if proposed is None:
            log(WARNING, "round %d: no update to aggregate; the global model stays", server_round)
        else:
            proposed = in_dtypes_of(state.arrays, proposed)
            # The server's optimizer step (FedAvgM's momentum), never on top of a strategy's own.
            if state.momentum is not None:
                proposed = state.momentum.apply(state.arrays, proposed, server_round)
            guard.check(state.arrays, proposed)
            # Advance the broadcast: the global arrays move by the encoded step towards the proposal.
            state.arrays = state.broadcast.advance(state.arrays, proposed)
    federated_metrics, client_accuracies = evaluate_on_clients(state, grid, server_round, traffic, checks)
    return RoundOutcome(traffic, train_metrics, federated_metrics, guard.refused, client_accuracies)


def record_round(server_round: int, state: ServerState, outcome: RoundOutcome, model: nn.Module,
                 test_split: Split, started: float, round_started: float,
                 round_fields: Callable[[int], dict] | None) -> RoundRecord:
    """Evaluate the global arrays on the held-out split; the round's record."""
    load_trainable(model, {name: array.numpy() for name, array in state.arrays.items()})
    train, federated, traffic = outcome.train_metrics, outcome.federated_metrics, outcome.traffic
    now = time.perf_counter()
    return RoundRecord(
        round=server_round, **evaluate(model, test_split),
        train_loss=_finite_metric(train, "train-loss"), federated_accuracy=_finite_metric(federated, "accuracy"),
        clients=traffic.accepted, rejected=traffic.rejected, failed=traffic.failed,
        rejected_updates=traffic.rejections, clipped_weights=traffic.clipped, step_refused=outcome.step_refused,
        federated_spread=spread(outcome.client_accuracies) if outcome.client_accuracies else None,
        uplink_bytes=traffic.uplink, downlink_bytes=traffic.downlink, dense_uplink_bytes=traffic.dense_uplink,
        compression=traffic.compression, round_seconds=now - round_started, wall_seconds=now - started,
        **(round_fields(server_round) if round_fields else {}),
    )


def _finite_metric(metrics: MetricRecord | None, key: str) -> float | None:
    """An averaged client metric for the record; None if absent or overflowed (clients' claims, bounded but large)."""
    value = float(metrics[key]) if metrics and key in metrics else None
    return value if value is not None and math.isfinite(value) else None


def evaluate_on_clients(state: ServerState, grid: Grid, server_round: int, traffic: RoundTraffic,
                        checks: UpdateChecks) -> tuple[MetricRecord | None, list[float] | None]:
    """Federated evaluation on the clients the strategy samples (none when fraction_evaluate is 0):
    the strategy's aggregate, and each client's own accuracy."""
    messages = list(state.strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), grid))
    if not messages:
        return None, None
    replies = accept_evaluations(exchange(messages, state, grid, traffic), checks, traffic=traffic,
                                 server_round=server_round)
    accuracies = [float(r.content["metrics"]["accuracy"]) for r in replies if not r.has_error()]
    accuracies = [a for a in accuracies if math.isfinite(a)] or None
    try:
        return state.strategy.aggregate_evaluate(server_round, replies), accuracies
    except Exception as error:  # a plug-in strategy's own check: the round's model stands regardless
        log(WARNING, "round %d: federated evaluation not aggregated: %s: %s", server_round,
            type(error).__name__, error)
        return None, accuracies


def write_class_report(folder: RunFolder, model: nn.Module, state: ServerState, test_split: Split,
                       classes: int) -> None:
    """The run's model, class by class: classes.json and confusion.png (classifiers only)."""
    if classes < 1 or test_split.labels.dim() != 1:
        return  # a causal LM predicts tokens: its accuracy per token is in the records
    load_trainable(model, {name: array.numpy() for name, array in state.arrays.items()})
    report = class_report(model, test_split, classes)
    folder.classes.write_text(json.dumps(report) + "\n")
    plot_confusion(report["confusion"], folder.confusion)


def exchange(messages, state: ServerState, grid: Grid, traffic: RoundTraffic) -> list:
    """Each message's global arrays as its node lacks them, sent; the replies, the bytes counted."""
    messages = state.broadcast.address(messages, state.arrays)
    traffic.count_sent(messages)
    replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
    state.broadcast.replied(replies)
    return replies


def new_state(config: Config) -> ServerState:
    """Round 0: the initial arrays of the run's seed, a fresh strategy, momentum and broadcast."""
    random.seed(config.seed)  # Flower's strategies sample clients with `random`
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    fed = config.federation
    start = initial_arrays(config.model, num_classes(config.data), config.seed)
    strategy = make_strategy(config)
    momentum = None
    if has_server_optimizer(strategy):
        log(INFO, "%s has a server optimizer of its own: federation.server_* do not apply", fed.strategy)
    else:
        momentum = ServerMomentum(fed.server_learning_rate, fed.server_momentum, fed.server_decay, fed.rounds)
    broadcast = Broadcast(config.downlink.build(), start, config.downlink.budget)
    return ServerState(round=0, arrays=ArrayRecord({name: Array(value) for name, value in start.items()}),
                       strategy=strategy, momentum=momentum, broadcast=broadcast,
                       selection=OverSelection.of(fed))


def resumed_state(config: Config, folder: RunFolder, clients_kept_state: bool) -> ServerState:
    """The state after the checkpoint's round; the random generators are restored with it."""
    state = load_checkpoint(folder.checkpoint, config)
    if state.momentum is not None:
        state.momentum.rounds = config.federation.rounds  # a resumed run may go on for longer
    if not clients_kept_state:
        state.broadcast.forget_nodes()
    if getattr(state, "selection", None) is None:  # a checkpoint from before over-selection: count from here
        state.selection = OverSelection.of(config.federation)
    return state


def in_dtypes_of(current: ArrayRecord, proposed: ArrayRecord) -> ArrayRecord:
    """The proposal in the model's dtypes: FedAdam & co. return float64 under NumPy 2."""
    if all(proposed[name].dtype == array.dtype for name, array in current.items()):
        return proposed
    return ArrayRecord({name: Array(array.numpy().astype(current[name].dtype, copy=False))
                        for name, array in proposed.items()})

