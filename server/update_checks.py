"""Update checks: what the server lets a round's clients and its own step do to the global model.

A decoded update can be well-formed and still hostile or broken: scaled a millionfold,
claiming 1e300 examples, or summing with others to more than float32 holds. Two lines
of defence, both on by default and set under ``federation`` (0 turns a bound off):

Before aggregation, ``screen_updates`` looks at every decoded update of the round:

* ``num-examples`` must be a positive integer (the uplink already refused anything
  else). A client whose size the server knows (a simulation's partition) must claim
  exactly that; any other claim above ``max_examples`` is rejected, and one above
  ``max_weight_ratio`` times the round's median claim is clipped to it, so no single
  client can take the round's weight.
* The update's L2 norm must not exceed ``max_update_norm``, nor ``max_norm_ratio``
  times the round's median norm. Such an update is rejected, not clipped: it is
  broken or hostile, and clipping would keep its direction, which for a scaled or
  poisoned update is the attack itself; with sparse aggregation a coordinate only it
  sent would still take its (clipped) value unaveraged. Rejected, the round is what
  the honest clients alone make of it.

* The update must point the way the rest of the round does: its cosine with the sum
  of the other updates' unit directions must be at least ``min_cosine`` (0: it may not
  oppose them; -1 turns the check off). A sign-flipped update keeps an honest norm and
  passes the norm check; against the others' directions it is negative. Unit
  directions, so that no single update (an attacker's at 9x the median norm) sets
  the reference the others are judged by; the most opposed update goes first and the
  rest are judged again without it, so that attackers do not drag honest updates
  below the bound with them. Only a round that shares a direction is judged (a
  positive mean cosine over all pairs): when the updates are nearly orthogonal, as
  sparse ones early and late in a run often are, every cosine is noise, and the
  check would turn away honest clients at random.

The round rules need at least ``MIN_FOR_MEDIAN`` updates: of two, either may be the odd one.

After aggregation, ``StepGuard`` wraps the strategy, the server's optimizer step and
the broadcast: if any of them raises, or the new global arrays are not finite or move
by more than ``max_step_ratio`` times their own norm, the round is refused. The global
arrays, the strategy's state (FedAvgM's and FedAdam's moments) and the server's
momentum stay as they were before the round, and the record says why.
"""

from __future__ import annotations

import math
import pickle
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import NamedTuple

import numpy as np
from flwr.app import ArrayRecord
from flwr.common import log

from pollen.config import Config
from pollen.data import partitions
from pollen.server.checkpoint import ServerState, pickled

MIN_FOR_MEDIAN = 3  # updates a round needs before its median judges any of them


@dataclass(frozen=True)
class KnownClients:
    """What the server knows of its nodes: readable names, and in a simulation each one's examples."""

    names: Mapping[int, str] = field(default_factory=dict)
    sizes: Mapping[int, int] = field(default_factory=dict)

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node {node_id}")


def simulated_clients(config: Config) -> KnownClients:
    """A simulation's nodes: node id = partition-id + 1 on every backend, each holding its partition."""
    parts = partitions(config, config.federation.num_clients)
    return KnownClients(names={p + 1: f"partition {p}" for p in range(len(parts))},
                        sizes={p + 1: len(part) for p, part in enumerate(parts)})


@dataclass(frozen=True)
class UpdateChecks:
    """The bounds of ``federation.max_*`` and the clients they judge (see the module docstring)."""

    max_norm_ratio: float
    max_update_norm: float
    min_cosine: float
    max_examples: int
    max_weight_ratio: float
    max_step_ratio: float
    clients: KnownClients = KnownClients()

    @classmethod
    def of(cls, config: Config, clients: KnownClients | None = None) -> UpdateChecks:
        fed = config.federation
        return cls(fed.max_norm_ratio, fed.max_update_norm, fed.min_cosine, fed.max_examples, fed.max_weight_ratio,
                   fed.max_step_ratio, clients or KnownClients())


@dataclass(frozen=True)
class Update:
    """What the checks see of one decoded update."""

    node_id: int
    examples: int | float  # the claim: a positive integer (within float range: the uplink checks)
    norm: float  # L2 norm of the decoded delta (inf when it overflows float64)
    # The delta as flat (indices, values); None: no direction to compare (the direction check skips it).
    direction: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Verdict:
    weight: int | float | None  # the num-examples to aggregate with; None: rejected
    reason: str = ""  # why it was rejected or clipped; "" when taken as sent

    @property
    def clipped(self) -> bool:
        return self.weight is not None and bool(self.reason)


def screen_updates(updates: list[Update], checks: UpdateChecks) -> list[Verdict]:
    """One verdict per update: rejected, accepted, or accepted with its weight clipped."""
    verdicts = [check_claim(update.node_id, update.examples, checks) for update in updates]
    verdicts = [_norm_verdict(update, checks) if verdict.weight is not None else verdict
                for update, verdict in zip(updates, verdicts)]
    kept = [i for i, verdict in enumerate(verdicts) if verdict.weight is not None]
    if checks.max_norm_ratio and len(kept) >= MIN_FOR_MEDIAN:
        median = statistics.median(updates[i].norm for i in kept)
        bound = checks.max_norm_ratio * median
        for i in kept:
            if median > 0 and updates[i].norm > bound:
                verdicts[i] = Verdict(None, f"update norm {updates[i].norm:.3g} is above {checks.max_norm_ratio:g} "
                                            f"x the round's median {median:.3g}")
        kept = [i for i in kept if verdicts[i].weight is not None]
    while checks.min_cosine > -1 and len(kept) >= MIN_FOR_MEDIAN:  # the most opposed first, then judge again
        round_agreement = agreement([updates[i] for i in kept])
        if round_agreement.mean_pairwise <= 0:  # no shared direction for any update to oppose
            break
        cosine, worst = min(((c, i) for c, i in zip(round_agreement.cosines, kept) if c is not None),
                            default=(1.0, None))
        if cosine >= checks.min_cosine:
            break
        verdicts[worst] = Verdict(None, f"update direction opposes the round's: cosine {cosine:.2f} with the "
                                        f"others is below federation.min_cosine {checks.min_cosine:g}")
        kept.remove(worst)
    if checks.max_weight_ratio and len(kept) >= MIN_FOR_MEDIAN:
        median = statistics.median(float(verdicts[i].weight) for i in kept)
        bound = checks.max_weight_ratio * median
        for i in kept:
            if updates[i].node_id not in checks.clients.sizes and verdicts[i].weight > bound:
                verdicts[i] = Verdict(bound, f"num-examples {verdicts[i].weight:g} clipped to {bound:g} "
                                             f"({checks.max_weight_ratio:g} x the round's median {median:g})")
    return verdicts


class Agreement(NamedTuple):
    """How a round's update directions line up."""

    cosines: list[float | None]  # each one's with the sum of the others' unit directions (None: nothing to compare)
    mean_pairwise: float  # the mean cosine over all pairs: > 0 when the round shares a direction


def agreement(updates: list[Update]) -> Agreement:
    """Each update's cosine with the sum of the others' unit directions, and the round's mean pairwise cosine."""
    units = [(u.direction[0], np.asarray(u.direction[1], dtype=np.float64) / u.norm)
             if u.direction is not None and u.norm > 0 else None for u in updates]
    size = max((int(unit[0].max()) + 1 for unit in units if unit is not None and unit[0].size), default=0)
    total = np.zeros(size)
    for unit in units:
        if unit is not None:
            total[unit[0]] += unit[1]  # indices are unique within one update
    total_sq = float(total @ total)
    cosines = []
    for unit in units:
        if unit is None:
            cosines.append(None)
            continue
        along = float(total[unit[0]] @ unit[1])  # <u, total>
        others_sq = total_sq - 2 * along + 1.0  # |total - u|^2, u a unit vector
        cosines.append((along - 1.0) / math.sqrt(others_sq) if others_sq > 1e-12 else None)
    count = sum(unit is not None for unit in units)
    # |sum of units|^2 = count + the sum of all pairwise cosines (each pair twice)
    mean_pairwise = (total_sq - count) / (count * (count - 1)) if count > 1 else 0.0
    return Agreement(cosines, mean_pairwise)


def check_claim(node_id: int, examples: int | float, checks: UpdateChecks) -> Verdict:
    """A client's num-examples (a positive integer below float's limit) against what the server knows."""
    known = checks.clients.sizes.get(node_id)
    if known is not None and examples != known:
        return Verdict(None, f"num-examples {examples:.3g} is not the {known} its partition holds")
    if examples > checks.max_examples:
        return Verdict(None, f"num-examples {examples:.3g} is above federation.max_examples {checks.max_examples}")
    return Verdict(examples)


def _norm_verdict(update: Update, checks: UpdateChecks) -> Verdict:
    if not math.isfinite(update.norm):
        return Verdict(None, "update norm overflows")
    if checks.max_update_norm and update.norm > checks.max_update_norm:
        return Verdict(None, f"update norm {update.norm:.3g} is above federation.max_update_norm "
                             f"{checks.max_update_norm:g}")
    return Verdict(update.examples)


def update_norm(values: np.ndarray) -> float:
    """L2 norm in float64, so float32 values near their limit do not overflow it."""
    return float(np.linalg.norm(np.asarray(values, dtype=np.float64).reshape(-1)))


class StepRefused(Exception):
    """The round's new global arrays are not finite or move too far; the message says which."""


class StepGuard:
    """``with StepGuard(state, checks) as guard:`` aggregate, step, ``guard.check(...)``, advance.

    Anything the block raises refuses the round (``guard.refused`` says why): the strategy
    and the server's momentum get back the state they had on entry, and the global arrays
    stay, as long as the block assigns ``state.arrays`` last.
    """

    def __init__(self, state: ServerState, checks: UpdateChecks, server_round: int) -> None:
        self.state = state
        self.max_step_ratio = checks.max_step_ratio
        self.server_round = server_round
        self.refused: str | None = None

    def __enter__(self) -> StepGuard:
        self._strategy = pickled(self.state.strategy)
        momentum = self.state.momentum
        self._velocity = None if momentum is None else dict(momentum.velocity)  # apply() replaces, never mutates
        return self

    def check(self, current: ArrayRecord, proposed: ArrayRecord) -> None:
        """Raise ``StepRefused`` unless ``proposed`` is finite and near enough to ``current``."""
        step, size = 0.0, 0.0
        for name, array in current.items():
            now = array.numpy().astype(np.float64)
            new = proposed[name].numpy().astype(np.float64)
            if not np.isfinite(new).all():
                raise StepRefused(f"the new global model is not finite ({name})")
            step += float(np.sum(np.square(new - now)))
            size += float(np.sum(np.square(now)))
        step, size = math.sqrt(step), math.sqrt(size)
        if not math.isfinite(step):
            raise StepRefused("the global step overflows")
        if self.max_step_ratio and size > 0 and step > self.max_step_ratio * size:
            raise StepRefused(f"the global step {step:.3g} is above federation.max_step_ratio "
                              f"{self.max_step_ratio:g} x the model's norm {size:.3g}")

    def __exit__(self, kind, error, traceback) -> bool:
        if not isinstance(error, Exception):
            return False
        self.refused = str(error) if isinstance(error, StepRefused) else f"{type(error).__name__}: {error}"
        self.state.strategy = pickle.loads(self._strategy)
        if self._velocity is not None:
            self.state.momentum.velocity = self._velocity
        log(WARNING, "round %d: step refused, the global model stays: %s", self.server_round, self.refused)
        return True
