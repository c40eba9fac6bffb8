"use strict";
// The live viewer of one study (docs/VIEWER.md). Three planes (axial, coronal, sagittal) drawn
// with the Canvas 2D API from the voxels received so far, a label layer over them (the
// per-slice state as a frame around each slice and a hatch over slices not received yet; the
// ROI outline), a slice ruler, window/level presets. The server pushes a "state" event
// (per-slice state and version) whenever data arrives; the page fetches only the slices whose
// version moved and redraws the three visible planes (a few milliseconds, GPU or not).

const STATE_COLORS = [[90, 90, 120], [240, 160, 40], [60, 200, 90], [70, 140, 255]];
const ROI_COLOR = [255, 40, 40];
const ROI_LABEL = 5;           // label of the ROI outline; 1..4 are the states + 1
const LABEL_COLORS = [null, ...STATE_COLORS, ROI_COLOR];
const LABEL_ALPHA = 0.85;
const WINDOWS = {liver: [150, 90], abdomen: [400, 40], bone: [2000, 500]};  // [width, level] HU
const FETCH_BATCH = 32;        // slices per request (the server takes at most 64)

const metrics = {firstImage: null, liverExactShown: null, exactShown: null, events: 0,
                 slicesFetched: 0, requests: 0, lastRevisionShown: -1, errors: []};
window.dladViewer = {metrics};

const $ = (id) => document.getElementById(id);
const study = new URLSearchParams(location.search).get("study");
const api = (path, extra = "") =>
  `/viewer/api/${path}?study=${encodeURIComponent(study)}${extra}`;

function rangesOf(list) {
  // [0,1,2,3,7] -> "0-3,7"
  const parts = [];
  for (let i = 0; i < list.length;) {
    let j = i;
    while (j + 1 < list.length && list[j + 1] === list[j] + 1) j++;
    parts.push(i === j ? `${list[i]}` : `${list[i]}-${list[j]}`);
    i = j + 1;
  }
  return parts.join(",");
}

function nextFrame() {
  return new Promise((resolve) => requestAnimationFrame(() => resolve(performance.now())));
}

