"""Hostile simulated clients: who attacks, what each attack sends, and the default defences holding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollen.client.attacks import attack_of, attackers, flipped_labels, poisoned
from pollen.config import ConfigError, load_config
from pollen.run_folder import RunFolder
from pollen.simulations.run import simulate

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "simulations/configs/tiny.yaml"


def test_the_attackers_are_the_configured_share_drawn_once_from_the_seed():
    config = load_config(None, ["simulation.attack.fraction=0.2"])
    chosen = attackers(config)
    assert len(chosen) == 20 and chosen == attackers(config) and chosen <= set(range(100))
    assert attackers(load_config(None, ["simulation.attack.fraction=0.2", "seed=1"])) != chosen
    assert attack_of(config, {"partition-id": min(chosen)}) == "sign-flip"
    honest = next(i for i in range(100) if i not in chosen)
    assert attack_of(config, {"partition-id": honest}) is None
    assert attack_of(load_config(None), {"partition-id": 0}) is None


def test_each_attack_sends_what_it_says():
    update = {"a": np.array([1.0, -2.0], dtype=np.float32), "b": np.array([[2.0]], dtype=np.float32)}
    assert poisoned(update, "sign-flip", 10, 0)["a"].tolist() == [-1.0, 2.0]
    assert poisoned(update, "scale", 10, 0)["b"].tolist() == [[20.0]]
    noise = poisoned(update, "noise", 10, 0)
    norm = lambda u: np.sqrt(sum(np.square(v).sum() for v in u.values()))  # noqa: E731
    assert norm(noise) == pytest.approx(norm(update), rel=1e-5) and not np.allclose(noise["a"], update["a"])
    assert poisoned(update, "weight", 10, 0) is update
    assert flipped_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]


@pytest.mark.parametrize("kind", ["scale", "weight", "sign-flip"])
def test_the_default_checks_turn_away_scaled_overweight_and_sign_flipping_attackers(tmp_path, kind):
    config = load_config(TINY, ["federation.rounds=2", "federation.num_clients=10", "federation.clients_per_round=10",
                                "train.local_epochs=1", "data.test_size=200", "simulation.attack.fraction=0.2",
                                f"simulation.attack.kind={kind}"])
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    names = {f"partition {p}" for p in attackers(config)}
    for record in records[1:]:
        refused = {item["client"]: item["reason"] for item in record.rejected_updates}
        assert names <= set(refused)
        # an honest client whose label-skewed data points against the rest may be turned away too
        honest = [reason for client, reason in refused.items() if client not in names]
        assert len(honest) <= 1 and all("direction opposes" in reason for reason in honest)
        assert record.clients == 8 - len(honest)
        assert all(np.isfinite(record.accuracy) for record in records)


def test_a_bad_attack_setting_is_named():
    for override in ("simulation.attack.fraction=1.5", "simulation.attack.kind=bribe", "simulation.attack.scale=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [override])
