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

* The update must not point against the round's majority (``min_cosine``, 0; -1 turns
  the check off). A sign-flipped update keeps an honest norm and passes the norm check,
  but it points away from the honest ones, and several flipped ones point together. The
  round's main axis, the top eigenvector of the cosines between its unit directions,
  splits the two groups; the larger side is taken as honest, and an update on the other
  side whose cosine with the sum of the majority's unit directions is below the bound
  is rejected. Unit directions, so that no single update (an attacker's at 9x the
  median norm) sets the reference. The majority is taken as one group, so that even
  4 attackers of 10 neither hide in the sum of all updates nor pull honest ones below
  the bound with them. A tie is not judged, nor a round whose majority shares no
  direction (a mean pairwise cosine of at most 0): when sparse updates are nearly
  orthogonal, every cosine is noise, and the check would turn away honest clients at
  random.

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

import numpy as np
from scipy import sparse
from flwr.app import ArrayRecord
from flwr.common import log

from pollen.config import Config
from pollen.data import partitions
from pollen.server.checkpoint import ServerState, pickled

MIN_FOR_MEDIAN = 3  # updates a round needs before its median judges any of them
EIGEN_ZERO = 1e-9  # an axis component this small is on neither side (an update orthogonal to the others)


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
    if checks.min_cosine > -1 and len(kept) >= MIN_FOR_MEDIAN:
        for i, cosine in opposed([updates[i] for i in kept], checks.min_cosine).items():
            verdicts[kept[i]] = Verdict(None, f"update direction opposes the round's: cosine {cosine:.2f} with the "
                                              f"majority is below federation.min_cosine {checks.min_cosine:g}")
        kept = [i for i in kept if verdicts[i].weight is not None]
    if checks.max_weight_ratio and len(kept) >= MIN_FOR_MEDIAN:
        median = statistics.median(float(verdicts[i].weight) for i in kept)
        bound = checks.max_weight_ratio * median
        for i in kept:
            if updates[i].node_id not in checks.clients.sizes and verdicts[i].weight > bound:
                verdicts[i] = Verdict(bound, f"num-examples {verdicts[i].weight:g} clipped to {bound:g} "
                                             f"({checks.max_weight_ratio:g} x the round's median {median:g})")
    return verdicts


def cosines(updates: list[Update]) -> tuple[np.ndarray, list[int]]:
    """The cosines between the updates' directions (a symmetric matrix, ones on its diagonal), and which
    updates (by index) they are of: those with a direction and a norm above 0."""
    judged = [i for i, u in enumerate(updates) if u.direction is not None and u.norm > 0 and u.direction[0].size]
    if not judged:
        return np.zeros((0, 0)), judged
    rows = [updates[i].direction for i in judged]
    units = sparse.csr_matrix(
        (np.concatenate([np.asarray(values, np.float64) / updates[i].norm for i, (_, values) in zip(judged, rows)]),
         np.concatenate([indices for indices, _ in rows]),
         np.cumsum([0] + [len(indices) for indices, _ in rows])),
        shape=(len(judged), max(int(indices.max()) + 1 for indices, _ in rows)))
    return (units @ units.T).toarray(), judged


def opposed(updates: list[Update], min_cosine: float) -> dict[int, float]:
    """The updates (by index) that oppose the round's majority, each with its cosine with the majority.

    The round's main axis is the top eigenvector of the matrix of cosines: the direction
    its updates share most, with attackers that all push one way (a sign flip) on its far
    side. The side that holds more updates is the majority; a tie is not judged, nor is a
    majority without a shared direction of its own (a mean pairwise cosine of at most 0,
    as when sparse updates are nearly orthogonal and every cosine is noise). An update on
    the minority side whose cosine with the sum of the majority's unit directions is below
    ``min_cosine`` opposes it.
    """
    matrix, judged = cosines(updates)
    if len(judged) < 2:
        return {}
    axis = np.linalg.eigh(matrix)[1][:, -1]
    ahead, behind = axis > EIGEN_ZERO, axis < -EIGEN_ZERO
    if ahead.sum() == behind.sum():
        return {}
    if behind.sum() > ahead.sum():
        behind = ahead
    majority = ~behind
    shared = matrix[np.ix_(majority, majority)]
    if majority.sum() < 2 or (shared.sum() - majority.sum()) <= 0:  # the sum of its pairwise cosines
        return {}
    with_majority = matrix[:, majority].sum(axis=1) / math.sqrt(shared.sum())
    return {judged[k]: float(with_majority[k]) for k in np.flatnonzero(behind) if with_majority[k] < min_cosine}


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
