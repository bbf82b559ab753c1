"""Weight-only int8 and int4 bases: packing, bytes, closeness to fp32, gradients to LoRA, embeddings."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, quantize_
from torchao.quantization.granularity import PerGroup

from pollen.config import ConfigError, ModelConfig, load_config
from pollen.models import build_model, resident_bytes, trainable_arrays
from pollen.quantize import (
    Int4Weight,
    Int4WeightOnly,
    QuantizedEmbedding,
    linear_maps,
    pack_int4,
    quantizable_layers,
    quantize_base,
    unpack_int4,
)

# Relative output error ||y_q - y|| / ||y|| on random weights and inputs: int8's step is
# 1/127 of a row's range, int4's 1/15 of a 32-weight group's (measured 0.004-0.006, 0.07-0.08).
TOLERANCE = {"int8": 0.01, "int4": 0.12}


class TinyTextModel(nn.Module):
    """Token ids -> embedding -> two linear maps -> head: a text model in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids).mean(dim=1)))


def seeded(module_class, *args):
    torch.manual_seed(0)
    return module_class(*args)


def quantized(module: nn.Module, scheme) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(module))
    quantize_base(holder, ["0"], scheme)
    return holder[0]


def test_int4_packs_two_values_per_byte():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # every int4 value, 32 a row
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), values)
    layer = quantized(seeded(nn.Linear, 64, 16), "int4")
    stored = layer.parametrizations.weight.original0
    assert stored.dtype == torch.uint8 and stored.numel() == 64 * 16 // 2


def test_resident_bytes_of_a_quantized_linear_and_embedding():
    linear, table = seeded(nn.Linear, 256, 64, False), seeded(nn.Embedding, 1000, 64)
    assert resident_bytes(linear) == 256 * 64 * 4
    assert resident_bytes(quantized(linear, "int8")) == 256 * 64 + 64 * 4  # int8 values, fp32 scale a row
    # int4: half a byte a value; fp32 scale and int8 zero point per 32 values.
    assert resident_bytes(quantized(linear, "int4")) == 256 * 64 // 2 + 64 * (256 // 32) * (4 + 1)
    assert resident_bytes(table) == 1000 * 64 * 4
    assert resident_bytes(quantized(table, "int8")) == 1000 * 64 + 1000 * 4
    assert resident_bytes(quantized(table, "int4")) == 1000 * 64 // 2 + 1000 * (64 // 32) * (4 + 1)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_outputs_are_close_to_fp32(scheme):
    x, ids = torch.randn(16, 96), torch.randint(0, 200, (4, 7))
    for layer, inputs in [(seeded(nn.Linear, 96, 40), x), (seeded(nn.Conv2d, 96, 40, 1), x.view(16, 96, 1, 1)),
                          (seeded(nn.Embedding, 200, 48), ids)]:
        with torch.no_grad():
            expected, got = layer(inputs), quantized(layer, scheme)(inputs)
        assert got.shape == expected.shape
        assert (got - expected).norm() / expected.norm() < TOLERANCE[scheme], type(layer).__name__


def test_int4_pads_rows_that_are_not_a_whole_number_of_groups():
    conv = seeded(nn.Conv2d, 24, 16, 1)  # EfficientNet-Lite0 has 1x1 convs of 16, 24, 40 ... inputs
    int4 = quantized(conv, "int4")
    stored = int4.parametrizations.weight
    assert stored.original0.shape == (16, 16) and stored.original1.numel() == 16  # 24 -> one padded group a row
    assert stored[0].group_size == 32 and int4.weight.shape == conv.weight.shape
    x = torch.randn(2, 24, 3, 3)
    with torch.no_grad():
        assert (int4(x) - conv(x)).norm() / conv(x).norm() < TOLERANCE["int4"]


def test_weights_are_torchaos_own_schemes_bit_for_bit():
    linear = seeded(nn.Linear, 96, 40)
    int8, int4 = copy.deepcopy(linear), copy.deepcopy(linear)
    quantize_(int8, Int8WeightOnlyConfig())
    quantize_(int4, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                         mapping_type=MappingType.ASYMMETRIC))
    assert torch.equal(quantized(linear, "int8").weight, int8.weight.dequantize())
    assert torch.equal(quantized(linear, "int4").weight, int4.weight.dequantize())


