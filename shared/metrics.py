"""Image-quality and compression metrics used by the benchmarks, the tests and the receiver.

* Compression ratio: raw int16 bytes of the original / all bytes written (headers included).
* PSNR: ``10 log10(L^2 / MSE)``; the paper uses ``L = 65535``, we also report ``L = 4095``
  (the 12-bit range CT actually uses), which is the stricter of the two.
* SSIM (Wang et al., 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed per
  slice on the region where the window fits (no padding), averaged over slices. The ROI variants
  average the SSIM map over window centres inside / outside a mask.
* GMSD (Xue et al., 2014, "Gradient magnitude similarity deviation"): edge preservation. Both
  images are scaled to [0, 255] by ``255 / L``, averaged over 2x2 blocks and subsampled by 2;
  Prewitt gradient magnitudes ``m_r``, ``m_t`` (3x3, divided by 3); per-pixel similarity
  ``GMS = (2 m_r m_t + T) / (m_r^2 + m_t^2 + T)`` with the paper's ``T = 170``; GMSD is the
  standard deviation of GMS over a slice (0: every edge kept; larger: edges lost unevenly),
  averaged over slices. The constant makes gradients well below ``sqrt(T) L / 255`` (209 HU
  at L = 4095, 20 HU at L = 400) count little: pick ``L`` (and clip to a window) for the
  edges that matter.
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


GMSD_T = 170.0


def _prewitt_magnitude(image: np.ndarray) -> np.ndarray:
    """Prewitt gradient magnitude (kernels divided by 3) on the interior of each slice."""
    rows = image[..., :-2, :] + image[..., 1:-1, :] + image[..., 2:, :]
    columns = image[..., :, :-2] + image[..., :, 1:-1] + image[..., :, 2:]
    gx = (rows[..., :, 2:] - rows[..., :, :-2]) / 3.0
    gy = (columns[..., 2:, :] - columns[..., :-2, :]) / 3.0
    return np.sqrt(gx ** 2 + gy ** 2)


def _half(image: np.ndarray) -> np.ndarray:
    """2x2 block means (odd trailing rows/columns dropped)."""
    ny, nx = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    image = image[..., :ny, :nx]
    return (image[..., 0::2, 0::2] + image[..., 1::2, 0::2] + image[..., 0::2, 1::2]
            + image[..., 1::2, 1::2]) / 4.0


def gmsd(reference: np.ndarray, test: np.ndarray, data_range: float,
         mask: np.ndarray | None = None) -> float:
    """Gradient magnitude similarity deviation (Xue et al., 2014), averaged over slices.

    With ``mask`` (bool, the volume's shape), only pixels of the half-resolution grid whose
    four source voxels are all in ``mask`` count; slices without such pixels are skipped.

    Example:
        >>> import numpy as np
        >>> edge = np.zeros((1, 32, 32)); edge[:, :, 16:] = 1000.0
        >>> gmsd(edge, edge, 4095)
        0.0
        >>> blurred = (edge + np.roll(edge, 1, axis=2) + np.roll(edge, -1, axis=2)) / 3
        >>> gmsd(edge, blurred, 4095) > 0
        True
    """
    reference = np.asarray(reference, np.float64) * (255.0 / data_range)
    test = np.asarray(test, np.float64) * (255.0 / data_range)
    if reference.shape != test.shape or reference.ndim not in (2, 3):
        raise ValueError(f"gmsd needs two images of one 2D or 3D shape, got {reference.shape} "
                         f"and {test.shape}")
    if reference.ndim == 2:
        reference, test = reference[None], test[None]
        mask = None if mask is None else np.asarray(mask)[None]
    if min(reference.shape[-2:]) < 6:
        raise ValueError("gmsd needs slices of at least 6 x 6 pixels")
    m_r = _prewitt_magnitude(_half(reference))
    m_t = _prewitt_magnitude(_half(test))
    similarity = (2 * m_r * m_t + GMSD_T) / (m_r ** 2 + m_t ** 2 + GMSD_T)
    if mask is None:
        return float(np.mean(similarity.std(axis=(1, 2))))
    inside = _half(np.asarray(mask, np.float64)) == 1.0
    inside = inside[:, 1:-1, 1:-1]
    deviations = [values[keep].std() for values, keep in zip(similarity, inside) if keep.any()]
    return float(np.mean(deviations)) if deviations else math.nan


def entropy_bits(values: np.ndarray) -> float:
    """Shannon entropy of the value histogram, bits per voxel."""
    counts = np.unique(np.asarray(values), return_counts=True)[1].astype(np.float64)
    probabilities = counts / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum())
