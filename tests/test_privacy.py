"""Client-level differential privacy: clipped, noised updates and the epsilon spent, round by round."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.config import ConfigError, FederationConfig, PrivacyConfig, load_config
from pollen.privacy import epsilon, privatized
from pollen.run_folder import RunFolder
from pollen.simulations.run import simulate

pytestmark = pytest.mark.usefixtures("one_thread")


def update(scale):
    return {"a": np.full((100,), scale, dtype=np.float32), "b": np.full((3, 3), -scale, dtype=np.float32)}


def test_off_leaves_the_update_as_it_is():
    original = update(5.0)
    assert privatized(original, PrivacyConfig(), seed=0) is original


def test_a_large_update_is_clipped_to_the_norm_and_noised_around_it():
    settings = PrivacyConfig(noise_multiplier=1e-6, clip_norm=2.0)
    out = privatized(update(5.0), settings, seed=0)
    norm = np.sqrt(sum(np.square(a).sum() for a in out.values()))
    assert norm == pytest.approx(2.0, rel=1e-4) and out["a"].dtype == np.float32
    small = privatized(update(1e-3), settings, seed=0)  # within the norm: not scaled
    assert np.allclose(small["a"], 1e-3, atol=1e-5)


def test_the_noise_has_the_configured_spread_and_is_seeded():
    settings = PrivacyConfig(noise_multiplier=0.5, clip_norm=2.0)
    zeros = {"a": np.zeros(200_000, dtype=np.float32)}
    noise = privatized(zeros, settings, seed=3)["a"]
    assert noise.std() == pytest.approx(1.0, rel=0.01)  # sigma x C
    assert np.array_equal(noise, privatized(zeros, settings, seed=3)["a"])
    assert not np.array_equal(noise, privatized(zeros, settings, seed=4)["a"])


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    fed = FederationConfig(num_clients=100, clients_per_round=10)
    loud, quiet = PrivacyConfig(noise_multiplier=2.0), PrivacyConfig(noise_multiplier=0.8)
    assert epsilon(PrivacyConfig(), fed, 10) is None and epsilon(loud, fed, 0) == 0.0
    assert 0 < epsilon(loud, fed, 5) < epsilon(loud, fed, 20) < epsilon(quiet, fed, 20)
    everyone = FederationConfig(num_clients=10, clients_per_round=10)
    assert epsilon(loud, everyone, 20) > epsilon(loud, fed, 20)  # no amplification by sampling
    over = FederationConfig(num_clients=100, clients_per_round=10, over_select=1.5)
    assert epsilon(loud, over, 20) == epsilon(loud, FederationConfig(num_clients=100, clients_per_round=15), 20)


def test_a_private_run_records_the_epsilon_spent_each_round(tmp_path):
    config = load_config("simulations/configs/tiny.yaml", [
        "federation.rounds=2", "federation.num_clients=4", "federation.clients_per_round=2", "train.local_epochs=1",
        "data.test_size=200", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5"])
    _, records = simulate(config, RunFolder(tmp_path / "run"))
    assert records[0].epsilon is None or records[0].epsilon == 0.0
    assert 0 < records[1].epsilon < records[2].epsilon
    assert records[2].epsilon == pytest.approx(epsilon(config.privacy, config.federation, 2))


def test_bad_privacy_settings_are_named():
    for override in ("privacy.noise_multiplier=-1", "privacy.clip_norm=0", "privacy.delta=1"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [override])


def test_epsilon_is_at_most_opacus_default_bound_and_tighter_at_low_noise():
    from opacus.accountants import RDPAccountant

    fed = FederationConfig(num_clients=100, clients_per_round=10)
    for sigma, tighter in ((0.1, True), (0.3, True), (1.0, False)):
        default = RDPAccountant()
        default.history = [(sigma, 0.1, 20)]
        ours = epsilon(PrivacyConfig(noise_multiplier=sigma), fed, 20)
        assert ours <= default.get_epsilon(1e-5)
        assert (ours < 0.99 * default.get_epsilon(1e-5)) == tighter
