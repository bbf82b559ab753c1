import dataclasses
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from pollen.flower_internals import ErrorCode

from pollen.client.app import app as client_app
from pollen.client.error_feedback import ErrorFeedback
from pollen.codec import decode, layout_of
from pollen.config import load_config, run_config_of
from pollen.data import num_classes
from pollen.partitions import sampled_partition
from pollen.models import initial_arrays
from pollen.run_folder import RunFolder
from pollen.simulations.client_state import SpilledStates, client_states
from pollen.simulations.inprocess import InProcessGrid
from pollen.simulations.federation import simulated_federation
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_config(TINY)
    folder, records = simulate(config, RunFolder(tmp_path_factory.mktemp("tiny")))
    return config, folder, records


def test_tiny_federation_learns(tiny_run):
    config, _, records = tiny_run
    assert [r.round for r in records] == list(range(config.federation.rounds + 1))
    assert records[-1].accuracy > records[0].accuracy + 0.15
    assert records[-1].loss < records[0].loss


def test_run_record_plot_and_checkpoint_are_written(tiny_run):
    config, folder, records = tiny_run
    assert folder.records() == records
    lines = (folder.path / "rounds.jsonl").read_text().splitlines()
    assert all("uplink_bytes" in json.loads(line) for line in lines)
    assert (folder.path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder.path / "checkpoint.pt").stat().st_size > 0
    assert load_config(folder.path / "config.yaml") == config
    for entry in records[1:]:
        assert entry.clients == config.federation.clients_per_round
        assert entry.uplink_bytes < entry.dense_uplink_bytes
        assert entry.compression > 1 and entry.downlink_bytes > 0


def test_same_seed_same_run(tiny_run, tmp_path):
    config, _, records = tiny_run
    _, again = simulate(config, RunFolder(tmp_path))
    assert [r.accuracy for r in again] == [r.accuracy for r in records]
    assert [r.uplink_bytes for r in again] == [r.uplink_bytes for r in records]


def test_a_budgeted_downlink_learns_and_every_client_rebuilds_the_capped_model(tiny_run, tmp_path):
    config, _, records = tiny_run
    budgeted = load_config(TINY, ["downlink.budget=0.2", "downlink.bits=4"])
    _, capped = simulate(budgeted, RunFolder(tmp_path))
    assert all(entry.failed == 0 and entry.clients == config.federation.clients_per_round for entry in capped[1:])
    assert capped[-1].accuracy > capped[0].accuracy + 0.15
    assert sum(r.downlink_bytes for r in capped) < 0.6 * sum(r.downlink_bytes for r in records)


def test_the_train_settings_reach_every_client_training(monkeypatch, tmp_path):
    import pollen.client.app
    seen = []
    real = pollen.client.app.train_locally

    def spy(model, data, settings, **kwargs):
        seen.append(settings)
        return real(model, data, settings, **kwargs)

    monkeypatch.setattr(pollen.client.app, "train_locally", spy)
    config = load_config(TINY, ["federation.rounds=1", "train.lr=0.02", "train.batch_size=8",
                                "train.adam_eps=0.05", "train.local_epochs=3", "train.weight_decay=0.01"])
    simulate(config, RunFolder(tmp_path))
    assert seen == [config.train] * config.federation.clients_per_round


def test_train_messages_carry_only_what_changes_per_round(tmp_path):
    config = load_config(TINY, ["federation.rounds=1", "federation.strategy=fedprox", "strategy.proximal_mu=0.1"])
    grid = InProcessGrid(client_app, config.federation.num_clients, run_config_of(config))
    sent = []
    deliver = grid.deliver
    grid.deliver = lambda message: sent.append(message.content["config"]) or deliver(message)
    simulated_federation(grid, config, RunFolder(tmp_path))
    keys = {key for record in sent for key in record}
    assert "server-round" in keys and "proximal-mu" in keys
    assert not keys & {"lr", "local-epochs", "batch-size", "adam-eps", "weight-decay", "codec.name"}
    assert keys <= {"server-round", "proximal-mu", "downlink.kind", "downlink.base", "downlink.version",
                    "downlink.base-crc"}


