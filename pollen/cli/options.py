"""Options every ``pollen`` command spells the same way: ``--threads N``, ``-v/--verbose``, ``--tensorboard``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pollen.threads import RULE

if TYPE_CHECKING:
    from pollen.config import Config


def add_threads_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--threads", type=positive_int, metavar="N", help=f"torch threads (default: {RULE})")


def add_verbose_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("-v", "--verbose", action="store_true",
                         help="show Flower's and torch's log at INFO (default: warnings and errors only)")


def add_tensorboard_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--tensorboard", action="store_true",
                         help="also write each round's scalars as TensorBoard events into the run folder "
                              "(the key tensorboard: true; needs pip install 'pollen[tensorboard]')")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The command's ``--set`` overrides, with ``tensorboard=true`` for ``--tensorboard``."""
    return [*args.overrides, *(["tensorboard=true"] if args.tensorboard else [])]


def positive_int(text: str) -> int:
    """argparse's type for a count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def use_threads(threads: int | None, config: Config | None) -> int:
    """Set torch's thread count in this process to ``threads``, or by the rule of ``pollen.threads``
    for ``config``'s model (None: a model not known yet); returns the count."""
    import torch

    from pollen.threads import default_threads

    chosen = threads or default_threads(config)
    torch.set_num_threads(chosen)
    return chosen
