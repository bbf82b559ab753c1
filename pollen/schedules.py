"""The clients' learning rate by round: ``train.lr_schedule``.

The server works out each round's rate and sends it with the round's train message, so
every client of a round trains with the same rate and the record shows it.

    constant        train.lr every round
    cosine          from train.lr in round 1 down to train.lr_min in the last round
    step            train.lr times train.lr_gamma after every train.lr_step_rounds rounds
    linear-warmup   rising linearly to train.lr over train.warmup_rounds rounds, then constant
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pollen.config import TrainConfig  # which imports SCHEDULES from here

SCHEDULES = ("constant", "cosine", "step", "linear-warmup")


def learning_rate(train: TrainConfig, server_round: int, rounds: int) -> float:
    """The learning rate clients train with in ``server_round`` (1..rounds) of a ``rounds``-round run."""
    if train.lr_schedule == "cosine":
        progress = (server_round - 1) / max(rounds - 1, 1)
        return train.lr_min + (train.lr - train.lr_min) * (1 + math.cos(math.pi * progress)) / 2
    if train.lr_schedule == "step":
        return train.lr * train.lr_gamma ** ((server_round - 1) // train.lr_step_rounds)
    if train.lr_schedule == "linear-warmup":
        return train.lr * min(1.0, server_round / train.warmup_rounds)
    return train.lr
