import pytest

from pollen.codec import Identity, TopK
from pollen.config import (Config, ConfigError, config_from_run_config, differences, load_config, run_config_of,
                           save_config, to_dict)


def test_default_yaml_restates_the_built_in_defaults():
    assert load_config("simulations/configs/default.yaml") == load_config()


def test_codec_settings_reach_the_codec():
    config = load_config(overrides=["codec.bits=4", "codec.block=32", "codec.scope=model",
                                    "codec.stochastic=true", "codec.density=0.05", "codec.select=salience"])
    assert config.codec.build() == TopK(density=0.05, bits=4, block=32, scope="model",
                                        stochastic=True, select="salience")
    assert load_config(overrides=["codec.name=identity"]).codec.build() == Identity()
    assert load_config(overrides=["downlink.density=0.1", "downlink.bits=4"]).downlink.build() == \
        TopK(density=0.1, bits=4)
    assert load_config(overrides=["downlink.name=identity"]).downlink.build() is None


def test_a_config_survives_its_yaml_file_and_flowers_run_config(tmp_path):
    config = load_config(overrides=["federation.rounds=3", "strategy.eta=0.01", "strategy.tau=0.001",
                                    "federation.strategy=fedadam", "codec.stochastic=true"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    flat = run_config_of(config)
    assert all(isinstance(value, (str, int, float, bool)) for value in flat.values())
    assert flat["federation.rounds"] == 3 and flat["strategy"] == "{eta: 0.01, tau: 0.001}"
    assert config_from_run_config(flat) == config
    assert config_from_run_config({"federation.rounds": 3}) == load_config(overrides=["federation.rounds=3"])
    assert to_dict(Config())["strategy"] == {}


def test_differences_name_the_keys_that_differ():
    base = load_config()
    other = load_config(overrides=["train.lr=0.5", "strategy.eta=0.1"])
    assert differences(base, other) == ["strategy", "train.lr"]
    assert differences(base, load_config()) == []


@pytest.mark.parametrize("run_config, named", [
    ({"federation.roundz": 3}, "federation.roundz"),
    ({"strategy": "{eta: [1, 2]}"}, "strategy.eta"),
    ({"strategy": "{eta: 0.1"}, "strategy"),
])
def test_a_bad_flower_run_config_is_named(run_config, named):
    with pytest.raises(ConfigError, match=named):
        config_from_run_config(run_config)


@pytest.mark.parametrize("override, named", [
    ("codec.name=gzip", "codec.name"),
    ("codec.bits=0", "codec.bits"),
    ("codec.scope=layer", "codec.scope"),
    ("codec.block=-1", "codec.block"),
    ("codec.select=random", "codec.select"),
    ("downlink.name=gzip", "downlink.name"),
    ("downlink.density=0", "downlink.density"),
    ("downlink.bits=1", "downlink.bits"),
    ("downlink.budget=0", "downlink.budget"),
    ("downlink.budget=1.5", "downlink.budget"),
    ("downlink.rate=2", "downlink.rate"),
    ("train.lr=0", "train.lr"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("simulation.client_timeout_seconds=-1", "simulation.client_timeout_seconds"),
    ("federation.over_select=0.5", "federation.over_select"),
])
def test_bad_codec_downlink_and_train_settings_are_named(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("federation.roundz=3", "federation.roundz: unknown key in --set; did you mean federation.rounds?"),
    ("rounds=3", "rounds: unknown key in --set; did you mean federation.rounds?"),  # in the wrong section
    ("density=0.1", "density: unknown key in --set; did you mean codec.density or downlink.density?"),
    ("model.lora.alpah=4", "model.lora.alpah: unknown key in --set; did you mean model.lora.alpha?"),
    ("federation={round: 3}", "federation.round: unknown key in --set; did you mean federation.rounds?"),
    ("train.zzz=1", "train.zzz: unknown key in --set; known in train: "),  # nothing near: the section's keys
])
def test_an_unknown_key_names_the_nearest_known_ones(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value).startswith(message)
    assert len(str(error.value)) < 400  # not the whole list of keys


def test_an_unknown_key_in_a_file_names_the_file_and_in_flowers_run_config_only_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  round: 3\n")
    with pytest.raises(ConfigError, match=f"^federation.round: unknown key in {path}; did you mean federation.rounds"):
        load_config(path)
    with pytest.raises(ConfigError, match="^federation.round: unknown key; did you mean federation.rounds"):
        config_from_run_config({"federation.round": 3})


def test_sign_values_cannot_be_rounded_stochastically():
    with pytest.raises(ConfigError, match="codec.stochastic"):
        load_config(overrides=["codec.bits=1", "codec.stochastic=true"])


def test_a_config_file_that_is_not_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_size: [16\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line 4, column 1: expected ',' or ']'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set 'train.lr=\{': the value is not valid YAML"):
        load_config(overrides=["train.lr={"])

