"""Distillation for the edge: a small student learns the federated model's soft labels.

``distill_run(run, student="tiny-cnn")`` takes a finished run's federated model as the
teacher and trains the student, every parameter of it, to match the teacher's
temperature-softened class probabilities (KL divergence times T², Hinton et al.) on
data the server already holds:

- by default, the run's held-out split, divided by the seed into a transfer half, whose
  labels are never read, and an evaluation half, on which teacher and student are
  compared;
- or ``data``: a path of the server's own images in any format ``data.dataset`` reads
  (their labels are ignored), with the whole held-out split for evaluation.

No client data is used: the student sees only the teacher's outputs on the server's own
examples, so it learns nothing the federated model, which the server already has, does
not already give away. It writes ``RUN/student/``: ``model.pt`` (the student's model
config and weights) and ``distill.json`` (sizes, CPU latency and accuracy of both).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pollen.config import LoraSettings, ModelConfig
from pollen.data import Split, load_dataset, num_classes, read_data, resized, to_model_input
from pollen.metrics import evaluate
from pollen.models import build_model, resident_bytes
from pollen.server.export import ExportError, run_model, seeded_halves

STUDENT_FOLDER = "student"
LATENCY_REPEATS = 50


class DistillError(ValueError):
    """The run or the settings cannot be distilled; the message says why."""


@dataclass(frozen=True)
class DistillResult:
    folder: Path
    teacher: dict  # accuracy, resident_bytes, latency_ms
    student: dict
    transfer_examples: int
    evaluation_examples: int

    def summary(self) -> str:
        t, s = self.teacher, self.student
        return (f"student {s['name']}: accuracy {s['accuracy']:.4f} (teacher {t['accuracy']:.4f}), "
                f"{s['resident_bytes'] / 1e6:.2f} MB in memory (teacher {t['resident_bytes'] / 1e6:.2f} MB), "
                f"{s['latency_ms']:.2f} ms an image on CPU (teacher {t['latency_ms']:.2f} ms); {self.folder}")


def distill_run(run: Path, student: str = "tiny-cnn", data: str | None = None, epochs: int = 30,
                temperature: float = 4.0, lr: float = 3e-3, batch_size: int = 64, image_size: int | None = None,
                augment: str = "affine", seed: int = 0) -> DistillResult:
    """Train ``student`` on the teacher's soft labels; write and return its comparison with the teacher."""
    if epochs < 1 or temperature <= 0 or lr <= 0 or batch_size < 1:
        raise DistillError(f"epochs, batch size (>= 1), temperature and lr (> 0) must be positive; got "
                           f"{epochs}, {batch_size}, {temperature}, {lr}")
    if image_size is not None and image_size < 1:
        raise DistillError(f"--image-size {image_size}: must be positive")
    try:
        config, teacher = run_model(run)
    except ExportError as error:
        raise DistillError(str(error)) from None
    _, held_out = load_dataset(config)
    if not isinstance(held_out, Split):
        raise DistillError(f"{run}: distillation takes image classifiers; this run's model is a "
                           f"{type(held_out).__name__} task")
    transfer, evaluation = _server_data(held_out, data, config.model.image_size, seed)
    classes = num_classes(config.data)
    size = image_size or config.model.image_size
    student_config = dataclasses.replace(ModelConfig(), name=student, trainable="full", quantize="none",
                                         image_size=size)
    try:
        pupil = build_model(student_config, classes, seed)
    except ValueError as error:
        raise DistillError(f"--student {student}: {error}") from None
    with torch.no_grad():
        soft = F.softmax(_logits(teacher, transfer.images) / temperature, dim=1)
    train_student(pupil, Split(resized(transfer.images, size), transfer.labels, augment), soft, epochs,
                  temperature, lr, batch_size, seed)
    folder = run / STUDENT_FOLDER
    folder.mkdir(exist_ok=True)
    torch.save({"model": dataclasses.asdict(student_config), "num_classes": classes, "seed": seed,
                "state": pupil.state_dict()}, folder / "model.pt")
    result = DistillResult(
        folder,
        teacher=_measured(teacher, evaluation, config.model.name),
        student=_measured(pupil, Split(resized(evaluation.images, size), evaluation.labels), student),
        transfer_examples=len(transfer), evaluation_examples=len(evaluation))
    (folder / "distill.json").write_text(json.dumps(
        {**dataclasses.asdict(result), "folder": str(folder), "temperature": temperature, "epochs": epochs,
         "augment": augment, "data": data or "half of the run's held-out split"}, indent=2) + "\n")
    return result


def load_student(run: Path) -> nn.Module:
    """The student ``distill_run`` wrote into the run folder, ready to use."""
    saved = torch.load(run / STUDENT_FOLDER / "model.pt", weights_only=True)
    model = saved["model"]
    config = ModelConfig(**{**model, "lora": LoraSettings(**model["lora"])})
    student = build_model(config, saved["num_classes"], saved["seed"])
    student.load_state_dict(saved["state"])
    return student.eval()


def train_student(student: nn.Module, transfer: Split, soft_targets: torch.Tensor, epochs: int, temperature: float,
                  lr: float, batch_size: int, seed: int) -> None:
    """AdamW on every parameter: KL(teacher || student) at ``temperature``, scaled by T² so the
    gradients keep their size whatever T is."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(transfer), generator=generator).split(batch_size):
            log_student = F.log_softmax(student(transfer.training_inputs(batch, generator)) / temperature, dim=1)
            loss = F.kl_div(log_student, soft_targets[batch], reduction="batchmean") * temperature ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    student.eval()


def _server_data(held_out: Split, data: str | None, image_size: int, seed: int) -> tuple[Split, Split]:
    """(transfer examples, evaluation examples): the server's own, never a client's."""
    if data is not None:
        loaded = read_data(data)
        if loaded.kind != "image":
            raise DistillError(f"--data {data}: holds {loaded.kind} examples; distillation takes images")
        images = to_model_input(loaded.inputs, image_size)
        return Split(images, torch.zeros(len(images), dtype=torch.long)), held_out
    try:
        return seeded_halves(held_out, seed)
    except ExportError as error:
        raise DistillError(f"{error}; pass --data with the server's own images") from None


def _logits(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def _measured(model: nn.Module, split: Split, name: str) -> dict:
    """Accuracy on ``split``, bytes in memory, and the median CPU time of one image (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = split.images[:1]
        with torch.no_grad():
            model(image)  # warm up
            times = []
            for _ in range(LATENCY_REPEATS):
                started = time.perf_counter()
                model(image)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return {"name": name, "accuracy": evaluate(model, split)["accuracy"], "resident_bytes": resident_bytes(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "latency_ms": float(np.median(times) * 1e3)}
