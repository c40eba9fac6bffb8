"""dlad-link: a network link emulator for the WebRTC path between sender and receiver.

A :class:`LinkRelay` carries UDP over an emulated link (rate, delay, jitter, loss, queue,
delivery traces), one :class:`LinkParams` per direction. A :class:`SignalingProxy` sits on
the HTTP signaling and puts every WebRTC session behind relays; :func:`run_behind_link` is
the one call that does it for a receiver URL. Pure asyncio; see docs/LINK.md.
"""

from .emulator import DirectionStats, EmulatedLink
from .model import Drop, LinkModel
from .params import TRACE_MTU, DeliveryTrace, GilbertElliott, LinkParams
from .profiles import PROFILES, get_profile
from .relay import LinkRelay, RelayStats
from .sdp import SdpCandidate, is_relayable, rewrite_sdp_candidates, sdp_candidates, strip_sdp_candidates
from .signaling import SignalingProxy, run_behind_link

__all__ = [
    "PROFILES",
    "TRACE_MTU",
    "DeliveryTrace",
    "DirectionStats",
    "Drop",
    "EmulatedLink",
    "GilbertElliott",
    "LinkModel",
    "LinkParams",
    "LinkRelay",
    "RelayStats",
    "SdpCandidate",
    "SignalingProxy",
    "get_profile",
    "is_relayable",
    "rewrite_sdp_candidates",
    "run_behind_link",
    "sdp_candidates",
    "strip_sdp_candidates",
]
