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
