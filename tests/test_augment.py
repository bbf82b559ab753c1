"""Augmentation: per-image random transforms for local training only, seeded, off at evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollen.augment import POLICIES, Policy, augmented
from pollen.client.training import train_locally
from pollen.config import ConfigError, TrainConfig, load_config
from pollen.data import Split, load_dataset, to_model_input
from pollen.metrics import evaluate
from pollen.models import build_model

TINY = "simulations/configs/tiny.yaml"


def digits(n=8, side=16):
    """A bright square on black, at the centre: where it moves shows what the transform did."""
    images = np.zeros((n, side, side))
    images[:, 6:10, 6:10] = 1.0
    return to_model_input(images, side)


def test_no_transform_leaves_images_as_they_are():
    images = digits()
    assert torch.allclose(augmented(images, Policy(), torch.Generator().manual_seed(0)), images, atol=1e-5)


def test_each_image_gets_its_own_draw_and_a_seed_repeats_it():
    images = digits()
    first = augmented(images, POLICIES["affine"], torch.Generator().manual_seed(0))
    again = augmented(images, POLICIES["affine"], torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and first.shape == images.shape
    assert not torch.allclose(first[0], first[1])  # one draw per image, not one per batch
    # edges replicated: the black background stays black, nothing grey comes in from outside
    assert torch.allclose(first[:, :, 0, 0], images[:, :, 0, 0], atol=1e-5)


def test_a_flip_mirrors_left_and_right():
    images = digits()
    images[:, :, :, :2] = images.max()  # a bright left edge
    flipped = augmented(images, Policy(flip=True), torch.Generator().manual_seed(1))
    mirrored = [bool(torch.allclose(f, i.flip(-1), atol=1e-5)) for f, i in zip(flipped, images)]
    unchanged = [bool(torch.allclose(f, i, atol=1e-5)) for f, i in zip(flipped, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and any(mirrored) and any(unchanged)


def test_jitter_stays_within_the_pixel_range():
    images = to_model_input(np.random.default_rng(0).random((6, 8, 8, 3)), 8)
    out = augmented(images, POLICIES["photo"], torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = out * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and not torch.allclose(out, images)


def test_only_local_training_sees_augmented_images():
    split = Split(digits(), torch.arange(8) % 2, augment="affine")
    index = torch.arange(8)
    assert torch.equal(split.inputs_of(index), split.images)  # what evaluation reads
    assert not torch.allclose(split.training_inputs(index, torch.Generator().manual_seed(0)), split.images)
    assert split.subset(np.arange(3)).augment == "affine"


def test_the_config_gives_the_clients_training_split_its_policy_and_never_the_test_split():
    config = load_config(TINY, ["data.augment=affine"])
    train, test = load_dataset(config)
    assert train.augment == "affine" and test.augment == "none"
    model = build_model(config.model, 10)
    before = evaluate(model, test)["loss"]
    run = train_locally(model, train.subset(np.arange(64)), TrainConfig(local_epochs=1, lr=0.01), seed=0)
    assert np.isfinite(run.loss) and evaluate(model, test)["loss"] != before


def test_an_unknown_policy_or_text_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(TINY, ["data.augment=rotate"])
    from pollen.data_files import DataError

    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "a b,0\nc d,1\n" * 4)
    config = load_config(None, ["model.name=minilm-l6", f"data.dataset={path}", "data.test_size=2",
                                "data.augment=affine"])
    with pytest.raises(DataError, match="data.augment: affine transforms images"):
        load_dataset(config)
