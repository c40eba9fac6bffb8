"""The torch device: CUDA when present, CPU otherwise; a clear error for one that is absent."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` (or ``"auto"``) is :func:`default_device`.

    Raises:
        ValueError: ``device`` is not a device name, or names a CUDA device this machine lacks
            (asked for before any work, so that the user hears of it at once).
    """
    if device is None or device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r}: {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here "
                             f"(torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved
