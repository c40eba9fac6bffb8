"""What a receiver lets a peer make it spend: sessions, memory, disk, CPU, log lines, ICE checks.

Every resource a sender can make ``dlad-receive --listen`` consume has a limit here, with a
default meant for one expert's workstation serving a few hospitals (``dlad-receive --help``
names the flag of each). The checks run as early as they can:

* **before a peer connection exists** (HTTP): the token, the session cap (counted atomically,
  so 100 offers in parallel cannot pass a cap of 8), the memory for one more session, the ICE
  candidates of the offer (at most :attr:`Limits.max_ice_candidates`, only addresses inside
  :attr:`Limits.allow_peers` when given);
* **on the header, before the study is allocated** (:func:`check_header`): voxels, plan
  entries (and that blocks of one layer do not overlap), the largest stream the plan allows,
  the memory the study will hold against :attr:`Limits.memory_budget`, its expected disk use
  against the out-dir quota and the free-space reserve (:class:`DiskGuard`);
* **while data flows**: frames larger than the header allows are refused unread, a session that
  sends more than :attr:`Limits.max_bad_frames` bad frames or :attr:`Limits.max_junk_bytes` of
  garbage, more bytes than its study's stream can hold, or nothing new for
  :attr:`Limits.progress_timeout` seconds is closed; every append to disk is checked against
  the quota and the reserve first.

Memory is an estimate made from the header (:func:`study_cost`), reserved while the study is in
memory and released when it is unloaded; the receiver's peak memory stays within its idle size
plus :attr:`Limits.memory_budget` (measured by ``scripts/bench_stress.py``).
"""

from __future__ import annotations

import ipaddress
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from shared.wire import (
    PREFIX,
    StreamHeader,
    max_data_frame_bytes,
    max_frame_bytes,
    max_roi_frame_bytes,
)

MiB = 1 << 20
GiB = 1 << 30

#: Header frames larger than this are refused before they are parsed. A header holds the
#: compressed ROI mask (kilobytes), the plan (3 entries per block) and at most 128 DICOM
#: attributes of at most 10 kB: a few MB at the very most.
MAX_HEADER_BYTES = 16 * MiB

#: Memory held per open session besides its study: aiortc's peer connection, SCTP and DTLS
#: state and the messages in flight (about 3 MB measured, twice that for safety), and what a
#: peer that ignores the receive window can make SCTP buffer (8.5 MiB at most, see
#: shared/webrtc/sctp.py, MAX_REASSEMBLY_BYTES).
SESSION_MEMORY = 16 * MiB

#: The decoders' own state while a chunk is decoded (the HEVC decoder holds 5-6 MB).
DECODER_MEMORY = 8 * MiB


class LimitExceeded(ValueError):
    """A request or a study asks for more than this receiver allows; the message says what."""


