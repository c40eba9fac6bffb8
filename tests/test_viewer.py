"""The live viewer (receiver/viewer.py): access control, the slice API, and a real browser.

The HTTP tests run the receiver service in this process with the viewer extension. The browser
test opens the viewer in a headless Chromium (Debian package ``chromium``) while a study crosses
``dlad-link`` (wifi-2m) and checks, from screenshots' pixels, that the volume appears and the
slice states change from "not yet"/"preview" to "exact"; it also reads the page's own timing of
the first image and of the liver shown exact against the receiver's milestone times.
"""

from __future__ import annotations

import asyncio
import doctest
import json
import logging
import sys
from io import BytesIO
from pathlib import Path

import aiohttp
import numpy as np
import pytest

import receiver.viewer
from receiver.service import ReceiverService, ServiceConfig
from receiver.slices import EXACT, LIVER_EXACT, NOT_YET, PREVIEW, slice_states
from receiver.stream import StudyStream
from receiver.viewer import STATIC_DIR, LiveViewer, ViewerConfig, parse_slice_list
from sender.transport import FileSource, stream_study
from shared.wire import FrameReader

sys.path.insert(0, str(Path(__file__).parent))
from chromium import CHROMIUM, Chromium  # noqa: E402
from test_streaming import TOKEN, RawClient, encode_phantom, quick, run, start_receiver_process  # noqa: E402

from shared.webrtc.protocol import encode_control  # noqa: E402

VIEWER_TOKEN = "viewer-token-0123456789abcdef"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    path = tmp_path_factory.mktemp("viewer") / "a.dlad"
    volume, header = encode_phantom(path, seed=7, exact=True)
    return path, volume, header


class ViewerReceiver:
    """The receiver service with the viewer, in this process."""

    def __init__(self, out_dir: Path):
        self.service = ReceiverService(ServiceConfig(out_dir=out_dir, token=TOKEN,
                                                     snapshot_interval=0.5))
        self.viewer = LiveViewer(ViewerConfig(token=VIEWER_TOKEN))

    async def __aenter__(self) -> ReceiverService:
        self.service.add_listener(self.viewer)
        await self.service.start("127.0.0.1", 0)
        return self.service

    async def __aexit__(self, *exc) -> None:
        await self.service.stop()


