"""Lossless and lossy codecs for blocks of int16 CT slices; decoders run in the receiver.

Importing this package registers every codec; use :func:`get_codec` by name.
"""

from shared.codecs import general, imaging, video  # noqa: F401  (registration side effect)
from shared.codecs.base import Codec, CodecError, codec_names, get_codec

__all__ = ["Codec", "CodecError", "codec_names", "get_codec"]
