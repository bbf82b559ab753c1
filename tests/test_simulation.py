import dataclasses
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import app as client_app
from client.error_feedback import ErrorFeedback
from pollen.codec import TopK, codec_to_config, decode, layout_of
from pollen.config import load_config, to_flat
from pollen.models import initial_arrays
from server.records import read_records
from simulations.inprocess import InProcessGrid
from simulations.run import PLOT, simulate

TINY = "simulations/configs/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_config(TINY)
    folder, records = simulate(config, tmp_path_factory.mktemp("tiny"))
    return config, folder, records


def test_tiny_federation_learns(tiny_run):
    config, _, records = tiny_run
    assert [r.round for r in records] == list(range(config.federation.rounds + 1))
    assert records[-1].accuracy > records[0].accuracy + 0.15
    assert records[-1].loss < records[0].loss


def test_run_record_plot_and_checkpoint_are_written(tiny_run):
    config, folder, records = tiny_run
    assert read_records(folder) == records
    lines = (folder / "rounds.jsonl").read_text().splitlines()
    assert all("uplink_bytes" in json.loads(line) for line in lines)
    assert (folder / PLOT).read_bytes()[:4] == b"\x89PNG"
    assert (folder / "checkpoint.pt").stat().st_size > 0
    for entry in records[1:]:
        assert entry.clients == config.federation.clients_per_round
        assert entry.uplink_bytes < entry.dense_uplink_bytes
        assert entry.compression > 1 and entry.downlink_bytes > 0


def test_same_seed_same_run(tiny_run, tmp_path):
    config, _, records = tiny_run
    _, again = simulate(config, tmp_path)
    assert [r.accuracy for r in again] == [r.accuracy for r in records]
    assert [r.uplink_bytes for r in again] == [r.uplink_bytes for r in records]


def train_message(grid, config, codec):
    arrays = ArrayRecord({k: Array(v) for k, v in initial_arrays(config.model, 10, config.seed).items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({
        "lr": 0.01, "local-epochs": 1, "batch-size": 16, "server-round": 1, **codec_to_config(codec)})})
    return arrays, grid.create_message(content, "train", 1, "1")


def test_client_replies_with_a_decodable_update_and_keeps_its_residual():
    config = load_config(TINY)
    grid = InProcessGrid(client_app, 3, to_flat(config))
    codec = TopK(density=0.05)
    arrays, message = train_message(grid, config, codec)
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error()
    assert reply.metadata.src_node_id == 1
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["encoded-bytes"] < metrics["dense-bytes"]
    sent = decode(reply.content["arrays"], layout_of(arrays), codec)
    residual = ErrorFeedback(grid.context(1).state).residual()
    assert set(residual) == set(sent)
    assert any(np.abs(r).sum() > 0 for r in residual.values())
    assert 2 not in grid.contexts  # contexts exist only for nodes that were addressed


def test_a_failing_client_becomes_an_error_reply_and_the_round_goes_on(tmp_path):
    config = load_config(TINY)
    grid = InProcessGrid(client_app, 3, to_flat(config))
    grid.context(2).node_config["partition-id"] = 99  # this node's data does not exist
    _, good = train_message(grid, config, TopK())
    _, bad = train_message(grid, config, TopK())
    bad.metadata.dst_node_id = 2
    replies = grid.send_and_receive([good, bad])
    assert [r.has_error() for r in replies] == [False, True]
    assert "partition-id 99" in replies[1].error.reason


def test_pretrained_efficientnet_federation_runs_two_rounds(tmp_path):
    config = load_config(overrides=[
        "model.image_size=32", "data.test_size=200", "federation.num_clients=20",
        "federation.clients_per_round=2", "federation.rounds=2", "codec.density=0.05",
    ])
    _, records = simulate(config, tmp_path)
    assert len(records) == 3
    assert all(r.clients == 2 and r.compression > 10 for r in records[1:])
    assert records[-1].loss < records[0].loss
