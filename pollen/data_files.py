"""Datasets read from files, for a simulation's ``data.dataset`` and a device's ``--data`` alike.

Images (labels are class numbers ``0, 1, ...``):

- a folder with one sub-folder per class, named by its number, holding images
  (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``)::

      data/0/img001.png  data/0/img002.png  data/1/a.jpg  ...

- an ``.npz`` file with ``images`` ([N, H, W] grayscale, [N, H, W, 3] or [N, 3, H, W]
  colour; uint8 0-255 or floats in [0, 1]) and ``labels`` ([N] integers)
- a ``.csv`` file, one example per row: the label, then the H*H pixels of a square
  grayscale image (0-255 or [0, 1]), row by row. A header row is optional; with one,
  the label is the column named ``label`` (else the first).

Text (``pollen.text_data``): a ``.csv`` or ``.jsonl`` table with ``text,label`` columns
(classification) or ``prompt,response`` (instruction tuning of a causal LM).

A Hugging Face ``datasets`` dataset, written by ``save_to_disk`` (a folder) or
``to_parquet`` (a ``.parquet`` file), with ``image,label``, ``text,label`` or
``prompt,response`` columns.

Per-example columns asked for by name (``user_id`` for natural partitions) are an
``.npz`` array or a column of that name, set aside from the examples.

Anything else is refused up front with one line naming the file and the problem, so a
run or a device fails when it is set up, not in the middle of a round. Another format
adds a reader to ``READERS`` (and a ``kind`` if its examples are not images).
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataError(ValueError):
    """The data cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True, eq=False)  # compared by identity, so caches can key on it
class LoadedData:
    """A dataset as read, before it becomes model input."""

    source: str  # the built-in name or the file, for messages
    kind: str  # "image": inputs are [H, W] gray or [H, W, 3] colour images, floats in [0, 1]; "text": strings
    inputs: np.ndarray | list[np.ndarray]  # one per example; a list when sizes differ
    labels: np.ndarray  # int64 class numbers, 0 or more
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # per-example values asked for by name

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """0 for prompt,response examples: a causal LM predicts tokens, not classes."""
        return 0 if self.kind == "instruction" else int(self.labels.max()) + 1

    def take(self, indices: np.ndarray) -> LoadedData:
        inputs = (self.inputs[indices] if isinstance(self.inputs, np.ndarray)
                  else [self.inputs[i] for i in indices])
        return LoadedData(self.source, self.kind, inputs, self.labels[indices],
                          {name: values[indices] for name, values in self.columns.items()})


