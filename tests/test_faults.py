"""Faulty clients in the in-process simulation: every failure is an error reply and the round goes on."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollen.config import load_config
from pollen.flower_internals import ErrorCode
from pollen.run_folder import RunFolder
from pollen.simulations.devices import DeviceGrid
from pollen.simulations.inprocess import InProcessGrid
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
FAULTY = "simulations/configs/devices-faulty.yaml"
OK, RAISES, EXITS, HANGS, INTERRUPTED = 1, 2, 3, 4, 5  # what each node's client does
hung_client_stopped = threading.Event()

faulty = ClientApp()


@faulty.train()
def train(msg: Message, context: Context) -> Message:
    context.state["trained"] = ConfigRecord({"round": int(msg.content["config"]["server-round"])})
    node = context.node_id
    if node == RAISES:
        raise RuntimeError("disk full")
    if node == EXITS:
        raise SystemExit(3)
    if node == INTERRUPTED:
        raise KeyboardInterrupt
    if node == HANGS:
        try:
            for _ in range(6000):  # a minute, unless the grid stops it first
                time.sleep(0.01)
        finally:
            hung_client_stopped.set()
    update = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
    return Message(RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)


def train_messages(grid, nodes, server_round=1):
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return [grid.create_message(content, "train", node, "1") for node in nodes]


@pytest.mark.parametrize("timeout", [0.0, 30.0])
def test_a_raising_or_exiting_client_becomes_an_error_reply(task_identity, timeout):
    grid = InProcessGrid(faulty, 5, {}, client_timeout=timeout)
    replies = grid.send_and_receive(train_messages(grid, [OK, RAISES, EXITS]))
    assert [r.has_error() for r in replies] == [False, True, True]
    assert all(r.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for r in replies[1:])
    assert "RuntimeError: disk full" in replies[1].error.reason and "SystemExit" in replies[2].error.reason


@pytest.mark.parametrize("timeout", [0.0, 30.0])  # inline, and in a thread of its own
def test_ctrl_c_in_a_client_still_stops_the_run(task_identity, timeout):
    grid = InProcessGrid(faulty, 5, {}, client_timeout=timeout)
    with pytest.raises(KeyboardInterrupt):
        grid.send_and_receive(train_messages(grid, [OK, INTERRUPTED]))


def test_a_client_past_the_timeout_is_a_straggler_and_the_round_goes_on(task_identity):
    hung_client_stopped.clear()
    inner = InProcessGrid(faulty, 5, {}, client_timeout=2.0)
    grid = DeviceGrid(inner, None, seed=0, local_epochs=1)
    replies = list(grid.send_and_receive(train_messages(grid, [OK, HANGS, RAISES])))
    assert [r.has_error() for r in replies] == [False, True, True]
    assert replies[1].error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE and "timeout" in replies[1].error.reason
    assert grid.record_fields(1)["stragglers"] == 1  # the raising client failed; it was not late
    assert hung_client_stopped.wait(30), "the given-up client was never stopped"
    assert HANGS not in inner.states and OK in inner.states  # a given-up client keeps its old state


def test_a_federation_with_30_percent_failing_clients_completes(tmp_path):
    config = load_config(TINY, ["federation.rounds=3", f"simulation.devices={FAULTY}"])
    _, records = simulate(config, RunFolder(tmp_path))
    assert [r.round for r in records] == [0, 1, 2, 3]
    assert sum(r.dropouts for r in records) > 0
    assert all(r.clients + r.failed == config.federation.clients_per_round for r in records[1:])
    assert all(r.failed == r.dropouts for r in records)
