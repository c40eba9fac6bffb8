"""A five-level 2D U-Net that maps one axial CT slice to per-pixel liver logits.

Architecture (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI; used for the liver by Christ et al. 2017, "Automatic Liver and Tumor
Segmentation of CT and MRI Volumes Using Cascaded Fully Convolutional Neural Networks",
arXiv:1702.05970): an encoder of five levels, each two ``3x3`` convolutions followed by a
``2x2`` max-pool, a decoder that upsamples with ``2x2`` transposed convolutions and
concatenates the encoder features of the same level (skip connections), and a ``1x1``
convolution to one logit per pixel. Unlike the original we pad the convolutions ("same"
padding), so the output has the input's size, use widths ``16..256`` instead of ``64..1024``
(CPU inference) and put a batch normalisation (Ioffe & Szegedy 2015, ICML) after every
convolution. In evaluation mode batch normalisation is a fixed per-channel affine map, so
a slice's prediction does not depend on the other slices of its batch.

The input side length must be a multiple of ``2 ** (levels - 1) = 16``;
:func:`models.preprocessing.pad_to_multiple` takes care of that.

Weights are stored in a file that :func:`torch.load` reads with ``weights_only=True``
(tensors, numbers, strings, lists and dicts only: no pickled code), half precision to keep
the bundled file small, together with the :class:`UNetConfig` that rebuilds the network and
the preprocessing it was trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from shared.atomic import atomic_path

#: The weights shipped with the sender, and their human-readable sidecar.
BUNDLED_WEIGHTS = Path(__file__).with_name("liver_unet.pt")
#: The second network of the bundled ensemble: the same data, with the augmentations that
#: imitate unseen scans (contrast phases, kernels, padding, capsule tumours, liver-free
#: regions). Held out, the two together (probabilities averaged) kept more liver than either
#: alone (docs/UNET.md, "Unseen scans").
BUNDLED_DOMAIN_WEIGHTS = Path(__file__).with_name("liver_unet_dom.pt")
#: What the sender's U-Net provider runs by default.
BUNDLED_ENSEMBLE = (BUNDLED_WEIGHTS, BUNDLED_DOMAIN_WEIGHTS)
#: Bundled weights must stay below this size (the issue's 20 MB).
MAX_WEIGHTS_BYTES = 20 * 1000 * 1000
#: Written into every weights file; :func:`load_weights` refuses other formats.
WEIGHTS_FORMAT = "dlad-liver-unet/1"


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the network and prepare its input.

    The preprocessing is part of the model: a slice is clipped to the HU ``window``, mapped
    linearly to ``[-1, 1]`` and resampled in-plane to ``spacing_mm`` before it enters the
    network, and the probabilities are resampled back to the native grid.
    """

    widths: tuple[int, ...] = (12, 24, 48, 96, 192)
    """Feature channels of each level, shallowest first; one entry per level."""
    spacing_mm: float = 2.0
    """In-plane pixel size, in mm, the network sees."""
    window: tuple[float, float] = (-200.0, 300.0)
    """HU clipping window ``(low, high)``; ``low`` maps to -1 and ``high`` to +1."""

    def __post_init__(self):
        widths = tuple(int(w) for w in self.widths)
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"widths must list at least two positive channel counts, got {widths}")
        if not 0.1 <= self.spacing_mm <= 10.0:
            raise ValueError(f"spacing_mm must be in [0.1, 10] mm, got {self.spacing_mm}")
        low, high = (float(v) for v in self.window)
        if not low < high:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "window", (low, high))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (one halving per lower level)."""
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys {sorted(unknown)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in values.items()})


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two ``3x3`` same-padded convolutions, each followed by batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class LiverUNet(nn.Module):
    """2D U-Net: ``(N, 1, H, W)`` windowed slices to ``(N, 1, H, W)`` liver logits.

    Args:
        config: channel widths (the preprocessing fields are not used by the module itself
            but travel with it).

    Example:
        >>> net = LiverUNet(UNetConfig(widths=(8, 16)))
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        widths = config.widths
        self.encoders = nn.ModuleList()
        in_channels = 1
        for width in widths:
            self.encoders.append(_conv_block(in_channels, width))
            in_channels = width
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.upsamplers.append(nn.ConvTranspose2d(deep, shallow, 2, stride=2))
            self.decoders.append(_conv_block(2 * shallow, shallow))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` is ``(N, 1, H, W)`` with ``H`` and ``W`` multiples of
        :attr:`UNetConfig.size_multiple`."""
        multiple = self.config.size_multiple
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (N, 1, H, W), got {tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got "
                             f"{tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # a trace is made of valid input; it checks nothing
            self.check_input(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, skips[-2::-1],
                                           strict=True):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def save_weights(model: LiverUNet, path, metadata: dict | None = None) -> Path:
    """Write ``model``'s parameters in half precision, with its config, atomically.

    ``metadata`` (JSON-like: numbers, strings, lists, dicts) is stored alongside; the sidecar
    ``.json`` is the caller's business.
    """
    path = Path(path)
    state = {name: tensor.detach().to("cpu", torch.float16 if tensor.is_floating_point()
                                      else tensor.dtype).clone()
             for name, tensor in model.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "config": model.config.to_dict(), "state_dict": state,
               "metadata": metadata or {}}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_weights(path=None, device: str | torch.device = "cpu") -> LiverUNet:
    """Rebuild a :class:`LiverUNet` in float32 evaluation mode from a weights file.

    The network comes back in channels-last memory format, which is about twice as fast for
    these narrow convolutions on CPU.

    Args:
        path: file written by :func:`save_weights`; ``None`` for :data:`BUNDLED_WEIGHTS`.
        device: where to put the network.

    The file is read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers, so a weights file cannot run code.
    """
    path = BUNDLED_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"U-Net weights not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read U-Net weights {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a {WEIGHTS_FORMAT} weights file")
    model = LiverUNet(UNetConfig.from_dict(payload["config"]))
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in payload["state_dict"].items()}
    model.load_state_dict(state)
    return model.to(device).to(memory_format=torch.channels_last).eval()

