"use strict";
// The live viewer of one study (docs/VIEWER.md). NiiVue draws the volume (axial, coronal,
// sagittal) and an overlay of labels: the per-slice state as a frame around each slice (and a
// hatch over slices not received yet), the ROI outline. The server pushes a "state" event (per-slice
// state and version) whenever data arrives; the page fetches only the slices whose version moved.

const STATE_COLORS = [[90, 90, 120], [240, 160, 40], [60, 200, 90], [70, 140, 255]];
const ROI_COLOR = [255, 40, 40];
const ROI_LABEL = 5;           // overlay label of the ROI outline; 1..4 are the states + 1
const WINDOWS = {liver: [150, 90], abdomen: [400, 40], bone: [2000, 500]};  // [width, level] HU
const FETCH_BATCH = 32;        // slices per request (the server takes at most 64)

const metrics = {firstImage: null, liverExactShown: null, exactShown: null, events: 0,
                 slicesFetched: 0, requests: 0, lastRevisionShown: -1, errors: []};
window.dladViewer = {metrics};

const $ = (id) => document.getElementById(id);
const study = new URLSearchParams(location.search).get("study");
const api = (path, extra = "") =>
  `/viewer/api/${path}?study=${encodeURIComponent(study)}${extra}`;

function niftiBuffer(header, voxels, datatype, bitpix, fill) {
  // The server's 352-byte NIfTI-1 header (int16, the study's affine) and blank voxels; the
  // overlay patches datatype/bitpix (offsets 70 and 72) to uint8.
  const bytes = bitpix / 8;
  const buffer = new ArrayBuffer(352 + voxels * bytes);
  new Uint8Array(buffer, 0, 352).set(header);
  const view = new DataView(buffer);
  view.setInt16(70, datatype, true);
  view.setInt16(72, bitpix, true);
  if (bitpix === 16) new Int16Array(buffer, 352).fill(fill);
  return buffer;
}

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

function blankHeader(n) {
  // A NIfTI-1 header of an n x n x n volume, 1 mm, identity sform: only to warm NiiVue up.
  const header = new Uint8Array(352);
  const view = new DataView(header.buffer);
  view.setInt32(0, 348, true);
  [3, n, n, n, 1, 1, 1, 1].forEach((d, i) => view.setInt16(40 + 2 * i, d, true));
  [1, 1, 1, 1].forEach((p, i) => view.setFloat32(76 + 4 * i, p, true));
  view.setFloat32(108, 352, true);
  view.setFloat32(112, 1, true);
  view.setInt16(254, 1, true);
  [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]].forEach((row, r) =>
    row.forEach((v, c) => view.setFloat32(280 + 16 * r + 4 * c, v, true)));
  header.set([110, 43, 49, 0], 344);
  return header;
}

async function warmUp(nv) {
  // The first volume and label overlay cost NiiVue its shader compilations and texture set-up
  // (seconds with a software GPU): pay them while the study has not arrived yet.
  const header = blankHeader(8);
  const ct = await niivue.NVImage.new(niftiBuffer(header, 512, 4, 16, 0), "warm.nii", "gray",
                                      1, null, 0, 1, true);
  const overlay = await niivue.NVImage.new(niftiBuffer(header, 512, 2, 8, 0), "warm-state.nii",
                                           "gray", 0.85, null, 0, ROI_LABEL, true);
  overlay.setColormapLabel(labelColormap(STATE_NAMES_FALLBACK));
  nv.addVolume(ct);
  nv.addVolume(overlay);
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.drawScene();
  await nextFrame();
  nv.removeVolume(overlay);
  nv.removeVolume(ct);
}

