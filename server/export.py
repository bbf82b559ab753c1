"""Export a run's fine-tuned model: ONNX or a saved ``torch.export`` program for on-device inference,
or its adapters as a peft adapter.

The federated model is a frozen base (int8 linear maps, see ``pollen.models``) plus
trainable adapters and head. For inference the adapters are merged into the base:
each adapted layer's weight becomes ``dequantized base + B @ A * scaling``, quantized
again to int8 per output row when the base was int8, so the file stays small and the
device runs one plain network. Both formats keep those weights as int8 with a scale
per row, dequantized inside the graph (weight-only int8: exact in any runtime).

After writing, the file is loaded back with its own runtime (onnxruntime, or
``torch.export.load``) and its outputs on the run's test images are compared with the
merged PyTorch model; an export that does not match is an error, not a file. Text
models take ``input_ids`` and ``attention_mask`` (batch and sequence length dynamic),
image models ``images``; a model torch.export cannot trace is refused, naming its kind.

``--prune S`` (``Pruning``) sets the smallest-magnitude share S of every weight layer of
the merged model to zero with ``torch.nn.utils.prune`` (L1, unstructured, per layer: each
convolution is followed by BatchNorm, which undoes its weight's scale, so magnitudes are
not comparable across layers), optionally fine-tunes it (``finetune_rounds`` epochs on a
seeded half of the held-out split; the accuracy is then measured on the other half), and
writes the file xz-compressed (``model.onnx.xz``): ONNX and torch.export store dense
tensors, so the zeros shrink the file a device downloads and stores, not the model it
decompresses into memory nor ONNX Runtime's dense kernels' time.

``--format peft`` writes the trained adapters and head, unmerged, as a peft adapter
directory (``adapter_config.json``, ``adapter_model.safetensors``) for
``peft.PeftModel.from_pretrained`` on the fp32 base (``peft_base``: the transformers
model itself for a Hugging Face model). It is built with peft's own ``get_peft_model``
and ``save_pretrained``, Pollen's trained values copied in by name, and checked by loading
it back with peft onto the run's own base.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import lzma
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from pollen.config import Config
from pollen.data import Split, load_dataset, num_classes
from pollen.hf_models import CAUSAL, SEQUENCE, HuggingFaceModel
from pollen.metrics import evaluate
from pollen.models import BASE_SEED, build_model, load_trainable, model_factory
from pollen.run_folder import RunFolder
from pollen.server.checkpoint import load_arrays

FORMATS = {"onnx": "model.onnx", "torch": "model.pt2", "peft": "peft-adapter"}
TOLERANCE = 1e-4  # max |exported - PyTorch| logit difference accepted
PEFT_TOLERANCE = 1e-5  # peft on the run's own base computes what Pollen does, in another order
PEFT_TASKS = {SEQUENCE: "SEQ_CLS", CAUSAL: "CAUSAL_LM"}  # peft has no task type for image classification
CHECKED_IMAGES = 64
PRUNABLE = (nn.Conv2d, nn.Linear, nn.Embedding)  # the layers whose weights --prune zeroes
COMPRESSED = ".xz"  # a pruned export's suffix: its zeros only shrink a compressed file
FINETUNE_LR = 1e-4  # small: the pruned model is already trained, the fine-tune only mends it
FINETUNE_BATCH = 32


# What the libraries say on every export that is no concern of the user's, by where it comes from and how
# it begins; nothing else is silenced. torch.onnx skips torchvision's operators when torchvision is not
# installed (no Pollen model uses them); torch.onnx copies a pytree LeafSpec that torch itself deprecates;
# peft asks a transformers model for is_gradient_checkpointing, which transformers deprecates.
KNOWN_LOG_LINES = {"torch.onnx._internal.exporter._registration": "torchvision is not installed. Skipping "}
KNOWN_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"`is_gradient_checkpointing` is deprecated")


class ExportError(ValueError):
    """The run cannot be exported, or the export does not reproduce the model."""


@dataclass(frozen=True)
class Pruning:
    """``--prune S [--finetune-rounds N]``: zero each weight layer's smallest share S, then fine-tune N epochs."""

    sparsity: float
    finetune_rounds: int = 0  # epochs over a seeded half of the held-out split; the other half measures accuracy
    seed: int = 0  # draws that half and the fine-tune's batches

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity)
                and 0 <= self.sparsity < 1):
            raise ExportError(f"--prune {self.sparsity}: the sparsity must be in [0, 1), the share of each "
                              "layer's weights set to zero")
        if self.finetune_rounds < 0:
            raise ExportError(f"--finetune-rounds {self.finetune_rounds}: must be 0 or more")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    bytes: int  # on disk
    max_difference: float  # exported vs merged PyTorch model (peft: vs the federated one), on ``checked`` examples
    checked: int
    agreement: float  # share of those images where the merged model predicts as the federated one
    accuracy: float | None = None  # the exported model's, on ``evaluated`` held-out examples (export_run)
    evaluated: int = 0
    sparsity: float = 0.0  # share of zeros in the weights of the prunable layers
    loaded_bytes: int | None = None  # the file decompressed, as the runtime loads it (pruned exports)


