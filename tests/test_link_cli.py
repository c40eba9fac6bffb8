"""The dlad-link command line: options, profiles and overrides, errors, and both modes end to end."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

from shared.link import GilbertElliott, LinkParams, get_profile
from shared.link.cli import _proxy_parser, link_params_from_args, main

REPO = Path(__file__).resolve().parents[1]


def resolve(*options: str) -> tuple[LinkParams, LinkParams]:
    return link_params_from_args(_proxy_parser().parse_args(["--to", "http://127.0.0.1:8080", *options]))


def test_profile_is_symmetric_and_overridable():
    up, down = resolve("--profile", "wifi-2m")
    assert up == down == get_profile("wifi-2m")
    up, down = resolve("--profile", "4g-12m", "--delay", "30ms", "--up-rate", "2mbit", "--down-queue", "50p")
    assert (up.rate, up.delay, up.loss, up.queue_bytes) == (2e6, 0.030, 0.01, 512_000)
    assert (down.rate, down.delay, down.queue_bytes, down.queue_packets) == (12e6, 0.030, None, 50)


def test_one_direction_profile_and_replacing_options():
    up, down = resolve("--profile", "cable-20m", "--down-profile", "lan-100m", "--gilbert", "1%,30%")
    assert up.rate == 20e6 and down.rate == 100e6
    assert up.gilbert == down.gilbert == GilbertElliott(p=0.01, r=0.30)
    up, down = resolve("--profile", "4g-12m", "--up-gilbert", "2%,25%,10%,99%")
    assert up.loss == 0.0 and up.gilbert == GilbertElliott(0.02, 0.25, 0.10, 0.99)
    assert down.loss == 0.01 and down.gilbert is None


def test_trace_replaces_the_rate(tmp_path):
    trace = tmp_path / "link.trace"
    trace.write_text("1\n2\n3\n")
    up, down = resolve("--profile", "wifi-2m", "--down-trace", str(trace), "--reorder", "--jitter", "2ms")
    assert up.rate == 2e6 and up.trace is None
    assert down.rate is None and down.trace.opportunities_ms == (1, 2, 3)
    assert up.reorder and down.reorder and down.jitter == 0.002


@pytest.mark.parametrize("options, message", [
    (["--rate", "2mb"], "argument --rate: invalid rate '2mb'"),
    (["--loss", "120%"], "argument --loss: invalid probability '120%'"),
    (["--delay", "40"], "argument --delay: invalid duration '40'"),
    (["--gilbert", "1%"], "argument --gilbert: invalid Gilbert-Elliott model"),
    (["--profile", "dialup"], "unknown link profile 'dialup'"),
    (["--queue", "lots"], "invalid queue limit 'lots'"),
    (["--trace", "/nonexistent/trace"], "cannot read trace /nonexistent/trace"),
    (["--up-loss", "1%", "--up-gilbert", "1%,30%"], "--up-loss and --up-gilbert contradict each other"),
    (["--rate", "2mbit", "--trace", "TRACE"], "--rate and --trace contradict each other"),
    (["--listen", "9000"], "invalid address '9000'"),
    (["--duration", "soon"], "invalid number of seconds 'soon'"),
])
def test_bad_parameters_give_one_line_and_status_2(capsys, tmp_path, options, message):
    trace = tmp_path / "link.trace"
    trace.write_text("1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--to", "http://127.0.0.1:8080", *(str(trace) if option == "TRACE" else option for option in options)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("dlad-link: error: ") and message in error


def test_bad_url_and_missing_upstream(capsys):
    for argv, message in ((["--to", "localhost:8080"], "invalid URL"),
                          (["udp", "--listen", "127.0.0.1:0"], "required: --upstream")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, heading", [(["--help"], "usage: dlad-link"),
                                           (["udp", "--help"], "usage: dlad-link udp")])
def test_help_has_examples(capsys, argv, heading):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(heading) and "examples:" in text and "--up-OPTION" in text


async def _start_cli(*argv: str) -> tuple[asyncio.subprocess.Process, re.Match]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.link.cli", *argv, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    while True:
        line = (await process.stdout.readline()).decode()
        if not line:
            raise AssertionError(f"dlad-link ended early: {(await process.stderr.read()).decode()}")
        ready = re.search(r"(?:UDP relay|signaling proxy) (?:http://)?127\.0\.0\.1:(\d+)", line)
        if ready:
            return process, ready


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data, addr) -> None:
        self.received.append(data)


def test_udp_mode_relays_and_prints_statistics():
    async def scenario():
        loop = asyncio.get_running_loop()
        upstream, sink = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
        client, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        process = None
        try:
            upstream_port = upstream.get_extra_info("sockname")[1]
            process, ready = await _start_cli(
                "udp", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}",
                "--profile", "wifi-2m", "--seed", "1", "--stats-interval", "0.5", "--duration", "1.5")
            for number in range(20):
                client.sendto(b"%04d" % number + bytes(996), ("127.0.0.1", int(ready[1])))
            output = (await process.stdout.read()).decode()
            return await process.wait(), output, len(sink.received)
        finally:
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
            upstream.close()
            client.close()

    status, output, received = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert status == 0 and received == 20
    assert re.search(r"\] uplink +in 20 pkt / 20 kB, forwarded 20 pkt", output)
    assert "totals after" in output and "mean delay" in output


def test_proxy_mode_stops_cleanly_on_sigint():
    async def scenario():
        process, ready = await _start_cli("--to", "http://127.0.0.1:9", "--stats-interval", "0")
        try:
            process.send_signal(signal.SIGINT)
            output = (await process.stdout.read()).decode()
            return await process.wait(), output
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    status, output = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert status == 0 and "totals after" in output


def test_statistics_lines_only_for_intervals_with_traffic(capsys):
    from shared.link.cli import _StatsPrinter
    from shared.link.emulator import DirectionStats
    from shared.link.relay import RelayStats

    counters = {"now": RelayStats()}
    printer = _StatsPrinter(lambda: counters["now"])
    printer.print_interval()  # no sender yet: nothing to say
    assert capsys.readouterr().out == ""
    counters["now"] = RelayStats(DirectionStats(packets_in=3, bytes_in=3000, packets_forwarded=2,
                                                bytes_forwarded=2000, delay_total=0.1))
    printer.print_interval()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "uplink   in 3 pkt" in lines[0] and "downlink" in lines[1]
    printer.print_interval()  # idle again: silent
    printer.print_interval()
    assert capsys.readouterr().out == ""
    counters["now"] = RelayStats(DirectionStats(packets_in=3, bytes_in=3000, packets_forwarded=3,
                                                bytes_forwarded=3000, delay_total=0.2))
    printer.print_interval()  # the last datagram left the queue: that is news
    assert "forwarded 3 pkt" in capsys.readouterr().out
