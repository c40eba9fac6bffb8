"""``dlad-link``: put a sender/receiver pair behind an emulated network link.

Two modes: a signaling proxy (the default) that relays every WebRTC session it sets up, and
a plain UDP relay (``dlad-link udp``). Both print their counters periodically and at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from shared.arguments import OneLineErrorParser
from shared.version import version_text

from .arguments import (
    add_link_arguments,
    argument_type,
    link_params_from_args,
    parse_address,
    parse_seconds,
    parse_url,
)
from .params import LinkParams
from .profiles import PROFILES
from .relay import LinkRelay, RelayStats
from .signaling import SignalingProxy
from .units import format_bytes, format_rate

_PROXY_DESCRIPTION = """\
Put a WebRTC sender/receiver pair behind an emulated network link. dlad-link proxies the
HTTP signaling: the sender posts its offer to dlad-link instead of the receiver, and dlad-link
answers with the receiver's answer rewritten so that all the session's UDP traffic goes
through a relay that applies the link (rate, delay, jitter, loss, queue) in each direction.
"""

_UDP_DESCRIPTION = """\
Relay UDP datagrams between clients sending to --listen and the --upstream address through
an emulated network link. Each client (source address) gets its own socket towards the
upstream; answers go back to the client they belong to.
"""

_PROXY_EPILOG = f"""\
profiles:
{"".join(f"  {name:10} {params.describe()}{chr(10)}" for name, params in PROFILES.items())}
examples:
  dlad-link --listen 127.0.0.1:9000 --to http://127.0.0.1:8080 --profile wifi-2m
      then point the sender at http://127.0.0.1:9000 instead of http://127.0.0.1:8080
  dlad-link --listen 127.0.0.1:9000 --to http://127.0.0.1:8080 --profile 4g-12m --up-rate 2mbit --jitter 5ms
  dlad-link --listen 127.0.0.1:9000 --to http://127.0.0.1:8080 --rate 8mbit --delay 25ms \\
      --gilbert 1%,30% --queue 100kB --seed 1
  dlad-link --listen 127.0.0.1:9000 --to http://127.0.0.1:8080 --down-trace lte.down --up-trace lte.up --delay 30ms

See `dlad-link udp --help` for the plain UDP relay, `dlad-link demo --help` for receiver, link
and sender in one command, and docs/LINK.md for the model.
"""

_UDP_EPILOG = """\
examples:
  dlad-link udp --listen 127.0.0.1:5000 --upstream 127.0.0.1:6000 --profile wifi-2m
  dlad-link udp --listen 127.0.0.1:5000 --upstream 127.0.0.1:6000 --rate 8mbit --loss 10% --seed 7 --duration 30
"""


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT", type=argument_type(parse_address),
                        default=("127.0.0.1", 0), help="where to listen (default 127.0.0.1 and a free port)")
    add_link_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, help="seed of the random draws (loss, jitter) for reproducible runs")
    run.add_argument("--stats-interval", metavar="S", type=argument_type(parse_seconds), default=5.0,
                     help="seconds between statistics lines, 0 for none; an interval without "
                          "traffic prints none (default %(default)g)")
    parser.add_argument("--version", action="version", version=version_text("dlad-link"))
    run.add_argument("--duration", metavar="S", type=argument_type(parse_seconds),
                     help="stop after S seconds (default: run until interrupted)")


def _proxy_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="dlad-link", description=_PROXY_DESCRIPTION, epilog=_PROXY_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--to", metavar="URL", required=True, type=argument_type(parse_url),
                        help="the receiver's HTTP signaling URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="with an https:// --to: certificate authorities that may sign the "
                             "receiver's certificate (default: the system's store)")
    _add_common_arguments(parser)
    return parser


def _udp_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="dlad-link udp", description=_UDP_DESCRIPTION, epilog=_UDP_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--upstream", metavar="HOST:PORT", required=True, type=argument_type(parse_address),
                        help="where to relay the clients' datagrams")
    _add_common_arguments(parser)
    return parser


class _StatsPrinter:
    """Prints the counters of both directions: cumulative, with the rate and delay since the last line.

    An interval in which no datagram came in either way prints nothing: an idle link (before
    the first sender, between studies) would otherwise fill the log with identical lines.
    """

    def __init__(self, stats: Callable[[], RelayStats]) -> None:
        self._stats = stats
        self._started = time.monotonic()
        self._previous = RelayStats()
        self._previous_at = self._started

    async def run(self, interval: float) -> None:
        """Print every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.print_interval()

    def print_interval(self) -> None:
        now, current = time.monotonic(), self._stats()
        if _activity(current) == _activity(self._previous):  # idle since the last interval
            self._previous, self._previous_at = current, now
            return
        for name in ("uplink", "downlink"):
            stats, before = getattr(current, name), getattr(self._previous, name)
            forwarded = stats.packets_forwarded - before.packets_forwarded
            rate = (stats.bytes_forwarded - before.bytes_forwarded) * 8 / max(now - self._previous_at, 1e-9)
            delay = (stats.delay_total - before.delay_total) / forwarded if forwarded else None
            print(f"[{now - self._started:7.1f} s] {name:8} {_counters(stats)} | "
                  f"last {now - self._previous_at:.0f} s: {format_rate(rate)}, delay {_milliseconds(delay)}",
                  flush=True)
        self._previous, self._previous_at = current, now

    def print_total(self) -> None:
        current = self._stats()
        print(f"dlad-link: totals after {time.monotonic() - self._started:.1f} s", flush=True)
        for name in ("uplink", "downlink"):
            stats = getattr(current, name)
            rate = format_rate(stats.rate) if stats.rate is not None else "-"
            print(f"  {name:8} {_counters(stats)} | {rate}, mean delay {_milliseconds(stats.mean_delay)}",
                  flush=True)