def read_path(path: str | Path, columns: tuple[str, ...] = ()) -> LoadedData:
    """The examples at ``path`` (a folder of class folders, an .npz or a .csv), checked."""
    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if not (source.is_dir() or source.suffix.lower() in (*READERS, ".jsonl") or is_hf_dataset(source)):
        raise DataError(f"{source}: expected a folder of class folders, an .npz, a .csv, a .jsonl or a .parquet "
                        "file, or a Hugging Face dataset folder")
    # The modification time is in the key so a long-lived process sees a rewritten file.
    return _read(str(source), tuple(columns), source.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read(path: str, columns: tuple[str, ...], mtime: int) -> LoadedData:
    source = Path(path)
    if is_text_table(source):
        return _read_text(source, columns)
    if is_hf_dataset(source):
        return _read_hf(source, columns)
    reader = _read_folder if source.is_dir() else READERS[source.suffix.lower()]
    images, labels, kept = reader(source, columns)
    if len(labels) == 0:
        raise DataError(f"{source}: holds no examples")
    if labels.min() < 0:
        raise DataError(f"{source}: labels must be class numbers 0, 1, ..., found {int(labels.min())}")
    return LoadedData(str(source), "image", images, labels, kept)


Read = tuple[np.ndarray | list[np.ndarray], np.ndarray, dict[str, np.ndarray]]


def _read_folder(folder: Path, columns: tuple[str, ...]) -> Read:
    if columns:
        raise DataError(f"{folder}: a folder of class folders has no per-example {columns[0]!r} column; "
                        "use an .npz or .csv that holds one")
    classes = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    if not classes:
        raise DataError(f"{folder}: no class folders; expected {folder}/0/*.png, {folder}/1/*.png, ...")
    bad = [p.name for p in classes if not p.name.isdigit()]
    if bad:
        raise DataError(f"{folder}: class folders must be named by class number (0, 1, ...), found {bad[0]!r}")
    from PIL import Image, UnidentifiedImageError

    images, labels, empty = [], [], []
    for class_folder in classes:
        files = [f for f in sorted(class_folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            empty.append(class_folder)
        for file in files:
            try:
                with Image.open(file) as image:
                    images.append(_image_array(image))
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"{file}: not a readable image ({error})") from None
            labels.append(int(class_folder.name))
    if not images:
        raise DataError(f"{folder}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    if empty:
        raise DataError(f"{empty[0]}: an empty class: no images ({', '.join(IMAGE_SUFFIXES)}) in its folder")
    if len({image.shape for image in images}) == 1:
        images = np.stack(images)  # one size: resized as one batch
    return images, np.asarray(labels, dtype=np.int64), {}


def _read_npz(file: Path, columns: tuple[str, ...]) -> Read:
    try:
        with np.load(file, allow_pickle=False) as arrays:
            missing = {"images", "labels"} - set(arrays.files)
            if missing:
                raise DataError(f"{file}: missing array(s) {', '.join(sorted(missing))} "
                                f"(found {', '.join(arrays.files) or 'none'})")
            for name in columns:
                if name not in arrays.files:
                    raise DataError(f"{file}: no array {name!r} (found {', '.join(arrays.files)})")
            images, labels = arrays["images"], arrays["labels"]
            kept = {name: arrays[name] for name in columns}
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{file}: not a readable .npz file ({error})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise DataError(f"{file}: images must be [N, H, W], [N, H, W, 3] or [N, 3, H, W] with "
                        f"N = {len(labels)} labels, got shape {images.shape}")
    if images.ndim == 4 and 3 not in (images.shape[1], images.shape[3]):
        raise DataError(f"{file}: colour images need 3 channels first or last, got shape {images.shape}")
    if images.ndim == 4 and images.shape[1] == 3:
        images = np.moveaxis(images, 1, -1)  # channels last, as images are read from files
    for name, values in kept.items():
        if values.shape != labels.shape:
            raise DataError(f"{file}: array {name!r} must hold one value per example (N = {len(labels)}), "
                            f"got shape {values.shape}")
    return _unit_range(images, file), labels.astype(np.int64), kept


def _read_csv(file: Path, columns: tuple[str, ...]) -> Read:
    try:
        with file.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{file}: not a readable .csv file ({error})") from None
    header = rows[0] if rows and not _is_number(rows[0][0]) else None
    body = rows[1:] if header else rows
    if not body:
        raise DataError(f"{file}: holds no examples")
    if len({len(row) for row in body}) != 1 or (header and len(header) != len(body[0])):
        raise DataError(f"{file}: expected rows of equal length: label, then pixels")
    if columns and header is None:
        raise DataError(f"{file}: needs a header row naming its columns to hold {columns[0]!r}")
    for name in columns:
        if name not in header:
            raise DataError(f"{file}: no column {name!r} (the header names {', '.join(header[:4])}, ...)")
    label_at = header.index("label") if header and "label" in header else 0
    set_aside = {label_at, *(header.index(name) for name in columns)}
    pixel_at = [i for i in range(len(body[0])) if i not in set_aside]
    try:
        table = np.asarray([[row[i] for i in [label_at, *pixel_at]] for row in body], dtype=np.float32)
    except ValueError as error:
        raise DataError(f"{file}: every row must be numbers: label, then pixels ({error})") from None
    side = int(round(np.sqrt(len(pixel_at))))
    if side < 1 or side * side != len(pixel_at):
        raise DataError(f"{file}: each row needs a label and H*H pixels of a square image, "
                        f"got {len(pixel_at)} pixels")
    labels = table[:, 0]
    if not np.all(labels == np.round(labels)):
        raise DataError(f"{file}: the label column must hold integer labels")
    kept = {name: np.asarray([row[header.index(name)] for row in body]) for name in columns}
    return _unit_range(table[:, 1:].reshape(-1, side, side), file), labels.astype(np.int64), kept


def is_text_table(file: Path) -> bool:
    """A .jsonl file, or a .csv whose header names a text column (pollen/text_data.py)."""
    if file.suffix.lower() == ".jsonl":
        return True
    if file.suffix.lower() != ".csv" or not file.is_file():
        return False
    with file.open(newline="", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    return "text" in header or "prompt" in header


def _read_text(file: Path, columns: tuple[str, ...]) -> LoadedData:
    from pollen.text_data import TextDataError, read_table

    try:
        rows = read_table(file)
    except TextDataError as error:
        raise DataError(str(error)) from None
    return _text_data(str(file), rows, columns)


def _text_data(source: str, rows: list[dict], columns: tuple[str, ...]) -> LoadedData:
    """text,label rows (classes numbered) or prompt,response rows (no classes), as read."""
    from pollen.text_data import TEXT, TextDataError, checked_kind, class_labels

    try:
        kind = checked_kind(source, rows)
        if kind == TEXT:
            labels, _ = class_labels(source, [row["label"] for row in rows])
            inputs = np.asarray([row["text"] for row in rows], dtype=object)
        else:  # tokenized for the run's causal LM later (pollen.text_data.instruction_split)
            labels = np.zeros(len(rows), dtype=np.int64)
            inputs = np.empty(len(rows), dtype=object)
            inputs[:] = [{"prompt": row["prompt"], "response": row["response"]} for row in rows]
    except TextDataError as error:
        raise DataError(str(error)) from None
    missing = [name for name in columns if name not in rows[0]]
    if missing:
        raise DataError(f"{source}: no column {missing[0]!r} (the table has {', '.join(rows[0])})")
    kept = {name: np.asarray([row[name] for row in rows]) for name in columns}
    return LoadedData(source, kind, inputs, labels.astype(np.int64), kept)


def is_hf_dataset(path: Path) -> bool:
    """A Hugging Face dataset written by ``save_to_disk`` (a Dataset or a DatasetDict) or ``to_parquet``."""
    if path.is_dir():
        return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return path.suffix.lower() == ".parquet"


def _read_hf(source: Path, columns: tuple[str, ...]) -> LoadedData:
    """Its examples as read: image,label, text,label or prompt,response columns.

    A DatasetDict gives its ``train`` split; another split is the folder ``DICT/SPLIT``
    (``data.test_path: DICT/test``). Image columns are the ``datasets.Image`` feature
    (or a column named ``image`` or ``img``), labels the ``label`` column.
    """
    import datasets
    import pyarrow
    import pyarrow.parquet

    try:
        if source.is_dir():
            dataset = datasets.load_from_disk(str(source))
        else:  # the features saved in the file's schema (images, class names) come back with it
            dataset = datasets.Dataset(pyarrow.parquet.read_table(source))
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise DataError(f"{source}: not a readable Hugging Face dataset ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{source}: a dataset dict without a 'train' split (it has {', '.join(dataset)}); "
                            f"name a split's folder, e.g. {source / next(iter(dataset))}")
        dataset = dataset["train"]
    if len(dataset) == 0:
        raise DataError(f"{source}: holds no examples")
    names = dataset.column_names
    missing = [name for name in columns if name not in names]
    if missing:
        raise DataError(f"{source}: no column {missing[0]!r} (the dataset has {', '.join(names)})")
    if any(set(pair) <= set(names) for pair in (("text", "label"), ("prompt", "response"))):
        return _text_data(str(source), dataset.to_list(), columns)
    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    images += [name for name in ("image", "img") if name in names and name not in images]
    if not images or "label" not in names:
        raise DataError(f"{source}: expected columns image,label, text,label or prompt,response; "
                        f"found {', '.join(names)}")
    labels = np.asarray(dataset["label"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: the label column must hold integer class numbers, got {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"{source}: labels must be class numbers 0, 1, ..., found {int(labels.min())}")
    pictures = []
    for number, image in enumerate(dataset[images[0]], 1):
        try:
            pictures.append(_image_array(image))
        except (OSError, ValueError, AttributeError) as error:
            raise DataError(f"{source}: example {number}'s {images[0]} is not a readable image ({error})") from None
    if len({picture.shape for picture in pictures}) == 1:
        pictures = np.stack(pictures)
    kept = {name: np.asarray(dataset[name]) for name in columns}
    return LoadedData(str(source), "image", pictures, labels.astype(np.int64), kept)


def _image_array(image) -> np.ndarray:
    """A PIL image (as ``datasets`` decodes one) -> [H, W, 3] floats in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


# File suffix -> reader(path, columns) -> (inputs, labels, columns); folders are read by _read_folder,
# text tables (.jsonl, or .csv with a text column) by _read_text.
READERS: dict[str, Callable[[Path, tuple[str, ...]], Read]] = {".npz": _read_npz, ".csv": _read_csv}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unit_range(images: np.ndarray, source: Path) -> np.ndarray:
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise DataError(f"{source}: pixel values must be finite numbers, found NaN or infinity")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise DataError(f"{source}: pixel values must be 0-255 or in [0, 1], "
                        f"found {images.min()}..{images.max()}")
    return images / 255.0 if images.max(initial=0) > 1.0 else images
