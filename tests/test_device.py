"""models/device.py: the one default device, and devices the machine lacks refused up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.device import default_device, resolve_device
from sender.diffusion import diffuse


def test_auto_is_cuda_when_present_and_cpu_otherwise(monkeypatch):
    for available, expected in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert default_device().type == expected
        assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == resolve_device("cpu") == torch.device("cpu")


def test_a_device_the_machine_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' asked for, but CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:3' asked for, but this machine has 1 CUDA"):
        resolve_device("cuda:3")
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        resolve_device("gpu")


def test_diffusion_refuses_a_missing_cuda_device_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    volume = np.zeros((2, 8, 8), np.int16)
    with pytest.raises(ValueError, match="CUDA is not available"):
        diffuse(volume, np.zeros(volume.shape, np.float32), device="cuda")
