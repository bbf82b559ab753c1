"""Over-selection: a round samples more clients when earlier rounds lost some, within its cap."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg

from pollen.cli import main
from pollen.config import FederationConfig, load_config
from pollen.run_folder import RunFolder
from pollen.server.checkpoint import load_checkpoint
from pollen.server.over_selection import OverSelection

TINY = "simulations/configs/tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cap_is_over_select_times_clients_per_round_and_at_most_every_client():
    assert FederationConfig(clients_per_round=10).most_sampled == 10
    assert FederationConfig(clients_per_round=10, over_select=1.5).most_sampled == 15
    assert FederationConfig(clients_per_round=10, over_select=1.29).most_sampled == 12
    assert FederationConfig(num_clients=12, clients_per_round=10, over_select=2).most_sampled == 12


def test_a_round_samples_as_many_more_as_were_lost_so_far_within_the_cap():
    selection = OverSelection(per_round=10, most=15, num_clients=100)
    assert selection.sample_size() == 10  # nothing seen yet
    selection.count(sampled=10, counted=7)  # 30% lost: 10 / 0.7 = 14.3
    assert selection.sample_size() == 15
    selection.count(sampled=15, counted=15)  # 22 of 25 counted: 10 / 0.88 = 11.4
    assert selection.sample_size() == 12
    selection.count(sampled=12, counted=1)  # 23 of 37 counted: 16.1, capped
    assert selection.sample_size() == 15
    lost_all = OverSelection(per_round=10, most=15, num_clients=100)
    lost_all.count(sampled=10, counted=0)
    assert lost_all.sample_size() == 15
    nothing_lost = OverSelection(per_round=10, most=15, num_clients=100)
    nothing_lost.count(sampled=10, counted=10)
    assert nothing_lost.sample_size() == 10


@pytest.mark.parametrize("per_round, num_clients", [(10, 100), (29, 100), (7, 30), (3, 7)])
def test_flower_samples_exactly_the_size_asked_when_every_client_is_online(per_round, num_clients):
    selection = OverSelection(per_round, min(num_clients, 2 * per_round), num_clients)
    for counted in range(per_round, -1, -1):  # each loss asks for more, up to the cap
        selection.count(per_round, counted)
        strategy = FedAvg(fraction_train=per_round / num_clients, min_train_nodes=per_round)
        selection.configure(strategy)
        # what FedAvg.configure_train samples from `num_clients` nodes online
        assert max(int(num_clients * strategy.fraction_train), strategy.min_train_nodes) == selection.sample_size()


def test_off_leaves_the_strategy_sampling_as_configured():
    selection = OverSelection(per_round=10, most=10, num_clients=100)
    selection.count(sampled=10, counted=3)
    strategy = FedAvg(fraction_train=0.1, min_train_nodes=10)
    selection.configure(strategy)
    assert strategy.fraction_train == 0.1 and selection.sample_size() == 10


def test_with_failing_clients_later_rounds_sample_more_and_the_checkpoint_keeps_the_counts(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    overrides = ["federation.rounds=3", "simulation.devices=simulations/configs/devices-faulty.yaml",
                 "federation.over_select=2"]
    assert main(["simulate", TINY, "--threads", "1", "--output", str(tmp_path),
                 *[part for override in overrides for part in ("--set", override)]]) == 0
    assert "5 per round (up to 10 sampled)" in " ".join(capsys.readouterr().out.split())
    config, folder = load_config(TINY, overrides), RunFolder(tmp_path)
    records = folder.records()
    sampled = [r.clients + r.rejected + r.failed for r in records[1:]]
    per_round = config.federation.clients_per_round
    assert sampled[0] == per_round and records[1].failed > 0  # round 1 knows no losses yet
    assert all(per_round < n <= 2 * per_round for n in sampled[1:])
    selection = load_checkpoint(folder.checkpoint, config).selection
    assert (selection.sampled, selection.counted) == (sum(sampled), sum(r.clients for r in records[1:]))
