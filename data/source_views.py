"""Which source views feed a target: the nearest cameras by centre distance (GNT's 'dist' method)."""
from __future__ import annotations

import numpy as np


def nearest_views(target_c2w: np.ndarray, candidate_c2w: np.ndarray, k: int, exclude: int | None = None) -> np.ndarray:
    """Indices into candidate_c2w [M, 4, 4] of the (at most) k closest camera centres, nearest first.

    `exclude` removes one candidate (the target itself when it is among the candidates).
    """
    distances = np.linalg.norm(candidate_c2w[:, :3, 3] - np.asarray(target_c2w)[:3, 3], axis=-1)
    if exclude is not None:
        distances = distances.copy()
        distances[exclude] = np.inf
    order = np.argsort(distances, kind="stable")
    available = len(order) - (exclude is not None)
    return order[: max(0, min(k, available))]


def sample_training_source_views(rng: np.random.Generator, target_c2w, candidate_c2w, num_source_views: int,
                                 exclude: int | None = None) -> np.ndarray:
    """GNT's randomized training-time sources: from the nearest num_source_views x f views (f in 1..3, capped at
    22), pick num_source_views + {-2..+1} at random, so the model sees varied baselines and view counts."""
    factor = rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35])
    pool = nearest_views(target_c2w, candidate_c2w, min(num_source_views * factor, 22), exclude)
    count = max(1, num_source_views + int(rng.integers(-2, 2)))
    return rng.choice(pool, size=min(count, len(pool)), replace=False)
