"""The run's plot: accuracy by round, by uplink MB and (with simulated devices) by simulated time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pollen.run_folder import RoundRecord  # noqa: E402

MB = 1e6


def cumulative_uplink_mb(records: list[RoundRecord]) -> list[float]:
    total, out = 0, []
    for entry in records:
        total += entry.uplink_bytes
        out.append(total / MB)
    return out


def plot_run(records: list[RoundRecord], path: Path, label: str = "run") -> Path:
    """Accuracy vs round, vs cumulative uplink MB and (with simulated devices) vs simulated time."""
    simulated = all(entry.simulated_seconds is not None for entry in records)
    fig, axes = plt.subplots(1, 3 if simulated else 2, figsize=(16 if simulated else 11, 4))
    by_round, by_bytes = axes[:2]
    rounds = [entry.round for entry in records]
    accuracy = [entry.accuracy for entry in records]
    by_round.plot(rounds, accuracy, marker="o", label=label)
    by_round.set(xlabel="round", ylabel="test accuracy", title="Accuracy by round")
    by_bytes.plot(cumulative_uplink_mb(records), accuracy, marker="o", label=label)
    by_bytes.set(xlabel="cumulative uplink (MB on the wire)", ylabel="test accuracy",
                 title="Accuracy by uplink traffic")
    if simulated:
        axes[2].plot([entry.simulated_seconds / 60 for entry in records], accuracy, marker="o", label=label)
        axes[2].set(xlabel="simulated time (min)", ylabel="test accuracy",
                    title="Accuracy by simulated device time")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(confusion: list[list[int]], path: Path) -> Path:
    """The confusion matrix of the final model on the central split: each row (true class) as shares,
    with the counts written in the cells when the classes are few enough to read them."""
    import numpy as np

    counts = np.asarray(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    classes = len(counts)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * max(classes, 6), 1 + 0.45 * max(classes, 6)))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if classes <= 20:
        for (row, column), count in np.ndenumerate(counts):
            ax.text(column, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if shares[row, column] > 0.5 else "black")
    ticks = range(classes) if classes <= 30 else range(0, classes, max(1, classes // 15))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set(xlabel="predicted class", ylabel="true class", title="Final model on the central test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
