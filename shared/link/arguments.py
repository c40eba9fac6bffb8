"""Command-line pieces shared by ``dlad-link`` and ``dlad-link demo``: the link options and
their parsers (the one-line-error parser of every command line is :mod:`shared.arguments`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from urllib.parse import urlsplit

from .params import DeliveryTrace, GilbertElliott, LinkParams
from .profiles import PROFILES, get_profile
from .units import parse_bytes, parse_duration, parse_probability, parse_queue, parse_rate

_LINK_GROUP_DESCRIPTION = """\
Options apply to both directions. Each also exists as --up-OPTION (sender to receiver,
i.e. client to upstream) and --down-OPTION (the way back), which win over the plain one;
profiles apply first, then the plain options, then the one-direction ones.
"""

def argument_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """Let argparse show the parser's own message instead of a generic 'invalid value'."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def parse_gilbert(text: str) -> GilbertElliott:
    """Parse ``p,r[,h[,k]]``, each a probability such as ``1%`` or ``0.01``."""
    parts = text.split(",")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"invalid Gilbert-Elliott model {text!r} (use p,r[,h[,k]], e.g. 1%,30%)")
    return GilbertElliott(*(parse_probability(part) for part in parts))


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {text!r} (use HOST:PORT, e.g. 127.0.0.1:9000)")
    return host, int(port)


def parse_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {text!r} (use e.g. http://127.0.0.1:8080)")
    return text


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"invalid number of seconds {text!r}")
    return value


@dataclass(frozen=True)
class _LinkOption:
    """A command-line option that sets part of a :class:`LinkParams`."""

    name: str
    "Option name without dashes or direction prefix."
    metavar: str
    "Placeholder shown in --help."
    parse: Callable[[str], object]
    "Turns the text into a value; raises ValueError."
    fields: Callable[[object], dict]
    "The LinkParams fields the value sets; setting a rate clears the trace, and so on."
    help: str
    "What the option does."


# Help texts quote the dataclasses' own defaults.
_GILBERT_DEFAULTS = {field.name: field.default for field in fields(GilbertElliott)}
_DEFAULT_BURST = LinkParams().burst

_LINK_OPTIONS = (
    _LinkOption("rate", "RATE", parse_rate, lambda v: {"rate": v, "trace": None},
                "link rate, e.g. 2mbit, 500kbit, 12Mbps or unlimited"),
    _LinkOption("delay", "TIME", parse_duration, lambda v: {"delay": v}, "one-way delay, e.g. 40ms"),
    _LinkOption("jitter", "TIME", parse_duration, lambda v: {"jitter": v},
                "delay variation: each delay is uniform in delay +/- jitter; packets keep their order"),
    _LinkOption("loss", "P", parse_probability, lambda v: {"loss": v, "gilbert": None},
                "independent random loss, e.g. 1%% or 0.01"),
    _LinkOption("gilbert", "p,r[,h[,k]]", parse_gilbert, lambda v: {"gilbert": v, "loss": 0.0},
                "bursty Gilbert-Elliott loss instead: p good->bad and r bad->good transition, h and k the "
                f"chance a packet gets through when bad (default {_GILBERT_DEFAULTS['h']:g}) and good "
                f"(default {_GILBERT_DEFAULTS['k']:g}), e.g. 1%%,30%%"),
    _LinkOption("queue", "SIZE", parse_queue, lambda v: {"queue_bytes": v[0], "queue_packets": v[1]},
                "drop-tail queue limit, e.g. 100kB, 64KiB, 50p or unlimited"),
    _LinkOption("burst", "SIZE", parse_bytes, lambda v: {"burst": v},
                f"token-bucket depth, what an idle link sends at once (default {_DEFAULT_BURST}B)"),
    _LinkOption("trace", "FILE", DeliveryTrace.load, lambda v: {"trace": v, "rate": None},
                "mahimahi delivery trace (one ms timestamp per 1500-byte opportunity, looping) "
                "giving a time-varying rate instead of --rate"),
)
_EXCLUSIVE = (("rate", "trace"), ("loss", "gilbert"))


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--profile`` and the link options, plain and ``--up-``/``--down-``, to `parser`."""
    group = parser.add_argument_group("link", _LINK_GROUP_DESCRIPTION)
    for prefix in ("", "up-", "down-"):
        hidden = prefix != ""
        group.add_argument(f"--{prefix}profile", metavar="NAME", type=argument_type(get_profile),
                           help=argparse.SUPPRESS if hidden else f"start from a named link: {', '.join(PROFILES)}")
        for option in _LINK_OPTIONS:
            group.add_argument(f"--{prefix}{option.name}", metavar=option.metavar, type=argument_type(option.parse),
                               help=argparse.SUPPRESS if hidden else option.help)
        group.add_argument(f"--{prefix}reorder", action="store_const", const=True,
                           help=argparse.SUPPRESS if hidden else "let jitter reorder packets")


def link_params_from_args(args: argparse.Namespace) -> tuple[LinkParams, LinkParams]:
    """Return the (uplink, downlink) parameters that parsed link options describe; raise ValueError on conflicts."""
    return _direction_params(args, "up"), _direction_params(args, "down")


def _direction_params(args: argparse.Namespace, direction: str) -> LinkParams:
    params = getattr(args, f"{direction}_profile") or args.profile or LinkParams()
    for prefix in ("", f"{direction}_"):
        given = {option.name: option for option in _LINK_OPTIONS if getattr(args, prefix + option.name) is not None}
        for first, second in _EXCLUSIVE:
            if first in given and second in given:
                dashed = prefix.replace("_", "-")
                raise ValueError(f"--{dashed}{first} and --{dashed}{second} contradict each other; choose one")
        changes = {}
        for name, option in given.items():
            changes.update(option.fields(getattr(args, prefix + name)))
        if getattr(args, prefix + "reorder"):
            changes["reorder"] = True
        params = replace(params, **changes)
    return params
