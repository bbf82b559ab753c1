"""Weight-only quantization of a frozen base: one verb and a scheme.

``quantize_base(model, names, "int4")`` (or ``Int4WeightOnly(group_size=64)``, or
``"int8"``, or ``"none"``) stores the weights of the named layers in low precision
and hands every forward a dequantized fp32 weight, so gradients flow through the
base to adapters and head while the base itself stays frozen. Linear maps get a
``torch.nn.utils.parametrize`` parametrization (the layer stays a plain
``nn.Linear``/``nn.Conv2d`` for peft); an ``nn.Embedding`` becomes a
``QuantizedEmbedding``, which dequantizes only the rows a lookup reads.

    int8   per row (output channel, or embedding row), symmetric, fp32 scale
           per row: ~1 byte a weight. The scheme of torchao's Int8WeightOnlyConfig.
    int4   per group of ``group_size`` (32) consecutive weights along the input
           dimension (along the vector, for an embedding row), asymmetric to [-8, 7]
           with an fp32 scale and an int8 zero point per group, two values packed
           per byte: ~0.66 byte a weight. The scheme of torchao's
           IntxWeightOnlyConfig(torch.int4, PerGroup(32), MappingType.ASYMMETRIC);
           asymmetric because it uses all 16 levels on skewed groups: on MiniLM's
           linear maps it cuts the weight error from 9.9% to 8.3% and lifts the
           sentence-embedding cosine to fp32 from 0.959 to 0.972, for 0.03 byte a weight.

Both schemes are built on torchao's affine primitives (choose_qparams_affine,
quantize_affine, dequantize_affine; int4 gives bit for bit the weights of that
``IntxWeightOnlyConfig``), not on ``torchao.quantization.quantize_``: peft wraps only
plain layers, 1x1 convolutions and embeddings need covering too (``quantize_``
converts ``nn.Linear`` only), and on CPU with torchao 0.18 none of its 4-bit tensors
fits: ``Int4WeightOnlyConfig``'s packing formats need the mslk kernels or CUDA (or
refuse CPU), and ``IntxWeightOnlyConfig``'s CPU format (unpacked_to_int8) keeps one
int4 value per int8 byte, no smaller than int8. The aten CPU kernel
``_weight_int4pack_mm_for_cpu`` does pack two per byte but has no backward, so no
gradient would reach adapters below it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from math import prod

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torchao.quantization import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)

INT4_MIN, INT4_MAX = -8, 7


class Int8Weight(nn.Module):
    """Weight parametrization: stored as int8 with one scale per row, used as fp32.

    Same scheme as torchao's ``Int8WeightOnlyConfig`` (symmetric, per row). For an
    embedding a row is one token's vector.
    """

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = (1, *weight.shape[1:])
        scale, zero = choose_qparams_affine(weight, MappingType.SYMMETRIC, block, torch.int8)
        return quantize_affine(weight, block, scale, zero, torch.int8), scale

    def forward(self, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        block = (1, *qweight.shape[1:])
        return dequantize_affine(qweight, block, scale, None, torch.int8, output_dtype=torch.float32)


class Int4Weight(nn.Module):
    """Weight parametrization: int4, a scale and zero point per group of weights in a row, two per byte.

    The weight is seen as rows (output channels, or embedding rows) of ``in`` values,
    padded with zeros to a multiple of ``group_size`` and cut back after dequantizing
    (zeros change no group's scale: torchao's affine range always includes 0).
    """

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size
        self.shape: torch.Size | None = None  # of the fp32 weight, set by right_inverse

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.shape = weight.shape
        rows = weight.reshape(weight.shape[0], -1)
        rows = F.pad(rows, (0, -rows.shape[1] % self.group_size))
        block = (1, self.group_size)
        scale, zero = choose_qparams_affine(rows, MappingType.ASYMMETRIC, block, torch.int8, INT4_MIN, INT4_MAX,
                                            zero_point_dtype=torch.int8)
        values = quantize_affine(rows, block, scale, zero, torch.int8, INT4_MIN, INT4_MAX)
        return pack_int4(values), scale, zero

    def forward(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        rows = dequantize_affine(unpack_int4(packed), (1, self.group_size), scale, zero, torch.int8,
                                 INT4_MIN, INT4_MAX, output_dtype=torch.float32)
        # As many rows as given: the whole weight, or the rows an embedding lookup reads.
        return rows[:, :prod(self.shape[1:])].reshape(-1, *self.shape[1:])


class QuantizedEmbedding(nn.Module):
    """An ``nn.Embedding``'s table stored as a scheme's rows; a lookup dequantizes only the rows it reads.

    Not a parametrization like the linear maps: that would dequantize the whole table
    at every forward (MiniLM's: 47.7 MB of fp32 and ~40 ms a step on one core).
    ``weight`` still gives the whole fp32 table to code that asks for it.
    """

    def __init__(self, embedding: nn.Embedding, rows: nn.Module) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.rows = rows  # Int8Weight or Int4Weight: one row per token
        stored = rows.right_inverse(embedding.weight.detach())  # values, scale(, zero point), row by row
        self.names = ("values", "scale", "zero")[:len(stored)]
        for name, tensor in zip(self.names, stored):
            self.register_buffer(name, tensor)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        read = self.rows(*(getattr(self, name)[flat] for name in self.names))
        return read.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(*(getattr(self, name) for name in self.names))


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], an even number per row -> uint8, element 2i in the low nibble."""
    nibbles = (values + 8).to(torch.uint8)  # offset binary: 0..15
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 -> int8 values in [-8, 7], twice as many per row."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return nibbles.to(torch.int8) - 8


@dataclass(frozen=True)
class Int8WeightOnly:
    """int8 weights, one scale per row."""

    def parametrization(self) -> nn.Module:
        return Int8Weight()


@dataclass(frozen=True)
class Int4WeightOnly:
    """int4 weights packed two per byte, a scale and zero point per ``group_size`` weights along a row."""

    group_size: int = 32

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size: must be even and at least 2 (values pack in pairs), got {self.group_size}")

    def parametrization(self) -> nn.Module:
        return Int4Weight(self.group_size)


Scheme = Int8WeightOnly | Int4WeightOnly
# model.quantize's values; "none" keeps the base in fp32.
SCHEMES: dict[str, Scheme | None] = {"int8": Int8WeightOnly(), "int4": Int4WeightOnly(), "none": None}


def quantize_base(model: nn.Module, names: list[str], scheme: str | Scheme | None) -> None:
    """Freeze the named layers' weights and store them as ``scheme`` says (a name in SCHEMES or a config)."""
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
        scheme = SCHEMES[scheme]
    if scheme is None:
        return
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedEmbedding(module, scheme.parametrization()))
        else:
            module.weight.requires_grad_(False)
            parametrize.register_parametrization(module, "weight", scheme.parametrization(), unsafe=True)


def linear_maps(base: nn.Module) -> list[str]:
    """Names of the base's linear maps: nn.Linear, 1x1 convolutions and transformers' Conv1D
    (GPT-2's linear map with a transposed weight); peft's LoRA targets too.

    Spatial and depthwise convolutions stay fp32: they hold ~3% of EfficientNet-Lite0's
    weights, and int8 there (9 weights per channel) more than doubles the feature error.
    A Conv1D weight is [in, out], so its rows (int8) and groups (int4) run along the
    output dimension instead; the scheme is the same.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # loaded with any HF model
    return [name for name, module in base.named_modules()
            if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))
            or (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1)]


def quantizable_layers(base: nn.Module) -> list[str]:
    """Names of the layers ``quantize_base`` is meant for: the linear maps, then the embeddings.

    Embeddings are quantized row-wise (int8) or group-wise along the row (int4) and stay
    frozen; LoRA targets only the linear maps. A text model's embeddings are most of
    its weights (MiniLM-L6: 11.9M of 22.7M).
    """
    # max_norm renormalises looked-up rows in place: such a table stays fp32.
    embeddings = [name for name, module in base.named_modules()
                  if isinstance(module, nn.Embedding) and module.max_norm is None]
    return linear_maps(base) + embeddings
