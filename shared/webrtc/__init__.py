"""Peer-neutral WebRTC pieces used by both ``dlad-send --to`` and ``dlad-receive --listen``.

* :mod:`shared.webrtc.protocol`: the ``dlad`` data-channel messages and the stream key;
* :mod:`shared.webrtc.signaling`: WHIP-style offer checks, bearer tokens;
* :mod:`shared.webrtc.ice`: which local addresses ICE gathers, socket buffers;
* :mod:`shared.webrtc.sctp`: aiortc SCTP tuning (delayed SACK, fast retransmit, HyStart++).

Nothing here imports torch or ITK: the receiver stays lightweight.
"""
