import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pollen.flower_internals import ErrorCode

from pollen.codec import wire_bytes
from pollen.config import ConfigError, load_config
from pollen.simulations.devices import DeviceGrid, DevicePopulation, device_grid, load_profiles
from pollen.simulations.inprocess import InProcessGrid
from pollen.run_folder import RunFolder
from pollen.server.checkpoint import CheckpointError
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
EXAMPLES = 50  # every stub client trains on this many examples
UPLINK = ArrayRecord({"update": Array(np.zeros(1000, np.float32))})

stub = ClientApp()


@stub.train()
def reply_with_fixed_payload(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": UPLINK, "metrics": MetricRecord({"num-examples": EXAMPLES})}),
                   reply_to=msg)


def fleet_file(tmp_path, *profiles, examples_per_second=100.0):
    lines = [f"examples_per_second: {examples_per_second}", "profiles:"]
    for profile in profiles:
        lines.append("  - " + "\n    ".join(f"{k}: {v}" for k, v in profile.items()))
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def profile(**changes):
    return {"name": "phone", "share": 1.0, "compute_speed": 1.0, "uplink_mbps": 1.0,
            "downlink_mbps": 8.0, "availability": 1.0, "dropout": 0.0, **changes}


def train_round(grid, node_ids, server_round=1):
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(500, np.float32))}),
                          "config": ConfigRecord({"server-round": server_round})})
    messages = [Message(content, node, "train") for node in node_ids]
    return messages, list(grid.send_and_receive(messages))


@pytest.fixture
def inner():
    return InProcessGrid(stub, 200, {})


def test_profiles_load_and_bad_values_name_the_key(tmp_path):
    fleet = load_profiles(fleet_file(tmp_path, profile(), profile(name="slow", share=3.0)))
    assert fleet.examples_per_second == 100.0 and [p.name for p in fleet.profiles] == ["phone", "slow"]
    for change, named in [({"availability": 1.5}, "availability"), ({"dropout": -0.1}, "dropout"),
                          ({"uplink_mbps": 0}, "uplink_mbps"), ({"speed": 2}, "speed")]:
        with pytest.raises(ConfigError, match=named):
            load_profiles(fleet_file(tmp_path, profile(**change)))
    with pytest.raises(ConfigError, match="examples_per_second"):
        load_profiles(fleet_file(tmp_path, profile(), examples_per_second=-1))
    with pytest.raises(ConfigError, match="not found"):
        load_profiles(tmp_path / "missing.yaml")
    for change, named in [({"dropout": ".nan"}, "dropout: must be a finite number"),
                          ({"availability": "often"}, "availability: must be a finite number")]:
        with pytest.raises(ConfigError, match=named):
            load_profiles(fleet_file(tmp_path, profile(**change)))
    with pytest.raises(ConfigError, match="examples_per_second"):
        load_profiles(fleet_file(tmp_path, profile(), examples_per_second=".inf"))
    # The file is read where the fleet is built, before any model loads (a device never reads it).
    config = load_config(TINY, ["simulation.devices=no/such/fleet.yaml"])
    with pytest.raises(ConfigError, match="simulation.devices: file not found"):
        simulate(config, RunFolder(tmp_path / "run"))


def test_profiles_are_drawn_per_client_by_share_with_the_seed(tmp_path):
    fleet = load_profiles(fleet_file(tmp_path, profile(name="a", share=0.7), profile(name="b", share=0.3)))
    population = DevicePopulation(fleet, 10_000, seed=3)
    assert 0.67 < np.mean(population.profile_of == 0) < 0.73
    assert np.array_equal(population.profile_of, DevicePopulation(fleet, 10_000, seed=3).profile_of)
    assert not np.array_equal(population.profile_of, DevicePopulation(fleet, 10_000, seed=4).profile_of)
    assert population.profile(1).name == "ab"[population.profile_of[0]]


def test_only_online_clients_are_offered_for_sampling(tmp_path, inner):
    fleet = load_profiles(fleet_file(tmp_path, profile(availability=0.3)))
    grid = DeviceGrid(inner, DevicePopulation(fleet, 200, 0), seed=0, local_epochs=2)
    first, second = grid.get_node_ids(), grid.get_node_ids()
    assert 30 < len(first) < 90 and first != second  # a fresh draw per moment
    again = DeviceGrid(inner, DevicePopulation(fleet, 200, 0), seed=0, local_epochs=2)
    assert again.get_node_ids() == first
    assert DeviceGrid(inner, None, seed=0, local_epochs=2).get_node_ids() == list(range(1, 201))


