"""Downlink compression: versioned global steps on the server, rebuilt on the client."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from pollen.client.global_copy import GlobalCopy
from pollen.codec import Identity, TopK, encode, wire_bytes
from pollen.downlink import DownlinkError, arrays_crc, chain_message, rebuild, sum_codec, sum_message
from pollen.server.broadcast import Broadcast
from strategy_replies import pollen_round, pollen_state, sampling

rng = np.random.default_rng(3)
INITIAL = {"w": rng.normal(size=(40, 50)).astype(np.float32), "b": rng.normal(size=(50,)).astype(np.float32)}
LAYOUT = {k: v.shape for k, v in INITIAL.items()}
NODES = [1, 2, 3, 4]


pytestmark = pytest.mark.usefixtures("task_identity")  # see conftest.py


class FixedGrid:
    def get_node_ids(self):
        return NODES


def as_record(arrays):
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})


def nudged(arrays, scale=0.01, density=0.05):
    """A sparse change of the arrays, like one round of sparse FedAvg."""
    out = {}
    for name, value in arrays.items():
        mask = rng.random(value.shape) < density
        out[name] = (value + scale * mask * rng.normal(size=value.shape)).astype(np.float32)
    return out


def reply_to(message, ok=True):
    if not ok:
        return Message(Error(code=0, reason="gone"), reply_to=message)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=message)


def send(broadcast, nodes, arrays):
    messages = [Message(RecordDict({"arrays": as_record(arrays), "config": ConfigRecord({"server-round": 1})}),
                        node, "train") for node in nodes]
    return broadcast.address(messages, as_record(arrays))


STEADY = {k: rng.random(v.shape) < 0.05 for k, v in INITIAL.items()}  # entries that keep changing


def advanced(broadcast, current, rounds, density=0.05, steady=False):
    """``rounds`` steps of random changes (on the same entries every time with ``steady``)."""
    for _ in range(rounds):
        arrays = {k: v.numpy() for k, v in current.items()}
        proposed = ({k: (v + 0.01 * STEADY[k] * rng.normal(size=v.shape)).astype(np.float32)
                     for k, v in arrays.items()} if steady else nudged(arrays, density=density))
        current = broadcast.advance(current, as_record(proposed))
    return current


def numpy(record):
    return {k: v.numpy() for k, v in record.items()}


def within_a_quantization_step(rebuilt, current, since, bits=8):
    """A sum is off by at most half a level (at ``bits``) of the largest change it carries."""
    for k in INITIAL:
        change = current[k].numpy() - since[k]
        assert np.abs(rebuilt[k] - current[k].numpy()).max() <= np.abs(change).max() / (2 ** (bits - 1) - 1) + 1e-6


def test_steps_rebuild_the_global_arrays_exactly_and_lose_nothing():
    broadcast = Broadcast(TopK(density=0.5, bits=4), INITIAL)
    current, proposed_total = as_record(INITIAL), {k: np.zeros_like(v) for k, v in INITIAL.items()}
    for _ in range(4):
        proposed = nudged(numpy(current), density=0.02)
        for k in proposed:
            proposed_total[k] += proposed[k] - current[k].numpy()
        current = broadcast.advance(current, as_record(proposed))
    record, config = chain_message(broadcast.steps, 0, 4, arrays_crc(INITIAL))
    assert list(record) == ["step-1", "step-2", "step-3", "step-4"]
    rebuilt, version = rebuild(record, config, LAYOUT, broadcast.codec, INITIAL, 0)
    assert version == 4
    for k in INITIAL:
        assert np.array_equal(rebuilt[k], current[k].numpy())
        # sent steps + what the server still holds back == everything the strategy proposed
        np.testing.assert_allclose(current[k].numpy() - INITIAL[k] + broadcast._residual[k],
                                   proposed_total[k], atol=1e-5)
    (message,) = send(broadcast, [1], numpy(current))
    assert message.content["config"]["server-round"] == 1  # the round's settings still travel


def test_a_client_that_replied_gets_only_the_new_steps():
    broadcast = Broadcast(TopK(density=1.0), INITIAL)
    client = GlobalCopy(RecordDict(), lambda: INITIAL, broadcast.codec)
    current = as_record(INITIAL)
    for round_ in range(3):
        current = advanced(broadcast, current, 1)
        (message,) = send(broadcast, [1], numpy(current))
        assert list(message.content["arrays"]) == [f"step-{round_ + 1}"]
        rebuilt = client.receive(message.content["arrays"], message.content["config"])
        assert all(np.array_equal(rebuilt[k], current[k].numpy()) for k in INITIAL)
        broadcast.replied([reply_to(message)])
    assert client.held()[1] == 3


def test_a_returning_client_gets_the_steps_it_missed_as_one_sum():
    broadcast = Broadcast(TopK(density=1.0), INITIAL)
    client = GlobalCopy(RecordDict(), lambda: INITIAL, broadcast.codec)
    current = advanced(broadcast, as_record(INITIAL), 1)
    (first,) = send(broadcast, [1], numpy(current))
    client.receive(first.content["arrays"], first.content["config"])
    broadcast.replied([reply_to(first)])
    held = client.held()[0]
    current = advanced(broadcast, current, 6, steady=True)
    (message,) = send(broadcast, [1], numpy(current))
    config = message.content["config"]
    assert (config["downlink.kind"], config["downlink.version"]) == ("sum", 7)
    chain, _ = chain_message(broadcast.steps, 1, 7)
    assert wire_bytes(message.content["arrays"]) < 0.9 * wire_bytes(chain)  # one header, one index stream
    since = held if config["downlink.base"] == 1 else INITIAL
    within_a_quantization_step(client.receive(message.content["arrays"], config), current, since)
    assert client.held()[1] == 7


def test_new_unknown_or_far_behind_clients_get_the_change_since_the_initial_arrays():
    broadcast = Broadcast(TopK(density=1.0), INITIAL)
    current = advanced(broadcast, as_record(INITIAL), 1)
    clients = {node: GlobalCopy(RecordDict(), lambda: INITIAL, broadcast.codec) for node in (2, 3)}
    for message in send(broadcast, [2, 3], numpy(current)):
        clients[message.metadata.dst_node_id].receive(message.content["arrays"], message.content["config"])
    lost, ok = send(broadcast, [2, 3], numpy(current))
    broadcast.replied([reply_to(lost, ok=False), reply_to(ok)])  # node 2: version unknown now
    current = advanced(broadcast, current, 40)  # dense-ish steps: far more than the whole arrays
    assert min(broadcast.steps) > 2  # steps no payload will use again are gone
    unknown, behind, new = send(broadcast, [2, 3, 4], numpy(current))
    for message in (unknown, behind, new):
        assert (message.content["config"]["downlink.kind"], message.content["config"]["downlink.base"]) == ("sum", 0)
    for node, message in ((2, unknown), (3, behind)):
        rebuilt = clients[node].receive(message.content["arrays"], message.content["config"])
        within_a_quantization_step(rebuilt, current, INITIAL)
    assert wire_bytes(new.content["arrays"]) < wire_bytes(as_record(INITIAL)) / 3.5


def test_a_first_contact_costs_what_changed_not_the_whole_arrays():
    broadcast = Broadcast(TopK(density=1.0), INITIAL)
    current = advanced(broadcast, as_record(INITIAL), 3, density=0.02)
    (message,) = send(broadcast, [5], numpy(current))
    whole, _ = sum_message({k: v + 1 for k, v in INITIAL.items()}, 0, 3, broadcast.codec)  # every entry changed
    assert wire_bytes(message.content["arrays"]) < wire_bytes(whole) / 3
    rebuilt = GlobalCopy(RecordDict(), lambda: INITIAL, broadcast.codec).receive(
        message.content["arrays"], message.content["config"])
    within_a_quantization_step(rebuilt, current, INITIAL)


def test_client_refuses_steps_that_do_not_fit_what_it_holds():
    broadcast = Broadcast(TopK(density=1.0), INITIAL)
    current = broadcast.advance(as_record(INITIAL), as_record(nudged(INITIAL)))
    record, config = chain_message(broadcast.steps, 0, 1, arrays_crc(INITIAL))
    codec = broadcast.codec
    other_start = {k: v + 1 for k, v in INITIAL.items()}
    with pytest.raises(DownlinkError, match="initial arrays differ"):
        rebuild(record, config, LAYOUT, codec, other_start, 0)
    with pytest.raises(DownlinkError, match="from version 0, this client holds version 1"):
        rebuild(record, config, LAYOUT, codec, INITIAL, 1)
    with pytest.raises(DownlinkError, match="expected arrays"):
        rebuild(ArrayRecord(), config, LAYOUT, codec, INITIAL, 0)
    with pytest.raises(DownlinkError, match="bad downlink payload"):
        rebuild(record, config, {"w": (40, 50)}, codec, INITIAL, 0)
    with pytest.raises(DownlinkError, match="unknown downlink kind"):
        rebuild(record, {**config, "downlink.kind": "zip"}, LAYOUT, codec, INITIAL, 0)
    with pytest.raises(DownlinkError, match="downlink.version"):
        rebuild(record, {**config, "downlink.version": -1}, LAYOUT, codec, INITIAL, 0)
    with pytest.raises(DownlinkError, match="bad version range"):
        rebuild(record, {**config, "downlink.base": 2}, LAYOUT, codec, INITIAL, 2)
    assert np.array_equal(rebuild(record, config, LAYOUT, codec, INITIAL, 0)[0]["w"], current["w"].numpy())


@pytest.mark.parametrize("bits", [8, 4])
def test_sum_message_round_trip_at_the_steps_bits(bits):
    steps = TopK(density=0.01, bits=bits)
    change = nudged({k: np.zeros_like(v) for k, v in INITIAL.items()}, density=0.1)
    record, config = sum_message(change, 2, 7, steps)
    arrays, version = rebuild(record, config, LAYOUT, steps, INITIAL, 2)
    assert version == 7 and list(record) == ["sum"]
    levels = 2 ** (bits - 1) - 1
    for k in INITIAL:
        np.testing.assert_allclose(arrays[k], INITIAL[k] + change[k], atol=np.abs(change[k]).max() / levels)
    assert sum_codec(steps) == TopK(density=1.0, bits=bits, block=256)
    four_bits = wire_bytes(sum_message(change, 2, 7, TopK(bits=4))[0])
    assert four_bits < 0.8 * wire_bytes(sum_message(change, 2, 7, TopK(bits=8))[0])


def test_dense_global_arrays_are_checked_by_the_client():
    client = GlobalCopy(RecordDict(), lambda: INITIAL, TopK(density=1.0))
    assert np.array_equal(client.receive(as_record(INITIAL), {})["b"], INITIAL["b"])
    with pytest.raises(DownlinkError, match="bad global arrays"):
        client.receive(as_record({"w": INITIAL["w"]}), {})
    assert client.held()[1] == 0  # nothing kept from dense messages


def test_the_round_sends_steps_and_counts_the_smaller_downlink():
    outcomes = {}
    for downlink in (None, TopK(density=0.1)):
        state = pollen_state(FedAvg(**sampling(4)), INITIAL, downlink=downlink)
        for server_round in (1, 2):
            deltas = [{k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in INITIAL.items()}
                      for _ in NODES]
            outcomes[downlink] = pollen_round(state, deltas, [5] * 4, server_round=server_round)
        if downlink is not None:
            assert state.broadcast.version == 2 and set(state.broadcast.node_versions.values()) == {1}
    assert outcomes[TopK(density=0.1)].traffic.downlink < outcomes[None].traffic.downlink / 5


def flipped(array: Array, bit: int) -> Array:
    data = bytearray(array.data)
    data[bit // 8 % len(data)] ^= 1 << (bit % 8)
    return Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data))


@pytest.mark.parametrize("bit", [0, 45, 333, 2001, 9999])
def test_a_flipped_bit_in_a_step_or_a_sum_is_refused_by_its_crc(bit):
    broadcast = Broadcast(TopK(density=1.0), INITIAL)
    broadcast.advance(as_record(INITIAL), as_record(nudged(INITIAL)))
    chain, chain_config = chain_message(broadcast.steps, 0, 1, arrays_crc(INITIAL))
    summed, sum_config = sum_message(INITIAL, 0, 1, broadcast.codec, arrays_crc(INITIAL))
    for record, config, key in ((chain, chain_config, "step-1"), (summed, sum_config, "sum")):
        bad = ArrayRecord({key: flipped(record[key], bit)})
        with pytest.raises(DownlinkError, match="bad downlink payload: .*(CRC-32|magic|version)"):
            rebuild(bad, config, LAYOUT, broadcast.codec, INITIAL, 0)


def changed_entries(arrays, start) -> int:
    return sum(int(np.count_nonzero(arrays[k].numpy() != start[k])) for k in start)


def test_a_budget_caps_the_entries_the_global_model_changes_and_keeps_the_rest_on_the_server():
    size = sum(v.size for v in INITIAL.values())
    broadcast = Broadcast(TopK(density=1.0, bits=4), INITIAL, budget=0.1)
    current, asked = as_record(INITIAL), {k: np.zeros_like(v) for k, v in INITIAL.items()}
    returning = GlobalCopy(RecordDict(), lambda: INITIAL, broadcast.codec)
    for step in range(6):  # dense proposals: every entry wants to move
        if step == 5:  # a client that holds version 5 exactly, from the chain of steps 1..5
            returning.receive(*chain_message(broadcast.steps, 0, 5, arrays_crc(INITIAL)))
        change = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in INITIAL.items()}
        asked = {k: asked[k] + change[k] for k in INITIAL}
        current = broadcast.advance(current, as_record({k: current[k].numpy() + change[k] for k in INITIAL}))
        assert changed_entries(current, INITIAL) <= 0.1 * size
    moved = {k: current[k].numpy() - INITIAL[k] for k in INITIAL}
    for k in INITIAL:  # nothing asked for is lost: what did not move waits in the server's residual
        np.testing.assert_allclose(moved[k] + broadcast._residual[k], asked[k], atol=1e-5)
    (first,) = send(broadcast, [9], numpy(current))
    assert first.content["config"]["downlink.kind"] == "sum"
    rebuilt = GlobalCopy(RecordDict(), lambda: INITIAL, broadcast.codec).receive(
        first.content["arrays"], first.content["config"])
    within_a_quantization_step(rebuilt, current, INITIAL, bits=4)
    assert changed_entries(as_record(rebuilt), INITIAL) <= 0.1 * size
    record, config = chain_message(broadcast.steps, 5, 6)
    assert "reset-6" in record  # entries that dropped out of the budget go back
    caught_up = returning.receive(record, config)
    assert all(np.array_equal(caught_up[k], current[k].numpy()) for k in INITIAL)  # steps and resets: exact
    free = Broadcast(TopK(density=1.0, bits=4), INITIAL)
    unbounded = free.advance(as_record(INITIAL), as_record({k: INITIAL[k] + asked[k] for k in INITIAL}))
    (whole,) = send(free, [9], numpy(unbounded))
    payload = lambda message: sum(len(a.data) for a in message.content["arrays"].values())  # noqa: E731
    assert payload(first) < payload(whole) / 3  # Flower's envelope aside


def test_a_reset_needs_the_initial_arrays_and_a_chain_must_hold_each_step():
    broadcast = Broadcast(TopK(density=1.0), INITIAL, budget=0.05)
    current = as_record(INITIAL)
    for _ in range(3):
        current = broadcast.advance(current, as_record({k: v.numpy() + rng.normal(size=v.shape).astype(np.float32)
                                                        for k, v in current.items()}))
    version = next(v for v, step in broadcast.steps.items() if "reset" in step)
    record, config = chain_message(broadcast.steps, version - 1, version)
    assert list(record) == [f"step-{version}", f"reset-{version}"]
    held = {k: v for k, v in INITIAL.items()}
    with pytest.raises(DownlinkError, match="needs the initial arrays"):
        rebuild(record, config, LAYOUT, broadcast.codec, held, version - 1)
    with pytest.raises(DownlinkError, match="expected arrays"):
        rebuild(ArrayRecord({f"reset-{version}": record[f"reset-{version}"]}), config, LAYOUT, broadcast.codec,
                held, version - 1, INITIAL)


def test_a_budget_is_a_share_in_0_1():
    for budget in (0.0, 1.5):
        with pytest.raises(ValueError, match="budget must be in"):
            Broadcast(TopK(), INITIAL, budget=budget)
