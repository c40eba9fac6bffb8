"""``dlad-receive --listen ... --viewer``: a live web viewer of the studies as they arrive.

Served by the receiver itself (same address, same TLS when it has one), under ``/viewer/``:

===============================================  ============================================
``GET  /viewer/``                                login form, then the list of studies
``POST /viewer/login``                           JSON ``{"token": ...}``: sets the session
                                                 cookie (HttpOnly, SameSite=Strict, Path=
                                                 /viewer, Secure under TLS); 401, 429 after
                                                 too many failures from one address
``POST /viewer/logout``                          ends the session
``GET  /viewer/study?study=FOLDER``              the viewer page of one study
``GET  /viewer/api/studies``                     JSON list of the studies (folder, state)
``GET  /viewer/api/study?study=FOLDER``          JSON: shape, spacing, RAS+ affine, value
                                                 range, which slices hold ROI, ``roi_known``
``GET  /viewer/api/roi?study=FOLDER``            the ROI's surface voxels, bit-packed; empty
                                                 while the ROI is pending (a live stream
                                                 sends its previews before its ROI frame):
                                                 the page asks again when a ``state`` event
                                                 says ``roi_known``
``GET  /viewer/api/events?study=FOLDER``         server-sent events: ``state`` (progress,
                                                 milestones, per-slice state and version)
``GET  /viewer/api/slices?study=FOLDER&z=0-3,9`` the voxels of those slices, int16 HU
                                                 little-endian, slice after slice
``GET  /viewer/static/<file>``                   the page's script and styles
===============================================  ============================================

Every ``/viewer/api`` request and the study page need the session cookie; the login takes the
*viewer* token (``--viewer-token-file``), which is not the senders' token: an expert who may
look at studies cannot send them, and a sender cannot look. Tokens never travel in a URL and
are never logged; the cookie holds a random session id, not the token. Answers are gzip'd when
the browser accepts it.

Live updates: each study has one version counter per slice, raised whenever a batch the receiver
applied touched the slice. The ``state`` event carries the versions (at most every
:data:`EVENT_INTERVAL_S`); the page fetches only the slices whose version moved, as compact
binary, and redraws. The per-slice state is :func:`receiver.slices.slice_states`.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import web

from receiver.limits import study_cost
from receiver.session import Refusal
from receiver.slices import STATE_NAMES, roi_voxels_per_slice, slice_states
from receiver.store import HEADER_FILE, StoreError, read_header_file

log = logging.getLogger("dlad.receiver")

STATIC_DIR = Path(__file__).with_name("viewer_static")
#: The files the viewer serves, and their types; nothing else under the folder is reachable.
STATIC_FILES = {
    "index.html": "text/html", "study.html": "text/html", "viewer.js": "text/javascript",
    "index.js": "text/javascript", "viewer.css": "text/css",
}
COOKIE = "dlad_viewer"
#: Seconds between two state events of one study at most (a batch applies every few ms).
EVENT_INTERVAL_S = 0.1
#: A quiet event stream sends a comment this often, so proxies and the browser keep it open.
KEEPALIVE_S = 15.0
MAX_SLICES_PER_REQUEST = 64
MAX_EVENT_STREAMS = 32
MAX_SESSIONS = 64
#: Failed logins allowed per client address within LOGIN_WINDOW_S before 429.
MAX_LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 60.0
_SLICE_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
SECURITY_HEADERS = {
    # Scripts and styles only from the receiver (no inline script, no eval), no framing, no
    # referrer.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass
class ViewerConfig:
    """What the viewer needs; the CLI fills it from its options."""

    token: str
    """The viewer token (not the senders' token)."""
    session_hours: float = 12.0
    """How long a login lasts."""


class StudyView:
    """What the viewer keeps about one study: per-slice versions and who waits for changes."""

    def __init__(self, nz: int, has_data: np.ndarray):
        self.outline: bytes | None = None
        self.versions = has_data.astype(np.uint32)
        self.revision = 0
        self._changed = asyncio.Event()

    def touch(self, ranges) -> None:
        for z0, z1 in ranges:
            self.versions[z0:z1] += 1
        self.revision += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def changed(self) -> asyncio.Event:
        return self._changed


class LiveViewer:
    """The viewer's routes and state; a receiver service extension (``add_listener``)."""

    def __init__(self, config: ViewerConfig):
        if len(config.token) < 16:
            raise ValueError("the viewer token must have at least 16 characters")
        self.config = config
        self.service = None
        self.views: dict[Path, StudyView] = {}
        self._sessions: dict[str, float] = {}
        self._failures: dict[str, list[float]] = {}
        self._streams = 0
        self._closing = False
        self._gzip_cache: dict[str, bytes] = {}
        self._token_digest = hashlib.sha256(config.token.encode()).digest()

    # --- extension hooks -----------------------------------------------------------------------

    def attach(self, service) -> None:
        self.service = service
        router = service.app.router
        router.add_get("/viewer", self.redirect_index)
        router.add_get("/viewer/", self.page_index)
        router.add_post("/viewer/login", self.login)
        router.add_post("/viewer/logout", self.logout)
        router.add_get("/viewer/study", self.page_study)
        router.add_get("/viewer/api/studies", self.api_studies)
        router.add_get("/viewer/api/study", self.api_study)
        router.add_get("/viewer/api/roi", self.api_roi)
        router.add_get("/viewer/api/events", self.api_events)
        router.add_get("/viewer/api/slices", self.api_slices)
        router.add_get("/viewer/static/{name}", self.static)

    def study_updated(self, runtime, update) -> None:
        view = self.views.get(runtime.record.folder)
        if view is not None:  # else nobody looks yet: a view starts from the data when one does
            view.touch(update.changed)

    async def close(self) -> None:
        self._closing = True
        for view in self.views.values():
            view.touch([])  # wake the event streams so they notice the end

    # --- authentication ------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        session = request.cookies.get(COOKIE)
        if not session:
            return False
        expires = self._sessions.get(session)
        if expires is None or expires < time.monotonic():
            self._sessions.pop(session, None)
            return False
        return True

    def _token_ok(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode("utf-8", "replace")).digest(),
                                   self._token_digest)

    async def login(self, request: web.Request) -> web.Response:
        remote = str(request.remote)
        now = time.monotonic()
        recent = [t for t in self._failures.get(remote, []) if now - t < LOGIN_WINDOW_S]
        self._failures[remote] = recent
        if len(recent) >= MAX_LOGIN_FAILURES:
            return _text(429, "too many failed logins, wait a minute\n", {"Retry-After": "60"})
        if request.content_type != "application/json":
            # A form from another site cannot send JSON without the browser asking first (CORS).
            return _text(415, "send the token as JSON\n")
        try:
            body = await request.json()
            token = body["token"] if isinstance(body, dict) else None
        except (ValueError, KeyError):
            token = None
        if not isinstance(token, str) or not self._token_ok(token):
            recent.append(now)
            log.warning("viewer: refused login from %s", remote)
            return _text(401, "wrong viewer token\n")
        self._failures.pop(remote, None)
        session = secrets.token_urlsafe(32)
        for old in [s for s, t in self._sessions.items() if t < now]:
            del self._sessions[old]
        if len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[min(self._sessions, key=self._sessions.get)]
        lifetime = self.config.session_hours * 3600
        self._sessions[session] = now + lifetime
        log.info("viewer: login from %s", remote)
        response = _json({"ok": True})
        response.set_cookie(COOKIE, session, max_age=int(lifetime), path="/viewer",
                            httponly=True, samesite="Strict", secure=request.secure)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = _json({"ok": True})
        response.del_cookie(COOKIE, path="/viewer")
        return response

    # --- pages and static files ----------------------------------------------------------------

    async def redirect_index(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/viewer/")

    async def page_index(self, request: web.Request) -> web.Response:
        return await self._file(request, "index.html")

    async def page_study(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            raise web.HTTPFound("/viewer/")
        return await self._file(request, "study.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES or name.endswith(".html"):
            return _text(404, "not found\n")
        return await self._file(request, name, cache=True)

    async def _file(self, request: web.Request, name: str, cache: bool = False) -> web.Response:
        path = STATIC_DIR / name
        body = path.read_bytes()
        headers = {**SECURITY_HEADERS,
                   "Cache-Control": "private, max-age=3600" if cache else "no-store"}
        if "gzip" in request.headers.get("Accept-Encoding", "") and len(body) > 1024:
            compressed = self._gzip_cache.get(name)
            if compressed is None:
                loop = asyncio.get_running_loop()
                compressed = await loop.run_in_executor(None, _gzip, body, 9)
                self._gzip_cache[name] = compressed
            body = compressed
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers, content_type=STATIC_FILES[name])

    # --- studies -------------------------------------------------------------------------------

    def _folder(self, request: web.Request) -> Path:
        """The study folder a request names (``study`` parameter), or a 404."""
        name = request.query.get("study", "")
        out_dir = self.service.store.out_dir
        if not name or len(name) > 300 or name.startswith(("/", ".")) or "\\" in name \
                or any(part in ("", ".", "..") or part.startswith(".")
                       for part in name.split("/")):
            raise web.HTTPNotFound(text="no such study\n")
        folder = out_dir / name
        if not (folder / HEADER_FILE).is_file():
            raise web.HTTPNotFound(text="no such study\n")
        return folder

    async def _runtime(self, folder: Path):
        """The study in memory (loaded from its folder if it is not), and its view."""
        service = self.service
        runtime = service.runtime_for_folder(folder)
        if runtime is None:
            # Loaded like a returning sender's study: within the receiver's memory budget.
            loop = asyncio.get_running_loop()
            header, frame = await loop.run_in_executor(None, read_header_file, folder / HEADER_FILE)
            try:
                runtime = await service.open_study(
                    header, frame, study_cost(header, service.config.window))
            except (Refusal, StoreError) as error:
                raise web.HTTPServiceUnavailable(text=f"{error}\n", headers={
                    **SECURITY_HEADERS, "Retry-After": "5"}) from None
            if runtime.record.folder != folder:
                raise web.HTTPNotFound(text="no such study\n")
        view = self.views.get(folder)
        if view is None:
            r = runtime.record.reassembler
            view = StudyView(r.header.shape[0], r.slice_layers() > 0)
            self.views[folder] = view
        return runtime, view

    def _check(self, request: web.Request) -> None:
        if not self._authorised(request):
            raise web.HTTPUnauthorized(text="log in first\n", headers=SECURITY_HEADERS)

    async def api_studies(self, request: web.Request) -> web.Response:
        self._check(request)
        loop = asyncio.get_running_loop()
        studies = await loop.run_in_executor(None, self.service.store.list)
        return _json({"studies": studies})

    async def api_study(self, request: web.Request) -> web.Response:
        self._check(request)
        folder = self._folder(request)
        runtime, _ = await self._runtime(folder)
        header = runtime.record.header
        info = {
            "study": str(folder.relative_to(self.service.store.out_dir)),
            "study_id": header.study_id,
            "shape": list(header.shape),
            "spacing": list(header.spacing),
            "value_range": list(header.value_range),
            "fill": int(header.value_range[0]),
            "affine": np.asarray(header.affine, dtype=float).tolist(),
            "roi_known": header.roi_known,
            "roi_voxels": header.roi_voxels,
            "roi_slices": (roi_voxels_per_slice(runtime.record.reassembler) > 0).tolist(),
            "exact_expected": 2 in header.layers,
            "description": str((header.dicom or {}).get("SeriesDescription", "")),
            "state_names": list(STATE_NAMES),
        }
        return _json(info)

    async def api_roi(self, request: web.Request) -> web.Response:
        self._check(request)
        runtime, view = await self._runtime(self._folder(request))
        header = runtime.record.header
        if not header.roi_known:
            # Announced as pending and its frame not here yet: no outline to draw (empty), and
            # nothing cached; the state events say when it is known (roi_known).
            return await self._binary(request, b"")
        if view.outline is None:
            loop = asyncio.get_running_loop()
            view.outline = await loop.run_in_executor(None, roi_outline_bits, header)
        return await self._binary(request, view.outline)

    async def api_slices(self, request: web.Request) -> web.Response:
        self._check(request)
        runtime, view = await self._runtime(self._folder(request))
        nz = runtime.record.header.shape[0]
        wanted = parse_slice_list(request.query.get("z", ""), nz)
        if wanted is None:
            return _text(400, f"z must be slice numbers or ranges in [0, {nz}), at most "
                              f"{MAX_SLICES_PER_REQUEST}, like 0-3,7\n")
        # Versions first: a slice changed while it is copied is sent again at the next event.
        versions = [int(view.versions[z]) for z in wanted]
        volume = runtime.record.reassembler.volume
        data = b"".join(np.ascontiguousarray(volume[z], dtype="<i2").tobytes() for z in wanted)
        return await self._binary(request, data, {
            "X-Slices": ",".join(map(str, wanted)), "X-Versions": ",".join(map(str, versions))})

    async def _binary(self, request: web.Request, data: bytes, headers=None) -> web.Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store", **(headers or {})}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            loop = asyncio.get_running_loop()
            # Level 1: 3-4x smaller than raw HU for a fraction of the time of level 6.
            data = await loop.run_in_executor(None, _gzip, data, 1)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=data, headers=headers, content_type="application/octet-stream")

    def _state(self, runtime, view: StudyView) -> dict:
        record = runtime.record
        r = record.reassembler
        status = {
            "revision": view.revision,
            "states": "".join(map(str, slice_states(r).tolist())),
            "versions": view.versions.tolist(),
            "applied": len(r.applied),
            "planned": len(r.plan),
            "bytes": record.counters.get("network_bytes", 0),
            "roi_known": r.roi_known,
            "roi_complete": r.roi_complete,
            "base_complete": r.base_complete,
            "exact_expected": r.exact_expected,
            "exact_complete": r.exact_complete,
            "verified": r.verified,
            "complete": r.complete,
            "connected": record.connected,
            "times": dict(record.times),
            "milestones_s": vars(r.milestones).copy(),
            "server_time": time.time(),
        }
        return status

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        folder = self._folder(request)
        if self._streams >= MAX_EVENT_STREAMS:
            return _text(503, "too many viewers\n", {"Retry-After": "5"})
        runtime, view = await self._runtime(folder)
        response = web.StreamResponse(headers={
            **SECURITY_HEADERS, "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        self._streams += 1
        try:
            await response.prepare(request)
            sent = None
            while True:
                changed = view.changed
                runtime = self.service.runtime_for_folder(folder) or runtime
                if view.revision != sent:
                    sent = view.revision
                    data = json.dumps(self._state(runtime, view), separators=(",", ":"))
                    await response.write(f"event: state\ndata: {data}\n\n".encode())
                    await asyncio.sleep(EVENT_INTERVAL_S)
                    continue
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await response.write(b": keepalive\n\n")
                if self._closing:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams -= 1
        return response


def roi_outline_bits(header) -> bytes:
    """The ROI's surface voxels, bit-packed like the header's mask (first voxel in the high bit).

    A surface voxel is in the ROI with one of its 6 neighbours outside it (or on the volume's
    edge): cut by any plane, the surface draws the ROI's outline in that view. Three slices of
    the mask are unpacked at a time.
    """
    nz = header.shape[0]
    out = np.zeros(header.shape, dtype=bool)
    previous = np.zeros(header.shape[1:], dtype=bool)
    current = header.roi_slices(0, 1)[0].copy()
    for z in range(nz):
        following = header.roi_slices(z + 1, z + 2)[0].copy() if z + 1 < nz else \
            np.zeros_like(current)
        inner = current.copy()
        inner[0, :] = inner[-1, :] = False
        inner[:, 0] = inner[:, -1] = False
        inner[1:-1, 1:-1] &= (current[:-2, 1:-1] & current[2:, 1:-1] & current[1:-1, :-2]
                              & current[1:-1, 2:])
        inner &= previous & following
        out[z] = current & ~inner
        previous, current = current, following
    return np.packbits(out).tobytes()


def parse_slice_list(text: str, nz: int) -> list[int] | None:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]`` within ``[0, nz)``; None if malformed or too many.

    >>> parse_slice_list("0-3,7", 10)
    [0, 1, 2, 3, 7]
    >>> parse_slice_list("9-12", 10) is None
    True
    """
    if not _SLICE_LIST.match(text or ""):
        return None
    wanted: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        z0, z1 = int(first), int(last or first)
        if not 0 <= z0 <= z1 < nz or len(wanted) + z1 - z0 + 1 > MAX_SLICES_PER_REQUEST:
            return None
        wanted.extend(range(z0, z1 + 1))
    return wanted


def _gzip(data: bytes, level: int) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def _text(status: int, text: str, headers=None) -> web.Response:
    return web.Response(status=status, text=text, headers={**SECURITY_HEADERS, **(headers or {})})


def _json(value) -> web.Response:
    return web.Response(text=json.dumps(value), content_type="application/json",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})
