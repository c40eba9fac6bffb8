"""The version of dlad-stream, from one source: ``version`` in pyproject.toml.

It reaches the code through the installed package's metadata, so the command lines
(``--version``) and the client string the sender puts in its hello (``dlad-send/0.1.0``) never
repeat it by hand. A source tree run without being installed says ``0+unknown``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "dlad-stream"


def package_version() -> str:
    """The installed distribution's version, ``0+unknown`` when it is not installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


__version__ = package_version()


def client_string(program: str) -> str:
    """``PROGRAM/VERSION``, e.g. ``dlad-send/0.1.0``: how a peer names itself to the other."""
    return f"{program}/{__version__}"


def version_text(program: str) -> str:
    """What ``PROGRAM --version`` prints."""
    return f"{program} {__version__}"
