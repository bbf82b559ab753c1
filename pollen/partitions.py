"""How the training examples are shared among clients: flwr-datasets' partitioners.

``data.partition`` names one; each but ``sampled`` is a partitioner of
``flwr_datasets.partitioner``, run on a small Hugging Face ``Dataset`` of the labels
(and the natural-id column) that keeps each row's index, shuffled with the run's seed
first as ``FederatedDataset`` does:

    iid           IidPartitioner: equal shares of the shuffled examples
    dirichlet     DirichletPartitioner: each class split by proportions drawn from
                  Dir(alpha), drawn again until every client holds min_partition_size
    pathological  PathologicalPartitioner: classes_per_partition classes a client, the
                  first by turn (so every class is used), the rest at random
    shard         ShardPartitioner: examples sorted by label, cut into equal shards,
                  shards_per_partition a client (McMahan et al., 2017)
    natural       NaturalIdPartitioner: one client per value of partition_by (user_id)
    sampled       here: every client draws min_partition_size examples from the whole
                  pool with its own Dir(alpha) class mix. Clients may share examples, so a
                  population can outnumber the examples (10,000 devices over 4,000
                  digits); every flwr-datasets partitioner splits the rows disjointly.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pollen.config import DataConfig

SCHEMES = ("iid", "dirichlet", "pathological", "shard", "natural", "sampled")
_LABEL, _NATURAL_ID = "label", "natural-id"  # columns of the table the partitioners read


def partition(labels: np.ndarray, num_partitions: int, settings: DataConfig, seed: int,
              natural_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """The indices of ``labels`` each of ``num_partitions`` clients holds, sorted."""
    labels = np.asarray(labels)
    if settings.partition == "sampled":
        return sampled_partition(labels, num_partitions, settings.alpha, seed, settings.min_partition_size)
    from datasets import Dataset  # Hugging Face datasets: seconds to import, so only when partitioning

    table = {"index": np.arange(len(labels)), _LABEL: labels}
    if settings.partition == "natural":
        table[_NATURAL_ID] = natural_ids
    partitioner = _partitioner(settings, num_partitions, seed)
    partitioner.dataset = Dataset.from_dict(table).shuffle(seed=seed)
    try:
        # flwr-datasets warns at each Dirichlet redraw (the last failure raises) and draws a
        # progress bar over natural ids: neither belongs in a run's output.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if partitioner.num_partitions != num_partitions:  # natural: one partition per id
                raise ValueError(f"{settings.partition_by} has {partitioner.num_partitions} distinct values, "
                                 f"one client each, but federation.num_clients is {num_partitions}")
            return [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                    for i in range(num_partitions)]
    except ValueError as error:
        raise ValueError(f"data.partition={settings.partition}: {error}") from None


def _partitioner(settings: DataConfig, num_partitions: int, seed: int):
    from flwr_datasets import partitioner as fds

    scheme = settings.partition
    if scheme == "iid":
        return fds.IidPartitioner(num_partitions=num_partitions)
    if scheme == "dirichlet":
        return fds.DirichletPartitioner(num_partitions=num_partitions, partition_by=_LABEL, alpha=settings.alpha,
                                        min_partition_size=settings.min_partition_size, self_balancing=False,
                                        seed=seed)
    if scheme == "pathological":
        return fds.PathologicalPartitioner(num_partitions=num_partitions, partition_by=_LABEL,
                                           num_classes_per_partition=settings.classes_per_partition,
                                           class_assignment_mode="first-deterministic", seed=seed)
    if scheme == "shard":
        return fds.ShardPartitioner(num_partitions=num_partitions, partition_by=_LABEL,
                                    num_shards_per_partition=settings.shards_per_partition, seed=seed)
    if scheme == "natural":
        return fds.NaturalIdPartitioner(partition_by=_NATURAL_ID)
    raise ValueError(f"unknown partition scheme {scheme!r} (one of {', '.join(SCHEMES)})")


def sampled_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                      size: int) -> list[np.ndarray]:
    """Each client draws ``size`` examples from the whole pool, its class mix from Dir(alpha).

    For populations larger than the dataset, where disjoint shares would leave most
    clients empty: clients may share examples, but each keeps its own label skew.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == cls) for cls in np.unique(labels)]
    shares = []
    for _ in range(num_clients):
        counts = rng.multinomial(size, rng.dirichlet([alpha] * len(members)))
        picks = [rng.choice(pool, min(count, len(pool)), replace=False)
                 for pool, count in zip(members, counts) if count]
        shares.append(np.sort(np.concatenate(picks)))
    return shares