@dataclass(frozen=True)
class Limits:
    """The receiver's limits; ``dlad-receive --listen`` sets each from a flag."""

    max_sessions: int = 8
    """Open sessions (peer connections) at most; more offers get 503 with Retry-After."""
    max_voxels: int = 256 * 1024 * 1024
    """Largest study in voxels (256 Mi: 512 MiB of int16, a 512 x 512 x 1024 CT)."""
    max_plan_entries: int = 65536
    """Most chunks a header may plan (3 layers of 8192 one-slice blocks fit twice over)."""
    max_stream_bytes: int = 4 * GiB
    """Largest stream a header may imply (the sum of the largest frames its plan allows)."""
    memory_budget: int = 2 * GiB
    """Memory for the studies in memory and the open sessions, as estimated from headers."""
    disk_quota: int | None = None
    """Bytes the out-dir may hold in all (None: no quota, only the free-space reserve)."""
    disk_reserve: int = 512 * MiB
    """Free space left on the out-dir's file system: nothing is written below it."""
    max_bad_frames: int = 32
    """Bad frames (garbage, bad checksums, rejected chunks) a session may send before it is
    closed; a run of garbage counts every magic in it."""
    max_junk_bytes: int = 1 * MiB
    """Bytes of garbage a session may send before it is closed."""
    progress_timeout: float = 120.0
    """A session that brings no new chunk for this long (while it has work left) is closed.
    Two minutes: a 2 MB chunk over a 256 kbit/s link takes about a minute."""
    header_timeout: float = 10.0
    """An HTTP connection must deliver a request's headers within this many seconds of opening
    (or of its previous response); idle keep-alive connections close after it too."""
    body_timeout: float = 10.0
    """Seconds to read a request's body (an SDP offer: at most 64 KiB)."""
    max_connections: int | None = None
    """Open HTTP connections at most (None: from the open-file limit, see
    :func:`connection_cap`); more are closed at once."""
    max_ice_candidates: int = 32
    """ICE candidates an offer may list (a browser offers 2-10); more: 400."""
    allow_peers: tuple | None = None
    """Networks (``ipaddress`` networks) the receiver sends ICE checks to; None: any."""

    def __post_init__(self):
        for name in ("max_sessions", "max_voxels", "max_plan_entries", "max_stream_bytes",
                     "memory_budget", "max_ice_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("disk_reserve", "max_bad_frames", "max_junk_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("progress_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.disk_quota is not None and self.disk_quota < 1:
            raise ValueError("disk_quota must be >= 1 byte (or None)")


@dataclass(frozen=True)
class StudyCost:
    """What one study will take, estimated from its header."""

    memory: int
    """Bytes of memory while the study is loaded (volume, ROI, decoding, buffers)."""
    disk: int
    """Bytes on disk expected: the chunk log (about the raw volume at most) and a snapshot
    (twice, while it is replaced)."""
    stream: int
    """Largest number of stream bytes the plan allows (sum of the largest frames)."""
    frame: int
    """Largest data frame of the stream."""


def study_cost(header: StreamHeader, window: int) -> StudyCost:
    """Estimate the memory and disk a study takes from its header.

    Memory: the int16 volume (2 bytes a voxel), the packed ROI (1/8), early residuals waiting
    for their base (a quarter of the volume at most, see ``Reassembler.max_waiting_bytes``),
    a decoded block three times over (the residual, its sum, a slice of the ROI) plus the
    decoder's state, and the bytes buffered for the session: twice the largest frame (the
    reader's buffer and the frame's copy) and twice the credit ``window``.
    """
    voxels = int(np.prod(header.shape, dtype=np.int64))
    volume = 2 * voxels
    plane = int(header.shape[1]) * int(header.shape[2])
    block = 2 * plane * max((z1 - z0 for _, _, z0, z1 in header.plan), default=1)
    frame = max_frame_bytes(header)
    memory = (volume + voxels // 8 + max(4 * MiB, volume // 4) + 3 * block + DECODER_MEMORY
              + 2 * frame + 2 * window)
    # A header whose ROI is pending: every chunk its ROI frame may add, and that frame.
    plan = header.planned_bound()
    stream = sum(min(max_data_frame_bytes(header), 2 * 2 * plane * (z1 - z0) + 64 * 1024)
                 for _, _, z0, z1 in plan)
    if not header.roi_known:
        stream += max_roi_frame_bytes(header)
    try:
        itemsize = np.dtype(header.source_dtype).itemsize
    except TypeError:  # a dtype name numpy does not know: the snapshot is written as int16
        itemsize = 2
    snapshot = 352 + voxels * max(itemsize, 2)
    return StudyCost(memory=int(memory), disk=int(volume + 2 * snapshot), stream=int(stream),
                     frame=int(frame))


def announced(frame: bytes) -> tuple[int | None, int | None]:
    """(voxels, plan entries) a header frame announces, read without building the header.

    The full parse unpacks the ROI mask (1/8 byte a voxel); this looks at two fields of the raw
    msgpack first. ``(None, None)`` when they cannot be read (the parse will say why).
    """
    try:
        body = msgpack.unpackb(frame[PREFIX.size:], raw=False, max_str_len=1 << 20,
                               max_bin_len=MAX_HEADER_BYTES, max_array_len=1 << 20,
                               max_map_len=1 << 12, max_ext_len=0)
    except Exception:  # malformed: parse_frame will say why
        return None, None
    if not isinstance(body, dict):
        return None, None
    shape, plan = body.get("shape"), body.get("plan")
    voxels = None
    if isinstance(shape, list) and all(isinstance(n, int) for n in shape):
        voxels = int(np.prod([max(n, 0) for n in shape], dtype=object))
    return voxels, len(plan) if isinstance(plan, list) else None


def check_announced(frame: bytes, limits: Limits) -> None:
    """Refuse a header frame by what it announces, before it is parsed."""
    voxels, entries = announced(frame)
    if voxels is not None and voxels > limits.max_voxels:
        raise LimitExceeded(f"the study has {voxels} voxels, more than this receiver takes "
                            f"({limits.max_voxels}, --max-voxels)")
    if entries is not None and entries > limits.max_plan_entries:
        raise LimitExceeded(f"the plan has {entries} chunks, more than this receiver takes "
                            f"({limits.max_plan_entries}, --max-plan-entries)")


def check_header(header: StreamHeader, limits: Limits, window: int) -> StudyCost:
    """Refuse a parsed header that exceeds a per-study limit; return its cost otherwise."""
    voxels = int(np.prod(header.shape, dtype=np.int64))
    if voxels > limits.max_voxels:
        raise LimitExceeded(f"the study has {voxels} voxels, more than this receiver takes "
                            f"({limits.max_voxels}, --max-voxels)")
    plan = header.planned_bound()  # with a pending ROI, what its frame may add too
    if len(plan) > limits.max_plan_entries:
        raise LimitExceeded(f"the plan has {len(plan)} chunks, more than this receiver "
                            f"takes ({limits.max_plan_entries}, --max-plan-entries)")
    covered: dict[int, np.ndarray] = {}
    for seq, layer, z0, z1 in header.plan:
        slices = covered.setdefault(layer, np.zeros(header.shape[0], dtype=bool))
        if slices[z0:z1].any():
            raise LimitExceeded(f"the plan's chunk {seq} overlaps another chunk of layer "
                                f"{layer} (slices {z0}-{z1 - 1})")
        slices[z0:z1] = True
    cost = study_cost(header, window)
    if cost.stream > limits.max_stream_bytes:
        raise LimitExceeded(f"the plan allows a stream of {cost.stream} bytes, more than this "
                            f"receiver takes ({limits.max_stream_bytes}, --max-stream-bytes)")
    if cost.memory > limits.memory_budget:
        raise LimitExceeded(f"the study needs about {human_bytes(cost.memory)} of memory, "
                            f"more than this receiver's budget "
                            f"({human_bytes(limits.memory_budget)}, --memory-budget)")
    return cost


class MemoryBudget:
    """Bytes reserved by sessions and loaded studies against :attr:`Limits.memory_budget`.

    Used from the event loop only (no lock): a check and its reservation happen without an
    ``await`` between them.
    """

    def __init__(self, total: int):
        self.total = total
        self.used = 0

    def available(self) -> int:
        return self.total - self.used

    def reserve(self, amount: int) -> bool:
        """Reserve ``amount`` bytes if they fit; return whether they did."""
        if self.used + amount > self.total:
            return False
        self.used += amount
        return True

    def release(self, amount: int) -> None:
        self.used = max(0, self.used - amount)


class DiskFull(OSError):
    """Writing would exceed the out-dir quota or eat into the free-space reserve."""


class DiskGuard:
    """The out-dir's quota and its file system's free-space reserve.

    ``usage`` starts from a scan of the out-dir and follows what the receiver writes there
    (:meth:`charge`); the free space is read from the file system at each check (``statvfs``
    costs microseconds), so other writers on the same disk are seen too.
    """

    def __init__(self, out_dir: Path, quota: int | None, reserve: int):
        self.out_dir = Path(out_dir)
        self.quota = quota
        self.reserve = reserve
        self.usage = disk_usage(self.out_dir) if quota is not None else 0

    def free(self) -> int:
        return shutil.disk_usage(self.out_dir).free

    def problem(self, need: int) -> str | None:
        """Why ``need`` more bytes cannot be written now (None: they can)."""
        if self.quota is not None and self.usage + need > self.quota:
            return (f"the out-dir quota is reached ({human_bytes(self.usage)} of "
                    f"{human_bytes(self.quota)} used, {human_bytes(need)} more needed; "
                    "--disk-quota)")
        free = self.free()
        if free - need < self.reserve:
            return (f"the disk is full: {human_bytes(free)} free, {human_bytes(need)} needed "
                    f"and {human_bytes(self.reserve)} kept free (--disk-reserve)")
        return None

    def require(self, need: int) -> None:
        """Raise :class:`DiskFull` unless ``need`` bytes can be written."""
        problem = self.problem(need)
        if problem is not None:
            raise DiskFull(problem)

    def charge(self, delta: int) -> None:
        """Account for ``delta`` bytes written (negative: freed) in the out-dir."""
        self.usage = max(0, self.usage + delta)


def human_bytes(count: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, for messages)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def disk_usage(folder: Path) -> int:
    """Bytes of the files under ``folder`` (their apparent sizes)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def parse_networks(text: str) -> tuple:
    """``"10.0.0.0/8,192.168.1.7"`` -> networks; raise ValueError with the bad part."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"--allow-peers: {part!r} is not an address or CIDR network") \
                from None
    if not networks:
        raise ValueError("--allow-peers needs at least one address or CIDR network")
    return tuple(networks)


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1048576"`` (binary units: K, M, G, T) -> bytes."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if value and value[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(value[-1]) + 1)
        value = value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G)") from None
    if number < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(number * scale)


#: File descriptors kept aside for everything but HTTP connections: the interpreter and its
#: libraries, the out-dir's files, and per session its ICE sockets and study files.
FD_RESERVE_BASE = 64
FD_PER_SESSION = 16


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _spare_files(limits: Limits, open_files: int) -> int:
    return open_files - FD_RESERVE_BASE - FD_PER_SESSION * limits.max_sessions


def accept_backlog(limits: Limits, open_files: int) -> int:
    """The listening socket's backlog: also how many connections the event loop accepts at
    once when it finds them waiting (after a busy spell), each holding a file until it is
    served or closed. A quarter of the spare files, 8 to 128."""
    return max(8, min(128, _spare_files(limits, open_files) // 4))


def connection_cap(limits: Limits, open_files: int) -> int:
    """HTTP connections at most: what the open-file limit leaves after the sessions' needs.

    Room is left for two bursts of accepted connections (:func:`accept_backlog`: those over the
    cap hold their file until the loop closes them, while it may accept the next burst), so
    that a flood of connections never runs the process out of files. At most 1024 (signaling
    needs a handful; more only serves an attacker), at least 8.
    """
    if limits.max_connections is not None:
        return limits.max_connections
    spare = _spare_files(limits, open_files) - 2 * accept_backlog(limits, open_files)
    return max(8, min(1024, spare))
