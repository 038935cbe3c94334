"""Task B's training images split over clients: ``iid`` (a seeded permutation cut into near-equal shards) or
``dirichlet`` label skew (for each class, the clients' shares drawn from Dirichlet(alpha, ..., alpha); small
alpha gives clients few classes). Every image goes to exactly one client; the split depends only on the
seed. Draws come from numpy's PCG64 generator seeded with the partition seed (torch has no Dirichlet
sampler that takes a generator)."""
from __future__ import annotations

import numpy as np
import torch

from raclora.errors import ConfigError

PARTITIONS = ("iid", "dirichlet")
MAX_TRIES = 100  # dirichlet: draws until every client holds at least one image


def partition(labels: torch.Tensor, clients: int, scheme: str, alpha: float, seed: int) -> list[torch.Tensor]:
    """Indices into ``labels`` (N,) of each client's shard, sorted; ConfigError for a split that cannot be made."""
    n = labels.numel()
    if scheme not in PARTITIONS:
        raise ConfigError(f"unknown partition {scheme!r}; allowed: {', '.join(PARTITIONS)}")
    if not 1 <= clients <= n:
        raise ConfigError(f"clients must be from 1 to the {n} training images, got {clients}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"dirichlet_alpha must be a finite number > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [torch.from_numpy(np.sort(s)) for s in np.array_split(rng.permutation(n), clients)]
    y = labels.cpu().numpy()
    for _ in range(MAX_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * idx.size).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        out = [np.sort(np.concatenate(s)) for s in shards]
        if min(s.size for s in out) > 0:
            return [torch.from_numpy(s) for s in out]
    raise ConfigError(f"dirichlet_alpha {alpha} leaves a client of {clients} without images in {MAX_TRIES} draws; "
                      f"use a larger dirichlet_alpha or fewer clients")
