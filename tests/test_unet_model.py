"""The U-Net module, its weights files and the preprocessing shared by training and inference."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from models.preprocessing import (
    canonical_spacing,
    from_canonical,
    network_size,
    pad_to_multiple,
    resize,
    to_canonical,
    window,
)
from models.unet import (
    BUNDLED_ENSEMBLE,
    BUNDLED_WEIGHTS,
    MAX_WEIGHTS_BYTES,
    WEIGHTS_FORMAT,
    LiverUNet,
    UNetConfig,
    load_weights,
    save_weights,
)


def test_five_levels_keep_the_input_size():
    model = LiverUNet().eval()
    assert len(model.encoders) == 5 and len(model.decoders) == 4
    with torch.no_grad():
        out = model(torch.zeros(3, 1, 48, 80))
    assert out.shape == (3, 1, 48, 80)


def test_input_size_must_be_a_multiple_of_sixteen():
    with pytest.raises(ValueError, match="multiples of 16"):
        LiverUNet()(torch.zeros(1, 1, 40, 48))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        LiverUNet()(torch.zeros(1, 2, 32, 32))


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": (8,)}, "at least two"),
    ({"widths": (8, 0)}, "at least two positive"),
    ({"spacing_mm": 0.0}, "spacing_mm"),
    ({"window": (300.0, -200.0)}, "low < high"),
])
def test_config_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = UNetConfig(widths=(8, 16, 32), spacing_mm=1.5, window=(-100.0, 250.0))
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**config.to_dict(), "dropout": 0.5})


def test_saved_weights_are_half_precision_and_load_safely(tmp_path):
    torch.manual_seed(0)
    model = LiverUNet(UNetConfig(widths=(4, 8, 16))).eval()
    path = save_weights(model, tmp_path / "net.pt", {"note": "test"})
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == WEIGHTS_FORMAT and payload["metadata"] == {"note": "test"}
    assert {t.dtype for t in payload["state_dict"].values() if t.is_floating_point()} \
        == {torch.float16}
    loaded = load_weights(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=2e-2)


def test_loading_refuses_foreign_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a dlad-liver-unet"):
        load_weights(path)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.pt")


@pytest.mark.parametrize("weights", BUNDLED_ENSEMBLE, ids=lambda path: path.name)
def test_bundled_weights_are_small_safe_and_documented(weights):
    assert weights.is_file(), f"bundled weights missing: {weights}"
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    torch.load(weights, map_location="cpu", weights_only=True)
    model = load_weights(weights)
    assert len(model.config.widths) == 5
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    for key in ("sha256", "preprocessing", "training_data", "training", "cross_validation",
                "retrain"):
        assert key in sidecar, f"sidecar lacks {key!r}"
    assert sidecar["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar["weights_file"] == weights.name
    assert BUNDLED_ENSEMBLE[0] == BUNDLED_WEIGHTS


#: RAS+ unit vector each axis code points to.
DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
              "S": (0, 0, 1), "I": (0, 0, -1)}


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("R", "A", "S"), ("P", "L", "I"),
                                     ("S", "R", "A")])
def test_canonical_orientation_is_exact_and_invertible(axcodes):
    spacing = (2.0, 3.0, 4.0)
    affine = np.eye(4)
    for axis, (code, size) in enumerate(zip(axcodes, spacing, strict=True)):
        affine[:3, axis] = np.array(DIRECTIONS[code]) * size
    k, j, i = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    world = np.einsum("rc,c...->r...", affine[:3, :3], np.stack([i, j, k]).astype(float))
    canonical = [to_canonical(world[r], affine) for r in range(3)]
    # Canonical (z, y, x) axes: x toward the patient's left (RAS x falls), y toward posterior
    # (RAS y falls), z toward superior (RAS z grows).
    assert np.all(np.diff(canonical[0], axis=2) < 0)
    assert np.all(np.diff(canonical[1], axis=1) < 0)
    assert np.all(np.diff(canonical[2], axis=0) > 0)
    assert np.array_equal(from_canonical(canonical[0], affine), world[0])
    x_size, y_size, z_size = canonical_spacing(spacing, affine)
    assert np.diff(canonical[0], axis=2).max() == pytest.approx(-x_size)
    assert np.diff(canonical[1], axis=1).max() == pytest.approx(-y_size)
    assert np.diff(canonical[2], axis=0).min() == pytest.approx(z_size)


def test_window_resize_and_pad():
    hu = torch.tensor([[-1000.0, -200.0, 50.0, 300.0, 2000.0]])
    assert torch.allclose(window(hu, -200, 300), torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0]]))
    assert network_size((512, 512), (0.9765625, 0.9765625), 2.0) == (250, 250)
    assert network_size((101, 122), (3.0, 3.0), 2.0) == (152, 183)
    probability = torch.rand(2, 1, 37, 29)
    shrunk = resize(probability, (20, 15))
    assert shrunk.shape == (2, 1, 20, 15) and 0 <= shrunk.min() and shrunk.max() <= 1
    padded, original = pad_to_multiple(probability, 16, -1.0)
    assert padded.shape == (2, 1, 48, 32) and original == (37, 29)
    assert torch.equal(padded[..., :37, :29], probability) and padded[0, 0, -1, -1] == -1


def _random_network(widths=(4, 8, 16)) -> LiverUNet:
    """A small network with random weights and non-trivial batch-norm statistics, eval mode."""
    torch.manual_seed(3)
    model = LiverUNet(UNetConfig(widths=widths))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.to(memory_format=torch.channels_last).eval()


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 1, 48, 80), (3, 1, 64, 16)])
def test_traced_network_gives_the_eager_logits_bit_for_bit(shape):
    from models.inference import gil_free

    model = _random_network()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5)) \
        .contiguous(memory_format=torch.channels_last)
    traced = gil_free(model)
    assert isinstance(traced, torch.jit.ScriptModule)
    with torch.inference_mode():
        for _ in range(4):  # TorchScript's executor profiles the first calls, then optimises
            assert torch.equal(traced(x), model(x))


def test_trace_is_made_once_and_follows_the_networks_tensors():
    from models.inference import gil_free

    model = _random_network()
    traced = gil_free(model)
    assert gil_free(model) is traced  # cached
    x = torch.randn(1, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # weights changed in place (training steps, load_state_dict)
        model.head.weight.mul_(-2.0)
    assert gil_free(model) is traced
    with torch.inference_mode():
        assert torch.equal(traced(x), model(x))
    model.double()  # tensors replaced: traced again
    retraced = gil_free(model)
    assert retraced is not traced
    with torch.inference_mode():
        assert torch.equal(retraced(x.double()), model(x.double()))


def test_network_in_training_mode_is_not_traced():
    from models.inference import gil_free

    model = _random_network().train()
    assert gil_free(model) is model
