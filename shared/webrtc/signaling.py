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
MIN_TOKEN_CHARS = 16


class TokenError(ValueError):
    """The token file cannot be used."""


def read_token_file(path, role: str = "receiver") -> str:
    """The token in ``path`` (surrounding whitespace stripped).

    Refuses a missing, empty or multi-line file; warns when the file is readable by other
    users (``chmod 600`` it) or the token is short.
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
    if len(token) < MIN_TOKEN_CHARS:
        log.warning("the %s token in %s is short (%d characters); use at least %d random "
                    "characters, e.g. `openssl rand -hex 32`", role, path, len(token),
                    MIN_TOKEN_CHARS)
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
