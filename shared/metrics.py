"""Image-quality and compression metrics used by the benchmarks, the tests and the receiver.

* Compression ratio: raw int16 bytes of the original / all bytes written (headers included).
* PSNR: ``10 log10(L^2 / MSE)``; the paper uses ``L = 65535``, we also report ``L = 4095``
  (the 12-bit range CT actually uses), which is the stricter of the two.
* SSIM (Wang et al., 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed per
  slice on the region where the window fits (no padding), averaged over slices. The ROI variants
  average the SSIM map over window centres inside / outside a mask.
* Entropy: Shannon entropy of the voxel-value histogram, in bits per voxel.

NumPy only: the receiver may compute them without torch or scipy.
"""

from __future__ import annotations

import math

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def compression_ratio(raw_voxels: int, bytes_written: int) -> float:
    """``raw_voxels * 2 / bytes_written`` (int16 original as the reference)."""
    return raw_voxels * 2 / bytes_written if bytes_written else math.inf


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float,
         mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` when identical)."""
    difference = reference.astype(np.float64) - test.astype(np.float64)
    if mask is not None:
        difference = difference[mask]
    if difference.size == 0:
        return math.nan
    mse = float(np.mean(difference ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_kernel() -> np.ndarray:
    offsets = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    kernel = np.exp(-(offsets ** 2) / (2 * SSIM_SIGMA ** 2))
    return kernel / kernel.sum()


def gaussian_valid(image: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian filter over the last two axes, 'valid' region only."""
    kernel = _gaussian_kernel()
    n = SSIM_WINDOW
    rows = sum(kernel[t] * image[..., t:image.shape[-2] - n + 1 + t, :] for t in range(n))
    return sum(kernel[t] * rows[..., t:rows.shape[-1] - n + 1 + t] for t in range(n))


def ssim_map(reference: np.ndarray, test: np.ndarray, data_range: float,
             blur=gaussian_valid, dtype=np.float64) -> np.ndarray:
    """SSIM at every window centre of every slice; shape ``(nz, ny - 10, nx - 10)``.

    ``blur`` computes :func:`gaussian_valid`; the sender's quality guard passes a faster SciPy
    version and float32 (its error, below 1e-4 of SSIM, is far under the guard's margins).
    """
    if reference.shape[-1] < SSIM_WINDOW or reference.shape[-2] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs slices of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    x = reference.astype(dtype)
    y = test.astype(dtype)
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x ** 2
    sigma_yy = blur(y * y) - mu_y ** 2
    sigma_xy = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
        (mu_x ** 2 + mu_y ** 2 + c1) * (sigma_xx + sigma_yy + c2))


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float,
         mask: np.ndarray | None = None, blur=gaussian_valid, dtype=np.float64) -> float:
    """Mean SSIM per slice, averaged over slices; with ``mask``, over window centres in it.

    Slices are processed in groups to bound memory on large volumes.
    """
    reference = np.asarray(reference)
    test = np.asarray(test)
    if reference.ndim == 2:
        reference, test = reference[None], test[None]
        mask = None if mask is None else mask[None]
    half = SSIM_WINDOW // 2
    per_slice_sum = []
    per_slice_count = []
    for start in range(0, reference.shape[0], 8):
        stop = start + 8
        values = ssim_map(reference[start:stop], test[start:stop], data_range, blur, dtype)
        if mask is None:
            per_slice_sum.extend(values.sum(axis=(1, 2)))
            per_slice_count.extend([values[0].size] * values.shape[0])
        else:
            centres = mask[start:stop, half:-half, half:-half]
            per_slice_sum.extend((values * centres).sum(axis=(1, 2)))
            per_slice_count.extend(centres.sum(axis=(1, 2)))
    sums = np.array(per_slice_sum)
    counts = np.array(per_slice_count)
    used = counts > 0
    if not used.any():
        return math.nan
    return float(np.mean(sums[used] / counts[used]))


def entropy_bits(values: np.ndarray) -> float:
    """Shannon entropy of the value histogram, bits per voxel."""
    counts = np.unique(np.asarray(values), return_counts=True)[1].astype(np.float64)
    probabilities = counts / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum())
