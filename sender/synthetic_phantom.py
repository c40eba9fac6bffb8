"""A synthetic abdominal CT phantom with its own liver mask: the built-in default study.

Anatomy in HU (axial slices, RAS+ geometry): air (-1000) around an elliptical body with a
subcutaneous fat layer (-100) and muscle wall (40), soft-tissue background (30), the liver
(60, the patient's right upper abdomen, i.e. image left in radiological display), with hepatic
vessels (contrast, 160) and a hypodense lesion (20), the spleen (50), two kidneys (cortex 150),
the aorta (200), a vertebral body (cortical 700, cancellous 250) and bowel gas (-900). Gaussian
quantum noise (default sigma 12 HU) is added, so the phantom compresses like a real CT rather
than like a cartoon. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np

from shared.volume import Volume


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def make_phantom(shape=(24, 256, 256), spacing=(1.5, 1.5, 2.5), seed: int = 0,
                 noise_hu: float = 12.0) -> tuple[Volume, np.ndarray]:
    """Return ``(volume, liver_mask)`` for a slice-major ``shape`` ``(nz, ny, nx)``.

    Example:
        >>> volume, liver = make_phantom((4, 64, 64))
        >>> volume.shape, bool(liver.any())
        ((4, 64, 64), True)
    """
    nz, ny, nx = shape
    if min(shape) < 1 or ny < 16 or nx < 16:
        raise ValueError(f"phantom slices must be at least 16x16, got shape {shape}")
    rng = np.random.default_rng(seed)
    # Normalised in-plane coordinates in [-1, 1]; y grows towards the patient's back (posterior)
    # in array order, which the affine below maps to RAS.
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    data = np.full(shape, -1000.0, dtype=np.float32)
    liver = np.zeros(shape, dtype=bool)
    for k in range(nz):
        t = k / max(nz - 1, 1)  # 0 = caudal, 1 = cranial
        s = data[k]
        body = _ellipse(x, y, 0, 0.05, 0.92, 0.72)
        s[body] = -100  # fat
        s[_ellipse(x, y, 0, 0.05, 0.84, 0.64)] = 40  # muscle wall
        s[_ellipse(x, y, 0, 0.05, 0.80, 0.60)] = 30  # soft tissue
        liver_size = 0.55 + 0.25 * np.sin(np.pi * (0.3 + 0.6 * t))
        organ = _ellipse(x, y, -0.38, -0.05, 0.38 * liver_size + 0.05, 0.42 * liver_size + 0.03)
        organ &= ~_ellipse(x, y, -0.05, 0.2, 0.22, 0.25)  # carve the medial border
        s[organ] = 60
        liver[k] = organ
        for cx, cy, r in ((-0.42, -0.1, 0.03), (-0.3, 0.05, 0.025), (-0.5, 0.08, 0.02)):
            s[_ellipse(x, y, cx, cy + 0.02 * t, r, r) & organ] = 160  # hepatic vessels
        if 0.3 < t < 0.7:
            s[_ellipse(x, y, -0.45, -0.2, 0.06, 0.05) & organ] = 20  # hypodense lesion
        s[_ellipse(x, y, 0.5, 0.05, 0.14, 0.2)] = 50  # spleen
        for cx in (-0.25, 0.25):
            kidney = _ellipse(x, y, cx, 0.33, 0.1, 0.13)
            s[kidney] = 150
            s[_ellipse(x, y, cx, 0.33, 0.05, 0.07)] = 30
        s[_ellipse(x, y, 0.05, 0.2, 0.05, 0.05)] = 200  # aorta
        s[_ellipse(x, y, 0, 0.45, 0.1, 0.09)] = 700  # vertebral body
        s[_ellipse(x, y, 0, 0.45, 0.075, 0.065)] = 250
        s[_ellipse(x, y, 0.2, -0.25, 0.08, 0.05)] = -900  # bowel gas
    data += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    hu = np.clip(np.rint(data), -1024, 3071).astype(np.int16)
    sx, sy, sz = spacing
    affine = np.array([[-sx, 0, 0, sx * (nx - 1) / 2],
                       [0, -sy, 0, sy * (ny - 1) / 2],
                       [0, 0, sz, -sz * (nz - 1) / 2],
                       [0, 0, 0, 1]], dtype=np.float64)
    volume = Volume(data=hu, affine=affine, spacing=spacing, source_dtype="int16",
                    description=f"synthetic abdominal phantom (seed {seed})")
    return volume, liver