async function studyInfo(nv) {
  // The page may be opened before the study's header has arrived: wait for it.
  let warm = false;
  for (;;) {
    const response = await fetch(api("study"), {cache: "no-store"});
    if (response.status === 401) { location.href = "/viewer/"; return null; }
    if (response.ok) return response.json();
    $("title").textContent = "waiting for the study to arrive...";
    if (!warm) {
      await warmUp(nv);
      warm = true;
      metrics.warmedUpMs = performance.now();
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

const STATE_NAMES_FALLBACK = ["not yet", "preview", "liver exact", "exact"];

function labelColormap(stateNames) {
  return {
    R: [0, ...STATE_COLORS.map((c) => c[0]), ROI_COLOR[0]],
    G: [0, ...STATE_COLORS.map((c) => c[1]), ROI_COLOR[1]],
    B: [0, ...STATE_COLORS.map((c) => c[2]), ROI_COLOR[2]],
    A: [0, 255, 255, 255, 255, 255],
    I: [0, 1, 2, 3, 4, ROI_LABEL],
    labels: ["", ...stateNames, "ROI"],
  };
}

async function main() {
  // NiiVue first (WebGL set-up is the slow part of opening the page), then the study.
  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1], show3Dcrosshair: false, isColorbar: false,
    crosshairColor: [1, 1, 0, 0.45], crosshairWidth: 1, isRadiologicalConvention: true,
    multiplanarShowRender: niivue.SHOW_RENDER ? niivue.SHOW_RENDER.NEVER : 0,
    multiplanarLayout: niivue.MULTIPLANAR_TYPE ? niivue.MULTIPLANAR_TYPE.GRID : 2,
    isNearestInterpolation: false, logLevel: "error",
  });
  await nv.attachTo("gl");
  metrics.niivueReadyMs = performance.now();
  const info = await studyInfo(nv);
  if (info === null) return;
  metrics.infoMs = performance.now();
  // Events start now; they are applied once the volumes exist (sync() waits for `ready`).
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
  $("title").textContent = `${info.study_id}${info.description ? " - " + info.description : ""}` +
    ` (${nx} x ${ny} x ${nz})`;
  const header = Uint8Array.from(atob(info.nifti_header), (c) => c.charCodeAt(0));

  const [width, level] = WINDOWS.liver;
  const ct = await niivue.NVImage.new(niftiBuffer(header, nz * plane, 4, 16, info.fill),
                                     "study.nii", "gray", 1, null, level - width / 2,
                                     level + width / 2, true);
  nv.addVolume(ct);
  const overlay = await niivue.NVImage.new(niftiBuffer(header, nz * plane, 2, 8, 0), "state.nii",
                                          "gray", 0.85, null, 0, ROI_LABEL, true);
  overlay.setColormapLabel(labelColormap(info.state_names));
  nv.addVolume(overlay);
  metrics.volumesMs = performance.now();
  nv.setSliceType(nv.sliceTypeMultiplanar);
  const img = ct.img;
  const labels = overlay.img;

  // ROI outline: the server sends the ROI's surface voxels (6-neighbourhood), bit-packed;
  // cut by any view's plane they draw the outline. Kept as voxel indices per slice.
  const outlineBits = new Uint8Array(
    await (await fetch(api("roi"), {cache: "no-store"})).arrayBuffer());
  const outline = Array.from({length: nz}, () => []);
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
  metrics.overlayReadyMs = performance.now();
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

  // Slice ruler: one cell per slice in its state's colour, the current axial slice marked.
  const ruler = $("ruler");
  // Start in the middle of the liver (the ROI's slices), where the expert looks first.
  const roiSlices = info.roi_slices.flatMap((hasRoi, z) => (hasRoi ? [z] : []));
  let currentSlice = roiSlices.length ? roiSlices[Math.floor(roiSlices.length / 2)] :
    Math.floor(nz / 2);
  let lastStates = "0".repeat(nz);
  const superiorUp = true;  // slice k drawn from the bottom (k = 0) up
  function drawRuler() {
    const rect = ruler.getBoundingClientRect();
    ruler.width = Math.max(20, Math.round(rect.width));
    ruler.height = Math.max(50, Math.round(rect.height));
    const g = ruler.getContext("2d");
    g.fillStyle = "#111";
    g.fillRect(0, 0, ruler.width, ruler.height);
    const cell = ruler.height / nz;
    for (let z = 0; z < nz; z++) {
      const [r, gr, b] = STATE_COLORS[+lastStates[z]];
      g.fillStyle = `rgb(${r},${gr},${b})`;
      const top = superiorUp ? ruler.height - (z + 1) * cell : z * cell;
      g.fillRect(8, top + (cell > 4 ? 1 : 0), ruler.width - 16, Math.max(1, cell - (cell > 4 ? 1 : 0)));
      if (info.roi_slices[z]) {
        g.fillStyle = `rgb(${ROI_COLOR.join(",")})`;
        g.fillRect(ruler.width - 6, top, 4, Math.max(1, cell));
      }
    }
    const top = superiorUp ? ruler.height - (currentSlice + 1) * cell : currentSlice * cell;
    g.strokeStyle = "#ff0";
    g.lineWidth = 2;
    g.strokeRect(3, top, ruler.width - 6, Math.max(2, cell));
  }
  function goToSlice(z) {
    currentSlice = Math.min(nz - 1, Math.max(0, z));
    const frac = nv.vox2frac([Math.floor(nx / 2), Math.floor(ny / 2), currentSlice]);
    const pos = nv.scene.crosshairPos;
    nv.scene.crosshairPos = [pos[0], pos[1], frac[2]];
    nv.drawScene();
    showSlice();
  }
  function showSlice() {
    $("slice").value = currentSlice;
    $("slice-text").textContent = `${currentSlice + 1} / ${nz}`;
    $("slice-state").textContent =
      `Slice ${currentSlice + 1}: ${info.state_names[+lastStates[currentSlice]]}` +
      (info.roi_slices[currentSlice] ? " (has ROI)" : "");
    drawRuler();
  }
  ruler.addEventListener("click", (event) => {
    const rect = ruler.getBoundingClientRect();
    const fraction = (event.clientY - rect.top) / rect.height;
    goToSlice(superiorUp ? Math.floor((1 - fraction) * nz) : Math.floor(fraction * nz));
  });
  $("slice").max = nz - 1;
  $("slice").addEventListener("input", () => goToSlice(+$("slice").value));
  nv.onLocationChange = (data) => {
    if (data && data.vox && data.vox[2] !== currentSlice) {
      currentSlice = data.vox[2];
      showSlice();
    }
  };
  window.addEventListener("resize", drawRuler);

  // Window/level: presets and a free window.
  function setWindow(w, l) {
    ct.cal_min = l - w / 2;
    ct.cal_max = l + w / 2;
    $("ww").value = Math.round(w);
    $("wl").value = Math.round(l);
    nv.updateGLVolume();
  }
  for (const button of document.querySelectorAll("[data-window]")) {
    button.addEventListener("click", () => {
      document.querySelectorAll("[data-window]").forEach((b) => b.classList.remove("selected"));
      button.classList.add("selected");
      setWindow(...WINDOWS[button.dataset.window]);
    });
  }
  for (const id of ["ww", "wl"]) {
    $(id).addEventListener("change", () => {
      document.querySelectorAll("[data-window]").forEach((b) => b.classList.remove("selected"));
      setWindow(Math.max(1, +$("ww").value), +$("wl").value);
    });
  }
  setWindow(width, level);

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
        const changed = [];
        const started = performance.now();
        for (let z = 0; z < nz; z++) if (s.versions[z] > have[z]) changed.push(z);
        for (let i = 0; i < changed.length; i += FETCH_BATCH) {
          await fetchSlices(changed.slice(i, i + FETCH_BATCH));
        }
        const fetched = performance.now();
        lastStates = s.states;
        paintStates(s.states);
        nv.updateGLVolume();
        showProgress(s);
        showSlice();
        const drawn = performance.now();
        const shownAt = await nextFrame();
        // Where an update's time goes: fetching slices, painting + NiiVue's upload, the frame.
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

  goToSlice(currentSlice);
  ready = true;
  sync();
}

main().catch((error) => {
  metrics.errors.push(String(error));
  $("title").textContent = `viewer error: ${error}`;
});
