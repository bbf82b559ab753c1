"""Loss and metrics of a model on a split, shared by training, central and federated evaluation.

Classification labels are one class per example. A causal LM's labels are the next
token at each position (``IGNORE`` where nothing is learned): its loss and metrics are
over the tokens it must predict.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
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
def predicted(model: nn.Module, split: Split | TextSplit, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, float]:
    """(true classes, predicted classes, summed cross-entropy): per example, or per learned token."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    loss, predictions, targets = 0.0, [], []
    for start in range(0, len(split), batch_size):
        batch = slice(start, start + batch_size)
        logits, labels = predicted_and_targets(model(split.inputs_of(batch)), split.labels[batch])
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(dim=1))
        targets.append(labels)
    return torch.cat(targets).numpy(), torch.cat(predictions).numpy(), loss


def evaluate(model: nn.Module, split: Split | TextSplit, batch_size: int = 256) -> dict[str, float]:
    """Accuracy, mean cross-entropy and macro precision/recall/F1 (per example, or per learned token)."""
    truth, guessed, loss = predicted(model, split, batch_size)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, guessed, average="macro", zero_division=0)
    return {
        "accuracy": float(np.mean(guessed == truth)),
        "loss": float(loss / len(truth)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def class_report(model: nn.Module, split: Split | TextSplit, num_classes: int) -> dict[str, list]:
    """Per class: precision, recall, F1 and support, and the confusion matrix (rows: true, columns: predicted)."""
    truth, guessed, _ = predicted(model, split)
    classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(truth, guessed, labels=classes,
                                                                     zero_division=0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.tolist(), "confusion": confusion_matrix(truth, guessed, labels=classes).tolist()}


def spread(accuracies: list[float]) -> dict[str, float]:
    """How evenly a model serves clients: the worst client's accuracy, the 10th percentile and the mean."""
    values = np.asarray(accuracies, dtype=np.float64)
    return {"worst": float(values.min()), "p10": float(np.percentile(values, 10)), "mean": float(values.mean())}
