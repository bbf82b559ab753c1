import pytest

from pollen.codec import TopK, codec_from_config
from pollen.config import ConfigError, load_config, to_flat


def test_default_yaml_restates_the_built_in_defaults():
    assert load_config("simulations/configs/default.yaml") == load_config()


def test_codec_settings_reach_the_codec():
    config = load_config(overrides=["codec.bits=4", "codec.block=32", "codec.scope=model",
                                    "codec.stochastic=true", "codec.density=0.05", "codec.select=salience"])
    assert codec_from_config(to_flat(config)) == TopK(density=0.05, bits=4, block=32, scope="model",
                                                      stochastic=True, select="salience")


@pytest.mark.parametrize("override, named", [
    ("codec.bits=0", "codec.bits"),
    ("codec.scope=layer", "codec.scope"),
    ("codec.block=-1", "codec.block"),
    ("codec.select=random", "codec.select"),
    ("downlink.name=gzip", "downlink.name"),
    ("downlink.density=0", "downlink.density"),
    ("downlink.bits=1", "downlink.bits"),
    ("downlink.rate=2", "downlink.rate"),
    ("train.lr=0", "train.lr"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.weight_decay=-1", "train.weight_decay"),
])
def test_bad_codec_downlink_and_train_settings_are_named(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(overrides=[override])


def test_sign_values_cannot_be_rounded_stochastically():
    with pytest.raises(ConfigError, match="codec.stochastic"):
        load_config(overrides=["codec.bits=1", "codec.stochastic=true"])
