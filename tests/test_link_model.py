"""dlad-link's arithmetic, driven with made-up clocks: shaping, traces, queues, loss, jitter, seeds."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from shared.link import PROFILES, DeliveryTrace, Drop, GilbertElliott, LinkModel, LinkParams, get_profile
from shared.link.model import GilbertElliottLoss, TokenBucket, TraceSchedule
from shared.link.units import parse_bytes, parse_duration, parse_probability, parse_queue, parse_rate


def admit_all(model: LinkModel, arrivals: list[tuple[float, int]]) -> list[float | Drop]:
    return [model.admit(now, size) for now, size in arrivals]


# --- token bucket -------------------------------------------------------------------------

def test_serialization_without_burst_follows_the_link_free_formula():
    bucket = TokenBucket(rate=1e6, burst=0)  # 1250 bytes take 10 ms
    departures = [bucket.departure(0.0, 1250) for _ in range(5)]
    assert departures == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    # After the link idled, a packet again only waits for its own serialization.
    assert bucket.departure(1.0, 1250) == pytest.approx(1.01)


def test_token_bucket_lets_one_burst_through_then_holds_the_rate():
    bucket = TokenBucket(rate=1e6, burst=1500)
    departures = [bucket.departure(0.0, 1250) for _ in range(5)]
    assert departures[0] == 0.0
    gaps = [b - a for a, b in zip(departures, departures[1:])]
    assert departures[1] == pytest.approx(0.008)  # 250 bytes of credit were left
    assert gaps[1:] == pytest.approx([0.01] * 3)


def test_token_bucket_long_run_rate_is_exact_for_mixed_sizes():
    rng = random.Random(1)
    bucket = TokenBucket(rate=8e6, burst=3000)
    sizes = [rng.randint(60, 1500) for _ in range(5000)]
    departures = [bucket.departure(i * 1e-4, size) for i, size in enumerate(sizes)]  # offered 60 Mbit/s
    measured = sum(sizes[1:]) * 8 / (departures[-1] - departures[0])
    assert measured == pytest.approx(8e6, rel=1e-3)


def test_packet_larger_than_the_bucket_waits_for_its_tokens():
    bucket = TokenBucket(rate=1e6, burst=1500)
    assert bucket.departure(0.0, 9000) == pytest.approx((9000 - 1500) * 8 / 1e6)


# --- delivery traces ----------------------------------------------------------------------

def test_trace_parse_and_mean_rate():
    trace = DeliveryTrace.parse("1\n1\n\n3\n")
    assert trace.opportunities_ms == (1, 1, 3)
    assert trace.period_ms == 3
    assert trace.mean_rate == pytest.approx(3 * 1500 * 8 / 0.003)


@pytest.mark.parametrize("text, message", [
    ("", "no delivery opportunity"),
    ("5\n3\n", "must not decrease"),
    ("0\n0\n", "last one > 0"),
    ("1\nabc\n", ":2: expected a millisecond timestamp"),
])
def test_bad_traces_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        DeliveryTrace.parse(text)


def test_trace_full_size_packets_take_one_opportunity_each_and_the_trace_loops():
    schedule = TraceSchedule(DeliveryTrace((1, 1, 3)), origin=10.0)
    departures = [schedule.departure(10.0, 1500) for _ in range(7)]
    assert departures == pytest.approx([10.001, 10.001, 10.003, 10.004, 10.004, 10.006, 10.007])


def test_trace_small_packets_share_an_opportunity_and_large_ones_span_several():
    schedule = TraceSchedule(DeliveryTrace((1, 2, 4)), origin=0.0)
    assert [schedule.departure(0.0, 500) for _ in range(4)] == pytest.approx([0.001, 0.001, 0.001, 0.002])
    # 1000 bytes are left at 2 ms: a 3000-byte packet needs them plus the 4 ms and the 5 ms ones.
    assert schedule.departure(0.0, 3000) == pytest.approx(0.005)


def test_trace_opportunities_do_not_wait_for_packets():
    schedule = TraceSchedule(DeliveryTrace((1, 1, 3)), origin=0.0)
    assert schedule.departure(0.0, 500) == pytest.approx(0.001)
    # The leftover of the 1 ms opportunity, and the second one at 1 ms, are gone by 1.5 ms.
    assert schedule.departure(0.0015, 500) == pytest.approx(0.003)
    # An idle link skips whole periods: 10 ms is the 1 ms opportunity of the fourth pass.
    assert schedule.departure(0.0095, 1500) == pytest.approx(0.010)


def test_trace_long_run_rate_matches_the_trace():
    trace = DeliveryTrace(tuple(sorted(random.Random(2).choices(range(1, 101), k=400))) + (100,))
    model = LinkModel(LinkParams(trace=trace))
    deliveries = admit_all(model, [(i * 1e-4, 1500) for i in range(20000)])  # 120 Mbit/s offered
    measured = 1500 * 8 * (len(deliveries) - 1) / (deliveries[-1] - deliveries[0])
    assert measured == pytest.approx(trace.mean_rate, rel=0.01)


# --- queue, delay, jitter -----------------------------------------------------------------

def test_drop_tail_in_bytes():
    model = LinkModel(LinkParams(rate=1e6, burst=0, queue_bytes=5000))
    verdicts = admit_all(model, [(0.0, 1000)] * 10)
    assert [v is Drop.QUEUE for v in verdicts] == [False] * 5 + [True] * 5
    assert model.queued(0.0) == (5, 5000)
    # Once the first packet has left (8 ms), there is room for one more.
    assert model.admit(0.008, 1000) != Drop.QUEUE
    assert model.admit(0.008, 1000) is Drop.QUEUE


def test_drop_tail_in_packets():
    model = LinkModel(LinkParams(rate=1e6, burst=0, queue_packets=3))
    verdicts = admit_all(model, [(0.0, 100)] * 6)
    assert sum(v is Drop.QUEUE for v in verdicts) == 3


def test_delay_is_added_after_serialization():
    model = LinkModel(LinkParams(rate=1e6, burst=0, delay=0.040))
    assert model.admit(2.0, 1250) == pytest.approx(2.050)
    assert LinkModel(LinkParams(delay=0.040)).admit(2.0, 1250) == pytest.approx(2.040)


def test_jitter_keeps_fifo_order_unless_reordering_is_asked():
    params = LinkParams(delay=0.040, jitter=0.020)
    arrivals = [(i * 0.001, 200) for i in range(2000)]
    fifo = admit_all(LinkModel(params, seed=1), arrivals)
    assert all(b >= a for a, b in zip(fifo, fifo[1:]))
    reordered = admit_all(LinkModel(LinkParams(delay=0.040, jitter=0.020, reorder=True), seed=1), arrivals)
    assert any(b < a for a, b in zip(reordered, reordered[1:]))
    delays = [delivery - now for delivery, (now, _) in zip(reordered, arrivals)]
    assert min(delays) >= 0.020 - 1e-9 and max(delays) <= 0.060 + 1e-9
    assert sum(delays) / len(delays) == pytest.approx(0.040, abs=0.001)


# --- loss -----------------------------------------------------------------------------------

def test_random_loss_rate_within_binomial_tolerance():
    n, p = 20000, 0.10
    verdicts = admit_all(LinkModel(LinkParams(loss=p), seed=5), [(0.0, 100)] * n)
    lost = sum(v is Drop.LOSS for v in verdicts)
    assert abs(lost - n * p) <= 4 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("model", [
    GilbertElliott(p=0.05, r=0.30),
    GilbertElliott(p=0.02, r=0.20, h=0.30, k=0.99),
])
def test_gilbert_elliott_mean_loss_matches_the_stationary_formula(model):
    loss = GilbertElliottLoss(model, random.Random(11))
    n = 200_000
    lost = sum(loss.lose() for _ in range(n))
    assert lost / n == pytest.approx(model.mean_loss, abs=0.01)


def test_gilbert_losses_come_in_bursts_of_mean_length_one_over_r():
    loss = GilbertElliottLoss(GilbertElliott(p=0.02, r=0.25), random.Random(3))
    pattern = [loss.lose() for _ in range(200_000)]
    bursts = [len(run) for run in "".join("x" if lost else "." for lost in pattern).split(".") if run]
    assert sum(bursts) / len(bursts) == pytest.approx(1 / 0.25, rel=0.1)


def test_gilbert_elliott_stationary_formula():
    model = GilbertElliott(p=0.02, r=0.20, h=0.30, k=0.99)
    bad = 0.02 / 0.22
    assert model.mean_loss == pytest.approx(0.01 * (1 - bad) + 0.70 * bad)
    with pytest.raises(ValueError, match="never ends"):
        GilbertElliott(p=0.1, r=0.0)


# --- seeds --------------------------------------------------------------------------------

def test_same_seed_same_outcome_and_jitter_leaves_the_loss_pattern_alone():
    params = LinkParams(rate=4e6, delay=0.02, jitter=0.005, gilbert=GilbertElliott(0.05, 0.3), queue_packets=50)
    arrivals = [(i * 0.0015, 1200) for i in range(3000)]
    first = admit_all(LinkModel(params, seed=42), arrivals)
    assert admit_all(LinkModel(params, seed=42), arrivals) == first
    assert admit_all(LinkModel(params, seed=43), arrivals) != first
    without_jitter = admit_all(LinkModel(replace(params, jitter=0.0), seed=42), arrivals)
    assert [v is Drop.LOSS for v in without_jitter] == [v is Drop.LOSS for v in first]


# --- parameters, units, profiles ----------------------------------------------------------

@pytest.mark.parametrize("text, bits", [
    ("2mbit", 2e6), ("2Mbit/s", 2e6), ("500kbit", 5e5), ("12Mbps", 12e6), ("1.5 gbit", 1.5e9), ("9600bit", 9600),
])
def test_parse_rate(text, bits):
    assert parse_rate(text) == pytest.approx(bits)


def test_parse_values():
    assert parse_rate("unlimited") is None
    assert parse_duration("40ms") == pytest.approx(0.04)
    assert parse_duration("0") == 0.0
    assert parse_duration("200us") == pytest.approx(2e-4)
    assert parse_probability("1%") == pytest.approx(0.01)
    assert parse_probability("0.25") == 0.25
    assert parse_queue("100kB") == (100_000, None)
    assert parse_queue("64KiB") == (65_536, None)
    assert parse_queue("50p") == (None, 50)
    assert parse_queue("unlimited") == (None, None)
    assert parse_bytes("1500B") == 1500


@pytest.mark.parametrize("parse, text", [
    (parse_rate, "2mb"), (parse_rate, "fast"), (parse_rate, "0mbit"), (parse_duration, "40"),
    (parse_probability, "150%"), (parse_probability, "2"), (parse_queue, "10kbit"), (parse_queue, "2.5p"),
])
def test_bad_values_name_the_text(parse, text):
    with pytest.raises(ValueError, match=f"invalid .*{text!r}"):
        parse(text)


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 0.0}, "above 0"),
    ({"rate": 1e6, "trace": DeliveryTrace((1,))}, "either a rate or a delivery trace"),
    ({"loss": 0.1, "gilbert": GilbertElliott(0.1, 0.5)}, "either a random loss"),
    ({"loss": 1.5}, r"\[0, 1\]"),
    ({"delay": -0.001}, "negative"),
    ({"queue_bytes": 0}, "at least 1"),
])
def test_link_params_refuse_contradictions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinkParams(**kwargs)


def test_profiles_match_the_issue_and_have_finite_queues():
    expected = {"wifi-2m": (2e6, 0.040, 0.0), "4g-12m": (12e6, 0.060, 0.01),
                "cable-20m": (20e6, 0.020, 0.0), "lan-100m": (100e6, 0.001, 0.0)}
    assert set(PROFILES) == set(expected)
    for name, (rate, delay, loss) in expected.items():
        profile = get_profile(name)
        assert (profile.rate, profile.delay, profile.loss) == (rate, delay, loss)
        bandwidth_delay_product = rate / 8 * 2 * delay
        assert bandwidth_delay_product < profile.queue_bytes < 10 * max(bandwidth_delay_product, 25_000)
    with pytest.raises(ValueError, match="known: wifi-2m"):
        get_profile("dialup")
