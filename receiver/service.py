"""``dlad-receive --listen``: takes studies over WebRTC data channels and rebuilds them on disk.

HTTP(S) signaling, in the style of WHIP (aiohttp):

==================================  ==========================================================
``POST /studies``                   ``Authorization: Bearer <token>``, ``Content-Type:
                                    application/sdp``, body = SDP offer with one data channel.
                                    ``201 Created`` with the SDP answer and ``Location:
                                    /studies/sessions/<id>``. 401 without the right token, 415
                                    for another content type, 413 for a body over 64 KiB, 408
                                    for a body slower than ``body_timeout``, 400 for a
                                    malformed offer or one with too many (or no allowed) ICE
                                    candidates, 503 with ``Retry-After`` when ``max_sessions``
                                    are open or the memory budget is used up. Nothing is
                                    created for a refused request.
``DELETE /studies/sessions/<id>``   ends that session (204; 404 if unknown).
``GET /studies``                    (token) JSON: study folders with their state, sessions.
``GET /health``                     ``ok`` (no token, no details).
==================================  ==========================================================

Each session (:mod:`receiver.session`) carries one study over the ``dlad`` channel (see
:mod:`shared.webrtc.protocol`). A study in memory is a :class:`~receiver.runtime.StudyRuntime`:
its record on disk (:mod:`receiver.store`) and one task that applies its bytes in order on the
worker thread. Every resource a peer can make the receiver spend is bounded
(:mod:`receiver.limits`); the HTTP listener has a connection cap and timeouts
(:mod:`receiver.http`).

Admission, in order, for an offer: token, content type, size, a free session slot (checked
and taken with no ``await`` in between, so parallel offers cannot overshoot the cap), the body
(within ``body_timeout``), the offer's shape and ICE candidates, the session's memory; then
for its header: size, voxels, plan, stream size, the study's memory (idle studies are unloaded
to make room) and disk (quota, free-space reserve).

A second session for a study that already has one takes it over (the first is closed): that is
what a sender reconnecting after a drop does, before the receiver may even have noticed the
drop. Finished studies leave memory as soon as their session ends, others after
``unload_after`` seconds or when their memory is needed.

Extension points (:mod:`receiver.events`): :meth:`ReceiverService.add_listener` for study
events and HTTP routes, :meth:`ReceiverService.add_route` for a route behind the senders' token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import resource
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from receiver.events import StudyUpdate
from receiver.http import GuardedSite, check_plain_http, read_body
from receiver.limits import (
    SESSION_MEMORY,
    DiskGuard,
    Limits,
    MemoryBudget,
    StudyCost,
    accept_backlog,
    connection_cap,
)
from receiver.runtime import StudyRuntime
from receiver.session import Refusal, Session
from receiver.store import StudyStore
from shared.webrtc import sctp
from shared.webrtc.ice import (
    CandidateError,
    enlarge_socket_buffers,
    ice_hosts,
    is_loopback,
    loopback_hosts_for,
    screen_candidates,
)
from shared.webrtc.protocol import DEFAULT_WINDOW, stream_key
from shared.webrtc.signaling import MAX_SDP_BYTES, SDP_CONTENT_TYPE, check_offer, token_matches
from shared.wire import StreamHeader

log = logging.getLogger("dlad.receiver")

#: Where session resources live (the ``Location`` of an answered offer; DELETE ends one).
SESSIONS_PATH = "/studies/sessions/"

#: A sender's heartbeat: while data flows, the receiver sends an ack at least this often, even
#: while its worker is busy (a long decode, a snapshot); the sender's stall timeout (15 s) is
#: several of these.
HEARTBEAT_S = 2.0

#: What a receiver whose media stays on loopback lets ICE probe.
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

#: Seconds a refused offer is told to wait (Retry-After): a slot frees as soon as a session
#: ends, and the sender polls again after this.
RETRY_AFTER_S = 1


@dataclass
class ServiceConfig:
    """What a receiver service needs; the CLI fills it from its options."""

    out_dir: Path
    """Where study folders go."""
    token: str
    """Bearer token every signaling request must carry."""
    limits: Limits = field(default_factory=Limits)
    """Every resource bound (sessions, memory, disk, errors, HTTP, ICE)."""
    snapshot_interval: float = 2.0
    """Least seconds between two snapshots of a study (milestones and ends write one anyway):
    whoever watches the folder sees the study grow every few seconds, while the writes stay
    rare next to the decoding."""
    snapshot_volume: bool = True
    """Write the NIfTI snapshot (False: status.json only, the volume at the end of a pass)."""
    snapshot_format: str = "nii"
    """``"nii"`` (fast to write, default) or ``"nii.gz"`` (smaller, about 6x the CPU)."""
    window: int = DEFAULT_WINDOW
    """Credit window offered to senders (bytes in flight beyond what was processed)."""
    open_timeout: float = 30.0
    """A session whose channel does not open (or send its header) in time is closed: the same
    bound as the sender's ``connect_timeout``, after which that sender has given up anyway."""
    idle_timeout: float = 60.0
    """A session silent for this long is closed: a sender sends each chunk once it is encoded
    (seconds), so a minute of silence means it is gone."""
    unload_after: float = 30.0
    """An unfinished study without a session leaves memory after this long (it stays on disk;
    a finished one leaves at once): longer than a sender's wait between reconnections (at most
    10 s), so a dropped transfer resumes without reloading its study."""
    progress_interval: float = 5.0
    """Seconds between progress log lines of a study that is receiving: a log that shows the
    transfer moving without a line per chunk."""
    workers: int = 1
    """Threads that decode chunks and write snapshots. One keeps the receiver within a core
    and its memory low (every thread that decodes keeps its own malloc arena); studies that
    arrive at once take turns, batch by batch."""
    tls: ssl.SSLContext | None = None
    """Serve HTTPS with this context (see :func:`shared.tls.server_tls_context`)."""
    allow_plain_http: bool = False
    """Serve plain HTTP on a non-loopback address (refused otherwise)."""
    ice_servers: list = field(default_factory=list)
    """aiortc ``RTCIceServer`` objects (STUN/TURN) for the peer connections."""
    ice_addresses: tuple[str, ...] | None = None
    """Local addresses ICE offers as host candidates. None: 127.0.0.1 (or ::1) alone when
    listening on loopback, every interface otherwise; ``("*",)``: every interface (behind a
    reverse proxy on loopback, say)."""


