"""Rewriting the ICE candidates of an SDP so that a peer's connectivity goes through relays."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

logger = logging.getLogger("dlad.link")

Address = tuple[str, int]
#: Where a candidate should point instead: a mapping from its (host, port), or a callback;
#: a candidate that gets no address is removed.
CandidateRemap = Mapping[Address, Address] | Callable[["SdpCandidate"], Address | None]

_CANDIDATE = "a=candidate:"
_END_OF_CANDIDATES = "a=end-of-candidates"


@dataclass(frozen=True)
class SdpCandidate:
    """The parts of an ``a=candidate:`` line (RFC 8839) that say where ICE checks go."""

    foundation: str
    "Groups candidates of the same kind from the same interface."
    component: int
    "ICE component, 1 for RTP or a data channel."
    transport: str
    "Transport protocol, ``udp`` or ``tcp`` (compared without case)."
    priority: int
    "ICE priority."
    host: str
    "Address or mDNS hostname."
    port: int
    "Port."
    type: str
    "``host``, ``srflx``, ``prflx`` or ``relay``."
    extensions: tuple[str, ...] = ()
    "The rest of the line (raddr, rport, generation...), kept as it was."

    @classmethod
    def parse(cls, value: str) -> SdpCandidate:
        """Parse the value of an ``a=candidate:`` attribute, i.e. the line without ``a=candidate:``."""
        tokens = value.split()
        if len(tokens) < 8 or tokens[6] != "typ":
            raise ValueError(f"malformed ICE candidate {value!r}")
        try:
            return cls(tokens[0], int(tokens[1]), tokens[2], int(tokens[3]), tokens[4], int(tokens[5]),
                       tokens[7], tuple(tokens[8:]))
        except ValueError:
            raise ValueError(f"malformed ICE candidate {value!r}") from None

    def to_value(self) -> str:
        """The attribute value, as it follows ``a=candidate:``."""
        return " ".join([self.foundation, str(self.component), self.transport, str(self.priority),
                         self.host, str(self.port), "typ", self.type, *self.extensions])


def sdp_candidates(sdp: str) -> list[SdpCandidate]:
    """Every well-formed ICE candidate of an SDP, in order."""
    candidates = []
    for line in sdp.splitlines():
        if line.startswith(_CANDIDATE):
            try:
                candidates.append(SdpCandidate.parse(line[len(_CANDIDATE):]))
            except ValueError as exc:
                logger.debug("%s", exc)
    return candidates


def is_relayable(candidate: SdpCandidate) -> bool:
    """Whether a relay on this machine can stand in for the candidate: a UDP host candidate on IPv4 unicast.

    aiortc (aioice) never offers 127.0.0.1 itself, so this takes the machine's interface
    addresses too; traffic to them from this machine still stays on the loopback device. It
    leaves out TCP, server-reflexive and TURN candidates (they lead off the machine), IPv6
    (its link-local addresses need a scope the relay cannot reach), mDNS ``.local`` names,
    and IPv4 link-local, multicast and unspecified addresses.
    """
    if candidate.transport.lower() != "udp" or candidate.type != "host":
        return False
    try:
        address = ipaddress.ip_address(candidate.host)
    except ValueError:
        return False
    return (address.version == 4 and not address.is_link_local and not address.is_multicast
            and not address.is_unspecified)


def rewrite_sdp_candidates(sdp: str, remap: CandidateRemap) -> str:
    """Point every ``a=candidate:`` line of `sdp` at the address `remap` gives for it.

    `remap` is a mapping from a candidate's ``(host, port)`` to the new one, or a callback
    that takes an :class:`SdpCandidate` and returns the new ``(host, port)``. Candidates it
    gives no address for, and lines that do not parse, are removed, so that no path bypasses
    the relays. Other lines, and every line ending, stay as they were.
    """
    lookup = remap if callable(remap) else (lambda candidate: remap.get((candidate.host, candidate.port)))
    lines = []
    for line in sdp.splitlines(keepends=True):
        if line.startswith(_CANDIDATE):
            body = line.rstrip("\r\n")
            try:
                candidate = SdpCandidate.parse(body[len(_CANDIDATE):])
            except ValueError as exc:
                logger.debug("%s", exc)
                continue
            target = lookup(candidate)
            if target is None:
                continue
            moved = replace(candidate, host=target[0], port=target[1])
            line = _CANDIDATE + moved.to_value() + line[len(body):]
        lines.append(line)
    return "".join(lines)


def strip_sdp_candidates(sdp: str) -> str:
    """Remove every ICE candidate and the end-of-candidates marker from `sdp`.

    Used on the offer, so that the answerer learns the offerer's address only from the checks
    that reach it through the relay (as peer-reflexive candidates). Were it to know the
    offerer's candidates, it would check them directly, and ICE could pick that direct path
    past the link. Dropping the end-of-candidates marker keeps the answerer's ICE waiting for
    those checks instead of failing at once for want of a candidate.
    """
    return "".join(
        line for line in sdp.splitlines(keepends=True)
        if not line.startswith(_CANDIDATE) and line.rstrip("\r\n") != _END_OF_CANDIDATES
    )
