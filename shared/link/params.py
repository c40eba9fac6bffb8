"""What one direction of an emulated link does to the packets that cross it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .units import format_bytes, format_rate

#: Bytes one mahimahi delivery opportunity carries (mahimahi's MTU).
TRACE_MTU = 1500


@dataclass(frozen=True)
class GilbertElliott:
    """Bursty loss: a good and a bad state, the chain stepped once per packet before its fate is drawn.

    Conventions as in netem's ``loss gemodel p r 1-h 1-k``: ``p`` and ``r`` are the
    transition probabilities, ``k`` and ``h`` the probabilities that a packet gets *through*
    in the good and the bad state, so the loss is ``1 - k`` when good and ``1 - h`` when bad.
    The defaults ``h = 0, k = 1`` give the simple Gilbert model: every packet in the bad state
    is lost and none in the good one.
    """

    p: float
    "Probability of moving from the good to the bad state at a packet."
    r: float
    "Probability of moving from the bad back to the good state at a packet."
    h: float = 0.0
    "Probability that a packet gets through while in the bad state."
    k: float = 1.0
    "Probability that a packet gets through while in the good state."

    def __post_init__(self) -> None:
        for name in ("p", "r", "h", "k"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Gilbert-Elliott {name} must lie in [0, 1], not {value}")
        if self.r == 0 and self.p > 0:
            raise ValueError("Gilbert-Elliott r must be above 0: with r = 0 the bad state never ends")

    @property
    def bad_fraction(self) -> float:
        """Long-run share of packets that meet the bad state: ``p / (p + r)``."""
        return self.p / (self.p + self.r) if self.p > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        """Long-run loss rate: ``(1 - k) (1 - bad_fraction) + (1 - h) bad_fraction``."""
        bad = self.bad_fraction
        return (1 - self.k) * (1 - bad) + (1 - self.h) * bad


@dataclass(frozen=True)
class DeliveryTrace:
    """A mahimahi packet-delivery trace: the link may send 1500 bytes at each listed millisecond.

    The trace starts when the link does and loops: after its last timestamp ``T`` it starts
    over at ``T``, so an opportunity at ``t`` recurs at ``t + T``, ``t + 2T``...
    """

    opportunities_ms: tuple[int, ...]
    "Millisecond timestamps of delivery opportunities, non-decreasing; repeats are several opportunities."
    source: str = "trace"
    "Where the trace came from, for messages."

    def __post_init__(self) -> None:
        if not self.opportunities_ms:
            raise ValueError(f"{self.source}: the trace has no delivery opportunity")
        if any(b < a for a, b in zip(self.opportunities_ms, self.opportunities_ms[1:])):
            raise ValueError(f"{self.source}: trace timestamps must not decrease")
        if self.opportunities_ms[0] < 0 or self.period_ms <= 0:
            raise ValueError(f"{self.source}: trace timestamps must be >= 0 and the last one > 0")

    @classmethod
    def parse(cls, text: str, source: str = "trace") -> DeliveryTrace:
        """Read the one-integer-per-line mahimahi format; blank lines are skipped."""
        opportunities = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    opportunities.append(int(line))
                except ValueError:
                    raise ValueError(f"{source}:{number}: expected a millisecond timestamp, "
                                     f"got {line.strip()!r}") from None
        return cls(tuple(opportunities), source)

    @classmethod
    def load(cls, path: str | Path) -> DeliveryTrace:
        """Read a mahimahi trace file."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read trace {path}: {exc.strerror}") from None
        return cls.parse(text, str(path))

    @property
    def period_ms(self) -> int:
        """Length of one pass over the trace, after which it repeats."""
        return self.opportunities_ms[-1]

    @property
    def mean_rate(self) -> float:
        """Average rate the trace offers, in bits per second."""
        return len(self.opportunities_ms) * TRACE_MTU * 8 / (self.period_ms / 1000)


@dataclass(frozen=True)
class LinkParams:
    """One direction of an emulated link; the defaults let every packet through at once.

    A packet meets, in order: the loss model, the drop-tail queue, the rate (a token bucket,
    or the delivery trace), then the propagation delay with its jitter.
    """

    rate: float | None = None
    "Link rate in bits per second; None leaves the rate unlimited."
    delay: float = 0.0
    "One-way propagation delay in seconds, added once a packet has left the queue."
    jitter: float = 0.0
    "Delay variation in seconds: each packet's delay is drawn uniformly from delay +/- jitter."
    loss: float = 0.0
    "Probability that a packet is lost on entry, independently of the others."
    gilbert: GilbertElliott | None = None
    "Bursty loss on entry, instead of the independent `loss`."
    queue_bytes: int | None = None
    "Drop-tail limit on the bytes waiting for the link; None leaves it unbounded."
    queue_packets: int | None = None
    "Drop-tail limit on the packets waiting for the link; None leaves it unbounded."
    burst: int = TRACE_MTU
    "Token-bucket depth in bytes: what an idle link may send at once before the rate applies."
    trace: DeliveryTrace | None = None
    "mahimahi delivery trace giving a time-varying rate, instead of `rate`."
    reorder: bool = False
    "Let jitter reorder packets; by default deliveries keep their arrival order."

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"the rate must be above 0 bit/s, not {self.rate}")
        if self.rate is not None and self.trace is not None:
            raise ValueError("set either a rate or a delivery trace, not both")
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("delay and jitter must not be negative")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"the loss probability must lie in [0, 1], not {self.loss}")
        if self.loss and self.gilbert is not None:
            raise ValueError("set either a random loss or a Gilbert-Elliott model, not both")
        for name in ("queue_bytes", "queue_packets"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, or None for no limit")
        if self.burst < 0:
            raise ValueError("the token-bucket depth must not be negative")

    @property
    def mean_loss(self) -> float:
        """Long-run fraction of packets the loss model drops."""
        return self.gilbert.mean_loss if self.gilbert is not None else self.loss

    def describe(self) -> str:
        """One line for logs, e.g. ``2 Mbit/s, delay 40 ms, queue 64 kB``."""
        parts = [f"trace {self.trace.source} ({format_rate(self.trace.mean_rate)} mean)" if self.trace
                 else format_rate(self.rate)]
        if self.delay or self.jitter:
            parts.append(f"delay {self.delay * 1e3:g} ms" + (f" +/- {self.jitter * 1e3:g} ms" if self.jitter else ""))
        if self.gilbert is not None:
            g = self.gilbert
            parts.append(f"Gilbert-Elliott p={g.p:g} r={g.r:g} h={g.h:g} k={g.k:g} (mean loss {g.mean_loss:.2%})")
        elif self.loss:
            parts.append(f"loss {self.loss:.2%}")
        if self.queue_bytes is not None:
            parts.append(f"queue {format_bytes(self.queue_bytes)}")
        if self.queue_packets is not None:
            parts.append(f"queue {self.queue_packets} packets")
        if self.reorder:
            parts.append("reordering")
        return ", ".join(parts)
