"""Export a run's fine-tuned model for on-device inference: ONNX or a saved ``torch.export`` program.

The federated model is a frozen base (int8 linear maps, see ``pollen.models``) plus
trainable adapters and head. For inference the adapters are merged into the base:
each adapted layer's weight becomes ``dequantized base + B @ A * scaling``, quantized
again to int8 per output row when the base was int8, so the file stays small and the
device runs one plain network. Both formats keep those weights as int8 with a scale
per row, dequantized inside the graph (weight-only int8: exact in any runtime).

After writing, the file is loaded back with its own runtime (onnxruntime, or
``torch.export.load``) and its outputs on the run's test images are compared with the
merged PyTorch model; an export that does not match is an error, not a file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from pollen.config import Config
from pollen.data import load_dataset
from pollen.models import build_model, load_trainable
from pollen.run_folder import RunFolder
from pollen.server.checkpoint import load_arrays

FORMATS = {"onnx": "model.onnx", "torch": "model.pt2"}
TOLERANCE = 1e-4  # max |exported - PyTorch| logit difference accepted
CHECKED_IMAGES = 64


class ExportError(ValueError):
    """The run cannot be exported, or the export does not reproduce the model."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    bytes: int
    max_difference: float  # exported vs merged PyTorch model, on ``checked`` test images
    checked: int
    agreement: float  # share of those images where the merged model predicts as the federated one


class Int8Linear(nn.Module):
    """Weight-only int8 linear map or 1x1 convolution: int8 weight, one fp32 scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d | None = None) -> None:
        super().__init__()
        scale = weight.abs().flatten(1).amax(dim=1).clamp(min=1e-12) / 127.0
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("qweight", torch.round(weight / scale.view(shape)).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.view(shape).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.conv = None if conv is None else (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(torch.float32) * self.scale
        if self.conv is None:
            return nn.functional.linear(x, weight, self.bias)
        stride, padding, dilation, groups = self.conv
        return nn.functional.conv2d(x, weight, self.bias, stride, padding, dilation, groups)


def merged_model(model: nn.Module, int8: bool) -> nn.Module:
    """A plain copy of ``model`` with LoRA merged in and (``int8``) weight-only int8 linear maps."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
            with torch.no_grad():
                weight = base.weight.detach().clone()
                for adapter in module.active_adapters:
                    weight += module.get_delta_weight(adapter)
            _replace(model, name, _plain(base, weight, int8))
        elif parametrize.is_parametrized(module, "weight") and not _inside_lora(model, name):
            _replace(model, name, _plain(module, module.weight.detach().clone(), int8))
    return model


def _inside_lora(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return name.endswith("base_layer") and hasattr(model.get_submodule(parent) if parent else model, "lora_A")


def _plain(layer: nn.Module, weight: torch.Tensor, int8: bool) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach().clone()
    conv = layer if isinstance(layer, nn.Conv2d) else None
    if int8:
        return Int8Linear(weight, bias, conv)
    if conv is not None:
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias is not None)
    else:
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def run_model(run: Path) -> tuple[Config, nn.Module]:
    """The run's config and its final federated model (fresh, not the process-wide cached one)."""
    folder = RunFolder(run)
    for path in (folder.config_path, folder.checkpoint):
        if not path.is_file():
            raise ExportError(f"{run}: no {path.name}; expected a run folder from `pollen simulate` or "
                              "`pollen server`")
    config = folder.read_config()
    model = build_model(config.model, config.num_classes, config.seed)
    load_trainable(model, load_arrays(folder.checkpoint))
    return config, model.eval()


def export_run(run: Path, format: str = "onnx", output: Path | None = None) -> ExportResult:
    """Write the run's merged model as ``format``; check it reproduces the PyTorch model."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: one of {', '.join(FORMATS)}")
    config, model = run_model(run)
    merged = merged_model(model, int8=config.model.quantize == "int8")
    _, test = load_dataset(config.data.dataset, config.model.image_size, config.data.test_size, config.seed)
    images = test.images[:CHECKED_IMAGES]
    with torch.no_grad():
        federated, expected = model(images).numpy(), merged(images).numpy()
    path = output or run / FORMATS[format]
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (images[:2],)
    batch = torch.export.Dim("batch", min=1)
    if format == "onnx":
        torch.onnx.export(merged, example, str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
                          optimize=False)  # constant folding would turn the int8 weights back into fp32
        got = _run_onnx(path, images.numpy())
    else:
        program = torch.export.export(merged, example, dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(images).numpy()
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise ExportError(f"the {format} model's outputs differ from PyTorch's by {difference:.2e} "
                          f"(more than {TOLERANCE:.0e}); nothing was written")
    agreement = float((federated.argmax(1) == expected.argmax(1)).mean())
    return ExportResult(path, format, path.stat().st_size, difference, len(images), agreement)


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0]
