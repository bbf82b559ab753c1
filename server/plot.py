"""The run's plots: accuracy by round, by MB on the wire, by simulated time; the final confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from pollen.config import CodecConfig, Config, DownlinkConfig  # noqa: E402
from pollen.run_folder import RoundRecord  # noqa: E402

MB = 1e6


def cumulative_mb(records: list[RoundRecord], downlink: bool = True) -> list[float]:
    """MB on the wire up to and including each round: uplink, plus downlink unless ``downlink`` is False."""
    total, out = 0, []
    for entry in records:
        total += entry.uplink_bytes + (entry.downlink_bytes if downlink else 0)
        out.append(total / MB)
    return out


def codec_label(codec: CodecConfig) -> str:
    """What the uplink sends, as a person says it: "top-k 1%, 8-bit", "dense fp32"."""
    if codec.name == "identity":
        return "dense fp32"
    density = f"up to {codec.density * 100:g}% by deadline" if codec.fit_deadline else f"{codec.density * 100:g}%"
    return f"top-k {density}, " + ("signs" if codec.bits == 1 else f"{codec.bits}-bit")


def downlink_label(downlink: DownlinkConfig) -> str:
    """How the downlink differs from its default, as a person says it: "down 10% budget, 8-bit" ("": default)."""
    if downlink.name == "identity":
        return "down dense fp32"
    budget = "no budget" if downlink.budget == 1 else f"{downlink.budget * 100:g}% budget"
    parts = [budget] if downlink.budget != DownlinkConfig.budget else []
    parts += [f"steps {downlink.density * 100:g}%"] if downlink.density < 1 else []
    parts += [f"{downlink.bits}-bit"] if downlink.bits != DownlinkConfig.bits else []
    return "down " + ", ".join(parts) if parts else ""


def run_label(config: Config) -> str:
    """What a run sends and trains, as a person says it: "top-k 1%, 8-bit; LoRA"."""
    trained = {"lora": "LoRA", "head": "head only", "full": "full fine-tune"}.get(config.model.trainable,
                                                                                   config.model.trainable)
    if config.model.trainable == "lora" and not config.model.lora.train_a:
        trained = "LoRA, B only"
    return "; ".join(part for part in (codec_label(config.codec), downlink_label(config.downlink), trained) if part)


def log_scale_if_wide(axis: plt.Axes, values: list[float]) -> None:
    """A log x axis, plainly labelled (1, 2, 5, 10, ...), when the values span more than 10x."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        axis.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
        axis.xaxis.set_minor_formatter(plain)


def plot_run(records: list[RoundRecord], path: Path, label: str = "run") -> Path:
    """Accuracy by round, by MB on the wire (uplink alone and uplink + downlink, what a device
    pays) and, with simulated devices, by simulated time."""
    simulated = all(entry.simulated_seconds is not None for entry in records)
    fig, axes = plt.subplots(1, 3 if simulated else 2, figsize=(15 if simulated else 10.5, 4.2))
    by_round, by_bytes = axes[:2]
    rounds = [entry.round for entry in records]
    accuracy = [entry.accuracy for entry in records]
    by_round.plot(rounds, accuracy, marker="o", label=label)
    by_round.set(xlabel="round", ylabel="central test accuracy", title="Accuracy by round")
    by_round.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    trained = records[1:] or records  # round 0 sends nothing: no place on an MB axis
    up, both = cumulative_mb(trained, downlink=False), cumulative_mb(trained)
    by_bytes.plot(both, [e.accuracy for e in trained], marker="o", label="uplink + downlink")
    by_bytes.plot(up, [e.accuracy for e in trained], marker=".", linestyle="--", label="uplink only")
    by_bytes.set(xlabel="MB on the wire so far", ylabel="central test accuracy",
                 title="Accuracy by traffic")  # the run's label is in the first panel's legend
    log_scale_if_wide(by_bytes, up + both)
    if simulated:
        axes[2].plot([entry.simulated_seconds / 60 for entry in records], accuracy, marker="o", label=label)
        axes[2].set(xlabel="simulated time (min)", ylabel="central test accuracy",
                    title="Accuracy by simulated device time")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
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