def _activity(stats: RelayStats) -> tuple[int, ...]:
    """What changes whenever a datagram enters the link, or leaves it, either way."""
    return tuple(getattr(direction, counter) for direction in (stats.uplink, stats.downlink)
                 for counter in ("packets_in", "packets_forwarded", "packets_lost",
                                 "packets_queue_dropped"))


def _counters(stats) -> str:
    return (f"in {stats.packets_in} pkt / {format_bytes(stats.bytes_in)}, "
            f"forwarded {stats.packets_forwarded} pkt / {format_bytes(stats.bytes_forwarded)}, "
            f"lost {stats.packets_lost}, queue-dropped {stats.packets_queue_dropped}")


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


async def _serve(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]],
                 stats: Callable[[], RelayStats], args: argparse.Namespace) -> int:
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, interrupted.set)
        except (NotImplementedError, RuntimeError):
            pass  # No signal handlers off the main thread or on Windows; Ctrl-C still ends asyncio.run.
    try:
        await start()
    except OSError as exc:
        print(f"dlad-link: error: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}",
              file=sys.stderr)
        await stop()
        return 1
    printer = _StatsPrinter(stats)
    periodic = asyncio.create_task(printer.run(args.stats_interval)) if args.stats_interval else None
    try:
        await asyncio.wait_for(interrupted.wait(), args.duration)
    except asyncio.TimeoutError:
        pass
    finally:
        if periodic is not None:
            periodic.cancel()
        await stop()
        printer.print_total()
    return 0


async def _run_proxy(args: argparse.Namespace, uplink: LinkParams, downlink: LinkParams) -> int:
    proxy = SignalingProxy(args.to, uplink, downlink, listen=args.listen, seed=args.seed,
                           ca_file=args.ca_file)

    async def start() -> None:
        await proxy.start()
        print(f"dlad-link: signaling proxy {proxy.proxied_url(args.to)} -> {args.to}; "
              f"point the sender at {proxy.proxied_url(args.to)}", flush=True)

    return await _serve(start, proxy.stop, lambda: proxy.stats, args)


async def _run_udp(args: argparse.Namespace, uplink: LinkParams, downlink: LinkParams) -> int:
    relay = LinkRelay(args.upstream, uplink, downlink, listen=args.listen, seed=args.seed)

    async def start() -> None:
        await relay.start()
        print(f"dlad-link: UDP relay {relay.address[0]}:{relay.address[1]} -> "
              f"{args.upstream[0]}:{args.upstream[1]}", flush=True)

    return await _serve(start, relay.stop, lambda: relay.stats, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dlad-link`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main  # imported here: demo imports this module
        return demo_main(argv[1:])
    udp = bool(argv) and argv[0] == "udp"
    parser = _udp_parser() if udp else _proxy_parser()
    args = parser.parse_args(argv[1:] if udp else argv)
    try:
        uplink, downlink = link_params_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"dlad-link: uplink   {uplink.describe()}\ndlad-link: downlink {downlink.describe()}", flush=True)
    logging.basicConfig(level=logging.INFO, format="dlad-link: %(message)s")
    return asyncio.run((_run_udp if udp else _run_proxy)(args, uplink, downlink))


if __name__ == "__main__":
    sys.exit(main())
