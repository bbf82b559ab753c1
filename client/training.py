"""Local fine-tuning: the whole training step, top to bottom."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pollen.config import TrainConfig
from pollen.data import Split
from pollen.metrics import loss_of
from pollen.text_data import TextSplit


@dataclass
class LocalRun:
    """What one local training leaves besides the model."""

    loss: float  # mean training loss over every sample seen
    optimizer: torch.optim.AdamW
    named: list[tuple[str, torch.Tensor]]  # the trainable parameters, in order

    @functools.cached_property
    def gradient_rms(self) -> dict[str, np.ndarray]:
        """Per trainable array: the RMS of its gradients (AdamW's second moment), read when asked."""
        return {name: _gradient_rms(self.optimizer, p) for name, p in self.named}


def train_locally(model: nn.Module, data: Split | TextSplit, settings: TrainConfig, *, proximal_mu: float = 0.0,
                  seed: int = 0) -> LocalRun:
    """AdamW on the trainable parameters for ``settings.local_epochs`` passes.

    ``settings.adam_eps`` is AdamW's epsilon: gradients much smaller than it take steps
    in proportion to their size rather than steps of about ``lr``.

    With ``proximal_mu`` > 0 the FedProx term mu/2 * ||w - w_global||^2 keeps the
    local model near the global one it started from.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  eps=settings.adam_eps)
    generator = torch.Generator().manual_seed(seed)
    model.eval()  # frozen BatchNorm statistics and the base's dropout; only the trainable parts learn
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):  # the adapters' own dropout (model.lora.dropout) does apply
            module.train()
    total, seen = 0.0, 0
    for _ in range(settings.local_epochs):
        for batch in torch.randperm(len(data), generator=generator).split(settings.batch_size):
            loss = loss_of(model(data.training_inputs(batch, generator)), data.labels[batch])
            if proximal_mu > 0:
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
                loss = loss + proximal_mu / 2 * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
    model.eval()
    return LocalRun(total / seen, optimizer, named)


def _gradient_rms(optimizer: torch.optim.AdamW, param: torch.Tensor) -> np.ndarray:
    """sqrt of AdamW's bias-corrected second moment: the RMS of the parameter's recent gradients."""
    state = optimizer.state.get(param)
    if not state:  # no gradient ever reached it
        return np.zeros(tuple(param.shape), np.float32)
    beta2 = optimizer.param_groups[0]["betas"][1]
    second = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
    return second.sqrt().detach().cpu().numpy().astype(np.float32)