async function studyInfo() {
  // The page may be opened before the study's header has arrived: wait for it.
  for (;;) {
    const response = await fetch(api("study"), {cache: "no-store"});
    if (response.status === 401) { location.href = "/viewer/"; return null; }
    if (response.ok) return response.json();
    $("title").textContent = "waiting for the study to arrive...";
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function orientation(affine, dims) {
  // Which voxel axis runs along each patient axis (R, A, S) and in which direction, from the
  // RAS+ affine's columns (the dominant component of each). A tilted or oblique acquisition is
  // shown in its own grid, named after its nearest patient axes.
  const axisOf = [null, null, null];
  const sign = [1, 1, 1];
  const used = new Set();
  const columns = [0, 1, 2].map((c) => [0, 1, 2].map((r) => affine[r][c]));
  const order = [0, 1, 2].sort((a, b) => Math.max(...columns[b].map(Math.abs)) -
                                         Math.max(...columns[a].map(Math.abs)));
  for (const c of order) {
    const ranked = [0, 1, 2].filter((r) => !used.has(r))
      .sort((a, b) => Math.abs(columns[c][b]) - Math.abs(columns[c][a]));
    const r = ranked[0];
    used.add(r);
    axisOf[r] = c;
    sign[r] = columns[c][r] >= 0 ? 1 : -1;
  }
  const spacing = columns.map((col) => Math.hypot(...col));
  return {axisOf, sign, spacing, dims};
}

async function main() {
  const info = await studyInfo();
  if (info === null) return;
  metrics.infoMs = performance.now();
  let latest = null;
  let ready = false;
  const events = new EventSource(api("events"));
  events.addEventListener("state", (event) => {
    metrics.events += 1;
    if (metrics.firstEventMs === undefined) metrics.firstEventMs = performance.now();
    latest = JSON.parse(event.data);
    if (ready) sync();
  });
  events.addEventListener("error", () => {
    $("connection").textContent = "viewer connection lost, reconnecting...";
  });
  const [nz, ny, nx] = info.shape;
  const plane = nx * ny;
  const dims = [nx, ny, nz];
  const stride = [1, nx, plane];
  $("title").textContent = `${info.study_id}${info.description ? " - " + info.description : ""}` +
    ` (${nx} x ${ny} x ${nz})`;
  const img = new Int16Array(nz * plane).fill(info.fill);
  const labels = new Uint8Array(nz * plane);
  const geo = orientation(info.affine, dims);
  const [axR, axA, axS] = geo.axisOf;
  const [sR, sA, sS] = geo.sign;

  // Views: fixed axis, horizontal and vertical voxel axes, and whether the screen runs against
  // the voxel index. Radiological convention: the patient's right on the screen's left in the
  // axial and coronal views; anterior up (axial) and on the left (sagittal); superior up.
  const views = [
    {name: "axial", fixed: axS, h: axR, v: axA, flipH: sR > 0, flipV: sA > 0,
     labels: ["R", "L", "A", "P"]},
    {name: "coronal", fixed: axA, h: axR, v: axS, flipH: sR > 0, flipV: sS > 0,
     labels: ["R", "L", "S", "I"]},
    {name: "sagittal", fixed: axR, h: axA, v: axS, flipH: sA > 0, flipV: sS > 0,
     labels: ["A", "P", "S", "I"]},
  ];
  const pos = [Math.floor(nx / 2), Math.floor(ny / 2), Math.floor(nz / 2)];
  for (const view of views) {
    view.canvas = $(`view-${view.name}`);
    view.w = dims[view.h];
    view.h2 = dims[view.v];
    view.image = new ImageData(view.w, view.h2);
    view.buffer = document.createElement("canvas");
    view.buffer.width = view.w;
    view.buffer.height = view.h2;
  }

  // Window/level as a lookup table from HU (int16 + 32768) to grey.
  const lut = new Uint8ClampedArray(65536);
  let windowWidth = WINDOWS.liver[0];
  let windowLevel = WINDOWS.liver[1];
  function buildLut() {
    const low = windowLevel - windowWidth / 2;
    for (let i = 0; i < 65536; i++) lut[i] = ((i - 32768 - low) / windowWidth) * 255;
  }

  function renderView(view) {
    const {w, h2, image, fixed, h, v, flipH, flipV} = view;
    const data = image.data;
    const base = pos[fixed] * stride[fixed];
    const sh = stride[h];
    const sv = stride[v];
    let p = 0;
    for (let y = 0; y < h2; y++) {
      const iv = flipV ? h2 - 1 - y : y;
      const row = base + iv * sv;
      for (let x = 0; x < w; x++) {
        const ih = flipH ? w - 1 - x : x;
        const voxel = row + ih * sh;
        let grey = lut[img[voxel] + 32768];
        const label = labels[voxel];
        if (label) {
          const c = LABEL_COLORS[label];
          data[p] = grey + (c[0] - grey) * LABEL_ALPHA;
          data[p + 1] = grey + (c[1] - grey) * LABEL_ALPHA;
          data[p + 2] = grey + (c[2] - grey) * LABEL_ALPHA;
        } else {
          data[p] = data[p + 1] = data[p + 2] = grey;
        }
        data[p + 3] = 255;
        p += 4;
      }
    }
    view.buffer.getContext("2d").putImageData(image, 0, 0);
    const canvas = view.canvas;
    const rect = canvas.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(rect.width * ratio));
    canvas.height = Math.max(1, Math.round(rect.height * ratio));
    const g = canvas.getContext("2d");
    g.fillStyle = "#000";
    g.fillRect(0, 0, canvas.width, canvas.height);
    // Keep millimetres square: the voxel grid scaled by its spacing, fitted to the canvas.
    const mmW = w * geo.spacing[h];
    const mmH = h2 * geo.spacing[v];
    const scale = Math.min(canvas.width / mmW, canvas.height / mmH);
    const dw = mmW * scale;
    const dh = mmH * scale;
    const dx = (canvas.width - dw) / 2;
    const dy = (canvas.height - dh) / 2;
    view.place = {dx, dy, dw, dh};
    g.imageSmoothingEnabled = true;
    g.drawImage(view.buffer, dx, dy, dw, dh);
    // Crosshair at the other two views' positions.
    const cx = dx + ((flipH ? w - 1 - pos[h] : pos[h]) + 0.5) * dw / w;
    const cy = dy + ((flipV ? h2 - 1 - pos[v] : pos[v]) + 0.5) * dh / h2;
    g.strokeStyle = "rgba(255, 255, 0, 0.45)";
    g.lineWidth = ratio;
    g.beginPath();
    g.moveTo(cx, dy); g.lineTo(cx, dy + dh);
    g.moveTo(dx, cy); g.lineTo(dx + dw, cy);
    g.stroke();
    g.fillStyle = "#ccc";
    g.font = `${12 * ratio}px sans-serif`;
    g.fillText(view.labels[0], dx + 4 * ratio, dy + dh / 2);
    g.fillText(view.labels[1], dx + dw - 12 * ratio, dy + dh / 2);
    g.fillText(view.labels[2], dx + dw / 2, dy + 14 * ratio);
    g.fillText(view.labels[3], dx + dw / 2, dy + dh - 4 * ratio);
    g.fillText(`${view.name} ${pos[view.fixed] + 1}/${dims[view.fixed]}`, 6 * ratio,
               14 * ratio);
  }
  function render() {
    for (const view of views) renderView(view);
  }

  // Navigation: click sets the crosshair, the wheel moves through a view's slices,
  // right-drag changes the window (horizontal: width, vertical: level).
  for (const view of views) {
    const canvas = view.canvas;
    const toVoxel = (event) => {
      const rect = canvas.getBoundingClientRect();
      const ratio = canvas.width / rect.width;
      const {dx, dy, dw, dh} = view.place;
      const x = Math.floor(((event.clientX - rect.left) * ratio - dx) / dw * view.w);
      const y = Math.floor(((event.clientY - rect.top) * ratio - dy) / dh * view.h2);
      if (x < 0 || y < 0 || x >= view.w || y >= view.h2) return null;
      return [view.flipH ? view.w - 1 - x : x, view.flipV ? view.h2 - 1 - y : y];
    };
    let drag = null;
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());
    canvas.addEventListener("mousedown", (event) => {
      if (event.button === 2) {
        drag = {x: event.clientX, y: event.clientY, w: windowWidth, l: windowLevel};
        return;
      }
      const voxel = toVoxel(event);
      if (voxel) {
        pos[view.h] = voxel[0];
        pos[view.v] = voxel[1];
        render();
        showSlice();
      }
    });
    window.addEventListener("mousemove", (event) => {
      if (!drag) return;
      setWindow(Math.max(1, drag.w + (event.clientX - drag.x) * 4),
                drag.l - (event.clientY - drag.y) * 2, true);
    });
    window.addEventListener("mouseup", () => { drag = null; });
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      const axis = view.fixed;
      pos[axis] = Math.min(dims[axis] - 1, Math.max(0, pos[axis] + (event.deltaY > 0 ? -1 : 1)));
      render();
      showSlice();
    }, {passive: false});
  }

  // ROI outline: the server sends the ROI's surface voxels (6-neighbourhood), bit-packed;
  // cut by any view's plane they draw the outline. Kept as voxel indices per slice. A live
  // stream may send its previews before its ROI (info.roi_known false): no outline then, and
  // it is fetched (with the slices that hold ROI) once a state event says the ROI is known.
  const outline = Array.from({length: nz}, () => []);
  let roiLoaded = false;
  async function loadRoi() {
    if (!info.roi_known) {
      const fresh = await (await fetch(api("study"), {cache: "no-store"})).json();
      if (!fresh.roi_known) return;
      info.roi_known = true;
      info.roi_voxels = fresh.roi_voxels;
      info.roi_slices = fresh.roi_slices;
    }
    const outlineBits = new Uint8Array(
      await (await fetch(api("roi"), {cache: "no-store"})).arrayBuffer());
    for (let byte = 0; byte < outlineBits.length; byte++) {
      const bits = outlineBits[byte];
      if (!bits) continue;
      for (let bit = 0; bit < 8; bit++) {
        if (bits & (128 >> bit)) {
          const v = byte * 8 + bit;
          outline[Math.floor(v / plane)].push(v);
        }
      }
    }
    roiLoaded = true;
    metrics.overlayReadyMs = performance.now();
  }
  if (info.roi_known) await loadRoi();
  const border = Math.max(2, Math.round(Math.min(nx, ny) / 64));
  let painted = "";

  function paintStates(states) {
    // Per slice whose state changed: a frame of `border` voxels in its state's colour, a hatch
    // of 8-voxel squares over a slice not received yet, the ROI outline on top.
    for (let z = 0; z < nz; z++) {
      if (painted[z] === states[z]) continue;
      const s = +states[z];
      const label = s + 1;
      const base = z * plane;
      for (let y = 0; y < ny; y++) {
        const row = base + y * nx;
        const edgeRow = y < border || y >= ny - border;
        for (let x = 0; x < nx; x++) {
          let value = 0;
          if (edgeRow || x < border || x >= nx - border) value = label;
          else if (s === 0 && (((x >> 3) + (y >> 3)) & 1)) value = 1;
          labels[row + x] = value;
        }
      }
      for (const v of outline[z]) labels[v] = ROI_LABEL;
    }
    painted = states;
  }

  // Slice ruler: one cell per stream slice in its state's colour, the current one boxed.
  const ruler = $("ruler");
  const roiSlices = info.roi_slices.flatMap((hasRoi, z) => (hasRoi ? [z] : []));
  if (roiSlices.length) pos[2] = roiSlices[Math.floor(roiSlices.length / 2)];
  let lastStates = "0".repeat(nz);
  // Slice k drawn from the bottom up when k runs towards the head.
  const superiorUp = !(axS === 2 && sS < 0);
  function drawRuler() {
    const rect = ruler.getBoundingClientRect();
    ruler.width = Math.max(20, Math.round(rect.width));
    ruler.height = Math.max(50, Math.round(rect.height));
    const g = ruler.getContext("2d");
    g.fillStyle = "#111";
    g.fillRect(0, 0, ruler.width, ruler.height);
    const cell = ruler.height / nz;
    const top = (z) => (superiorUp ? ruler.height - (z + 1) * cell : z * cell);
    for (let z = 0; z < nz; z++) {
      const [r, gr, b] = STATE_COLORS[+lastStates[z]];
      g.fillStyle = `rgb(${r},${gr},${b})`;
      const gap = cell > 4 ? 1 : 0;
      g.fillRect(8, top(z) + gap, ruler.width - 16, Math.max(1, cell - gap));
      if (info.roi_slices[z]) {
        g.fillStyle = `rgb(${ROI_COLOR.join(",")})`;
        g.fillRect(ruler.width - 6, top(z), 4, Math.max(1, cell));
      }
    }
    g.strokeStyle = "#ff0";
    g.lineWidth = 2;
    g.strokeRect(3, top(pos[2]), ruler.width - 6, Math.max(2, cell));
  }
  function goToSlice(z) {
    pos[2] = Math.min(nz - 1, Math.max(0, z));
    render();
    showSlice();
  }
  function showSlice() {
    const z = pos[2];
    $("slice").value = z;
    $("slice-text").textContent = `${z + 1} / ${nz}`;
    $("slice-state").textContent = `Slice ${z + 1}: ${info.state_names[+lastStates[z]]}` +
      (info.roi_slices[z] ? " (has ROI)" : "");
    drawRuler();
  }
  ruler.addEventListener("click", (event) => {
    const rect = ruler.getBoundingClientRect();
    const fraction = (event.clientY - rect.top) / rect.height;
    goToSlice(superiorUp ? Math.floor((1 - fraction) * nz) : Math.floor(fraction * nz));
  });
  $("slice").max = nz - 1;
  $("slice").addEventListener("input", () => goToSlice(+$("slice").value));
  window.addEventListener("resize", () => { render(); drawRuler(); });

  // Window/level: presets and a free window.
  function setWindow(w, l, free = false) {
    windowWidth = w;
    windowLevel = l;
    $("ww").value = Math.round(w);
    $("wl").value = Math.round(l);
    if (free) {
      document.querySelectorAll("[data-window]").forEach((b) => b.classList.remove("selected"));
    }
    buildLut();
    render();
  }
  for (const button of document.querySelectorAll("[data-window]")) {
    button.addEventListener("click", () => {
      document.querySelectorAll("[data-window]").forEach((b) => b.classList.remove("selected"));
      button.classList.add("selected");
      setWindow(...WINDOWS[button.dataset.window]);
    });
  }
  for (const id of ["ww", "wl"]) {
    $(id).addEventListener("change", () => setWindow(Math.max(1, +$("ww").value),
                                                     +$("wl").value, true));
  }

  // Live updates.
  const have = new Uint32Array(nz);     // version of each slice on screen
  let shownRevision = -1;
  let syncing = false;

  async function fetchSlices(list) {
    const response = await fetch(api("slices", `&z=${rangesOf(list)}`), {cache: "no-store"});
    if (!response.ok) throw new Error(`slices: HTTP ${response.status}`);
    const slices = response.headers.get("X-Slices").split(",").map(Number);
    const versions = response.headers.get("X-Versions").split(",").map(Number);
    const data = new Int16Array(await response.arrayBuffer());
    slices.forEach((z, index) => {
      img.set(data.subarray(index * plane, (index + 1) * plane), z * plane);
      have[z] = Math.max(have[z], versions[index]);
    });
    metrics.requests += 1;
    metrics.slicesFetched += slices.length;
  }

  function showProgress(s) {
    const fraction = s.planned ? s.applied / s.planned : 0;
    $("bar").style.width = `${(100 * fraction).toFixed(1)}%`;
    $("progress-text").textContent = `${s.applied}/${s.planned} chunks, ` +
      `${(s.bytes / 1e6).toFixed(2)} MB` + (s.complete ? " - all received" : "");
    const names = [["first_chunk", "first chunk"], ["roi_complete", "ROI complete (liver exact)"],
                   ["base_complete", "whole volume previewed"],
                   ["exact_complete", "exact layer complete"], ["complete", "all chunks"]];
    const list = $("milestones");
    list.replaceChildren();
    const created = s.times.created ? Date.parse(s.times.created) : null;
    for (const [key, text] of names) {
      if (!s.times[key]) continue;
      const item = document.createElement("li");
      const at = Date.parse(s.times[key]);
      item.textContent = `${text}` + (created ? ` +${((at - created) / 1000).toFixed(1)} s` : "");
      list.append(item);
    }
    if (s.verified === true) list.append(Object.assign(document.createElement("li"),
      {textContent: "SHA-256 verified: bit-exact"}));
    if (s.verified === false) list.append(Object.assign(document.createElement("li"),
      {textContent: "SHA-256 MISMATCH", className: "error"}));
    $("connection").textContent = s.connected ? "sender connected" : "no sender connected";
  }

  async function sync() {
    if (syncing) return;
    syncing = true;
    try {
      while (latest && latest.revision !== shownRevision) {
        const s = latest;
        if (s.roi_known && !roiLoaded) {
          await loadRoi();
          painted = "";  // every slice again, with the outline
        }
        const changed = [];
        const started = performance.now();
        for (let z = 0; z < nz; z++) if (s.versions[z] > have[z]) changed.push(z);
        for (let i = 0; i < changed.length; i += FETCH_BATCH) {
          await fetchSlices(changed.slice(i, i + FETCH_BATCH));
        }
        const fetched = performance.now();
        lastStates = s.states;
        paintStates(s.states);
        render();
        showProgress(s);
        showSlice();
        const drawn = performance.now();
        const shownAt = await nextFrame();
        // Where an update's time goes: fetching slices, painting and drawing, the frame.
        metrics.breakdown = (metrics.breakdown || []).slice(-49);
        metrics.breakdown.push({slices: changed.length, fetchMs: Math.round(fetched - started),
                                drawMs: Math.round(drawn - fetched),
                                frameMs: Math.round(shownAt - drawn)});
        const now = performance.timeOrigin + shownAt;
        // Seconds from the server's state (taken right after a batch was applied) to the
        // frame that shows it, for the last 200 updates.
        metrics.latencies = (metrics.latencies || []).slice(-199);
        metrics.latencies.push((now - 1000 * s.server_time) / 1000);
        if (metrics.firstImage === null && s.states.split("").some((c) => c !== "0")) {
          metrics.firstImage = now;
          metrics.firstChunkServer = s.times.first_chunk ? Date.parse(s.times.first_chunk) : null;
        }
        const roiDone = info.roi_slices.every((hasRoi, z) => !hasRoi || +s.states[z] >= 2);
        if (metrics.liverExactShown === null && s.roi_complete && roiDone) {
          metrics.liverExactShown = now;
          metrics.roiCompleteServer = s.times.roi_complete ? Date.parse(s.times.roi_complete) : null;
        }
        if (metrics.exactShown === null && s.states.split("").every((c) => c === "3")) {
          metrics.exactShown = now;
        }
        shownRevision = s.revision;
        metrics.lastRevisionShown = s.revision;
        metrics.lastStates = s.states;
        document.body.dataset.revision = String(s.revision);
        document.body.dataset.states = s.states;
      }
    } catch (error) {
      metrics.errors.push(String(error));
      setTimeout(sync, 1000);
    } finally {
      syncing = false;
    }
  }

  setWindow(...WINDOWS.liver);
  showSlice();
  ready = true;
  metrics.readyMs = performance.now();
  sync();
}

main().catch((error) => {
  metrics.errors.push(String(error));
  $("title").textContent = `viewer error: ${error}`;
});