def test_the_clock_adds_downlink_compute_and_uplink_time(tmp_path, inner):
    fleet = load_profiles(fleet_file(tmp_path, profile(compute_speed=0.5, uplink_mbps=2.0, downlink_mbps=4.0)))
    grid = DeviceGrid(inner, DevicePopulation(fleet, 200, 0), seed=0, local_epochs=2)
    messages, replies = train_round(grid, [3, 9])
    assert not any(r.has_error() for r in replies)
    down = wire_bytes(messages[0].content["arrays"]) / (4e6 / 8)
    compute = EXAMPLES * 2 / (100 * 0.5)
    up = wire_bytes(UPLINK) / (2e6 / 8)
    assert grid.rounds[1].seconds == pytest.approx(down + compute + up)
    assert grid.rounds[1].compute_seconds == pytest.approx(compute)  # the bound no codec can beat
    train_round(grid, [4], server_round=2)
    fields = grid.record_fields(2)
    assert fields["simulated_seconds"] == pytest.approx(grid.rounds[1].seconds + grid.rounds[2].seconds)
    assert fields["simulated_compute_seconds"] == pytest.approx(2 * compute)


def test_stragglers_miss_the_deadline_and_the_round_keeps_the_rest(tmp_path):
    slow, fast = profile(name="slow", uplink_mbps=0.001), profile(name="fast", uplink_mbps=100.0)
    fleet = load_profiles(fleet_file(tmp_path, slow, fast))
    population = DevicePopulation(fleet, 200, 0)
    grid = DeviceGrid(InProcessGrid(stub, 200, {}), population, seed=0, local_epochs=2, deadline_seconds=5.0)
    nodes = list(range(1, 21))
    _, replies = train_round(grid, nodes)
    late = [n for n in nodes if population.profile(n).name == "slow"]
    assert late and len(late) < len(nodes)
    assert [r.metadata.src_node_id for r in replies if r.has_error()] == late
    assert all(r.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE and "deadline" in r.error.reason
               for r in replies if r.has_error())
    assert grid.rounds[1].seconds == 5.0 and grid.record_fields(1)["stragglers"] == len(late)
    assert grid.rounds[1].compute_seconds == pytest.approx(EXAMPLES * 2 / 100)  # of the replies in time


def test_dropouts_never_reach_the_client_and_reply_node_unavailable(tmp_path):
    delivered = []
    inner = InProcessGrid(stub, 200, {})
    deliver = inner.deliver
    inner.deliver = lambda message: delivered.append(message.metadata.dst_node_id) or deliver(message)
    fleet = load_profiles(fleet_file(tmp_path, profile(dropout=0.5)))
    grid = DeviceGrid(inner, DevicePopulation(fleet, 200, 0), seed=0, local_epochs=2,
                      log_path=tmp_path / "log.jsonl")
    nodes = list(range(1, 41))
    _, replies = train_round(grid, nodes)
    dropped = [r.metadata.src_node_id for r in replies if r.has_error()]
    assert 5 < len(dropped) < 35
    assert sorted(delivered + dropped) == nodes
    assert all(r.error.code == ErrorCode.NODE_UNAVAILABLE for r in replies if r.has_error())
    assert grid.finish_round(1)["dropouts"] == len(dropped)
    logged = json.loads((tmp_path / "log.jsonl").read_text())
    assert logged["sampled"] == nodes and logged["dropouts"] == sorted(dropped)


def test_a_resumed_device_grid_goes_on_with_the_same_draws_and_clock(tmp_path):
    fleet = load_profiles(fleet_file(tmp_path, profile(availability=0.5, dropout=0.2)))

    def device_grid_at(log):
        return DeviceGrid(InProcessGrid(stub, 200, {}), DevicePopulation(fleet, 200, 0), seed=0, local_epochs=2,
                          log_path=log)

    def play(grid, rounds):
        seen = []
        for server_round in rounds:
            online = grid.get_node_ids()
            train_round(grid, online[:10], server_round)
            seen.append((online, grid.finish_round(server_round)))
        return seen

    whole = play(device_grid_at(tmp_path / "whole.jsonl"), [1, 2, 3, 4])
    log = tmp_path / "resumed.jsonl"
    play(device_grid_at(log), [1, 2, 3])  # killed during round 3: its line is written, its checkpoint is not
    resumed = device_grid_at(log)
    resumed.resume(2)
    assert [json.loads(line)["round"] for line in log.read_text().splitlines()] == [1, 2]
    assert play(resumed, [3, 4]) == whole[2:]
    assert log.read_text() == (tmp_path / "whole.jsonl").read_text()
    with pytest.raises(CheckpointError, match="round 7"):
        device_grid_at(log).resume(7)


