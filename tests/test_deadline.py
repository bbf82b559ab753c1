import dataclasses

import numpy as np
import pytest

from pollen.client.deadline import (DEADLINE, DOWNLINK_SECONDS, TRAINING_RATE, UPLINK_RATE, fitted_payload,
                                    uplink_budget)
from pollen.codec import TopK, decode, encode, layout_of, wire_bytes
from pollen.config import ConfigError, load_config
from pollen.run_folder import RunFolder
from pollen.simulations.run import simulate

TINY = "simulations/configs/tiny.yaml"
LINK = {DEADLINE: 10.0, DOWNLINK_SECONDS: 1.0, UPLINK_RATE: 1000.0, TRAINING_RATE: 50.0}


def update():
    rng = np.random.default_rng(0)
    return {"conv": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
            "head": rng.normal(size=(10, 512)).astype(np.float32)}


def test_the_budget_is_the_uplink_rate_times_the_time_left_after_downlink_and_training():
    assert uplink_budget(LINK, examples=200) == pytest.approx((10.0 - 1.0 - 200 / 50.0) * 1000.0)
    assert uplink_budget(LINK, examples=1000) == 0.0  # training alone runs past the deadline
    assert uplink_budget({k: v for k, v in LINK.items() if k != DEADLINE}, examples=200) is None


def test_without_a_budget_or_within_it_the_codec_is_kept():
    codec = TopK(density=0.05)
    full = encode(update(), codec)
    for budget in (None, wire_bytes(full)):
        fitted, payload = fitted_payload(update(), codec, budget, 0.001)
        assert fitted == codec and payload == full


def test_a_tight_budget_gets_the_largest_density_that_fits():
    codec, arrays = TopK(density=0.05), update()
    budget = (wire_bytes(encode(arrays, codec)) + wire_bytes(encode(arrays, TopK(density=0.001)))) / 2
    fitted, payload = fitted_payload(arrays, codec, budget, 0.001)
    assert 0.001 < fitted.density < codec.density and wire_bytes(payload) <= budget
    denser = dataclasses.replace(fitted, density=fitted.density * 1.05)
    assert wire_bytes(encode(arrays, denser)) > budget  # within the search's 1% of the best
    assert payload == encode(arrays, fitted)
    # The server decodes it with its own codec, whose density is only an upper bound.
    decoded = decode(payload, layout_of(arrays), codec)
    assert sum(np.count_nonzero(v) for v in decoded.values()) < codec.max_kept([v.size for v in arrays.values()])


def test_when_nothing_fits_the_lowest_density_is_sent():
    fitted, payload = fitted_payload(update(), TopK(density=0.05), 10.0, 0.002)
    assert fitted.density == 0.002 and payload == encode(update(), fitted)


def test_fit_deadline_needs_a_deadline_on_devices_and_a_top_k_codec(tmp_path):
    with pytest.raises(ConfigError, match="codec.fit_deadline: needs simulation.devices"):
        load_config(TINY, ["codec.fit_deadline=true"])
    with pytest.raises(ConfigError, match="codec.min_density"):
        load_config(TINY, ["codec.min_density=0"])
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("examples_per_second: 100\nprofiles:\n  - {name: a, share: 1, compute_speed: 1, "
                     "uplink_mbps: 1, downlink_mbps: 1}\n")
    with pytest.raises(ConfigError, match="codec.fit_deadline: needs codec.name=topk"):
        load_config(TINY, ["codec.fit_deadline=true", "codec.name=identity", f"simulation.devices={fleet}",
                           "simulation.deadline_seconds=10"])


def test_slow_uplinks_that_miss_the_deadline_at_a_fixed_density_make_it_when_they_fit_it(tmp_path):
    # Training and downlink are near instant; the uplink carries 60 bytes a second for 10 s:
    # a tiny update at 10% (about 780 bytes) misses, one at a lower density fits.
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("examples_per_second: 1000000\nprofiles:\n  - {name: slow, share: 1, compute_speed: 1, "
                     "uplink_mbps: 0.00048, downlink_mbps: 1000}\n")
    base = ["federation.rounds=2", f"simulation.devices={fleet}", "simulation.deadline_seconds=10"]
    _, fixed = simulate(load_config(TINY, base), RunFolder(tmp_path / "fixed"))
    assert all(r.clients == 0 and r.stragglers == 5 for r in fixed[1:])
    _, fitted = simulate(load_config(TINY, base + ["codec.fit_deadline=true"]), RunFolder(tmp_path / "fitted"))
    assert all(r.clients == 5 and r.stragglers == 0 and r.rejected == 0 for r in fitted[1:])
    assert all(r.uplink_bytes <= 5 * 600 for r in fitted[1:])
    assert fitted[-1].accuracy != fitted[0].accuracy  # the fitted updates were aggregated
