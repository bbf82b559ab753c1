"""Evaluation beyond accuracy: per-class scores, the confusion matrix and its plot, the clients' spread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pollen.data import Split
from pollen.metrics import class_report, evaluate, spread
from pollen.server.plot import plot_confusion


class Fixed(nn.Module):
    """Predicts the given class for each example, in order."""

    def __init__(self, guesses):
        super().__init__()
        self.guesses = torch.tensor(guesses)

    def forward(self, images):
        return nn.functional.one_hot(self.guesses[: len(images)], 3).float() * 10


def test_per_class_scores_and_the_confusion_matrix_count_each_prediction():
    split = Split(torch.zeros(6, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2]))
    report = class_report(Fixed([0, 1, 1, 1, 2, 0]), split, num_classes=3)
    assert report["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["support"] == [2, 2, 2] and report["recall"] == [0.5, 1.0, 0.5]
    assert report["precision"][1] == pytest.approx(2 / 3)
    assert evaluate(Fixed([0, 1, 1, 1, 2, 0]), split)["accuracy"] == pytest.approx(4 / 6)


def test_a_class_without_examples_still_has_its_row():
    split = Split(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]))
    report = class_report(Fixed([0, 1]), split, num_classes=3)
    assert report["confusion"][2] == [0, 0, 0] and report["support"] == [1, 1, 0]


def test_the_confusion_plot_is_written(tmp_path):
    path = plot_confusion([[5, 1], [0, 4]], tmp_path / "confusion.png")
    assert path.stat().st_size > 1000


def test_the_spread_names_the_worst_client_and_the_tenth_percentile():
    result = spread([0.9, 0.5, 0.8, 0.7, 1.0, 0.6, 0.9, 0.95, 0.85, 0.75, 0.8])
    assert result["worst"] == 0.5 and result["p10"] == pytest.approx(0.6) and result["mean"] == pytest.approx(0.7955, abs=1e-3)
