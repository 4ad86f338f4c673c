"""Per-example quality measures, and the classical baseline they are compared with.

scipy is imported where it is used: it is half a second of every worker's start,
and a resumed leg may never evaluate (docs/elastic.md, "Where a restart's seconds go").
"""

from __future__ import annotations

import numpy as np
import torch


def squared_error(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each example, ``[B, N, D]`` -> ``[B]``."""
    return (predicted.float() - targets.float()).pow(2).mean(dim=(1, 2))


def wasserstein(predicted, targets) -> np.ndarray:
    """2-Wasserstein distance between the predicted and true point clouds, per example.

    Both clouds have N equally weighted points, so the optimal transport plan is
    an assignment; the distance is the root mean squared length of its pairs.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    predicted, targets = np.asarray(predicted, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    out = np.empty(len(predicted))
    for i, (p, t) in enumerate(zip(predicted, targets)):
        cost = cdist(p, t, "sqeuclidean")
        if not np.isfinite(cost).all():  # a diverged model: no assignment to find
            out[i] = np.nan
            continue
        rows, cols = linear_sum_assignment(cost)
        out[i] = np.sqrt(cost[rows, cols].mean())
    return out


def kmeans_centres(points, num_components, seeds) -> np.ndarray:
    """The classical baseline: k-means (k-means++ start) told the true K of each example.

    Each point's prediction is the centroid of its cluster. ``seeds`` (one per
    example, e.g. its index) make the baseline independent of how examples are batched.
    """
    from scipy.cluster.vq import kmeans2

    points = np.asarray(points, dtype=np.float64)
    out = np.empty_like(points)
    for i, (cloud, k, seed) in enumerate(zip(points, np.asarray(num_components), seeds)):
        centroids, labels = kmeans2(cloud, int(k), minit="++", seed=int(seed))
        out[i] = centroids[labels]
    return out


def set_mean_centres(points: torch.Tensor) -> torch.Tensor:
    """The trivial predictor: every point's centre is the mean of its set."""
    return points.mean(dim=1, keepdim=True).expand_as(points)
