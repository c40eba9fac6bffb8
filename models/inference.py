"""Liver probability of a whole CT volume with the 2D U-Net, slice batch by slice batch.

For each batch of axial slices (in canonical orientation, see :mod:`models.preprocessing`,
with the padding outside the field of view turned into air): window, resample in-plane to
the network's pixel size, pad, run the network, take the sigmoid
``p = 1 / (1 + exp(-logit))``, crop, resample back to the native in-plane grid
(bilinear, a convex combination, so ``p`` stays in ``[0, 1]``) and undo the orientation.
Inference runs in float32 on CPU and CUDA alike (no autocast), so both give the same map up
to floating-point summation order (and TF32 convolutions on recent GPUs).

On CPU the batches are spread over worker threads that each run torch on **one** thread
(:func:`predict_probability`'s ``workers``, by default as many as torch's threads), and the
networks see one slice per forward pass. Two reasons, measured on the 2-core machine
(docs/BENCHMARKS.md, live sessions):

* **the same map however it is computed**: torch's own multi-threading changes the summation
  order (up to ``1.8e-7`` in ``p`` between one and two threads), and the convolution
  algorithm oneDNN picks may change with the batch size (up to ``1.2e-7`` between batches of
  one and two 144 x 168 slices); on one thread, one slice at a time, a slice's map is a
  function of that slice alone, bit for bit, whatever the batch, the number of workers or the
  machine's core count. A live sender that computes each slice as it arrives
  (:class:`sender.pipeline.SliceProbabilities`) so gets exactly the map of a whole-volume pass.
* **speed**: independent single-threaded workers do not stall when another thread or process
  holds a core (two intra-op threads took 2-5 x longer per slice than one then, every parallel
  region waiting for its share on the busy core), and cost less on a quiet machine too (0.111
  CPU s per 512 x 512 slice for the two-network ensemble on one thread, against 0.124 on two);
  one slice per pass costs about 4 % more than eight (0.116 against 0.111 s).
* **no waiting for Python**: on CPU the networks run as TorchScript traces (:func:`gil_free`),
  which do not need Python's global interpreter lock between operations: in a live sender a
  slice's eager pass waited for it dozens of times while the event loop and the DICOM node
  held it (8 x slower beside one busy Python thread).
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from models.preprocessing import (
    canonical_spacing,
    from_canonical,
    network_size,
    pad_to_multiple,
    resize,
    suppress_padding,
    to_canonical,
    window,
)
from models.unet import LiverUNet
from shared.progress import progress as progress_display

log = logging.getLogger("dlad.models")


#: Each network's TorchScript trace with what it was made from (:func:`gil_free`).
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRACES_LOCK = threading.Lock()


def gil_free(member: LiverUNet) -> torch.nn.Module:
    """``member`` as a TorchScript trace, for inference on CPU: the same operations on the same
    tensors, so the same logits bit for bit, run by TorchScript's interpreter, which does not
    come back to Python (and its global interpreter lock, the GIL) between one operation and
    the next.

    Why: an eager forward pass returns to Python for each of the network's 70-odd module
    calls and each time needs the GIL, which in a live sender the event loop, the WebRTC
    stack (aiortc's SCTP is Python) and the DICOM node also want; a thread waiting for the GIL
    may wait up to the interpreter's switch interval (5 ms) each time. Measured on the 2-core
    machine (``python scripts/bench_unet.py --gil``, docs/BENCHMARKS.md): one abdomen slice
    through the two-network ensemble, with its pre- and post-processing, took 0.12 s eager and
    0.11 s traced alone, but 1.03 s eager and 0.45 s traced beside one busy Python thread (0.14 s
    traced with a live sender's shorter switch interval, :data:`sender.live`).

    The trace is made once per network (cached; made again if the network's tensors are
    replaced) from a zero input; it keeps the network's parameters, not copies, and records
    evaluation-mode batch normalisation, so a network in training mode is returned as it is,
    and so is a network where this PyTorch cannot trace (a warning says so). TorchScript's
    CPU fuser is off by default in PyTorch, so no operation is fused or reordered;
    ``tests/test_unet_model.py`` checks the bit-for-bit equality.
    """
    if member.training:
        return member
    tensors = tuple(tensor.data_ptr() for tensor in member.state_dict().values())
    with _TRACES_LOCK:
        made = _TRACES.get(member)
        if made is None or made[0] != tensors:
            side = member.config.size_multiple
            parameter = next(member.parameters())
            example = torch.zeros((1, 1, side, side), dtype=parameter.dtype,
                                  device=parameter.device
                                  ).contiguous(memory_format=torch.channels_last)
            made = (tensors, _trace(member, example))
            _TRACES[member] = made
    return made[1]


def _trace(member: LiverUNet, example: torch.Tensor) -> torch.nn.Module:
    """TorchScript trace of ``member``, or ``member`` itself where this PyTorch cannot trace."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # PyTorch 2.9+ calls TorchScript deprecated in favour of torch.compile and
            # torch.export, neither of which runs a graph without Python (torch.compile also
            # needs a C++ compiler and changes the numerics); the pin in pyproject.toml keeps
            # a PyTorch that has it, and a later one without it falls back to eager below.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.trace(member, example, check_trace=False)
    except (AttributeError, RuntimeError) as error:
        log.warning("U-Net runs eager (slower beside other Python threads): this PyTorch "
                    "cannot trace it (%s)", error)
        return member


def _members(model) -> list[LiverUNet]:
    members = list(model) if isinstance(model, list | tuple) else [model]
    if not members:
        raise ValueError("no network given")
    config = members[0].config
    for member in members[1:]:
        if (member.config.spacing_mm, member.config.window) != (config.spacing_mm, config.window):
            raise ValueError("ensemble members must share the preprocessing (pixel size and "
                             f"HU window): {member.config} vs {config}")
    return members


@torch.inference_mode()
def predict_probability(model: LiverUNet | list[LiverUNet], hu: np.ndarray, affine: np.ndarray,
                        spacing, batch_size: int = 8, progress: bool = False,
                        flips: bool = False, workers: int | None = None) -> np.ndarray:
    """Per-voxel liver probability of a slice-major HU volume.

    Args:
        model: network in evaluation mode, on the device to run on; or a list of such
            networks with the same preprocessing (an ensemble: their probabilities are
            averaged).
        hu: ``(nz, ny, nx)`` Hounsfield units.
        affine: 4x4 voxel-to-RAS+ matrix of ``hu``'s grid (gives the orientation).
        spacing: ``(sx, sy, sz)`` voxel size in mm.
        batch_size: slices per forward pass on CUDA (memory vs. speed); on CPU, slices
            per worker's turn (each forward pass takes one).
        progress: show the slice batches done (when this module's log shows INFO, as the
            command lines' do: a bar on a terminal, plain lines in a log).
        flips: test-time augmentation: also run every network on the slices mirrored left to
            right, mirror the result back and average it in (twice the cost).
        workers: on CPU, threads that run batches side by side, each with one torch thread
            (the map is the same whatever their number); ``None``: torch's thread count of
            the calling thread. Ignored on CUDA (one stream).

    Returns:
        float32 probabilities of ``hu``'s shape, in ``[0, 1]``: the mean of
        ``sigmoid(network(x))`` over the members (and the mirrored inputs).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    members = _members(model)
    config = members[0].config
    device = next(members[0].parameters()).device
    canonical = suppress_padding(to_canonical(hu, affine))
    sx, sy, _ = canonical_spacing(spacing, affine)
    native_size = canonical.shape[1:]
    size = network_size(native_size, (sx, sy), config.spacing_mm)
    probability = np.empty(canonical.shape, dtype=np.float32)
    starts = range(0, canonical.shape[0], batch_size)

    def run(start: int) -> int:
        block = np.ascontiguousarray(canonical[start:start + batch_size], dtype=np.float32)
        probability[start:start + batch_size] = _predict_block(
            members, block, size, native_size, device, flips)
        return start

    if device.type != "cpu":
        for start in progress_display(starts, desc="liver U-Net", unit="batch",
                                      disable=not progress, logger=log):
            run(start)
        return np.ascontiguousarray(from_canonical(probability, affine))
    workers = min(workers or torch.get_num_threads(), len(starts)) or 1
    if workers == 1:
        with _one_thread():
            for start in progress_display(starts, desc="liver U-Net", unit="batch",
                                          disable=not progress, logger=log):
                run(start)
    else:
        def work(start: int) -> int:
            with torch.inference_mode(), _one_thread():
                return run(start)

        with ThreadPoolExecutor(workers, thread_name_prefix="dlad-unet") as pool:
            futures = [pool.submit(work, start) for start in starts]
            for future in progress_display(futures, desc="liver U-Net", unit="batch",
                                           disable=not progress, logger=log):
                future.result()
    return np.ascontiguousarray(from_canonical(probability, affine))


@contextmanager
def _one_thread():
    """torch on one thread in the calling thread (OpenMP's setting is per thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _predict_block(members: list[LiverUNet], block: np.ndarray, size, native_size, device,
                   flips: bool) -> np.ndarray:
    """The mean probability of ``block`` (canonical slices, float32) over the members (and
    their mirrored inputs), on ``block``'s native in-plane grid."""
    config = members[0].config
    low, high = config.window
    slices = torch.from_numpy(block)[:, None].to(device)
    slices = resize(window(slices, low, high), size)
    total, count = None, 0
    for mirrored in ((False, True) if flips else (False,)):
        # A mirrored slice is padded like any other (bottom and right), so the network sees
        # exactly what it would see of a mirrored scan.
        view = torch.flip(slices, dims=[-1]) if mirrored else slices
        padded, (height, width) = pad_to_multiple(view, config.size_multiple, -1.0)
        padded = padded.contiguous(memory_format=torch.channels_last)
        for member in members:
            if device.type == "cpu":  # one slice per pass, traced: see the module docstring
                network = gil_free(member)
                logits = torch.cat([network(padded[i:i + 1]) for i in range(len(padded))])
            else:
                logits = member(padded)
            p = torch.sigmoid(logits.float())[:, :, :height, :width]
            p = torch.flip(p, dims=[-1]) if mirrored else p
            total = p if total is None else total + p
            count += 1
    block_probability = resize(total / count, native_size).clamp_(0.0, 1.0)
    return block_probability[:, 0].cpu().numpy()
