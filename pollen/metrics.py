"""Classification metrics of a model on a split, shared by central and federated evaluation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from pollen.data import Split


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 256) -> dict[str, float]:
    """Accuracy, mean cross-entropy and macro precision/recall/F1."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    losses, predictions = [], []
    for start in range(0, len(split), batch_size):
        logits = model(split.images[start:start + batch_size])
        labels = split.labels[start:start + batch_size]
        losses.append(F.cross_entropy(logits, labels, reduction="sum").item())
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions).numpy()
    truth = split.labels.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="macro", zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "loss": float(sum(losses) / len(split)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
