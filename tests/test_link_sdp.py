"""Rewriting and stripping the ICE candidates of an SDP."""

from __future__ import annotations

import pytest

from shared.link import SdpCandidate, is_relayable, rewrite_sdp_candidates, sdp_candidates, strip_sdp_candidates

ANSWER = "\r\n".join([
    "v=0",
    "o=- 3916416406 3916416406 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "m=application 41000 UDP/DTLS/SCTP webrtc-datachannel",
    "c=IN IP4 192.0.2.2",
    "a=mid:0",
    "a=sctp-port:5000",
    "a=candidate:1 1 udp 2130706431 192.0.2.2 41000 typ host",
    "a=candidate:2 1 udp 2130706431 127.0.0.1 41001 typ host generation 0",
    "a=candidate:3 1 udp 2130706431 fd00::2 41002 typ host",
    "a=candidate:4 1 udp 2130706431 fe80::1 41003 typ host",
    "a=candidate:5 1 udp 2130706431 1f2e3d4c-aaaa-bbbb-cccc-0123456789ab.local 41004 typ host",
    "a=candidate:6 1 tcp 1518280447 192.0.2.2 9 typ host tcptype active",
    "a=candidate:7 1 udp 2130706431 169.254.3.4 41005 typ host",
    "a=candidate:8 1 udp 1694498815 203.0.113.9 41006 typ srflx raddr 192.0.2.2 rport 41000",
    "a=candidate:broken line",
    "a=end-of-candidates",
    "a=ice-ufrag:abcd",
    "a=ice-pwd:0123456789abcdefghijkl",
    "a=setup:active",
    "",
])


def candidate_lines(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:")]


def test_parse_candidate_round_trips():
    value = "8 1 udp 1694498815 203.0.113.9 41006 typ srflx raddr 192.0.2.2 rport 41000"
    candidate = SdpCandidate.parse(value)
    assert (candidate.transport, candidate.host, candidate.port, candidate.type) == (
        "udp", "203.0.113.9", 41006, "srflx")
    assert candidate.extensions == ("raddr", "192.0.2.2", "rport", "41000")
    assert candidate.to_value() == value
    with pytest.raises(ValueError, match="malformed"):
        SdpCandidate.parse("1 1 udp 5 1.2.3.4 notaport typ host")


def test_relayable_candidates_are_ipv4_udp_host_candidates():
    relayable = [(c.host, c.port) for c in sdp_candidates(ANSWER) if is_relayable(c)]
    assert relayable == [("192.0.2.2", 41000), ("127.0.0.1", 41001)]


def test_rewrite_with_a_mapping_points_at_relays_and_drops_the_rest():
    rewritten = rewrite_sdp_candidates(ANSWER, {("127.0.0.1", 41001): ("127.0.0.1", 50001),
                                                ("192.0.2.2", 41000): ("127.0.0.1", 50000)})
    assert candidate_lines(rewritten) == [
        "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
        "a=candidate:2 1 udp 2130706431 127.0.0.1 50001 typ host generation 0",
    ]
    # Everything else is left as it was, CRLF line endings included.
    others = [line for line in ANSWER.split("\r\n") if not line.startswith("a=candidate:")]
    assert rewritten.split("\r\n") == others[:9] + candidate_lines(rewritten) + others[9:]


def test_rewrite_with_a_callback():
    def to_relay(candidate: SdpCandidate):
        return ("127.0.0.1", candidate.port + 10000) if is_relayable(candidate) else None

    rewritten = rewrite_sdp_candidates(ANSWER, to_relay)
    assert [(c.host, c.port) for c in sdp_candidates(rewritten)] == [("127.0.0.1", 51000), ("127.0.0.1", 51001)]
    assert "a=end-of-candidates\r\n" in rewritten


def test_rewrite_keeps_lf_only_sdp_as_lf():
    sdp = ANSWER.replace("\r\n", "\n")
    rewritten = rewrite_sdp_candidates(sdp, {("192.0.2.2", 41000): ("127.0.0.1", 50000)})
    assert "\r" not in rewritten and rewritten.endswith("a=setup:active\n")


def test_strip_removes_candidates_and_end_of_candidates_only():
    stripped = strip_sdp_candidates(ANSWER)
    assert candidate_lines(stripped) == [] and "end-of-candidates" not in stripped
    assert stripped == "".join(line for line in ANSWER.splitlines(keepends=True)
                               if not line.startswith(("a=candidate:", "a=end-of-candidates")))
