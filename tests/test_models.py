import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pollen.config import Config, ModelConfig
from pollen.data import load_dataset
from pollen.models import (
    build_model,
    initial_arrays,
    load_model,
    load_trainable,
    resident_bytes,
    trainable_arrays,
)
from pollen.quantize import Int8Weight, linear_maps

TINY = ModelConfig(name="tiny-cnn", trainable="lora", image_size=8)


def test_linear_maps_are_linears_and_pointwise_convs_only():
    names = linear_maps(build_model(dataclasses.replace(TINY, trainable="head", quantize="none"), 10))
    assert names == ["features.2", "features.6", "head"]  # 1x1 conv and linears, not the 3x3 conv


def test_int8_weight_stores_int8_and_reconstructs_within_half_a_step():
    layer = nn.Linear(64, 32)
    original = layer.weight.detach().clone()
    layer.weight.requires_grad_(False)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Int8Weight(), unsafe=True)
    stored, scale = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert stored.dtype == torch.int8 and scale.shape[0] == 32
    step = original.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((layer.weight - original).abs() <= step * 0.51 + 1e-7)


def test_trainable_parts_follow_the_mode():
    head = build_model(dataclasses.replace(TINY, trainable="head"), 10)
    lora = build_model(TINY, 10)
    full = build_model(dataclasses.replace(TINY, trainable="full", quantize="none"), 10)
    assert set(trainable_arrays(head)) == {"head.weight", "head.bias"}
    lora_names = set(trainable_arrays(lora))
    assert {"head.weight", "head.bias"} < lora_names
    assert all("lora_" in n or n.startswith("head.") for n in lora_names)
    assert len(trainable_arrays(full)) == len(list(full.parameters()))


def test_frozen_a_trains_b_only_from_the_same_seeded_a():
    from pollen.client.training import train_locally
    from pollen.config import TrainConfig
    from pollen.data import Split

    frozen_a = build_model(dataclasses.replace(TINY, lora=dataclasses.replace(TINY.lora, train_a=False)), 10, seed=3)
    names = set(trainable_arrays(frozen_a))
    assert not any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert {"head.weight", "head.bias"} < names
    a_of = lambda model: {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    before = a_of(frozen_a)
    assert before and all(torch.equal(before[n], a) for n, a in a_of(build_model(TINY, 10, seed=3)).items())
    b_before = trainable_arrays(frozen_a)
    data = Split(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    train_locally(frozen_a, data, TrainConfig(local_epochs=2, batch_size=8, lr=0.05))
    assert all(torch.equal(before[n], a) for n, a in a_of(frozen_a).items())  # A: shared by all, never moves
    b_after = trainable_arrays(frozen_a)
    assert any(not np.array_equal(b_before[n], b_after[n]) for n in names if "lora_B" in n)


def test_initial_trainable_arrays_depend_on_seed_but_base_does_not():
    a, b, c = (build_model(TINY, 10, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(trainable_arrays(a).values(), trainable_arrays(b).values()))
    assert not np.array_equal(trainable_arrays(a)["head.weight"], trainable_arrays(c)["head.weight"])
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(a.features(x), c.features(x))


def test_load_trainable_round_trip_and_rejects_mismatch():
    model = build_model(TINY, 10)
    arrays = {k: np.full_like(v, 0.5) for k, v in trainable_arrays(model).items()}
    load_trainable(model, arrays)
    assert all(np.all(v == 0.5) for v in trainable_arrays(model).values())
    with pytest.raises(ValueError, match="missing"):
        load_trainable(model, {"head.weight": arrays["head.weight"]})
    bad = dict(arrays, **{"head.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_trainable(model, bad)


def test_load_model_is_cached_per_process():
    assert load_model(TINY, 10) is load_model(TINY, 10)


def test_initial_arrays_survive_changes_to_the_cached_model():
    before = initial_arrays(TINY, 10, seed=0)
    model = load_model(TINY, 10, seed=0)
    load_trainable(model, {k: np.zeros_like(v) for k, v in before.items()})
    after = initial_arrays(TINY, 10, seed=0)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert any(after[k].any() for k in after)
    after["head.weight"][:] = 7  # callers get copies
    assert not np.any(initial_arrays(TINY, 10, seed=0)["head.weight"] == 7)


@pytest.fixture(scope="module")
def mnist_batch():
    _, test = load_dataset(Config(model=ModelConfig(image_size=64)))  # mnist5k, 1000 held out, seed 0
    return test.images[:32], test.labels[:32]


@pytest.fixture(scope="module")
def efficientnets():
    config = ModelConfig(trainable="lora", image_size=64)
    return (build_model(dataclasses.replace(config, quantize="none"), 10),
            build_model(config, 10))


def test_int8_efficientnet_is_smaller_and_close_to_fp32(efficientnets, mnist_batch):
    fp32, int8 = efficientnets
    assert resident_bytes(int8) < 0.4 * resident_bytes(fp32)
    quantized = [m for m in int8.modules() if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    assert len(quantized) == 32  # EfficientNet-Lite0's pointwise convolutions; not the new head
    images, _ = mnist_batch
    with torch.no_grad():
        a = fp32.extract_features(images).mean(dim=(2, 3))
        b = int8.extract_features(images).mean(dim=(2, 3))
    assert F.cosine_similarity(a, b).mean() > 0.98


def test_gradients_reach_lora_and_head_through_int8_base(efficientnets, mnist_batch):
    _, model = efficientnets
    images, labels = mnist_batch
    # LoRA B starts at zero, so give it a value for A to receive a gradient too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.zero_grad()
    F.cross_entropy(model(images[:8]), labels[:8]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
