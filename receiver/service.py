"""``dlad-receive --listen``: takes studies over WebRTC data channels and rebuilds them on disk.

HTTP signaling, in the style of WHIP (aiohttp):

==========================  ==================================================================
``POST /studies``           ``Authorization: Bearer <token>``, ``Content-Type: application/sdp``,
                            body = SDP offer with one data channel. ``201 Created`` with the
                            SDP answer and ``Location: /studies/sessions/<id>``. 401 without
                            the right token, 415 for another content type, 413 for a body over
                            64 KiB, 400 for a malformed offer, 503 when ``max_sessions`` are
                            open. Nothing is created for a refused request.
``DELETE /studies/sessions/<id>``  ends that session (204; 404 if unknown).
``GET /studies``            (token) JSON: study folders with their state, open sessions.
``GET /health``             ``ok`` (no token, no details).
==========================  ==================================================================

Each session carries one study over the ``dlad`` channel (see :mod:`shared.webrtc.protocol`). A study
is kept in :class:`StudyRuntime`: the record on disk (:mod:`receiver.store`) and one task that
applies its bytes in order, in a worker thread, so the event loop keeps serving the network
while chunks are decoded. Snapshots (NIfTI + status.json) are replaced at milestones, at the
end of each pass and at most every ``snapshot_interval`` seconds in between.

A second session for a study that already has one takes it over (the first is closed): that is
what a sender reconnecting after a drop does, before the receiver may even have noticed the
drop. Network input never raises out of a handler: bad frames are logged and counted, a session
that breaks the protocol is closed, and the other sessions go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from receiver.store import StoreError, StudyRecord, StudyStore
from shared.receiver_process import format_ready_line
from shared.webrtc import sctp
from shared.webrtc.ice import enlarge_socket_buffers, ice_hosts, loopback_hosts_for
from shared.webrtc.protocol import (
    CHANNEL_LABEL,
    DEFAULT_WINDOW,
    MAX_MESSAGE_BYTES,
    MILESTONE_TEXT,
    PROTOCOL_VERSION,
    ProtocolError,
    encode_control,
    parse_control,
)
from shared.webrtc.signaling import MAX_SDP_BYTES, SDP_CONTENT_TYPE, check_offer, token_matches
from shared.wire import KIND_HEADER, MAGIC, PREFIX, StreamHeader, WireError, parse_frame

log = logging.getLogger("dlad.receiver")

SESSIONS_PATH = "/studies/sessions/"
MAX_HEADER_BYTES = 16 * 1024 * 1024
BATCH_BYTES = 256 * 1024
MAX_SESSION_ERRORS = 50
HEARTBEAT_S = 2.0
MILESTONES = ("roi_complete", "base_complete", "exact_complete", "complete")


@dataclass
class ServiceConfig:
    """What a receiver service needs; the CLI fills it from its options."""

    out_dir: Path
    """Where study folders go."""
    token: str
    """Bearer token every signaling request must carry."""
    snapshot_interval: float = 2.0
    """Least seconds between two snapshots of a study (milestones and ends write one anyway)."""
    snapshot_volume: bool = True
    """Write the NIfTI snapshot (False: status.json only, the volume at the end of a pass)."""
    snapshot_format: str = "nii"
    """``"nii"`` (fast to write, default) or ``"nii.gz"`` (smaller, about 6x the CPU)."""
    max_sessions: int = 8
    """Open sessions at most; more get 503."""
    window: int = DEFAULT_WINDOW
    """Credit window offered to senders (bytes in flight beyond what was processed)."""
    open_timeout: float = 30.0
    """A session whose channel does not open (or send its header) in time is closed."""
    idle_timeout: float = 60.0
    """A session silent for this long is closed."""
    unload_after: float = 30.0
    """A study without a session is dropped from memory after this long (it stays on disk)."""
    progress_interval: float = 5.0
    """Seconds between progress log lines of a study that is receiving."""
    workers: int = 1
    """Threads that decode chunks and write snapshots. One keeps the receiver within a core
    and its memory low (every thread that decodes keeps its own malloc arena); studies that
    arrive at once take turns, batch by batch."""
    max_voxels: int = 512 * 1024 * 1024
    """Largest study accepted (voxels); the receiver holds about 2.1 bytes per voxel (the int16
    volume and its bit-packed ROI mask), plus one decoded block."""


@dataclass
class Progress:
    """What one batch did, reported from the worker thread to the event loop."""

    consumed: int
    applied: int
    planned: int
    reached: list
    ended: bool


class StudyRuntime:
    """One study in memory: its record and the task that applies its input in order."""

    def __init__(self, service: ReceiverService, record: StudyRecord):
        self.service = service
        self.record = record
        self.session: Session | None = None
        self.items: deque = deque()
        self.wakeup = asyncio.Event()
        self.detached_at = time.monotonic()
        self.busy = False
        self.last_progress_log = 0.0
        self.bytes_since_log = 0
        self._seen_end = record.stream.end
        self.worker = asyncio.create_task(self._work(), name=f"study {record.folder.name}")

    @property
    def name(self) -> str:
        return self.record.header.study_id

    # --- queueing (event loop) ---------------------------------------------------------------

    def call(self, function) -> asyncio.Future:
        """Run ``function()`` in the worker thread after everything queued before it."""
        future = asyncio.get_running_loop().create_future()
        self.items.append(("call", function, future))
        self.wakeup.set()
        return future

    def feed(self, session: Session, data: bytes) -> None:
        self.items.append(("data", session, data))
        self.wakeup.set()

    @property
    def idle(self) -> bool:
        return not self.items and not self.busy

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        executor = self.service.executor
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.items:
                kind, owner, payload = self.items.popleft()
                self.busy = True
                try:
                    if kind == "call":
                        try:
                            result = await loop.run_in_executor(executor, owner)
                        except Exception as error:  # reported to whoever awaits it
                            if not payload.done():
                                payload.set_exception(error)
                        else:
                            if not payload.done():
                                payload.set_result(result)
                        continue
                    # Coalesce consecutive data of the same session into one batch.
                    parts = [payload]
                    size = len(payload)
                    while (self.items and self.items[0][0] == "data" and self.items[0][1] is owner
                           and size < BATCH_BYTES):
                        size += len(self.items[0][2])
                        parts.append(self.items.popleft()[2])
                    data = b"".join(parts)
                    try:
                        progress = await loop.run_in_executor(executor, self._process, data)
                    except Exception:  # a bug, not bad input (StudyStream never raises on it)
                        log.exception("study %s: failed to process %d bytes", self.name, size)
                        owner.close("receiver error while applying data", notify=True,
                                    retry=True)
                        continue
                    self._report(owner, progress)
                finally:
                    self.busy = False

    # --- worker thread -----------------------------------------------------------------------

    def _process(self, data: bytes) -> Progress:
        record = self.record
        applied = record.stream.feed(data)
        record.counters["network_bytes"] += len(data)
        record.append(applied)
        reached = record.check_milestones()
        ended = record.stream.end is not self._seen_end
        self._seen_end = record.stream.end
        if applied:
            record.dirty = True
        interval = self.service.config.snapshot_interval
        if (any(name in MILESTONES for name in reached) or ended
                or (record.dirty and time.monotonic() - record.last_snapshot >= interval)):
            record.write_snapshot(with_volume=self.service.config.snapshot_volume
                                  or ended or "complete" in reached)
        r = record.reassembler
        return Progress(consumed=len(data), applied=len(r.applied), planned=len(r.plan),
                        reached=reached, ended=ended)

    def _finish_pass(self) -> dict | None:
        """After a session: drop a partial frame, write the snapshot if anything changed."""
        record = self.record
        try:
            record.stream.finish()
            record.connected = False
            return record.write_snapshot(with_volume=record.dirty)
        except Exception:  # disk full, say: keep serving the other studies
            log.exception("study %s: cannot write its snapshot", self.name)
            return None

    def _inventory(self) -> dict:
        record = self.record
        record.connected = True
        record.counters["sessions"] += 1
        r = record.reassembler
        return {"have": sorted(r.applied), "complete": r.complete}

    # --- reporting (event loop) --------------------------------------------------------------

    def _report(self, session: Session, progress: Progress) -> None:
        r = self.record.reassembler
        for name in progress.reached:
            log.info("study %s: %s (%d/%d chunks)", self.name, MILESTONE_TEXT.get(name, name),
                     progress.applied, progress.planned)
        self.bytes_since_log += progress.consumed
        now = time.monotonic()
        if now - self.last_progress_log >= self.service.config.progress_interval:
            rate = 8 * self.bytes_since_log / max(now - self.last_progress_log, 1e-3) / 1e6
            if self.last_progress_log:
                log.info("study %s: %d/%d chunks, %.1f MB received, %.1f Mbit/s", self.name,
                         progress.applied, progress.planned,
                         self.record.counters["network_bytes"] / 1e6, rate)
            self.last_progress_log, self.bytes_since_log = now, 0
        if session is not self.session:
            return  # a session taken over: its remaining data was applied, nobody to tell
        session.consumed += progress.consumed
        session.send_control("ack", consumed=session.consumed, applied=progress.applied,
                             planned=progress.planned, roi_complete=r.roi_complete,
                             base_complete=r.base_complete, exact_complete=r.exact_complete,
                             verified=r.verified, reached=progress.reached)
        if progress.ended:
            seconds = time.monotonic() - session.data_started
            self.record.last_pass = {"bytes": session.consumed, "seconds": round(seconds, 3),
                                     "mbit_s": round(8 * session.consumed / max(seconds, 1e-6)
                                                     / 1e6, 2)}
            self.call(lambda: self.record.write_snapshot(with_volume=False))
            missing = [seq for seq, *_ in r.missing()]
            end = self.record.stream.end
            log.info("study %s: end of pass (%d chunks sent in it): %d/%d applied, %s", self.name,
                     end.chunks if end else -1, progress.applied, progress.planned,
                     "complete" if r.complete else f"{len(missing)} missing")
            if r.verified is not None:
                (log.info if r.verified else log.error)(
                    "study %s: SHA-256 of the exact volume %s", self.name,
                    "verified" if r.verified else "DOES NOT MATCH the sender's")
            session.send_control("done", complete=r.complete, verified=r.verified,
                                 missing=missing[:100000], applied=progress.applied,
                                 planned=progress.planned, roi_complete=r.roi_complete,
                                 exact_complete=r.exact_complete,
                                 duplicates=self.record.stream.duplicates,
                                 problems=len(self.record.stream.problems),
                                 roi_mismatches=r.roi_mismatches,
                                 folder=self.record.folder.name)

    # --- sessions ----------------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        previous = self.session
        if previous is not None and previous is not session:
            log.warning("study %s: a new connection takes over from session %s", self.name,
                        previous.id)
            previous.close("replaced by a newer connection for the same study", notify=True,
                           retry=True)
        self.session = session

    def detach(self, session: Session) -> None:
        if self.session is session:
            self.session = None
            self.detached_at = time.monotonic()
            self.call(self._finish_pass)

    async def unload(self) -> None:
        self.worker.cancel()
        try:
            await self.worker
        except asyncio.CancelledError:
            pass
        self.record.close()


class Session:
    """One peer connection (one sender, one study at a time)."""

    def __init__(self, service: ReceiverService, pc: RTCPeerConnection, remote: str):
        self.service = service
        self.pc = pc
        self.remote = remote
        self.id = secrets.token_urlsafe(12)
        self.created = self.last_activity = time.monotonic()
        self.channel = None
        self.state = "new"  # new -> header -> opening -> data -> closed
        self.study: StudyRuntime | None = None
        self.header_bytes = bytearray()
        self.consumed = 0
        self.received = 0
        self.errors = 0
        self.data_started = 0.0
        self.last_sent = 0.0
        self.closing = False

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label != CHANNEL_LABEL or self.channel is not None:
                log.warning("session %s: unexpected data channel %r closed", self.id,
                            channel.label)
                channel.close()
                return
            self.channel = channel
            channel.on("message", self.on_message)
            channel.on("close", lambda: self.close("channel closed"))

        @pc.on("connectionstatechange")
        def on_state():
            if pc.connectionState in ("failed", "closed"):
                self.close(f"connection {pc.connectionState}")

    # --- messages ----------------------------------------------------------------------------

    def on_message(self, message) -> None:
        if self.state == "closed":
            return
        self.last_activity = time.monotonic()
        try:
            if isinstance(message, str):
                self._on_control(message)
            else:
                self._on_binary(bytes(message))
        except ProtocolError as error:
            self.fail(str(error))
        except Exception:  # never let network input take the receiver down
            log.exception("session %s: unexpected error on a message", self.id)
            self.fail("receiver error", retry=True)

    def _on_control(self, text: str) -> None:
        message = parse_control(text)
        if message["type"] != "hello":
            raise ProtocolError(f"unexpected {message['type']!r} message from a sender")
        if self.state != "new":
            raise ProtocolError("a second hello")
        if message.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {message.get('protocol')!r} "
                                f"(this receiver speaks {PROTOCOL_VERSION})")
        self.state = "header"

    def _on_binary(self, data: bytes) -> None:
        if self.state == "new":
            raise ProtocolError("binary data before the hello")
        if self.state == "data":
            self.received += len(data)
            backlog = self.received - self.consumed
            if backlog > 2 * self.service.config.window + MAX_MESSAGE_BYTES * 16:
                raise ProtocolError(f"sender ignores the flow-control window ({backlog} bytes "
                                    "unprocessed)")
            self.study.feed(self, data)
            return
        if self.state == "opening":
            self.note_error(f"{len(data)} bytes sent before the inventory were ignored")
            return
        # state "header": the first frame must be the stream header. Its prefix and size are
        # checked first, then the volume it announces, and only then is it parsed (the parse
        # allocates the packed ROI mask, an eighth of a byte per voxel).
        self.header_bytes += data
        if len(self.header_bytes) < PREFIX.size:
            return
        magic, version, kind, length, _ = PREFIX.unpack_from(self.header_bytes)
        if magic != MAGIC or kind != KIND_HEADER:
            raise ProtocolError("the first frame must be the stream header")
        if length > MAX_HEADER_BYTES:
            raise ProtocolError(f"header frame of {length} bytes is too large")
        end = PREFIX.size + length
        if len(self.header_bytes) < end:
            return
        frame = bytes(self.header_bytes[:end])
        if len(self.header_bytes) > end:
            self.note_error(f"{len(self.header_bytes) - end} bytes after the header were sent "
                            "before the inventory and ignored")
        self.header_bytes = bytearray()
        voxels = announced_voxels(frame)
        if voxels is not None and voxels > self.service.config.max_voxels:
            raise ProtocolError(f"the study has {voxels} voxels, more than this receiver takes "
                                f"({self.service.config.max_voxels})")
        try:
            header = parse_frame(frame)
        except WireError as error:
            raise ProtocolError(f"bad header frame: {error}") from None
        self.state = "opening"
        self.service.spawn(self._open_study(header, frame))

    async def _open_study(self, header: StreamHeader, frame: bytes) -> None:
        try:
            runtime = await self.service.open_study(header, frame)
        except StoreError as error:
            log.error("session %s: study %s refused: %s", self.id, header.study_id, error)
            self.fail(str(error))
            return
        if self.state == "closed":
            return
        self.study = runtime
        runtime.attach(self)
        inventory = await runtime.call(runtime._inventory)
        if self.state == "closed":
            return
        log.info("session %s: study %s (%s): %d/%d chunks already here%s", self.id,
                 header.study_id, runtime.record.folder.name, len(inventory["have"]),
                 len(header.plan), ", complete" if inventory["complete"] else "")
        self.state = "data"
        self.data_started = time.monotonic()
        self.send_control("inventory", study_id=header.study_id,
                          folder=runtime.record.folder.name, have=inventory["have"],
                          complete=inventory["complete"], window=self.service.config.window)

    def note_error(self, message: str) -> None:
        self.errors += 1
        log.warning("session %s: %s", self.id, message)
        if self.errors > MAX_SESSION_ERRORS:
            self.fail("too many protocol errors")

    def send_control(self, kind: str, **fields) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        self.last_sent = time.monotonic()
        try:
            channel.send(encode_control(kind, **fields))
        except Exception as error:  # a channel closing under us
            log.debug("session %s: cannot send %s: %s", self.id, kind, error)

    def fail(self, reason: str, retry: bool = False) -> None:
        log.warning("session %s (%s): closing: %s", self.id, self.remote, reason)
        self.close(reason, notify=True, retry=retry)

    def close(self, reason: str, notify: bool = False, retry: bool = False) -> None:
        """End the session; ``notify`` tells the sender why, and whether to try again."""
        if self.state == "closed":
            return
        if notify:
            self.send_control("error", reason=reason, retry=retry)
        self.state = "closed"
        log.info("session %s closed (%s)", self.id, reason)
        if self.study is not None:
            self.study.detach(self)
        self.service.forget(self)
        self.service.spawn(self._close_pc(notify))

    async def _close_pc(self, linger: bool) -> None:
        if linger:
            await asyncio.sleep(0.2)  # let the error message leave
        try:
            await self.pc.close()
        except Exception as error:
            log.debug("session %s: closing the peer connection: %s", self.id, error)


class ReceiverService:
    """The HTTP signaling server, the open sessions and the studies in memory."""

    def __init__(self, config: ServiceConfig, store: StudyStore | None = None,
                 ice_addresses: tuple[str, ...] | None = None):
        self.config = config
        self.store = store or StudyStore(config.out_dir, config.snapshot_format)
        self.ice_addresses = ice_addresses
        self.sessions: dict[str, Session] = {}
        self.studies: dict[tuple[str, str], StudyRuntime] = {}
        self.executor = ThreadPoolExecutor(max_workers=config.workers,
                                           thread_name_prefix="dlad-apply")
        self._open_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._janitor: asyncio.Task | None = None
        self.address: tuple[str, int] | None = None
        self.app = web.Application(client_max_size=MAX_SDP_BYTES)
        self.app.router.add_post("/studies", self.handle_offer)
        self.app.router.add_get("/studies", self.handle_list)
        self.app.router.add_delete(SESSIONS_PATH + "{session_id}", self.handle_delete)
        self.app.router.add_get("/health", self.handle_health)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        if self.ice_addresses is None:
            self.ice_addresses = loopback_hosts_for(host)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.address = tuple(self._runner.addresses[0][:2])
        self._janitor = asyncio.create_task(self._housekeeping())
        log.info("listening on http://%s:%d (out-dir %s)", *self.address[:2],
                 self.config.out_dir)
        log.debug("SCTP tuning (shared/webrtc/sctp.py): %s", sctp.status())
        return self.address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        for session in list(self.sessions.values()):
            session.close("receiver shutting down", notify=True, retry=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for runtime in list(self.studies.values()):
            await self._drain(runtime)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for runtime in list(self.studies.values()):
            await runtime.unload()
        self.studies.clear()
        self.executor.shutdown(wait=True)
        self.store.close()

    async def _drain(self, runtime: StudyRuntime, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not runtime.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.state in ("new", "header") and now - session.created > \
                        self.config.open_timeout:
                    session.fail("no stream header in time", retry=True)
                elif now - session.last_activity > self.config.idle_timeout:
                    session.fail(f"idle for {self.config.idle_timeout:g} s", retry=True)
                elif session.state == "data" and now - session.last_sent >= HEARTBEAT_S:
                    # Sign of life while a long batch (decode, snapshot) keeps the acks away:
                    # the sender tells a slow receiver from a dead one by these.
                    session.send_control("ack", consumed=session.consumed)
            for key, runtime in list(self.studies.items()):
                if (runtime.session is None and runtime.idle
                        and now - runtime.detached_at > self.config.unload_after):
                    del self.studies[key]
                    await runtime.unload()
                    log.info("study %s: unloaded from memory (kept in %s)", runtime.name,
                             runtime.record.folder)

    async def open_study(self, header: StreamHeader, frame: bytes) -> StudyRuntime:
        from shared.webrtc.protocol import stream_key

        async with self._open_lock:
            key = (header.study_id, stream_key(header))
            runtime = self.studies.get(key)
            if runtime is None:
                loop = asyncio.get_running_loop()
                record, _ = await loop.run_in_executor(self.executor, self.store.open, header,
                                                       frame)
                runtime = StudyRuntime(self, record)
                self.studies[key] = runtime
            return runtime

    # --- HTTP --------------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        if token_matches(request.headers.get("Authorization"), self.config.token):
            return True
        log.warning("refused %s %s from %s: missing or wrong token", request.method,
                    request.path, request.remote)
        return False

    @staticmethod
    def _unauthorised() -> web.Response:
        return web.Response(status=401, text="missing or wrong bearer token\n",
                            headers={"WWW-Authenticate": 'Bearer realm="dlad-receive"'})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle_offer(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._unauthorised()
        if request.content_type != SDP_CONTENT_TYPE:
            return web.Response(status=415, text=f"the body must be {SDP_CONTENT_TYPE}\n")
        if request.content_length is not None and request.content_length > MAX_SDP_BYTES:
            return web.Response(status=413, text="SDP offer too large\n")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="SDP offer too large\n")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return web.Response(status=400, text="the SDP offer is not UTF-8\n")
        problem = check_offer(text)
        if problem:
            log.warning("refused an offer from %s: %s", request.remote, problem)
            return web.Response(status=400, text=f"bad SDP offer: {problem}\n")
        if len(self.sessions) >= self.config.max_sessions:
            return web.Response(status=503, text="too many sessions, retry later\n",
                                headers={"Retry-After": "2"})
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            with ice_hosts(self.ice_addresses):
                await pc.setRemoteDescription(RTCSessionDescription(text, "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
            enlarge_socket_buffers(pc)
        except Exception as error:  # aiortc rejects offers it cannot answer in many ways
            await pc.close()
            log.warning("refused an offer from %s: %s", request.remote, error)
            return web.Response(status=400, text=f"bad SDP offer: {error}\n")
        session = Session(self, pc, str(request.remote))
        self.sessions[session.id] = session
        log.info("session %s: new connection from %s", session.id, request.remote)
        return web.Response(status=201, body=pc.localDescription.sdp.encode(),
                            content_type=SDP_CONTENT_TYPE,
                            headers={"Location": SESSIONS_PATH + session.id})

    async def handle_delete(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._unauthorised()
        session = self.sessions.get(request.match_info["session_id"])
        if session is None:
            return web.Response(status=404, text="no such session\n")
        session.close("ended by the sender (DELETE)")
        return web.Response(status=204)

    async def handle_list(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._unauthorised()
        loop = asyncio.get_running_loop()
        studies = await loop.run_in_executor(None, self.store.list)
        sessions = [{"id": s.id, "state": s.state,
                     "study_id": s.study.name if s.study else None,
                     "bytes": s.received} for s in self.sessions.values()]
        return web.Response(text=json.dumps({"studies": studies, "sessions": sessions},
                                            indent=1), content_type="application/json")


def announced_voxels(frame: bytes) -> int | None:
    """The voxel count a header frame announces (None if it does not say), without parsing it."""
    try:
        body = msgpack.unpackb(frame[PREFIX.size:], raw=False, max_str_len=1 << 20,
                               max_bin_len=MAX_HEADER_BYTES, max_array_len=1 << 20,
                               max_map_len=1 << 12, max_ext_len=0)
        shape = body.get("shape")
        if isinstance(shape, list) and all(isinstance(n, int) for n in shape):
            return int(np.prod([max(n, 0) for n in shape], dtype=object))
    except Exception:  # malformed: parse_frame will say why
        return None
    return None


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


async def serve(config: ServiceConfig, host: str, port: int, ready=None,
                stop_event: asyncio.Event | None = None) -> None:
    """Run the service until ``stop_event`` is set or SIGINT/SIGTERM arrives."""
    service = ReceiverService(config)
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop_event.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await service.start(host, port)
        if ready is not None:
            ready(service)
        await stop_event.wait()
        log.info("shutting down")
    finally:
        await service.stop()


def run_listen(args, parser) -> int:
    """``dlad-receive --listen``: the CLI's network mode."""
    from shared.webrtc.signaling import TokenError, read_token_file

    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="dlad-receive: %(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as error:
        parser.error(str(error))
    if args.snapshot_interval < 0 or args.max_sessions < 1:
        parser.error("--snapshot-interval must be >= 0 and --max-sessions >= 1")
    try:
        token = read_token_file(args.token_file)
    except TokenError as error:
        print(f"dlad-receive: error: {error}", file=sys.stderr)
        return 1
    config = ServiceConfig(out_dir=args.out_dir, token=token,
                           snapshot_interval=args.snapshot_interval,
                           snapshot_format=args.snapshot_format,
                           max_sessions=args.max_sessions)

    def announce(service: ReceiverService) -> None:
        # The one line on stdout (the log goes to stderr): shared/receiver_process.py reads it.
        print(format_ready_line(service.url, os.getpid(), config.out_dir), flush=True)

    try:
        asyncio.run(serve(config, host, port, ready=announce))
    except StoreError as error:
        print(f"dlad-receive: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"dlad-receive: error: cannot listen on {args.listen}: {error}", file=sys.stderr)
        return 1
    return 0
