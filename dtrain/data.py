"""Gaussian-mixture examples as pure functions of (seed, stream, index).

Example ``i`` of a stream is drawn from its own Philox generator whose key is
``(seed, stream)`` and whose counter starts at ``i``: no generator state drifts,
so any example can be made at any time, on any rank, in any order. Each example
takes a fixed number of draws; everything after the draws is vectorised over
the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Streams separate the example families that share a seed.
TRAIN_STREAM = 0
VALIDATION_STREAM = 1
_DYNAMIC_STREAM_BASE = 2  # dynamic mode: stream = base + epoch


def train_streams(mode: str, epochs):
    """Fixed mode reuses one stream every epoch; dynamic mode a fresh one per epoch."""
    return TRAIN_STREAM if mode == "fixed" else _DYNAMIC_STREAM_BASE + np.asarray(epochs)


def mixture_spec(data_cfg) -> MixtureSpec:
    return MixtureSpec(
        data_cfg.dim,
        data_cfg.points,
        data_cfg.min_components,
        data_cfg.max_components,
        data_cfg.box,
        data_cfg.min_snr,
        data_cfg.max_snr,
        data_cfg.weight_concentration,
    )


@dataclass(frozen=True)
class MixtureSpec:
    """What a mixture looks like; mirrors ``DataConfig``'s generation keys."""

    dim: int
    points: int
    min_components: int
    max_components: int
    box: float  # component means are uniform in [-box, box]^dim
    min_snr: float  # snr = box / sigma, drawn uniformly per example
    max_snr: float
    weight_concentration: float  # Dirichlet alpha of the mixture weights


def _draws(spec: MixtureSpec, seed: int, stream: int, index: int):
    rng = np.random.Generator(np.random.Philox(key=[seed, stream], counter=[0, 0, int(index), 0]))
    uniforms = rng.random(2 + spec.max_components * spec.dim + spec.points)
    gammas = rng.standard_gamma(spec.weight_concentration, spec.max_components)
    normals = rng.standard_normal(spec.points * spec.dim)
    return uniforms, gammas, normals


def make_examples(spec: MixtureSpec, seed: int, streams, indices) -> dict[str, torch.Tensor]:
    """Examples ``(streams[j], indices[j])`` of ``seed`` stacked into a batch.

    ``streams`` may be one stream for the whole batch.

    Returns ``points`` and ``targets`` (each point's true component mean)
    ``[B, N, D]``, ``labels`` ``[B, N]``, ``num_components`` ``[B]``, ``means``
    ``[B, Kmax, D]`` and ``weights`` ``[B, Kmax]`` (zero past each K), ``sigma`` ``[B]``.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    streams = np.broadcast_to(np.asarray(streams, dtype=np.int64), indices.shape)
    batch, n, d, kmax = len(indices), spec.points, spec.dim, spec.max_components
    uniforms = np.empty((batch, 2 + kmax * d + n))
    gammas = np.empty((batch, kmax))
    normals = np.empty((batch, n * d))
    for row, (stream, index) in enumerate(zip(streams, indices)):
        uniforms[row], gammas[row], normals[row] = _draws(spec, seed, stream, index)

    span = spec.max_components - spec.min_components + 1
    k = spec.min_components + np.minimum((uniforms[:, 0] * span).astype(np.int64), span - 1)
    snr = spec.min_snr + (spec.max_snr - spec.min_snr) * uniforms[:, 1]
    sigma = spec.box / snr
    means = (2.0 * uniforms[:, 2 : 2 + kmax * d] - 1.0).reshape(batch, kmax, d) * spec.box
    present = np.arange(kmax)[None, :] < k[:, None]
    means = np.where(present[:, :, None], means, 0.0)
    weights = np.where(present, np.maximum(gammas, 1e-12), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)

    # Inverse-CDF labels: the first component whose cumulative weight exceeds u.
    cumulative = np.cumsum(weights, axis=1)
    label_uniforms = uniforms[:, 2 + kmax * d :]
    labels = (label_uniforms[:, :, None] >= cumulative[:, None, :]).sum(axis=2)
    labels = np.minimum(labels, k[:, None] - 1)

    targets = np.take_along_axis(means, labels[:, :, None], axis=1)
    points = targets + sigma[:, None, None] * normals.reshape(batch, n, d)
    return {
        "points": torch.from_numpy(points.astype(np.float32)),
        "targets": torch.from_numpy(targets.astype(np.float32)),
        "labels": torch.from_numpy(labels),
        "num_components": torch.from_numpy(k),
        "means": torch.from_numpy(means.astype(np.float32)),
        "weights": torch.from_numpy(weights.astype(np.float32)),
        "sigma": torch.from_numpy(sigma.astype(np.float32)),
    }
