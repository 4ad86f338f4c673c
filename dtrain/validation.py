"""The validation set and its scores, one definition for training and for ``ModelManager``.

Scores are sums over examples, so ranks that each hold a share of the set add
theirs up and divide once by the set's size; one process scores the whole set
the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

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


def scores_line(metrics: dict) -> str:
    """The validation scores beside their references, as the progress line shows them."""
    return (
        f"val mse {metrics['val_mse']:.4f} (k-means {metrics['kmeans_mse']:.4f}, set mean "
        f"{metrics['trivial_mse']:.4f}), wasserstein {metrics['val_wasserstein']:.4f} "
        f"(k-means {metrics['kmeans_wasserstein']:.4f})"
    )


class Validator:
    """This rank's share of the run's validation set, made once, and its scores summed over the
    ranks (collective)."""

    def __init__(self, config, ctx):
        self.config, self.ctx = config, ctx
        self._share = None

    def share(self):
        if self._share is None:
            indices, weight = rank_share(self.config.data.val_samples, self.ctx.rank, self.ctx.world_size)
            examples = validation_examples(self.config.data, indices)
            real = int(weight.sum())
            baselines = baseline_sums({k: v[:real] for k, v in examples.items()}, seeds=indices[:real])
            self._share = examples, weight, baselines
        return self._share

    @torch.no_grad()
    def __call__(self, model) -> dict:
        examples, weight, baselines = self.share()
        model.eval()
        device = self.ctx.device
        sums = prediction_sums(
            lambda points: model(points.to(device)), examples, self.config.train.eval_batch_size, weight
        )
        totals = torch.tensor([sums["mse"], sums["wasserstein"], *baselines.values()], dtype=torch.float64)
        dist.all_reduce(totals)  # gloo or the CPU side of the cuda group
        mse, w2, *rest = (totals / self.config.data.val_samples).tolist()
        return {"val_mse": mse, "val_wasserstein": w2, **dict(zip(baselines, rest))}