def test_a_fleet_that_cannot_fill_a_round_is_refused(tmp_path, inner):
    path = fleet_file(tmp_path, profile(availability=0.01))
    with pytest.raises(ConfigError, match="clients_per_round"):
        device_grid(inner, 200, 0, str(path), 0.0, min_online=10, local_epochs=2)


def test_a_heterogeneous_federation_aggregates_what_came_back_in_time(tmp_path):
    fleet = fleet_file(tmp_path, profile(name="slow", share=0.3, compute_speed=0.05, availability=0.8),
                       profile(name="fast", share=0.7, uplink_mbps=50.0, availability=0.8, dropout=0.2))
    config = load_config(TINY, [f"simulation.devices={fleet}", "simulation.deadline_seconds=30",
                                "federation.rounds=2", "federation.num_clients=20"])
    folder, records = simulate(config, RunFolder(tmp_path / "run"))
    participants = [json.loads(line) for line in folder.participants.read_text().splitlines()]
    assert records[0].simulated_seconds == 0.0
    for entry, seen in zip(records[1:], participants):
        assert len(seen["sampled"]) == config.federation.clients_per_round  # Flower's minimum held
        assert entry.clients == len(seen["sampled"]) - entry.dropouts - entry.stragglers - entry.rejected
        assert entry.failed == entry.dropouts + entry.stragglers
        assert 0 < entry.simulated_round_seconds <= 30
    assert sum(r.stragglers for r in records) > 0 and sum(r.dropouts for r in records) > 0
    clock = [r.simulated_seconds for r in records]
    assert clock == sorted(clock) and clock[-1] == pytest.approx(sum(r.simulated_round_seconds for r in records[1:]))
    _, again = simulate(config, RunFolder(tmp_path / "again"))
    assert [r.simulated_seconds for r in again] == clock  # the same seed, the same fleet and clock


def test_evaluate_messages_and_the_run_pass_straight_through(inner):
    grid = DeviceGrid(inner, None, seed=0, local_epochs=2)
    assert grid.run is inner.run
    message = grid.create_message(RecordDict(), "evaluate", 5, "1")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and "evaluate" in reply.error.reason  # the stub only trains
    assert grid.rounds == {}


seen_configs = []
recorder = ClientApp()


@recorder.train()
def record_the_round_config(msg: Message, context: Context) -> Message:
    seen_configs.append((msg.metadata.dst_node_id, dict(msg.content["config"])))
    return reply_with_fixed_payload(msg, context)


def test_with_a_deadline_each_message_tells_its_device_the_deadline_and_its_own_link(tmp_path):
    from pollen.client.deadline import DEADLINE, DOWNLINK_SECONDS, TRAINING_RATE, UPLINK_RATE

    fleet = load_profiles(fleet_file(tmp_path, profile(name="slow", share=0.5, compute_speed=0.5, uplink_mbps=2.0),
                                     profile(name="fast", share=0.5, downlink_mbps=80.0)))
    population = DevicePopulation(fleet, 200, 0)
    for deadline in (0.0, 30.0):
        seen_configs.clear()
        grid = DeviceGrid(InProcessGrid(recorder, 200, {}), population, seed=0, local_epochs=2,
                          deadline_seconds=deadline)
        messages, _ = train_round(grid, [1, 2, 3, 4])
        if not deadline:
            assert seen_configs and all(DEADLINE not in config for _, config in seen_configs)
            continue
        down = wire_bytes(messages[0].content["arrays"])
        for node, config in seen_configs:
            kind = population.profile(node)
            assert config == pytest.approx({
                "server-round": 1, DEADLINE: 30.0, DOWNLINK_SECONDS: down / (kind.downlink_mbps * 1e6 / 8),
                UPLINK_RATE: kind.uplink_mbps * 1e6 / 8, TRAINING_RATE: 100.0 * kind.compute_speed})
        assert len(seen_configs) == 4 and len({c[UPLINK_RATE] for _, c in seen_configs}) == 2  # each its own link
