"""Early stopping on the central accuracy: ``federation.early_stopping``.

After each round the server asks ``EarlyStop.after``: the run stops once the accuracy
has not beaten the best so far by more than ``min_delta`` for ``patience`` rounds, and
the best round's global arrays become the run's model, the one the checkpoint and
``pollen export`` hold. A resumed run counts its patience afresh from the round it
resumes at.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord

from pollen.config import EarlyStopping
from pollen.wording import counted


class EarlyStop:
    """The best round so far, its accuracy and its global arrays."""

    def __init__(self, settings: EarlyStopping, server_round: int, accuracy: float, arrays: ArrayRecord) -> None:
        self.settings = settings
        self.keep(server_round, accuracy, arrays)

    def keep(self, server_round: int, accuracy: float, arrays: ArrayRecord) -> None:
        self.best_round, self.best_accuracy = server_round, accuracy
        self.best_arrays = ArrayRecord({name: Array(array.numpy().copy()) for name, array in arrays.items()})

    def after(self, server_round: int, accuracy: float, arrays: ArrayRecord) -> str | None:
        """Why the run stops after this round (None: it goes on); a better round is kept first."""
        if accuracy > self.best_accuracy + self.settings.min_delta:
            self.keep(server_round, accuracy, arrays)
            return None
        waited = server_round - self.best_round
        if not self.settings.patience or waited < self.settings.patience:
            return None
        return (f"no accuracy gain above {self.settings.min_delta:g} for {counted(waited, 'round')}: "
                f"stopped after round {server_round}, kept round {self.best_round}'s model "
                f"(accuracy {self.best_accuracy:.4f})")