def browser_like() -> aiohttp.ClientSession:
    """A client that keeps cookies for 127.0.0.1 (aiohttp's default jar skips IP hosts)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(http: aiohttp.ClientSession, url: str, token: str = VIEWER_TOKEN):
    return await http.post(url + "/viewer/login", json={"token": token})


def test_doctests():
    assert doctest.testmod(receiver.viewer).failed == 0


def test_slice_list_parser():
    assert parse_slice_list("0-2,5,7-8", 10) == [0, 1, 2, 5, 7, 8]
    for bad in ("", "a", "1-", "-1", "3-1", "0-10", "0,,1", "0-63,64", "1;2"):
        assert parse_slice_list(bad, 100 if bad == "0-63,64" else 10) is None, bad


def test_slice_states_follow_the_layers(study):
    path, volume, header = study
    stream = StudyStream()
    stream.accept_header(header)
    r = stream.reassembler
    assert set(slice_states(r).tolist()) == {NOT_YET}
    seen = set()
    for event in FrameReader().feed(path.read_bytes()):
        if event.chunk is header or not hasattr(event.chunk, "seq"):
            continue
        stream.feed(event.chunk.to_frame())
        states = slice_states(r)
        seen |= set(states.tolist())
        if not r.verified:
            assert EXACT not in states  # nothing is called exact before the SHA-256 proof
    assert seen >= {PREVIEW, LIVER_EXACT, EXACT}
    assert set(slice_states(r).tolist()) == {EXACT}


def test_access_needs_the_viewer_token_and_a_cookie(study, tmp_path, caplog):
    path, volume, header = study

    async def scenario():
        async with ViewerReceiver(tmp_path / "out") as service:
            await stream_study(FileSource(path), service.url, TOKEN, quick())
            url = service.url
            codes = {}
            async with browser_like() as http:
                query = f"?study={header.study_id}"
                for name in ("studies", "study", "roi", "slices", "events"):
                    async with http.get(f"{url}/viewer/api/{name}{query}&z=0") as response:
                        codes[f"{name} without login"] = response.status
                async with http.get(f"{url}/viewer/study{query}", allow_redirects=False) as r:
                    codes["page without login"] = r.status
                codes["sender token"] = (await login(http, url, TOKEN)).status
                codes["wrong token"] = (await login(http, url, "x" * 30)).status
                async with http.post(url + "/viewer/login",
                                     data={"token": VIEWER_TOKEN}) as response:
                    codes["form post"] = response.status
                # The senders' bearer token opens nothing of the viewer.
                async with http.get(f"{url}/viewer/api/studies",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    codes["bearer"] = response.status
                response = await login(http, url)
                codes["login"] = response.status
                cookie = response.headers["Set-Cookie"]
                async with http.get(f"{url}/viewer/api/studies") as response:
                    codes["studies"] = response.status
                    listing = await response.json()
                async with http.get(f"{url}/viewer/study{query}") as response:
                    codes["page"] = response.status
                    csp = response.headers["Content-Security-Policy"]
                for hostile in ("..", "../out", "/etc", ".hidden", "a/../../x", "nothing"):
                    async with http.get(f"{url}/viewer/api/study",
                                        params={"study": hostile}) as response:
                        codes[f"study {hostile}"] = response.status
                async with http.get(f"{url}/viewer/api/slices{query}&z=0-200") as response:
                    codes["too many slices"] = response.status
                await http.post(url + "/viewer/logout", json={})
                async with http.get(f"{url}/viewer/api/studies") as response:
                    codes["after logout"] = response.status
            async with browser_like() as http:
                for _ in range(10):
                    await login(http, url, "wrong-token-wrong-token")
                codes["after 10 failures"] = (await login(http, url)).status
            return codes, cookie, listing, csp

    with caplog.at_level(logging.DEBUG):
        codes, cookie, listing, csp = run(scenario())
    assert codes == {
        "studies without login": 401, "study without login": 401, "roi without login": 401,
        "slices without login": 401, "events without login": 401, "page without login": 302,
        "sender token": 401, "wrong token": 401, "form post": 415, "bearer": 401, "login": 200,
        "studies": 200, "page": 200, "study ..": 404, "study ../out": 404, "study /etc": 404,
        "study .hidden": 404, "study a/../../x": 404, "study nothing": 404,
        "too many slices": 400, "after logout": 401, "after 10 failures": 429}
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/viewer" in cookie
    assert "Secure" not in cookie  # plain HTTP here; under TLS the cookie is Secure
    assert VIEWER_TOKEN not in cookie
    assert [s["folder"] for s in listing["studies"]] == [header.study_id]
    assert "script-src 'self'" in csp and "unsafe" not in csp
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert VIEWER_TOKEN not in logged and TOKEN not in logged
    assert "refused login" in logged


def test_viewer_over_tls_sets_a_secure_cookie(tmp_path):
    """Under the receiver's TLS the viewer is served over HTTPS and its cookie is Secure."""
    import ssl

    from attack_helpers import make_certificate

    from shared.tls import server_tls_context

    cert, key = make_certificate(tmp_path / "tls")

    async def scenario():
        service = ReceiverService(ServiceConfig(out_dir=tmp_path / "out", token=TOKEN,
                                                tls=server_tls_context(cert, key)))
        service.add_listener(LiveViewer(ViewerConfig(token=VIEWER_TOKEN)))
        await service.start("127.0.0.1", 0)
        try:
            client_tls = ssl.create_default_context(cafile=str(cert))
            connector = aiohttp.TCPConnector(ssl=client_tls)
            async with aiohttp.ClientSession(connector=connector,
                                             cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(service.url + "/viewer/") as response:
                    page = response.status
                async with http.post(service.url + "/viewer/login",
                                     json={"token": VIEWER_TOKEN}) as response:
                    cookie = response.headers["Set-Cookie"]
                async with http.get(service.url + "/viewer/api/studies") as response:
                    studies = response.status
            return service.url, page, cookie, studies
        finally:
            await service.stop()

    url, page, cookie, studies = run(scenario())
    assert url.startswith("https://") and page == 200 and studies == 200
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_slices_api_returns_the_received_voxels(study, tmp_path):
    path, volume, header = study

    async def scenario():
        async with ViewerReceiver(tmp_path / "out") as service:
            await stream_study(FileSource(path), service.url, TOKEN, quick())
            async with browser_like() as http:
                await login(http, service.url)
                params = {"study": header.study_id}
                async with http.get(service.url + "/viewer/api/study", params=params) as r:
                    info = await r.json()
                async with http.get(service.url + "/viewer/api/slices",
                                    params={**params, "z": "0-2,5"}) as r:
                    encoding = r.headers.get("Content-Encoding")
                    slices, versions = r.headers["X-Slices"], r.headers["X-Versions"]
                    data = await r.read()
                async with http.get(service.url + "/viewer/api/roi", params=params) as r:
                    roi = await r.read()
                async with http.get(service.url + "/viewer/api/events", params=params) as r:
                    line = b""
                    while not line.startswith(b"data:"):
                        line = await r.content.readline()
                    state = json.loads(line[5:])
            return info, encoding, slices, versions, data, roi, state

    info, encoding, slices, versions, data, roi, state = run(scenario())
    nz, ny, nx = header.shape
    assert info["shape"] == [nz, ny, nx]
    np.testing.assert_allclose(info["affine"], header.affine)
    assert encoding == "gzip" and slices == "0,1,2,5"
    assert all(int(v) >= 1 for v in versions.split(","))
    received = np.frombuffer(data, "<i2").reshape(4, ny, nx)
    np.testing.assert_array_equal(received, volume.data[[0, 1, 2, 5]])
    outline = np.unpackbits(np.frombuffer(roi, np.uint8))[:nz * ny * nx].reshape(nz, ny, nx)
    mask = header.roi
    assert outline.any() and not (outline.astype(bool) & ~mask).any()  # on the ROI's surface
    interior = mask.copy()
    interior[1:-1, 1:-1, 1:-1] = (mask[1:-1, 1:-1, 1:-1] & mask[:-2, 1:-1, 1:-1]
                                  & mask[2:, 1:-1, 1:-1] & mask[1:-1, :-2, 1:-1]
                                  & mask[1:-1, 2:, 1:-1] & mask[1:-1, 1:-1, :-2]
                                  & mask[1:-1, 1:-1, 2:])
    interior[[0, -1]] = False
    interior[:, [0, -1]] = False
    interior[:, :, [0, -1]] = False
    np.testing.assert_array_equal(outline.astype(bool), mask & ~interior)
    assert state["states"] == "3" * nz and state["verified"] is True
    assert state["applied"] == state["planned"] == len(header.plan)


def test_static_assets_fit_the_budget():
    """Page + viewer assets <= 5 MB as files (gzip'd on the wire: about a third)."""
    total = sum(p.stat().st_size for p in STATIC_DIR.iterdir())
    assert total <= 5_000_000, total


def test_cli_checks_viewer_and_dicom_options(tmp_path):
    from receiver.cli import main

    token = tmp_path / "t.txt"
    token.write_text(TOKEN)
    same = tmp_path / "same.txt"
    same.write_text(TOKEN)
    base = ["--listen", "127.0.0.1:0", "--token-file", str(token), "--out-dir", str(tmp_path)]
    for extra, code in ((["--viewer"], 2), (["--viewer", "--viewer-token-file", str(same)], 1),
                        (["--pacs", "A@h:104"], 2), (["--viewer-token-file", str(same)], 2)):
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == code, extra
    with pytest.raises(SystemExit) as exit_info:
        main(["--in", "x.dlad", "--out", "x.nii", "--viewer"])
    assert exit_info.value.code == 2


# --- a real browser ------------------------------------------------------------------------------

def pixel_colours(png: bytes):
    """The screenshot as an (h, w, 3) uint8 array."""
    from PIL import Image

    return np.asarray(Image.open(BytesIO(png)).convert("RGB"))


STATE_RGB = {"not yet": (90, 90, 120), "preview": (240, 160, 40), "liver exact": (60, 200, 90),
             "exact": (70, 140, 255)}


def count_colour(image: np.ndarray, rgb, tolerance: int = 12) -> int:
    return int((np.abs(image.astype(int) - np.array(rgb)).max(axis=2) <= tolerance).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package "
                                             "'chromium'; .ci/run installs it)")
def test_viewer_in_chromium_during_a_transfer_over_the_link(tmp_path):
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider
    from shared.link.signaling import run_behind_link

    # A study that takes a few seconds over wifi-2m: 24 slices of 192 x 224.
    volume, liver = make_phantom((24, 192, 224), spacing=(1.8, 2.1, 2.5), seed=11)
    prepared = prepare_study(volume, StaticMaskProvider(liver, "phantom liver"))
    encoder = StudyEncoder(prepared, EncodeSettings(exact=True, group_slices=2, preset="fast"))
    source = tmp_path / "study.dlad"
    source.write_bytes(b"".join(encoder.frames()))
    header = encoder.header
    frames = [event.chunk.to_frame() for event in FrameReader().feed(source.read_bytes())]
    shots = tmp_path / "shots"
    shots.mkdir()

    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN)
    viewer_token_file = tmp_path / "viewer-token.txt"
    viewer_token_file.write_text(VIEWER_TOKEN)
    for path in (token_file, viewer_token_file):
        path.chmod(0o600)

    async def scenario(receiver_url: str):
        async with Chromium() as browser:
            page = await browser.page()
            await page.goto(receiver_url + "/viewer/")
            status = await page.evaluate(
                "fetch('/viewer/login', {method: 'POST', headers: {'Content-Type': "
                f"'application/json'}}, body: JSON.stringify({{token: '{VIEWER_TOKEN}'}})}})"
                ".then(r => r.status)")
            assert status == 200
            # First pass (straight to the receiver): a sender that has only the first chunks,
            # so some slices are previewed and none is exact. The expert opens the study then.
            client = RawClient()
            await client.connect(receiver_url)
            client.channel.send(encode_control("hello", protocol=1))
            client.send(frames[0])
            await client.expect("inventory")
            client.send(b"".join(frames[1:7]))
            while (await client.expect("ack")).get("applied", 0) < 6:
                pass
            await client.close()
            url, proxy = await run_behind_link(receiver_url, "wifi-2m", seed=5)
            await page.goto(f"{receiver_url}/viewer/study?study={header.study_id}")
            await page.wait_for("window.dladViewer && "
                                "window.dladViewer.metrics.lastRevisionShown >= 0", 120)
            await asyncio.sleep(0.5)
            taken = [(await page.evaluate("document.body.dataset.states"),
                      await page.screenshot(shots / "000-partial.png"))]
            # Second pass through the link, the page open: it follows live.
            sending = asyncio.ensure_future(stream_study(FileSource(source), url, TOKEN, quick()))
            while not sending.done():
                await asyncio.sleep(0.5)
                states = await page.evaluate("document.body.dataset.states || ''")
                taken.append((states, await page.screenshot(shots / f"{len(taken):03d}.png")))
            result = await sending
            nz = header.shape[0]
            await page.wait_for(f"document.body.dataset.states === '{'3' * nz}'", 30)
            await asyncio.sleep(0.3)
            metrics = await page.evaluate("JSON.stringify(window.dladViewer.metrics)")
            taken.append((await page.evaluate("document.body.dataset.states"),
                          await page.screenshot(shots / "final.png")))
            console = list(page.console)
            await page.close()
            await proxy.stop()
            return result, json.loads(metrics), taken, console

    # The receiver runs in a process of its own, as it does in use (the sender and the link
    # emulator share this test's event loop).
    receiver_process = start_receiver_process(tmp_path, token_file, "--viewer",
                                              "--viewer-token-file", str(viewer_token_file),
                                              "--snapshot-interval", "1")
    try:
        result, metrics, taken, console = run(scenario(receiver_process.url), timeout=240)
    finally:
        receiver_process.stop()
    log = receiver_process.log_path.read_text()
    assert VIEWER_TOKEN not in log and TOKEN not in log
    assert result.complete and result.verified
    assert not metrics["errors"], (metrics, console)
    nz = header.shape[0]
    states_seen = [states for states, _ in taken]
    print("states seen:", states_seen, "metrics:", {k: v for k, v in metrics.items()
                                                    if k != "latencies"})
    # The page showed the partial study (no slice exact, some not there yet), then every state
    # on the way, and exact at the end.
    assert "3" not in states_seen[0] and "0" in states_seen[0] and set(states_seen[0]) != {"0"}
    assert states_seen[-1] == "3" * nz
    assert len(set(states_seen)) >= 2, states_seen
    # Pixels. Partial: the volume's slices that arrived and the colours of the states "not yet"
    # and "preview" on the ruler and the frames; final: the "exact" colour, no "not yet".
    first = pixel_colours(taken[0][1])
    final = pixel_colours(taken[-1][1])
    early = {name: count_colour(first, rgb) for name, rgb in STATE_RGB.items()}
    late = {name: count_colour(final, rgb) for name, rgb in STATE_RGB.items()}
    print("state colours, partial:", early, "final:", late)
    assert early["not yet"] > 1000 and early["preview"] + early["liver exact"] > 500, early
    assert early["exact"] < 300, early  # the legend's 12 x 12 square
    assert late["exact"] > 2000 and late["not yet"] < 300 and late["preview"] < 300, late
    views = final[120:760, 0:1100].astype(float)
    assert views.std() > 20, "no volume on screen"
    # More of the volume (grey, not a state colour) is on screen at the end than before. The
    # threshold (30 of 255) counts the body down to fat in the viewer's window, not air: a
    # higher one would count noise, which the early previews (CRF 30) smooth away and the
    # exact volume brings back.
    def tissue(image):
        views = image[120:760, 0:1100].astype(int)
        grey = views.max(axis=2) - views.min(axis=2) < 8
        return int((grey & (views.max(axis=2) > 30)).sum())

    print("volume pixels on screen, partial / final:", tissue(first), tissue(final))
    assert tissue(final) > tissue(first) > 0, (tissue(first), tissue(final))
    latencies = sorted(metrics["latencies"])
    print(f"update latency (state on the server -> frame on screen): median "
          f"{latencies[len(latencies) // 2]:.3f} s, max {latencies[-1]:.3f} s over "
          f"{len(latencies)} updates")
    if metrics.get("roiCompleteServer"):
        print(f"liver shown exact {(metrics['liverExactShown'] - metrics['roiCompleteServer']) / 1000:.3f} s "
              "after ROI complete")
