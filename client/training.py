"""Local fine-tuning: the whole training step, top to bottom."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pollen.data import Split


def train_locally(model: nn.Module, data: Split, *, epochs: int, batch_size: int, lr: float,
                  weight_decay: float = 0.0, proximal_mu: float = 0.0, seed: int = 0) -> float:
    """AdamW on the trainable parameters for ``epochs`` passes; returns the mean loss.

    With ``proximal_mu`` > 0 the FedProx term mu/2 * ||w - w_global||^2 keeps the
    local model near the global one it started from.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.eval()  # frozen BatchNorm statistics; only the trainable parts learn
    total, seen = 0.0, 0
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=generator).split(batch_size):
            logits = model(data.images[batch])
            loss = F.cross_entropy(logits, data.labels[batch])
            if proximal_mu > 0:
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
                loss = loss + proximal_mu / 2 * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
    return total / seen
