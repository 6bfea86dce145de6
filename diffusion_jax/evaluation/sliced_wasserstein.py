"""Sliced Wasserstein-1 distance between two equal-size sample sets, in their own space."""

from __future__ import annotations

import numpy as np


def sliced_wasserstein(a, b, num_projections: int = 128, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance of the projections.

    ``a`` and ``b`` are [N, ...] with the same N; each sample is flattened. Directions are
    fixed by ``seed`` so that figures from one call to the next are comparable.
    """
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have the same shape, got {a.shape} and {b.shape}")
    dirs = np.random.default_rng(seed).normal(size=(a.shape[1], num_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    return float(np.mean(np.abs(np.sort(a @ dirs, axis=0) - np.sort(b @ dirs, axis=0))))


def pixel_distance(images, reference) -> float:
    """The quickstart's quality figure: :func:`sliced_wasserstein` between two sets of uint8 images
    [N, H, W, C], their pixels scaled to [0, 1]."""
    return sliced_wasserstein(np.asarray(images, np.float32) / 255, np.asarray(reference, np.float32) / 255)
