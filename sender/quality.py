"""The encoder's quality guard: SSIM of what the receiver will show, computed fast.

The layered encoder checks every base block: the reconstruction after layers 0+1 (the ROI
exact, the lossy base elsewhere) must reach the target SSIM, or the block is coded again at a
higher quality. The SSIM is :func:`shared.metrics.ssim` itself (the benchmarks' definition); only
its Gaussian filter is replaced by SciPy's and it runs in float32, which together make it about
four times faster (the float32 error, below 1e-4 of SSIM, is far under the guard's margins).
"""

from __future__ import annotations

import numpy as np

from shared.metrics import SSIM_SIGMA, SSIM_WINDOW, ssim

_RADIUS = SSIM_WINDOW // 2


def scipy_gaussian_valid(image: np.ndarray) -> np.ndarray:
    """Same result as :func:`shared.metrics.gaussian_valid` (radius 5, sigma 1.5)."""
    # Imported here: scipy.ndimage costs 0.3-0.5 s of start-up that a sender replaying a
    # .dlad (no encoding, no guard) would pay before its first packet.
    from scipy.ndimage import gaussian_filter1d

    truncate = _RADIUS / SSIM_SIGMA
    blurred = gaussian_filter1d(image, SSIM_SIGMA, axis=-2, truncate=truncate)
    blurred = gaussian_filter1d(blurred, SSIM_SIGMA, axis=-1, truncate=truncate)
    return blurred[..., _RADIUS:-_RADIUS, _RADIUS:-_RADIUS]


def block_ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 4095.0) -> float:
    """Mean per-slice SSIM of a block; NaN when its slices are smaller than the window."""
    if min(reference.shape[-2:]) < SSIM_WINDOW:
        return float("nan")
    return ssim(reference, test, data_range, blur=scipy_gaussian_valid, dtype=np.float32)
