"""Probability-steered Perona–Malik diffusion (Luu et al.; Perona & Malik, 1990).

The image evolves by the explicit scheme

.. math::

    I^{t+1}_x = I^t_x + \\Delta t \\,(1 - p_x) \\sum_{d \\in N(x)}
                 \\exp\\!\\left(-\\frac{|I^t_d - I^t_x|}{K}\\right) (I^t_d - I^t_x)

over the 4 in-plane neighbours ``N(x)`` (per-slice 2D, as in the paper) or the 6 neighbours of
3D mode, with zero flux across the volume border. The coefficient of a voxel is
``C = (1 - p) * exp(-|grad I| / K)``: where the liver probability ``p`` is 1 the update is exactly
zero, so those voxels come out bit-identical; elsewhere homogeneous tissue is smoothed while
gradients much larger than ``K`` (edges) barely conduct.

Intensity scale of K: **Hounsfield units**. ``|grad I|`` is the HU difference between
neighbouring voxels, so ``K = 40`` means a 40 HU step between neighbours conducts with weight
``exp(-1) = 0.37``. The paper's ``K = 0.4`` is on images scaled to [0, 1]; with its CT window
that corresponds to roughly ``0.4 * window`` HU. Our default comes from a sweep on the shared
abdomen CT (``scripts/bench_codecs.py``): the largest layered compression ratio with
whole-volume SSIM (L = 4095) >= 0.99.

Where it is used: :func:`sender.pipeline.default_diffusion` diffuses by default only when one
lossless codec codes the volume (the paper's setting, where it pays); in the layered modes it
saves no bytes at equal quality and is off unless asked for (docs/BENCHMARKS.md).

Stability: with ``C <= 1`` the scheme obeys a maximum principle (every new value is a convex
combination of old ones) when ``dt <= 1/4`` in 2D and ``dt <= 1/6`` in 3D; those are the defaults.

How it is computed (the same arithmetic on every device, float32, torch):

* The flux across the face between neighbours ``i`` and ``i + s`` (``s`` = 1, ``nx`` or
  ``ny * nx`` in the flattened volume) is computed once and used twice, with opposite signs:
  half the exponentials of the textbook four-flux scheme.
* Every step is a handful of contiguous vector kernels writing into buffers allocated once
  (no temporaries: a 512 x 512 slice has five float32 buffers of 1 MiB).
* 2D mode is independent per slice, so the CPU runs the 15 iterations on one block of
  slices at a time (about 2^18 voxels, :data:`CPU_SLAB_VOXELS`) while its buffers stay in
  cache, and hands blocks to ``torch.get_num_threads()`` worker threads, each running
  single-threaded kernels (torch's own intra-op threads would meet at a barrier after every
  kernel). CUDA runs 2D on blocks of up to :data:`CUDA_SLAB_VOXELS` (the whole volume, in
  practice: fewer kernel launches). 3D mode couples the slices and always runs on the whole
  volume (on one CPU core).
* The sum over the axes is taken in the same order in every layout (slowest axis first), so
  every block size and thread count gives bit-identical results (tested), identical also to
  this module's earlier whole-volume implementation.

Accuracy: against the float64 NumPy reference (``tests/diffusion_oracle.py``), at most 1 HU
after rounding, on fewer than 0.1 % of the voxels (values that sit at .5 boundaries; 88 of
5.2 million on the shared abdomen CT), tested. CPU and CUDA agree within 1e-3 HU before rounding
(different exp implementations), i.e. at most 1 HU after rounding; voxels with ``p == 1`` are
bit-exact on both.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the sender's command line (and a replay of a recorded
# stream) must not pay its import time before it knows it will diffuse.

#: Voxels per block of slices on the CPU in 2D mode: one 512 x 512 slice, so that the five
#: float32 buffers (5 MiB) stay in the last-level cache over all iterations; smaller slices are
#: grouped up to it, so that small volumes do not pay the per-kernel overhead per slice.
#: Measured on the shared abdomen CT: 1 slice per block 0.26 s, 2: 0.28 s, 4: 0.34 s, 20: 0.53 s.
CPU_SLAB_VOXELS = 1 << 18
#: Voxels per block on CUDA: 256 MiB per buffer, i.e. a whole 90 x 512 x 512 study in one
#: block (kernel launches, not memory traffic, bound small blocks on a GPU).
CUDA_SLAB_VOXELS = 1 << 26
# torch's thread count is process-wide: one diffusion at a time may change it.
_THREADS_LOCK = threading.Lock()


@dataclass(frozen=True)
class DiffusionSettings:
    """Parameters of the probability-steered Perona–Malik scheme."""

    kappa: float = 10.0
    """Edge threshold K in HU: neighbour differences well above K stop the flow."""
    iterations: int = 15
    """Number of explicit time steps (the paper uses 15)."""
    mode: str = "2d"
    """``"2d"``: per slice, 4 neighbours (the paper); ``"3d"``: 6 neighbours across slices."""
    time_step: float | None = None
    """Explicit step; ``None`` picks the stability limit (1/4 in 2D, 1/6 in 3D)."""

    def __post_init__(self):
        if not (np.isfinite(self.kappa) and self.kappa > 0):
            raise ValueError(f"K (kappa) must be a positive number of HU, got {self.kappa}")
        if not (isinstance(self.iterations, (int, np.integer)) and 0 <= self.iterations <= 1000):
            raise ValueError(f"iterations must be an integer in [0, 1000], got {self.iterations}")
        if self.mode not in ("2d", "3d"):
            raise ValueError(f"diffusion mode must be '2d' or '3d', got {self.mode!r}")
        if self.time_step is not None and not 0 < self.time_step <= self.stable_time_step():
            raise ValueError(f"time step must be in (0, {self.stable_time_step():.4f}] for "
                             f"{self.mode} (explicit scheme stability), got {self.time_step}")

    def stable_time_step(self) -> float:
        return 0.25 if self.mode == "2d" else 1.0 / 6.0

    @property
    def dt(self) -> float:
        return self.time_step if self.time_step is not None else self.stable_time_step()


def diffuse(volume: np.ndarray, probability: np.ndarray,
            settings: DiffusionSettings = DiffusionSettings(),
            device: torch.device | str | None = None) -> np.ndarray:
    """Diffuse an int16 volume (slice-major) steered by ``probability``; return int16.

    Voxels with ``probability == 1`` are returned unchanged. Values are rounded to the nearest
    integer (ties to even) and stay within the input's range (maximum principle). ``device``:
    None picks CUDA when available (:func:`models.device.resolve_device`).

    Example:
        >>> import numpy as np
        >>> ct = np.random.default_rng(0).normal(40, 20, (2, 32, 32)).astype(np.int16)
        >>> p = np.zeros(ct.shape, np.float32); p[:, 8:16, 8:16] = 1
        >>> out = diffuse(ct, p)
        >>> bool((out[p == 1] == ct[p == 1]).all()), bool(out.std() < ct.std())
        (True, True)
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"diffuse() needs a 3D slice-major volume, got shape {volume.shape}")
    if probability.shape != volume.shape:
        raise ValueError(f"probability shape {probability.shape} != volume shape {volume.shape}")
    if settings.iterations == 0:
        return volume.astype(np.int16, copy=True)
    import torch

    from models.device import resolve_device

    with torch.no_grad():
        return _diffuse(volume, probability, settings, resolve_device(device))