def test_embeddings_are_quantized_row_by_row():
    table = seeded(nn.Embedding, 20, 64)
    with torch.no_grad():
        table.weight[3] *= 1000  # one huge row must not coarsen the others
    row_max = table.weight.detach().abs().amax(dim=1, keepdim=True)
    # Each row within a step of its own scale: half of max/127 (int8), one of range/15 (int4).
    for scheme, scale_shape, bound in [("int8", (20,), row_max / 254), ("int4", (20, 2), row_max * 2 / 15)]:
        embedding = quantized(table, scheme)
        assert isinstance(embedding, QuantizedEmbedding) and embedding.scale.shape == scale_shape
        assert torch.all((embedding.weight - table.weight).abs() <= bound * 1.001 + 1e-7)
        ids = torch.tensor([[3, 0, 19], [5, 5, 1]])
        assert torch.equal(embedding(ids), embedding.weight[ids])  # a lookup reads only its rows, same values


def test_gradients_reach_lora_on_an_int4_base_and_the_base_stays_frozen():
    from peft import LoraConfig, inject_adapter_in_model

    model = seeded(TinyTextModel)
    base = [n for n in quantizable_layers(model) if n != "head"]
    assert base == ["body.0", "body.2", "embed"]
    quantize_base(model, base, "int4")
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["body.0", "body.2"]), model)
    for name, p in model.named_parameters():  # as build_model marks them
        p.requires_grad = "lora_" in name or name.startswith("head.")
    with torch.no_grad():  # LoRA B starts at zero; give it a value so A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    F.cross_entropy(model(torch.randint(0, 50, (8, 5))), torch.randint(0, 3, (8,))).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n and not n.startswith("head.")]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert isinstance(model.body[0].base_layer.parametrizations.weight[0], Int4Weight)
    assert not list(model.embed.parameters())  # the table is buffers: nothing to train there


def test_build_model_gives_an_int4_base_that_trains_lora_and_head():
    config = ModelConfig(name="tiny-cnn", trainable="lora", quantize="int4", image_size=8)
    model = build_model(config, 10)
    fp32 = build_model(ModelConfig(name="tiny-cnn", trainable="lora", quantize="none", image_size=8), 10)
    int8 = build_model(ModelConfig(name="tiny-cnn", trainable="lora", quantize="int8", image_size=8), 10)
    parametrized = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(parametrized) == 2  # the 1x1 conv and the linear map; the 3x3 conv and the head stay fp32
    assert all(isinstance(m.parametrizations.weight[0], Int4Weight) for m in parametrized)
    assert resident_bytes(model) < resident_bytes(int8) < resident_bytes(fp32)
    assert set(trainable_arrays(model)) == set(trainable_arrays(int8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.arange(4)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_linear_maps_are_loras_targets_and_embeddings_are_not():
    model = seeded(TinyTextModel)
    assert linear_maps(model) == ["body.0", "body.2", "head"]
    assert quantizable_layers(model) == ["body.0", "body.2", "head", "embed"]


def test_a_bad_quantize_value_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="model.quantize: 'int3' is not one of int8, int4, none"):
        load_config(None, ["model.quantize=int3"])


def test_a_quantized_base_cannot_be_fine_tuned_in_full():
    for scheme in ("int8", "int4"):
        with pytest.raises(ConfigError, match="model.quantize: an " + scheme):
            ModelConfig(trainable="full", quantize=scheme).check()
    ModelConfig(trainable="full", quantize="none").check()


def test_quantize_base_refuses_unknown_schemes_and_odd_groups():
    with pytest.raises(ValueError, match="int3"):
        quantize_base(nn.Sequential(nn.Linear(4, 4)), ["0"], "int3")
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnly(group_size=7)
    layer = quantized(seeded(nn.Linear, 128, 8), Int4WeightOnly(group_size=64))
    assert layer.parametrizations.weight.original1.shape == (8, 2)
