"""A device's own training data, read from local files.

Three layouts are accepted (labels are class numbers ``0..num_classes-1``):

- a folder with one sub-folder per class, named by its number, holding images
  (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``)::

      data/0/img001.png  data/0/img002.png  data/1/a.jpg  ...

- an ``.npz`` file with ``images`` ([N, H, W] grayscale, [N, H, W, 3] or [N, 3, H, W]
  colour; uint8 0-255 or floats in [0, 1]) and ``labels`` ([N] integers)
- a ``.csv`` file, one example per row: the label, then the H*H pixels of a square
  grayscale image (0-255 or [0, 1]), row by row; an optional header row is skipped

Every image is resized to the model's input size and normalised as the pretrained
base expects. Anything else is refused up front with a message naming the problem,
so a device fails when it is set up, not in the middle of a round.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pollen.data import IMAGENET_MEAN, IMAGENET_STD, Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class LocalDataError(ValueError):
    """The device's data cannot be used; the message says what is wrong and where."""


def load_local_data(path: str | Path, image_size: int, num_classes: int | None) -> Split:
    """Images and labels at ``path`` (folder, .npz or .csv), ready for the model.

    ``num_classes`` None checks only that labels are class numbers (before the device
    has joined a run, it does not know the run's class count).
    """
    return _load(str(Path(path).expanduser().resolve()), image_size, num_classes)


@functools.lru_cache(maxsize=2)
def _load(path: str, image_size: int, num_classes: int | None) -> Split:
    source = Path(path)
    if source.is_dir():
        images, labels = _read_folder(source)
    elif source.suffix.lower() == ".npz" and source.is_file():
        images, labels = _read_npz(source)
    elif source.suffix.lower() == ".csv" and source.is_file():
        images, labels = _read_csv(source)
    elif not source.exists():
        raise LocalDataError(f"{source}: no such file or folder")
    else:
        raise LocalDataError(f"{source}: expected a folder of class folders, an .npz or a .csv file")
    if len(labels) == 0:
        raise LocalDataError(f"{source}: holds no examples")
    if labels.min() < 0:
        raise LocalDataError(f"{source}: labels must be class numbers 0, 1, ..., found {int(labels.min())}")
    if num_classes is not None and labels.max() >= num_classes:
        raise LocalDataError(f"{source}: labels must be between 0 and {num_classes - 1} (this run's classes), "
                             f"found {int(labels.min())}..{int(labels.max())}")
    return Split(_to_model_input(images, image_size), torch.as_tensor(labels, dtype=torch.long))


def _read_folder(folder: Path) -> tuple[list[np.ndarray], np.ndarray]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise LocalDataError(f"{folder}: no class folders; expected {folder}/0/*.png, {folder}/1/*.png, ...")
    bad = [p.name for p in classes if not p.name.isdigit()]
    if bad:
        raise LocalDataError(f"{folder}: class folders must be named by class number (0, 1, ...), "
                             f"found {bad[0]!r}")
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for class_folder in classes:
        for file in sorted(class_folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as error:
                raise LocalDataError(f"{file}: not a readable image ({error})") from None
            labels.append(int(class_folder.name))
    if not images:
        raise LocalDataError(f"{folder}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return images, np.asarray(labels, dtype=np.int64)


def _read_npz(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as arrays:
            missing = {"images", "labels"} - set(arrays.files)
            if missing:
                raise LocalDataError(f"{file}: missing array(s) {', '.join(sorted(missing))} "
                                     f"(found {', '.join(arrays.files) or 'none'})")
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError) as error:
        if isinstance(error, LocalDataError):
            raise
        raise LocalDataError(f"{file}: not a readable .npz file ({error})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise LocalDataError(f"{file}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise LocalDataError(f"{file}: images must be [N, H, W], [N, H, W, 3] or [N, 3, H, W] with "
                             f"N = {len(labels)} labels, got shape {images.shape}")
    if images.ndim == 4 and 3 not in (images.shape[1], images.shape[3]):
        raise LocalDataError(f"{file}: colour images need 3 channels first or last, got shape {images.shape}")
    return _unit_range(images, file), labels.astype(np.int64)


def _read_csv(file: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    if lines and not _is_number(lines[0].split(",")[0]):
        lines = lines[1:]  # header
    try:
        table = np.asarray([[float(v) for v in line.split(",")] for line in lines], dtype=np.float32)
    except ValueError as error:
        raise LocalDataError(f"{file}: every row must be numbers: label, then pixels ({error})") from None
    if table.ndim != 2 or table.shape[0] == 0:
        raise LocalDataError(f"{file}: expected rows of equal length: label, then pixels")
    side = int(round(np.sqrt(table.shape[1] - 1)))
    if side < 1 or side * side != table.shape[1] - 1:
        raise LocalDataError(f"{file}: each row needs a label and H*H pixels of a square image, "
                             f"got {table.shape[1] - 1} pixels")
    labels = table[:, 0]
    if not np.all(labels == np.round(labels)):
        raise LocalDataError(f"{file}: the first column must hold integer labels")
    return _unit_range(table[:, 1:].reshape(-1, side, side), file), labels.astype(np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unit_range(images: np.ndarray, source: Path) -> np.ndarray:
    images = images.astype(np.float32)
    if images.size and (images.min() < 0 or images.max() > 255):
        raise LocalDataError(f"{source}: pixel values must be 0-255 or in [0, 1], "
                             f"found {images.min()}..{images.max()}")
    return images / 255.0 if images.max(initial=0) > 1.0 else images


def _to_model_input(images, image_size: int) -> torch.Tensor:
    """Images of any size, gray or colour, in [0, 1] -> [N, 3, size, size], ImageNet-normalised."""
    x = torch.cat([_resized(_chw(np.asarray(image, dtype=np.float32)), image_size) for image in images])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _resized(x: torch.Tensor, image_size: int) -> torch.Tensor:
    x = x.unsqueeze(0)
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _chw(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image)
    if x.ndim == 2:
        return x.unsqueeze(0).expand(3, -1, -1)
    return x if x.shape[0] == 3 else x.permute(2, 0, 1)