def _diffuse(volume: np.ndarray, probability: np.ndarray, settings: DiffusionSettings,
             device: torch.device) -> np.ndarray:
    import torch

    nz, ny, nx = volume.shape
    if settings.mode == "3d":  # every slice talks to its neighbours: one block
        return diffuse_slabs(volume, probability, settings, device, nz)
    if device.type == "cuda":
        return diffuse_slabs(volume, probability, settings, device,
                             max(1, CUDA_SLAB_VOXELS // (ny * nx)))
    workers = torch.get_num_threads()
    slab = max(1, min(CPU_SLAB_VOXELS // (ny * nx), -(-nz // workers)))  # a block per worker
    return diffuse_slabs(volume, probability, settings, device, slab, workers)


def diffuse_slabs(volume: np.ndarray, probability: np.ndarray, settings: DiffusionSettings,
                  device: torch.device | str, slab: int, workers: int = 1) -> np.ndarray:
    """The scheme on blocks of ``slab`` slices, shared by ``workers`` threads.

    On the CPU every kernel is single-threaded (``workers`` threads share the blocks); on CUDA
    the caller's thread launches them and ``workers`` is ignored. :func:`diffuse` chooses both
    (see the module notes); tests call this directly to check that every layout, the CUDA one
    (one large block) included, gives the same bits.

    Raises:
        ValueError: 3D mode with ``slab`` smaller than the volume (its slices are coupled).
    """
    import torch

    device = torch.device(device)
    nz = volume.shape[0]
    if settings.mode == "3d" and slab < nz:
        raise ValueError(f"3D diffusion couples all {nz} slices: slab must be >= {nz}, got {slab}")
    if slab < 1 or workers < 1:
        raise ValueError(f"slab and workers must be >= 1, got {slab} and {workers}")
    slab = min(slab, nz)
    starts = range(0, nz, slab)
    workers = min(workers, len(starts))
    out = np.empty(volume.shape, np.int16)

    def run(blocks):
        buffers = _SlabBuffers(slab, volume.shape[1:], settings, device)
        for z0 in blocks:
            z1 = min(nz, z0 + slab)
            buffers.diffuse(volume[z0:z1], probability[z0:z1], out[z0:z1])

    if device.type != "cpu":
        run(starts)
        return out
    # On the CPU every kernel runs single-threaded, and threads share the blocks instead: one
    # synchronisation per call rather than one per kernel. torch's intra-op threads meet at a
    # barrier after each of the ~100 kernels per block and iteration (and spin between them),
    # which on a busy machine waits for a descheduled thread: measured at load 5 on 2 cores,
    # 20 slices took 9.8 s with 2 intra-op threads against 0.26 s with one.
    queue, queue_lock = iter(starts), threading.Lock()

    def next_blocks():
        while True:
            with queue_lock:
                z0 = next(queue, None)
            if z0 is None:
                return
            yield z0

    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if workers == 1:
                run(starts)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="dlad-diffusion") as pool:
                    for future in [pool.submit(run, next_blocks()) for _ in range(workers)]:
                        future.result()
        finally:
            torch.set_num_threads(threads)
    return out


class _SlabBuffers:
    """Flat float32 buffers for blocks of up to ``slab`` slices, allocated once.

    Neighbours along an axis are the flat indices ``i`` and ``i + stride`` (stride 1, ``nx`` or
    ``ny * nx``); a face whose voxel ``i`` is the last along that axis (the volume border, or a
    slice border in 2D) gets zero flux. ``flux`` keeps ``pad`` (the largest stride) zeros in
    front of the face fluxes, so that the flux of the face *before* each voxel is the shifted
    view ``flux[pad - stride:]``, which reads 0 at the border.
    """

    def __init__(self, slab: int, plane: tuple[int, int], settings: DiffusionSettings,
                 device: torch.device):
        import torch

        self.settings = settings
        self.ny, self.nx = plane
        size = slab * self.ny * self.nx
        self.pad = self.ny * self.nx if settings.mode == "3d" else self.nx
        self.image = torch.empty(size, device=device)
        self.weight = torch.empty(size, device=device)
        self.update = torch.empty(size, device=device)
        self.difference = torch.empty(size, device=device)
        self.flux = torch.zeros(self.pad + size, device=device)

    def diffuse(self, block: np.ndarray, probability: np.ndarray, out: np.ndarray) -> None:
        """Diffuse ``block`` (slices of the volume) into ``out`` (int16, same shape)."""
        import torch

        settings, ny, nx, pad = self.settings, self.ny, self.nx, self.pad
        nz = block.shape[0]
        size = nz * ny * nx
        image, weight, update = self.image[:size], self.weight[:size], self.update[:size]
        _load(image, block)
        _load(weight, probability)
        # Per-voxel factor dt * (1 - p): exactly 0 inside the ROI, so its voxels never move.
        weight.neg_().add_(1.0).mul_(settings.dt).clamp_(min=0.0)
        # (stride, length) of each axis, slowest first: the order of the sum over the axes.
        axes = [(ny * nx, nz)] if settings.mode == "3d" else []
        axes = [(stride, length) for stride, length in axes + [(nx, ny), (1, nx)] if length > 1]
        inv_kappa = 1.0 / settings.kappa
        flux = self.flux[pad:pad + size]
        for _ in range(settings.iterations if axes else 0):
            for index, (stride, length) in enumerate(axes):
                faces = size - stride
                difference, face_flux = self.difference[:faces], flux[:faces]
                torch.sub(image[stride:], image[:faces], out=difference)
                torch.abs(difference, out=face_flux).mul_(-inv_kappa).exp_().mul_(difference)
                # Faces after the last voxel along this axis carry none (this also clears the
                # tail of ``flux`` past ``faces``).
                flux.view(-1, length, stride)[:, length - 1, :].zero_()
                before = self.flux[pad - stride:pad - stride + size]
                if index == 0:
                    torch.sub(flux, before, out=update)
                else:
                    update.add_(flux).sub_(before)
            image.addcmul_(update, weight)
        rounded = torch.round(image, out=self.difference[:size]).clamp_(-32768, 32767)
        # Integral values: the cast to int16 (a copy from the device on CUDA) is exact.
        torch.from_numpy(out).view(-1).copy_(rounded)


def _load(target: torch.Tensor, values: np.ndarray) -> None:
    """Copy ``values`` (int16 CT, float probabilities) into the flat float32 ``target``."""
    import torch

    values = np.ascontiguousarray(values)
    if not (values.dtype.isnative and values.flags.writeable):  # what torch.from_numpy needs
        values = values.astype(values.dtype.newbyteorder("="))
    target.copy_(torch.from_numpy(values).view(-1))


class LazyDiffusion:
    """The diffused volume, computed block by block when a block is first asked for.

    The sender needs the diffused voxels of a block only when it encodes that block's base, so
    diffusion runs chunk by chunk in the encoding thread while earlier chunks are on the wire
    (2D mode: slices are independent, and :func:`diffuse` gives the same bits for every block
    layout). In 3D mode slices exchange flux, so the first access diffuses the whole volume.
    Voxels with ``probability == 1`` (the ROI) are copied from the input, whatever the float
    arithmetic did.

    Indexing takes a slice range along the first axis only: ``lazy[z0:z1]``; ``np.asarray(lazy)``
    is the whole volume.
    """

    def __init__(self, volume: np.ndarray, probability: np.ndarray | None, roi: np.ndarray,
                 settings: DiffusionSettings = DiffusionSettings(), device=None):
        volume = np.asarray(volume)
        if probability is None:
            # Without iterations nothing is diffused: the steering map is not needed (a live
            # series skips computing it, sender.roi.steering.steer's need_probability).
            if settings.iterations:
                raise ValueError("diffusion needs the steering probability map")
        elif probability.shape != volume.shape:
            raise ValueError(f"probability {probability.shape} must have the volume's shape "
                             f"{volume.shape}")
        if roi.shape != volume.shape:
            raise ValueError(f"ROI {roi.shape} must have the volume's shape {volume.shape}")
        self.volume, self.probability, self.roi = volume, probability, roi
        self.settings, self.device = settings, device
        self.shape = volume.shape
        self.dtype = np.dtype(np.int16)
        self._out = np.empty(volume.shape, dtype=np.int16)
        self._done = np.zeros(volume.shape[0], dtype=bool)
        self._lock = threading.Lock()
        self._locks: dict[tuple[int, int], threading.Lock] = {}
        self.seconds = 0.0
        """Wall seconds spent diffusing so far."""

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("LazyDiffusion takes a slice range along the first axis (z0:z1)")
        z0, z1, _ = index.indices(self.shape[0])
        self.compute(z0, z1)
        return self._out[z0:z1]

    def compute(self, z0: int, z1: int) -> None:
        """Diffuse the slices of ``[z0, z1)`` not diffused yet."""
        if self.settings.mode == "3d":
            z0, z1 = 0, self.shape[0]
        # One lock per slice range asked for (the encoder asks whole blocks): blocks are
        # diffused in parallel when several threads encode, each block once.
        with self._lock:
            lock = self._locks.setdefault((z0, z1), threading.Lock())
        with lock:
            if self._done[z0:z1].all():
                return
            started = time.perf_counter()
            todo = np.flatnonzero(~self._done[z0:z1]) + z0
            # Consecutive runs of slices still to do (usually the whole block).
            for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1):
                a, b = int(run[0]), int(run[-1]) + 1
                block = diffuse(self.volume[a:b], self.probability[a:b], self.settings,
                                self.device) if self.probability is not None \
                    else self.volume[a:b].astype(np.int16, copy=True)
                np.copyto(block, self.volume[a:b], where=self.roi[a:b])
                self._out[a:b] = block
                self._done[a:b] = True
            with self._lock:
                self.seconds += time.perf_counter() - started

    def full(self) -> np.ndarray:
        """The whole diffused volume (computing what is left)."""
        self.compute(0, self.shape[0])
        return self._out

    @property
    def ndim(self) -> int:
        return 3

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(lazy)``: the whole diffused volume (what callers that want an array,
        such as the benchmarks' metrics, get)."""
        out = self.full()
        if dtype is not None and np.dtype(dtype) != out.dtype:
            return out.astype(dtype)
        return out.copy() if copy else out
