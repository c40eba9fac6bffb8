"""A plain NumPy explicit Perona–Malik scheme: the tests' oracle and the benchmarks' baseline.

This is the textbook formulation (four directional differences per voxel, each with its own
conduction coefficient, float64), written the way a first implementation would be. The tests
check :func:`sender.diffusion.diffuse` against it and ``scripts/bench_codecs.py`` times both in
the same run (importing it as ``tests.diffusion_oracle``, the repository root on its path). It
lives with the tests, not in the product: nothing the sender runs uses it.
"""

from __future__ import annotations

import numpy as np


def diffuse_numpy(volume: np.ndarray, probability: np.ndarray, kappa: float, iterations: int,
                  dt: float = 0.25) -> np.ndarray:
    """Per-slice 2D steered Perona–Malik with zero-flux borders; returns int16 (rounded)."""
    image = volume.astype(np.float64)
    weight = dt * (1.0 - probability.astype(np.float64))
    for _ in range(iterations):
        padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="edge")
        north = padded[:, :-2, 1:-1] - image
        south = padded[:, 2:, 1:-1] - image
        west = padded[:, 1:-1, :-2] - image
        east = padded[:, 1:-1, 2:] - image
        update = (np.exp(-np.abs(north) / kappa) * north + np.exp(-np.abs(south) / kappa) * south
                  + np.exp(-np.abs(west) / kappa) * west + np.exp(-np.abs(east) / kappa) * east)
        image = image + weight * update
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)