def train_message(grid, config, server_round=1):
    arrays = ArrayRecord({k: Array(v) for k, v in initial_arrays(config.model, num_classes(config.data),
                                                                 config.seed).items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return arrays, grid.create_message(content, "train", 1, "1")


@pytest.mark.parametrize("select", ["magnitude", "salience"])
def test_client_replies_with_a_decodable_update_and_keeps_its_residual(select):
    config = load_config(TINY, ["codec.density=0.05", f"codec.select={select}", "downlink.name=identity"])
    grid = InProcessGrid(client_app, 3, run_config_of(config))
    codec = config.codec.build()
    arrays, message = train_message(grid, config)
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error()
    assert reply.metadata.src_node_id == 1
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["encoded-bytes"] < metrics["dense-bytes"]
    sent = decode(reply.content["arrays"], layout_of(arrays), codec)
    residual = ErrorFeedback(grid.context(1).state).residual()
    assert set(residual) == set(sent)
    assert any(np.abs(r).sum() > 0 for r in residual.values())
    assert 1 in grid.states and 2 not in grid.states  # state only for nodes that were addressed


def test_a_failing_client_becomes_an_error_reply_and_the_round_goes_on(tmp_path):
    config = load_config(TINY, ["downlink.name=identity"])
    grid = InProcessGrid(client_app, 3, run_config_of(config))
    _, good = train_message(grid, config)
    _, bad = train_message(grid, config)
    bad.content["arrays"] = ArrayRecord({"nonsense": Array(np.zeros(3, np.float32))})  # cannot be loaded
    _, absent = train_message(grid, config)
    absent.metadata.dst_node_id = 4  # no such node
    replies = grid.send_and_receive([good, bad, absent])
    assert [r.has_error() for r in replies] == [False, True, True]
    assert "nonsense" in replies[1].error.reason
    assert replies[2].error.code == ErrorCode.NODE_UNAVAILABLE and "4" in replies[2].error.reason


def test_spilled_client_state_comes_back_bit_exact_and_leaves_nothing_behind():
    config = load_config(TINY, ["codec.density=0.05", "downlink.name=identity"])
    in_memory = InProcessGrid(client_app, 3, run_config_of(config))
    states = SpilledStates()
    spilled = InProcessGrid(client_app, 3, run_config_of(config), states)
    for round_number in (1, 2):  # the second round adds the first round's residual
        for grid in (in_memory, spilled):
            _, message = train_message(grid, config, round_number)
            (reply,) = grid.send_and_receive([message])
            assert not reply.has_error()
        kept = ErrorFeedback(in_memory.context(1).state).residual()
        restored = ErrorFeedback(spilled.context(1).state).residual()
        assert all(np.array_equal(kept[name], restored[name]) for name in kept)
    assert 1 in states and 2 not in states and states.bytes_on_disk() > 0
    spilled.close()
    assert not states.folder.exists()


def test_any_record_kept_in_context_state_survives_a_spill():
    states = SpilledStates()
    copy = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    state = RecordDict({"global-copy": ArrayRecord({"w": Array(copy), "b": Array(np.arange(4, dtype=np.int64))}),
                        "downlink": ConfigRecord({"version": 12})})
    states.save(5, state)
    back = states.load(5)
    assert np.array_equal(back["global-copy"]["w"].numpy(), copy)
    assert back["global-copy"]["b"].numpy().dtype == np.int64
    assert back["downlink"]["version"] == 12
    states.save(5, RecordDict())  # nothing left to keep: nothing stored
    assert 5 not in states and len(states.load(5)) == 0
    states.close()


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_large_population_keeps_state_only_for_sampled_clients(kind, tmp_path):
    config = load_config(TINY, [
        "federation.num_clients=2000", "federation.clients_per_round=3", "federation.rounds=2",
        "data.partition=sampled", "data.min_partition_size=12", f"simulation.client_state={kind}",
    ])
    states = client_states(kind)
    grid = InProcessGrid(client_app, config.federation.num_clients, run_config_of(config), states)
    records = simulated_federation(grid, config, RunFolder(tmp_path))
    participants = [json.loads(line) for line in (tmp_path / "participants.jsonl").read_text().splitlines()]
    sampled = {node for entry in participants for node in entry["sampled"]}
    assert [len(entry["sampled"]) for entry in participants] == [3, 3]
    assert all(r.clients == 3 for r in records[1:])
    assert {node for node in range(1, 2001) if node in states} == sampled
    grid.close()


def test_the_sampled_partition_gives_every_client_its_own_skewed_share():
    labels = np.repeat(np.arange(10), 40)
    shares = sampled_partition(labels, 5000, 0.3, seed=1, size=8)
    assert len(shares) == 5000 and all(len(s) == 8 for s in shares)
    assert sampled_partition(labels, 5000, 0.3, seed=1, size=8)[17].tolist() == shares[17].tolist()
    assert np.mean([len(np.unique(labels[s])) for s in shares]) < 5  # label skew, not IID


def test_pretrained_efficientnet_federation_runs_two_rounds(tmp_path):
    config = load_config(overrides=[
        "model.image_size=32", "data.test_size=200", "federation.num_clients=20",
        "federation.clients_per_round=2", "federation.rounds=2", "codec.density=0.05",
    ])
    _, records = simulate(config, RunFolder(tmp_path))
    assert len(records) == 3
    assert all(r.clients == 2 and r.compression > 10 for r in records[1:])
    assert records[-1].loss < records[0].loss
