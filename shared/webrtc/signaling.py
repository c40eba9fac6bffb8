"""WHIP-style signaling helpers: bearer tokens and SDP offer checks (no peer connection here).

The checks run before the receiver creates anything for a request, so a refused request
leaves no state behind: the token (compared in constant time), the content type, the size,
and the shape of the SDP offer (one data-channel section with ICE credentials and a DTLS
fingerprint).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("dlad.receiver")

SDP_CONTENT_TYPE = "application/sdp"
MAX_SDP_BYTES = 64 * 1024
#: A token must carry at least this much entropy (estimated by :func:`token_bits`): 128 bits
#: cannot be guessed online, whatever the request rate.
MIN_TOKEN_BITS = 128
_HEX = frozenset("0123456789abcdefABCDEF")
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")


class TokenError(ValueError):
    """The token file cannot be used."""


def token_bits(token: str) -> float:
    """Entropy of ``token`` in bits, assuming it was drawn at random from its alphabet.

    The alphabet is the smallest usual one that holds every character: hex digits (4 bits a
    character: ``openssl rand -hex 32`` gives 256 bits), base64 / base64url (6 bits:
    ``openssl rand -base64 32``, ``secrets.token_urlsafe``), else printable ASCII (6.5 bits).
    A token with fewer than 8 distinct characters is not random text: it counts 8 bits a
    distinct character at most (``"aaaa..."`` is worth next to nothing).

    >>> token_bits("0123456789abcdef0123456789abcdef")
    128.0
    >>> token_bits("secret") < 128
    True
    """
    characters = set(token)
    if characters <= _HEX:
        per_char = 4.0
    elif characters <= _BASE64:
        per_char = 6.0
    else:
        per_char = 6.55  # log2(94) printable ASCII characters
    bits = len(token) * per_char
    if len(characters) < 8:
        bits = min(bits, 8.0 * len(characters))
    return bits


def read_token_file(path, role: str = "receiver", allow_weak: bool = False) -> str:
    """The token in ``path`` (surrounding whitespace stripped).

    Refuses a missing, empty or multi-line file, and (for the receiver, unless
    ``allow_weak``) a token worth less than :data:`MIN_TOKEN_BITS` bits; a sender only warns
    about a weak token (the receiver decides). Warns when the file is readable by other users
    (``chmod 600`` it).
    """
    path = Path(path)
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenError(f"cannot read token file {path}: {error}") from None
    token = text.strip()
    if not token:
        raise TokenError(f"token file {path} is empty")
    if "\n" in token or "\r" in token or any(ord(c) < 0x21 or ord(c) == 0x7F for c in token):
        raise TokenError(f"token file {path} must hold one token without spaces or control "
                         "characters")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and os.name == "posix":
        log.warning("token file %s is accessible by other users (mode %o); chmod 600 it",
                    path, stat.S_IMODE(info.st_mode))
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        advice = (f"the token in {path} is weak (about {bits:.0f} bits, fewer than "
                  f"{MIN_TOKEN_BITS}); make one with `openssl rand -hex 32 > {path}`")
        if role == "receiver" and not allow_weak:
            raise TokenError(f"{advice}, or pass --allow-weak-token")
        log.warning("%s", advice)
    return token


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given_digest = hashlib.sha256(given.strip().encode("utf-8", "surrogatepass")).digest()
    expected_digest = hashlib.sha256(token.encode("utf-8")).digest()
    return hmac.compare_digest(given_digest, expected_digest)


def check_offer(text: str) -> str | None:
    """Why ``text`` is not a usable data-channel SDP offer, or None if it is."""
    from aiortc.sdp import SessionDescription

    if not text.startswith("v=0"):
        return "not an SDP document (it must start with v=0)"
    try:
        description = SessionDescription.parse(text)
    except Exception as error:  # aiortc's parser raises several types on malformed lines
        return f"malformed SDP ({type(error).__name__}: {error})"
    applications = [m for m in description.media if m.kind == "application"]
    if len(applications) != 1 or len(description.media) != 1:
        return "the offer must have exactly one media section, a data channel (m=application)"
    media = applications[0]
    if "SCTP" not in (media.profile or "") or media.sctp_port is None and media.sctpmap == {}:
        return "the data channel section is not DTLS/SCTP"
    ice = media.ice or description.ice
    if ice is None or not ice.usernameFragment or not ice.password:
        return "the offer has no ICE credentials"
    dtls = media.dtls or description.dtls
    if dtls is None or not dtls.fingerprints:
        return "the offer has no DTLS fingerprint"
    return None