class ReceiverService:
    """The HTTP signaling server, the open sessions and the studies in memory."""

    def __init__(self, config: ServiceConfig, store: StudyStore | None = None,
                 ice_addresses: tuple[str, ...] | None = None):
        self.config = config
        limits = config.limits
        self.disk = DiskGuard(config.out_dir, limits.disk_quota, limits.disk_reserve)
        self.store = store or StudyStore(config.out_dir, config.snapshot_format, self.disk)
        self.memory = MemoryBudget(limits.memory_budget)
        self.ice_addresses = ice_addresses
        self.allow_peers = config.limits.allow_peers
        """Networks the receiver sends ICE checks to (None: any); set by :meth:`start`."""
        self.sessions: dict[str, Session] = {}
        self.studies: dict[tuple[str, str], StudyRuntime] = {}
        self.executor = ThreadPoolExecutor(max_workers=config.workers,
                                           thread_name_prefix="dlad-apply")
        self._opening = 0  # offers being answered: they hold a session slot
        self._open_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list = []
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self._janitor: asyncio.Task | None = None
        self.address: tuple[str, int] | None = None
        self.app = web.Application(client_max_size=MAX_SDP_BYTES)
        self.app.router.add_post("/studies", self.handle_offer)
        self.app.router.add_get("/studies", self.handle_list)
        self.app.router.add_delete(SESSIONS_PATH + "{session_id}", self.handle_delete)
        self.app.router.add_get("/health", self.handle_health)

    # --- extensions --------------------------------------------------------------------------

    def add_listener(self, listener) -> None:
        """Register an extension (see :mod:`receiver.events`) before :meth:`start`.

        ``listener.attach(service)`` is called at once (it may add routes), then
        ``listener.study_updated(runtime, update)`` on every :class:`StudyUpdate`, and
        ``await listener.close()`` when the service stops.
        """
        self._listeners.append(listener)
        listener.attach(self)

    def add_route(self, method: str, path: str, handler, auth: bool = True) -> None:
        """Serve ``handler`` at ``method path`` on the receiver's listener (TLS, timeouts and
        connection cap included); with ``auth`` only for requests with the senders' token."""
        if auth:
            async def guarded(request: web.Request) -> web.StreamResponse:
                if not self.authorised(request):
                    return self._unauthorised()
                return await handler(request)
            self.app.router.add_route(method, path, guarded)
        else:
            self.app.router.add_route(method, path, handler)

    def notify(self, runtime: StudyRuntime, update: StudyUpdate) -> None:
        for listener in self._listeners:
            try:
                listener.study_updated(runtime, update)
            except Exception:  # an extension's bug must not stop the reception
                log.exception("study %s: listener %s failed", runtime.name,
                              type(listener).__name__)

    def runtime_for_folder(self, folder: Path) -> StudyRuntime | None:
        """The study in memory whose folder is ``folder`` (None if it is not loaded)."""
        for runtime in self.studies.values():
            if runtime.record.folder == folder:
                return runtime
        return None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        limits = self.config.limits
        check_plain_http(host, self.config.tls is not None, self.config.allow_plain_http)
        if self.ice_addresses is None:
            chosen = self.config.ice_addresses
            self.ice_addresses = (loopback_hosts_for(host) if chosen is None
                                  else None if "*" in chosen else tuple(chosen))
        self.allow_peers = limits.allow_peers
        if (self.allow_peers is None and self.ice_addresses is not None
                and all(is_loopback(a) for a in self.ice_addresses)
                and not self.config.ice_servers):
            # Media on loopback only: a sender elsewhere could not reach it anyway, so the
            # receiver sends no ICE check to any other address an offer lists.
            self.allow_peers = LOOPBACK_NETWORKS
        # aiohttp's keep-alive timer runs from a connection's start (and from each response)
        # until a complete request head has arrived: it is the header timeout, and it also
        # ends idle keep-alive connections.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=limits.header_timeout)
        await self._runner.setup()
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._site = GuardedSite(self._runner, host, port,
                                 max_connections=connection_cap(limits, open_files),
                                 handshake_timeout=limits.header_timeout,
                                 ssl_context=self.config.tls,
                                 backlog=accept_backlog(limits, open_files))
        await self._site.start()
        self.address = tuple(self._runner.addresses[0][:2])
        self._janitor = asyncio.create_task(self._housekeeping())
        log.info("listening on %s (out-dir %s)", self.url, self.config.out_dir)
        log.debug("SCTP tuning (shared/webrtc/sctp.py): %s", sctp.status())
        return self.address

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self.config.tls is not None else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        for session in list(self.sessions.values()):
            session.close("receiver shutting down", notify=True, retry=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for runtime in list(self.studies.values()):
            await self._drain(runtime)
        if self._tasks:  # closing peer connections: a moment each; never hang the shutdown
            await asyncio.wait(list(self._tasks), timeout=5)
        for listener in self._listeners:
            try:
                await listener.close()
            except Exception:
                log.exception("listener %s failed to close", type(listener).__name__)
        for runtime in list(self.studies.values()):
            await self._unload(runtime)
        self.executor.shutdown(wait=True)
        self.store.close()

    async def _drain(self, runtime: StudyRuntime, timeout: float = 30.0) -> None:
        # The batch in hand (at most BATCH_BYTES to decode, then a snapshot) ends well within
        # the timeout; a worker stuck longer is left behind rather than hanging the shutdown.
        deadline = time.monotonic() + timeout
        while not runtime.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.memory.release(SESSION_MEMORY)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)  # the timeouts checked here are seconds to minutes long
            try:
                await self._check_timeouts()
            except Exception:  # the janitor must survive anything
                log.exception("housekeeping failed")

    async def _check_timeouts(self) -> None:
        now = time.monotonic()
        limits = self.config.limits
        for session in list(self.sessions.values()):
            if (session.state == "header" and now - session.header_since >
                    self.config.open_timeout) or (session.state == "new" and now -
                                                  session.last_activity >
                                                  self.config.open_timeout):
                # "new" counts from the last message: a warm sender waiting for its next
                # series keeps an opened connection with keepalives (bounded by max_sessions
                # and the token, like any session).
                session.fail("no stream header in time", retry=True)
            elif now - session.last_activity > self.config.idle_timeout:
                session.fail(f"idle for {self.config.idle_timeout:g} s", retry=True)
            elif (session.state == "data" and session.study is not None
                  and not session.study.complete
                  and now - session.last_progress > limits.progress_timeout):
                session.fail(f"no new chunk for {limits.progress_timeout:g} s", retry=True,
                             discard=True)
            elif session.state == "data" and now - session.last_sent >= HEARTBEAT_S:
                # Sign of life while a long batch (decode, snapshot) keeps the acks away:
                # the sender tells a slow receiver from a dead one by these.
                session.send_control("ack", consumed=session.consumed)
        for runtime in list(self.studies.values()):
            if runtime.session is None and runtime.idle and (
                    runtime.complete or now - runtime.detached_at > self.config.unload_after):
                await self._unload(runtime)

    async def _unload(self, runtime: StudyRuntime) -> None:
        """Take a study out of memory (it stays on disk) and release its reservation."""
        key = (runtime.name, runtime.record.key)
        if self.studies.get(key) is runtime:
            del self.studies[key]
        self.notify(runtime, StudyUpdate(unloaded=True))
        await runtime.unload()
        self.memory.release(runtime.cost.memory)
        if runtime.record.remove_if_empty():
            log.info("study %s: out of memory, its folder removed (no chunk ever arrived)",
                     runtime.name)
        else:
            log.info("study %s: out of memory (kept in %s)", runtime.name,
                     runtime.record.folder)

    def drop_study(self, runtime: StudyRuntime) -> None:
        """Take a study whose data could not be stored out of memory (from its own task)."""
        key = (runtime.name, runtime.record.key)
        if self.studies.get(key) is runtime:
            del self.studies[key]
            self.spawn(self._unload(runtime))

    async def _make_room(self, amount: int) -> bool:
        """Reserve ``amount`` bytes of memory, unloading idle studies (oldest first) if needed."""
        while not self.memory.reserve(amount):
            idle = [r for r in self.studies.values() if r.session is None and r.idle]
            if not idle:
                return False
            await self._unload(min(idle, key=lambda r: r.detached_at))
        return True

    async def open_study(self, header: StreamHeader, frame: bytes, cost: StudyCost
                         ) -> StudyRuntime:
        """The study in memory for this header: found, loaded from its folder, or new.

        Raises :class:`~receiver.session.Refusal` when its memory cannot be found now, and
        StoreError when its folder cannot be used (disk limits included).
        """
        async with self._open_lock:
            key = (header.study_id, stream_key(header))
            runtime = self.studies.get(key)
            if runtime is not None:
                return runtime
            if not await self._make_room(cost.memory):
                raise Refusal(f"the receiver is busy: its memory budget "
                              f"({self.memory.total >> 20} MiB) is used by other studies; "
                              "retry later", retry=True)
            loop = asyncio.get_running_loop()
            try:
                record, _ = await loop.run_in_executor(self.executor, self.store.open, header,
                                                       frame, cost.disk)
            except BaseException:
                self.memory.release(cost.memory)
                raise
            runtime = StudyRuntime(self, record, cost)
            self.studies[key] = runtime
            self.notify(runtime, StudyUpdate(opened=True))
            return runtime

    # --- HTTP --------------------------------------------------------------------------------

    def authorised(self, request: web.Request) -> bool:
        """Whether ``request`` carries the senders' bearer token (a refusal is logged)."""
        if token_matches(request.headers.get("Authorization"), self.config.token):
            return True
        log.warning("refused %s %s from %s: missing or wrong token", request.method,
                    request.path, request.remote)
        return False

    @staticmethod
    def _unauthorised() -> web.Response:
        return web.Response(status=401, text="missing or wrong bearer token\n",
                            headers={"WWW-Authenticate": 'Bearer realm="dlad-receive"'})

    @staticmethod
    def _busy(what: str) -> web.Response:
        return web.Response(status=503, text=f"{what}, retry later\n",
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    def _slots_taken(self) -> int:
        return len(self.sessions) + self._opening

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle_offer(self, request: web.Request) -> web.Response:
        limits = self.config.limits
        if not self.authorised(request):
            return self._unauthorised()
        if request.content_type != SDP_CONTENT_TYPE:
            return web.Response(status=415, text=f"the body must be {SDP_CONTENT_TYPE}\n")
        if request.content_length is not None and request.content_length > MAX_SDP_BYTES:
            return web.Response(status=413, text="SDP offer too large\n")
        if self._slots_taken() >= limits.max_sessions:
            return self._busy("too many sessions")
        try:
            body = await read_body(request, limits.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="SDP offer too large\n")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return web.Response(status=400, text="the SDP offer is not UTF-8\n")
        problem = check_offer(text)
        if problem is None:
            try:
                text, dropped = screen_candidates(text, self.allow_peers,
                                                  limits.max_ice_candidates)
                if dropped:
                    log.info("offer from %s: %d ICE candidates outside --allow-peers dropped",
                             request.remote, dropped)
            except CandidateError as error:
                problem = str(error)
        if problem:
            log.warning("refused an offer from %s: %s", request.remote, problem)
            return web.Response(status=400, text=f"bad SDP offer: {problem}\n")
        # The slot is checked and taken with no await in between: the event loop runs one
        # handler at a time, so parallel offers cannot all see a free slot.
        if self._slots_taken() >= limits.max_sessions:
            return self._busy("too many sessions")
        if not self.memory.reserve(SESSION_MEMORY):
            return self._busy("the receiver's memory budget is used up")
        self._opening += 1
        try:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.config.ice_servers)))
            try:
                with ice_hosts(self.ice_addresses):
                    await pc.setRemoteDescription(RTCSessionDescription(text, "offer"))
                    await pc.setLocalDescription(await pc.createAnswer())
                enlarge_socket_buffers(pc)
            except Exception as error:  # aiortc rejects offers it cannot answer in many ways
                await pc.close()
                self.memory.release(SESSION_MEMORY)
                log.warning("refused an offer from %s: %s", request.remote, error)
                return web.Response(status=400, text=f"bad SDP offer: {error}\n")
            session = Session(self, pc, str(request.remote))
            self.sessions[session.id] = session  # the session now holds the slot and memory
        finally:
            self._opening -= 1
        log.info("session %s: new connection from %s", session.id, request.remote)
        return web.Response(status=201, body=pc.localDescription.sdp.encode(),
                            content_type=SDP_CONTENT_TYPE,
                            headers={"Location": SESSIONS_PATH + session.id})

    async def handle_delete(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return self._unauthorised()
        session = self.sessions.get(request.match_info["session_id"])
        if session is None:
            return web.Response(status=404, text="no such session\n")
        session.close("ended by the sender (DELETE)")
        return web.Response(status=204)

    async def handle_list(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return self._unauthorised()
        loop = asyncio.get_running_loop()
        studies = await loop.run_in_executor(None, self.store.list)
        sessions = [{"id": s.id, "state": s.state,
                     "study_id": s.study.name if s.study else None,
                     "bytes": s.received} for s in self.sessions.values()]
        return web.Response(text=json.dumps({"studies": studies, "sessions": sessions},
                                            indent=1), content_type="application/json")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


async def serve(config: ServiceConfig, host: str, port: int, ready=None,
                stop_event: asyncio.Event | None = None, listeners=()) -> None:
    """Run the service until ``stop_event`` is set or SIGINT/SIGTERM arrives."""
    service = ReceiverService(config)
    for listener in listeners:
        service.add_listener(listener)
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
