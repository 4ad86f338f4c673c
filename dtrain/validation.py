"""The validation set and its scores, one definition for training and for ``ModelManager``.

Scores are sums over examples, so ranks that each hold a share of the set add
theirs up and divide once by the set's size; one process scores the whole set
the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import VALIDATION_STREAM, make_examples, mixture_spec
from .metrics import kmeans_centres, set_mean_centres, squared_error, wasserstein

SCORES = ("mse", "wasserstein", "trivial_mse", "kmeans_mse", "kmeans_wasserstein")


def validation_examples(data, indices, seed: int | None = None) -> dict:
    """Examples ``indices`` of the run's validation set (or of another ``seed``)."""
    return make_examples(
        mixture_spec(data), data.val_seed if seed is None else seed, VALIDATION_STREAM, np.asarray(indices)
    )


def rank_share(num_samples: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's validation indices padded to the same length on every rank, and their weights.

    Every rank must run the same number of forward passes (FSDP gathers parameters
    collectively), so a short share repeats an example with weight 0.
    """
    mine = np.array_split(np.arange(num_samples), world_size)[rank]
    length = math.ceil(num_samples / world_size)
    padded = np.concatenate([mine, np.full(length - len(mine), mine[0] if len(mine) else 0)])
    return padded, np.r_[np.ones(len(mine)), np.zeros(length - len(mine))]


def baseline_sums(examples: dict, seeds) -> dict:
    """Summed errors of the set mean and of k-means told the true K (seeded per example)."""
    points, targets = examples["points"], examples["targets"]
    kmeans = kmeans_centres(points, examples["num_components"], seeds=seeds)
    return {
        "trivial_mse": squared_error(set_mean_centres(points), targets).sum().item(),
        "kmeans_mse": squared_error(torch.from_numpy(kmeans), targets).sum().item(),
        "kmeans_wasserstein": float(wasserstein(kmeans, targets.numpy()).sum()),
    }


def prediction_sums(predict, examples: dict, batch_size: int, weight=None) -> dict:
    """Summed MSE and Wasserstein distance of ``predict`` (points -> centres) over ``examples``,
    each example weighted by ``weight`` (default 1)."""
    points, targets = examples["points"], examples["targets"]
    weight = torch.ones(len(points), dtype=torch.float64) if weight is None else torch.as_tensor(weight)
    mse, w2 = 0.0, 0.0
    for start in range(0, len(points), batch_size):
        part = slice(start, start + batch_size)
        predicted = predict(points[part]).cpu()
        mse += (squared_error(predicted, targets[part]) * weight[part]).sum().item()
        w2 += float((wasserstein(predicted.numpy(), targets[part].numpy()) * weight[part].numpy()).sum())
    return {"mse": mse, "wasserstein": w2}
