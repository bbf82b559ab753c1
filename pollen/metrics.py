"""Loss and metrics of a model on a split, shared by training, central and federated evaluation.

Classification labels are one class per example. A causal LM's labels are the next
token at each position (``IGNORE`` where nothing is learned): its loss and metrics are
over the tokens it must predict.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from pollen.data import Split
from pollen.text_data import IGNORE, TextSplit


def predicted_and_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (logits, targets) of what is predicted: one per example, or each next token that is learned."""
    if labels.dim() == 1:
        return logits, labels
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    learned = labels != IGNORE
    return logits[learned], labels[learned]


def loss_of(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the examples' classes, or over the next tokens a causal LM learns."""
    return F.cross_entropy(*predicted_and_targets(logits, labels), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split | TextSplit, batch_size: int = 256) -> dict[str, float]:
    """Accuracy, mean cross-entropy and macro precision/recall/F1 (per example, or per learned token)."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    losses, predictions, targets = [], [], []
    for start in range(0, len(split), batch_size):
        batch = slice(start, start + batch_size)
        logits, labels = predicted_and_targets(model(split.inputs_of(batch)), split.labels[batch])
        losses.append(F.cross_entropy(logits, labels, reduction="sum").item())
        predictions.append(logits.argmax(dim=1))
        targets.append(labels)
    predicted = torch.cat(predictions).numpy()
    truth = torch.cat(targets).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="macro", zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "loss": float(sum(losses) / len(truth)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