class Int8Linear(nn.Module):
    """Weight-only int8 linear map or 1x1 convolution: int8 weight, one fp32 scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d | None = None) -> None:
        super().__init__()
        qweight, scale = _int8_rows(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.conv = None if conv is None else (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(torch.float32) * self.scale
        if self.conv is None:
            return nn.functional.linear(x, weight, self.bias)
        stride, padding, dilation, groups = self.conv
        return nn.functional.conv2d(x, weight, self.bias, stride, padding, dilation, groups)


class Int8Embedding(nn.Module):
    """Weight-only int8 embedding table: int8 rows, one fp32 scale per row (token)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        qweight, scale = _int8_rows(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather the rows first: dequantizing the whole table would cost a vocabulary of floats a call.
        rows = nn.functional.embedding(ids, self.qweight).to(torch.float32)
        return rows * nn.functional.embedding(ids, self.scale)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row (per token for an embedding), scales shaped to broadcast."""
    scale = weight.abs().flatten(1).amax(dim=1).clamp(min=1e-12) / 127.0
    scale = scale.view((-1,) + (1,) * (weight.dim() - 1)).contiguous()
    return torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale


def merged_model(model: nn.Module, int8: bool, pruning: Pruning | None = None,
                 finetune: Split | None = None) -> nn.Module:
    """A plain copy of ``model`` with LoRA merged in and (``int8``) weight-only int8 linear maps and embeddings.

    With ``pruning``, the merged fp32 weights are pruned (and fine-tuned on ``finetune``)
    before they are quantized, so a pruned weight is an exact int8 zero.
    """
    model = copy.deepcopy(model).eval()
    merged = []  # the layers the base held quantized or LoRA wrapped: int8 again when the base was
    for name, module in list(model.named_modules()):
        if any(name.startswith(f"{done}.") for done in merged):
            continue  # inside a layer already replaced (a LoRA layer's base_layer)
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
            with torch.no_grad():
                weight = base.weight.detach().clone()
                for adapter in module.active_adapters:
                    weight += module.get_delta_weight(adapter)
            _replace(model, name, _plain(base, weight))
            merged.append(name)
        elif parametrize.is_parametrized(module, "weight"):
            _replace(model, name, _plain(module, module.weight.detach().clone()))
            merged.append(name)
    if pruning is not None:
        prune_weights(model, pruning, finetune)
    if int8:
        for name in merged:
            _replace(model, name, _int8(model.get_submodule(name)))
    return model


def prune_weights(model: nn.Module, pruning: Pruning, finetune: Split | None = None) -> None:
    """Zero the smallest-magnitude share of every prunable layer's weight, in place; fine-tune with the zeros held."""
    layers = [module for module in model.modules() if isinstance(module, PRUNABLE)]
    for layer in layers:
        prune.l1_unstructured(layer, "weight", amount=pruning.sparsity)
    if pruning.finetune_rounds:
        if finetune is None:
            raise ExportError("--finetune-rounds: no examples to fine-tune on")
        fine_tune(model, finetune, pruning.finetune_rounds, pruning.seed)
    for layer in layers:
        prune.remove(layer, "weight")  # the mask becomes the weight: plain tensors with zeros, for export


def fine_tune(model: nn.Module, split: Split, epochs: int, seed: int) -> None:
    """Cross-entropy on ``split``, every parameter (prune's masks keep pruned weights at zero).

    BatchNorm keeps its statistics (eval mode): a few hundred examples would only make them noisier.
    """
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=FINETUNE_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(split), generator=generator).split(FINETUNE_BATCH):
            loss = F.cross_entropy(model(split.training_inputs(batch, generator)), split.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for param in params:
        param.requires_grad_(False)


def weight_sparsity(model: nn.Module) -> float:
    """Share of zeros in the weights of the prunable layers (int8 ones counted by their int8 values)."""
    weights = [module.weight for module in model.modules() if isinstance(module, PRUNABLE)]
    weights += [module.qweight for module in model.modules() if isinstance(module, (Int8Linear, Int8Embedding))]
    total = sum(weight.numel() for weight in weights)
    return sum(int((weight == 0).sum()) for weight in weights) / max(total, 1)


def seeded_halves(split, seed: int):
    """Two disjoint halves of a held-out split, drawn by ``seed``: one to learn on, one to measure on."""
    order = np.random.default_rng(seed).permutation(len(split))
    half = len(order) // 2
    if half < 1:
        raise ExportError(f"the held-out split ({len(split)} examples) is too small to divide in two")
    return split.subset(order[:half]), split.subset(order[half:])


def _plain(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain fp32 layer of ``layer``'s kind computing with ``weight``."""
    if isinstance(layer, nn.Embedding):
        return nn.Embedding.from_pretrained(weight, padding_idx=layer.padding_idx)
    if _transposed(layer):
        weight = weight.t()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, nn.Conv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, bias is not None)
    else:
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain


def _int8(layer: nn.Module) -> nn.Module:
    """The weight-only int8 form of a plain fp32 layer from ``_plain``."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Embedding):
        return Int8Embedding(weight)
    return Int8Linear(weight, layer.bias, layer if isinstance(layer, nn.Conv2d) else None)


def _transposed(layer: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's projections) is a linear map storing its weight as [in, out]."""
    utils = sys.modules.get("transformers.pytorch_utils")  # loaded whenever such a model exists
    return utils is not None and isinstance(layer, utils.Conv1D)


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
    arrays = load_arrays(folder.checkpoint)  # a damaged file: CheckpointError naming it, before a model is built
    model = build_model(config.model, num_classes(config.data), config.seed)
    try:
        load_trainable(model, arrays)
    except ValueError as error:  # arrays of another model: names or shapes differ
        raise ExportError(f"{folder.checkpoint}: does not fit the model of {folder.config_path} ({error})") from None
    return config, model.eval()


def export_run(run: Path, format: str = "onnx", output: Path | None = None,
               pruning: Pruning | None = None) -> ExportResult:
    """Write the run's model as ``format`` (with ``pruning``: pruned, xz-compressed); check it reproduces the
    PyTorch model; measure its accuracy on the held-out split, or after a fine-tune on the half it never saw."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: one of {', '.join(FORMATS)}")
    if pruning is not None and format == "peft":
        raise ExportError("--prune: prunes the merged model; use --format onnx or torch")
    config, model = run_model(run)
    _, test = load_dataset(config)
    inputs = test.inputs_of(slice(None, CHECKED_IMAGES))
    if format == "peft":
        return export_peft(config, model, inputs, output or run / FORMATS[format])
    finetune, evaluation = None, test
    if pruning is not None and pruning.finetune_rounds:
        if not isinstance(test, Split):
            raise ExportError(f"--finetune-rounds: fine-tuning takes image classifiers; this run's held-out "
                              f"split is a {type(test).__name__}")
        finetune, evaluation = seeded_halves(test, pruning.seed)
    path = output or run / (FORMATS[format] + (COMPRESSED if pruning is not None else ""))
    merged = merged_model(model, config.model.quantize == "int8", pruning, finetune)
    result = export_graph(model, inputs, format, path, merged=merged, compress=pruning is not None)
    return dataclasses.replace(result, accuracy=evaluate(merged, evaluation)["accuracy"],
                               evaluated=len(evaluation))


def export_graph(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor], format: str, path: Path,
                 int8: bool = True, merged: nn.Module | None = None, compress: bool = False) -> ExportResult:
    """Write ``model`` merged (or ``merged``, its merged form) as ONNX or a torch.export program, xz-compressed
    if ``compress``; check the file as written on ``inputs`` (images or tokens)."""
    merged = merged_model(model, int8) if merged is None else merged
    with torch.no_grad():
        federated, expected = model(inputs).numpy(), merged(inputs).numpy()
    graph, names, tensors, dynamic = _graph_inputs(merged, inputs)
    try:
        program = torch.export.export(graph, tuple(t[:2] for t in tensors), dynamic_shapes=dynamic)
    except Exception as error:  # torch.export raises many kinds; all mean it cannot trace this model
        raise ExportError(f"{_kind(model)}: torch.export cannot trace it ({_first_line(error)}), so neither onnx "
                          "nor torch can be written; --format peft still works for lora and head runs") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        try:
            with known_notices_silenced():
                torch.onnx.export(program, (), str(path), input_names=names, output_names=["logits"], dynamo=True,
                                  external_data=False, verbose=False,
                                  optimize=False)  # constant folding would turn the int8 weights back into fp32
        except Exception as error:  # the converter's errors have no common class either
            path.unlink(missing_ok=True)
            raise ExportError(f"{_kind(model)}: ONNX cannot express its traced program ({_first_line(error)}); "
                              "use --format torch") from error
    else:
        buffer = io.BytesIO()  # torch.export wants a path ending in .pt2, or a buffer
        torch.export.save(program, buffer)
        path.write_bytes(buffer.getvalue())
    if compress:
        path.write_bytes(lzma.compress(path.read_bytes(), preset=9))
    # Checked as a device loads it: from the file on disk, decompressed if it was compressed.
    loaded = load_model_bytes(path)
    got = run_onnx(loaded, dict(zip(names, tensors))) if format == "onnx" else run_program(loaded, tensors)
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise ExportError(f"the {format} model's outputs differ from PyTorch's by {difference:.2e} "
                          f"(more than {TOLERANCE:.0e}); nothing was written")
    agreement = float((federated.argmax(-1) == expected.argmax(-1)).mean())
    return ExportResult(path, format, path.stat().st_size, difference, len(federated), agreement,
                        sparsity=weight_sparsity(merged), loaded_bytes=len(loaded) if compress else None)


def load_model_bytes(path: Path) -> bytes:
    """An exported file's model, decompressed if it is a pruned (``.xz``) export."""
    data = path.read_bytes()
    return lzma.decompress(data) if data.startswith(b"\xfd7zXZ\x00") else data


TOKENS = ("input_ids", "attention_mask")  # a text model's inputs, in the exported graph's order


class TokenInputs(nn.Module):
    """A text model taking its token tensors positionally, so the graph's inputs are flat and named."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def _graph_inputs(merged: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]):
    """(module, input names, input tensors, dynamic shapes): any batch size, and any length of text."""
    batch = torch.export.Dim("batch", min=1)
    if isinstance(inputs, Mapping):
        if set(inputs) != set(TOKENS):
            raise ExportError(f"text inputs must be {' and '.join(TOKENS)}, got {', '.join(inputs)}")
        length = {0: batch, 1: torch.export.Dim.AUTO}
        return TokenInputs(merged), list(TOKENS), [inputs[name] for name in TOKENS], (length, length)
    return merged, ["images"], [inputs], ({0: batch},)


class _DropLines(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextlib.contextmanager
def known_notices_silenced() -> Iterator[None]:
    """While exporting: the libraries' known notices (``KNOWN_LOG_LINES``, ``KNOWN_WARNINGS``) unsaid."""
    filters = [(logging.getLogger(name), _DropLines(start)) for name, start in KNOWN_LOG_LINES.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


def _kind(model: nn.Module) -> str:
    if isinstance(model, HuggingFaceModel):
        return f"the {model.task} model {type(model.model).__name__}"
    return f"the torch model {type(model).__name__}"


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def run_onnx(model: bytes, feeds: Mapping[str, torch.Tensor], threads: int = 0) -> np.ndarray:
    """An ONNX model's logits on ONNX Runtime's CPU provider (``threads`` 0: its own choice)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {name: tensor.numpy() for name, tensor in feeds.items()})[0]


def run_program(program: bytes, tensors: list[torch.Tensor]) -> np.ndarray:
    """A saved torch.export program's logits."""
    with torch.no_grad():
        return torch.export.load(io.BytesIO(program)).module()(*tensors).numpy()


def peft_base(name: str, num_classes: int) -> nn.Module:
    """The fp32 base a peft export of ``model.name=name`` loads onto, built as Pollen builds it.

    A Hugging Face model (a directory, minilm-l6) gives the transformers model itself, what
    ``AutoModelFor<task>.from_pretrained(path, num_labels=num_classes)`` loads; a torch model
    (tiny-cnn, efficientnet-lite0, a factory) gives what its factory returns, under Pollen's
    base seed (tiny-cnn's random base depends on it). Its head is replaced by the adapter's.
    """
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)
        model, _ = model_factory(name)(num_classes)
    return (model.model if isinstance(model, HuggingFaceModel) else model).eval()


def export_peft(config: Config, model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor],
                path: Path) -> ExportResult:
    """Write the run's adapters and head as a peft adapter directory; check peft reproduces the model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if config.model.trainable == "full":
        raise ExportError("--format peft: a model.trainable=full run changed every weight and has no adapter; "
                          "use --format onnx or torch")
    hf = isinstance(model, HuggingFaceModel)
    prefix = "model." if hf else ""  # Pollen wraps a transformers model; peft takes it unwrapped
    layers = {name.removeprefix(prefix): module for name, module in model.named_modules()
              if isinstance(module, LoraLayer)}
    head = _head(model)
    settings = dataclasses.replace(
        getattr(model, "peft_config", {}).get("default") or LoraConfig(),  # r, alpha, ... the run trained with
        target_modules=sorted(layers) or DUMMY_TARGET_MODULES,  # peft's placeholder for "no LoRA layer" (head runs)
        fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),  # GPT-2's Conv1D
        modules_to_save=[head.removeprefix(prefix)] if head else None,
        task_type=PEFT_TASKS.get(model.task) if hf else None,
    )
    with known_notices_silenced():
        adapter = get_peft_model(_bare_base(model), settings)
    # Set after get_peft_model, which takes it from the model (a torch model has none).
    adapter.peft_config["default"].base_model_name_or_path = _base_source(config.model.name, model)
    _copy_trained(model, adapter, prefix)
    before = set(os.listdir(path)) if path.is_dir() else set()
    adapter.save_pretrained(str(path), save_embedding_layers=False)  # none is trained; skips a Hub look-up
    # Loaded back by peft onto the run's own base (head zeroed), it must compute what Pollen's model does.
    with known_notices_silenced():
        loaded = PeftModel.from_pretrained(_bare_base(model), str(path)).eval()
    check = HuggingFaceModel(loaded, model.task) if hf else loaded
    with torch.no_grad():
        federated, got = model(inputs).numpy(), check(inputs).numpy()
    difference = float(np.abs(got - federated).max())
    if not difference <= PEFT_TOLERANCE:
        for name in (set(os.listdir(path)) - before) | set(ADAPTER_FILES):
            (path / name).unlink(missing_ok=True)
        raise ExportError(f"peft's model differs from Pollen's by {difference:.2e} (more than "
                          f"{PEFT_TOLERANCE:.0e}); nothing was written")
    agreement = float((federated.argmax(-1) == got.argmax(-1)).mean())
    size = sum((path / name).stat().st_size for name in ADAPTER_FILES)
    return ExportResult(path, "peft", size, difference, len(federated), agreement)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # peft also writes a README.md model card


def _head(model: nn.Module) -> str | None:
    """The head's module name: where the trained parameters that are not LoRA's live (None: no head)."""
    paths = [name.split(".")[:-1] for name, param in model.named_parameters()
             if param.requires_grad and "lora_" not in name]
    return ".".join(os.path.commonprefix(paths)) or None


def _base_source(name: str, model: nn.Module) -> str:
    """adapter_config.json's base_model_name_or_path: the model directory, or Pollen's name of a torch model."""
    if isinstance(model, HuggingFaceModel):
        return str(Path(model.model.name_or_path).expanduser().resolve())
    return f"pollen:{name}"


def _bare_base(model: nn.Module) -> nn.Module:
    """A copy of the run's base: LoRA layers unwrapped, head zeroed (the adapter must bring it), unwrapped for peft."""
    base = copy.deepcopy(model)
    base.__dict__.pop("peft_config", None)
    for name, module in list(base.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            _replace(base, name, module.base_layer)
    with torch.no_grad():
        for param in base.parameters():
            if param.requires_grad:
                param.zero_()
    return base.model if isinstance(base, HuggingFaceModel) else base


def _copy_trained(model: nn.Module, adapter: nn.Module, prefix: str) -> None:
    """Pollen's trained values into the peft model's parameters of the same names.

    peft names them ``base_model.model.<name>``, and a head's ``<head>.modules_to_save.default.<param>``.
    """
    ours = {name: param for name, param in model.named_parameters() if param.requires_grad}
    theirs = {prefix + name.removeprefix("base_model.model.").replace(".modules_to_save.default.", "."): param
              for name, param in adapter.named_parameters() if param.requires_grad}
    if set(ours) != set(theirs):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise ExportError(f"peft's adapter does not hold the run's trained parameters: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
