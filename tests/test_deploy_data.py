"""A device's own data: class folders of images, .npz and .csv, checked up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pollen.client.app import DATA_PATH, local_data
from pollen.config import Config, ModelConfig
from pollen.data import IMAGENET_MEAN, IMAGENET_STD, load_local_data
from pollen.data_files import DataError


def denormalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def test_folder_of_class_folders(tmp_path):
    for label, value in ((0, 0), (3, 255)):
        (tmp_path / str(label)).mkdir()
        for i in range(2):
            Image.fromarray(np.full((5, 7, 3), value, np.uint8)).save(tmp_path / str(label) / f"{i}.png")
    (tmp_path / "3" / "notes.txt").write_text("ignored")
    split = load_local_data(tmp_path, ModelConfig(image_size=8), 10, 128)
    assert split.images.shape == (4, 3, 8, 8)
    assert split.labels.tolist() == [0, 0, 3, 3]
    pixels = denormalised(split.images)
    assert torch.allclose(pixels[:2], torch.zeros(1), atol=1e-5)
    assert torch.allclose(pixels[2:], torch.ones(1), atol=1e-5)


def test_npz_gray_and_colour_uint8_and_float(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (6, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray, labels=np.arange(6))
    split = load_local_data(tmp_path / "gray.npz", ModelConfig(image_size=8), 10, 128)
    assert split.labels.tolist() == list(range(6))
    np.testing.assert_allclose(denormalised(split.images)[:, 1].numpy(), gray / 255.0, atol=1e-5)

    colour = np.random.default_rng(1).random((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "colour.npz", images=colour, labels=np.array([1, 2, 1, 2]))
    split = load_local_data(tmp_path / "colour.npz", ModelConfig(image_size=8), 10, 128)
    assert split.images.shape == (4, 3, 8, 8)
    channels_last = np.moveaxis(colour, 1, -1)
    np.savez(tmp_path / "last.npz", images=channels_last, labels=np.array([1, 2, 1, 2]))
    last = load_local_data(tmp_path / "last.npz", ModelConfig(image_size=8), 10, 128)
    assert torch.allclose(last.images, split.images)


def test_csv_label_then_square_pixels_with_optional_header(tmp_path):
    rows = ["label," + ",".join(f"p{i}" for i in range(16))]
    rows += [f"{label}," + ",".join(str(v) for v in range(0, 256, 16)) for label in (7, 2)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    split = load_local_data(tmp_path / "d.csv", ModelConfig(image_size=4), 10, 128)
    assert split.labels.tolist() == [7, 2]
    np.testing.assert_allclose(denormalised(split.images)[0, 0].numpy(),
                               np.arange(0, 256, 16).reshape(4, 4) / 255.0, atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such file"),
    (lambda p: (p / "x.txt").write_text("1") and p / "x.txt", "expected a folder"),
    (lambda p: (p / "cats").mkdir() or p, "named by class number"),
    (lambda p: p, "no class folders"),
    (lambda p: (p / "0").mkdir() or p, "hold no images"),
    (lambda p: np.savez(p / "a.npz", x=np.zeros(1)) or p / "a.npz", "missing array"),
    (lambda p: np.savez(p / "a.npz", images=np.zeros((2, 4, 4)), labels=np.array([0, 12])) or p / "a.npz",
     "between 0 and 9"),
    (lambda p: np.savez(p / "a.npz", images=np.zeros((2, 4, 4)), labels=np.array([0, -1])) or p / "a.npz",
     "class numbers"),
    (lambda p: np.savez(p / "a.npz", images=np.zeros((3, 4, 4)), labels=np.array([0, 1])) or p / "a.npz",
     "N = 2 labels"),
    (lambda p: np.savez(p / "a.npz", images=np.zeros((2, 4, 4)), labels=np.array([0.5, 1])) or p / "a.npz",
     "integer array"),
    (lambda p: np.savez(p / "a.npz", images=np.full((2, 4, 4), 300.0), labels=np.array([0, 1])) or p / "a.npz",
     "0-255"),
    (lambda p: (p / "a.csv").write_text("1,0,0,0\n") and p / "a.csv", "square image"),
    (lambda p: (p / "a.csv").write_text("1,0,0,0,x\n") and p / "a.csv", "must be numbers"),
    (lambda p: (p / "a.csv").write_text("1.5,0,0,0,0\n") and p / "a.csv", "integer labels"),
])
def test_bad_data_is_refused_with_a_message_naming_the_problem(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_local_data(make(tmp_path), ModelConfig(image_size=8), 10, 128)


def test_before_a_run_only_the_format_is_checked_not_the_class_count(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4)), labels=np.array([0, 12]))
    assert load_local_data(tmp_path / "a.npz", ModelConfig(image_size=8), None, 128).labels.tolist() == [0, 12]
    with pytest.raises(DataError, match="between 0 and 9"):
        load_local_data(tmp_path / "a.npz", ModelConfig(image_size=8), 10, 128)


def test_client_app_trains_on_the_device_files_when_given_a_data_path(tmp_path):
    images = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 3, 4]))
    config = Config(model=ModelConfig(name="tiny-cnn", image_size=8))
    split = local_data(config, {DATA_PATH: str(tmp_path / "d.npz"), "partition-id": 123456})
    assert split.labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(split.images, load_local_data(tmp_path / "d.npz", ModelConfig(image_size=8), 10, 128).images)
