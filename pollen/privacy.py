"""Differential privacy for each client's update: clipping, Gaussian noise, and the privacy spent.

With ``privacy.noise_multiplier`` (sigma) above 0, every client clips its update (the
change its local training made, before error feedback and compression) to an L2 norm
of ``privacy.clip_norm`` (C) and adds Gaussian noise of standard deviation sigma x C to
every coordinate. Error feedback and top-k only ever see the noised update, so what
leaves the device is post-processing of a Gaussian mechanism with sensitivity C.

Each round a client takes part with probability q = clients_per_round / num_clients
(with ``federation.over_select``, the most a round may sample over num_clients: an upper bound),
so its privacy loss over the rounds so far is that of the subsampled Gaussian
mechanism, composed; ``epsilon`` asks Opacus' RDP accountant for the epsilon at
``privacy.delta``. This is per client (user-level): it covers everything a client's
data contributes, whichever examples it holds. It assumes clients are sampled
uniformly at random each round, as Pollen's strategies do; device dropouts only
sample less.
"""

from __future__ import annotations

import numpy as np

from pollen.config import FederationConfig, PrivacyConfig


def privatized(update: dict[str, np.ndarray], settings: PrivacyConfig, seed: int) -> dict[str, np.ndarray]:
    """The update clipped to ``clip_norm`` in L2 over all its arrays, plus Gaussian noise; as is when off."""
    if settings.noise_multiplier <= 0:
        return update
    norm = l2_norm(update)
    scale = min(1.0, settings.clip_norm / norm) if norm > 0 else 1.0
    rng = np.random.default_rng(seed)
    std = settings.noise_multiplier * settings.clip_norm
    return {name: (a * scale + rng.normal(0.0, std, a.shape)).astype(a.dtype) for name, a in update.items()}


def l2_norm(update: dict[str, np.ndarray]) -> float:
    """The L2 norm of an update over all its arrays, summed in float64."""
    return float(np.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in update.values())))


RDP_ORDERS = [1 + step / 100 for step in range(1, 101)] + [2 + step / 10 for step in range(1, 90)] + list(range(12, 64))


def epsilon(settings: PrivacyConfig, federation: FederationConfig, rounds: int) -> float | None:
    """The epsilon each client has spent after ``rounds`` rounds, at ``settings.delta`` (None: no privacy set)."""
    if settings.noise_multiplier <= 0:
        return None
    if rounds == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    sample_rate = min(1.0, federation.most_sampled / federation.num_clients)
    accountant.history = [(settings.noise_multiplier, sample_rate, rounds)]
    # Low noise spends so much that the best RDP order lies near or below Opacus' smallest
    # (1.1, then steps of 0.1): steps of 0.01 from 1.01 to 2 keep the bound tight there.
    return float(accountant.get_epsilon(settings.delta, alphas=RDP_ORDERS))
