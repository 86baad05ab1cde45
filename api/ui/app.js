// elasticserve playground: chat with pictures against this server's
// /v1/chat/completions, and show what the KV cache did (kv_cache and
// kv_cache.explain). Plain JavaScript, no dependencies.
"use strict";

const KEY_STORE = "elasticserve.apiKey";
const STATE_NAMES = { k: "kept", m: "merged", e: "evicted by the prompt plan", d: "evicted while generating" };
const REGIONS = ["system", "image", "question", "template", "answer"];

const $ = (sel) => document.querySelector(sel);

const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  model: "",
  history: [], // messages as sent: {role, content}
  pictures: [], // pictures of the history, in prompt order: {url, w, h, name}
  pending: [], // pictures attached to the next message
  busy: false,
};

// el builds an element: el("div", {class: "x", text: "y"}, child, ...).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) e.append(c);
  }
  return e;
}

function setStatus(text, error) {
  const s = $("#status");
  s.textContent = text || "";
  s.classList.toggle("error", !!error);
}

// ---- the API ----

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, opts) {
  opts = Object.assign({}, opts);
  const headers = Object.assign({}, opts.headers);
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  opts.headers = headers;
  const resp = await fetch(path, opts);
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText;
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) msg = body.error.message;
    } catch (_) { /* not JSON */ }
    if (resp.status === 401) {
      askKey(state.key ? "The API key was refused: " + msg : "This server asks for an API key.");
    }
    throw new APIError(resp.status, msg);
  }
  return resp;
}

function askKey(reason) {
  $("#key-reason").textContent = reason;
  $("#key-form").hidden = false;
  $("#key-button").hidden = false;
  $("#api-key").focus();
}

async function loadModel() {
  try {
    const resp = await api("v1/models");
    const list = await resp.json();
    const m = list.data && list.data[0];
    if (!m) return;
    state.model = m.id;
    $("#model").textContent = m.id;
    const ec = m.elastic_cache;
    if (ec && ec.default) {
      $("#policy").value = ec.default.policy;
      $("#budget").value = ec.default.budget;
      $("#selection").value = ec.default.selection;
      updateBudget();
    }
    if (ec && ec.policies) {
      for (const p of ec.policies) {
        const opt = $("#policy").querySelector(`option[value="${p.policy}"]`);
        if (opt && !p.supported) {
          opt.disabled = true;
          opt.title = p.reason || "not supported by this model";
        }
      }
    }
    setStatus("ready");
  } catch (err) {
    setStatus(err.status === 401 ? "an API key is needed" : "cannot reach the server: " + err.message, true);
  }
}

// streamChat posts body as a stream and calls onText with each piece of the
// answer; it resolves to the end's {kv, usage, finish}.
async function streamChat(body, onText) {
  const resp = await api("v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  const out = { kv: null, usage: null, finish: null };
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue; // ": keep-alive" comments
        const data = line.slice(6);
        if (data === "[DONE]") return out;
        const msg = JSON.parse(data);
        if (msg.error) throw new APIError(0, msg.error.message);
        const ch = msg.choices && msg.choices[0];
        if (ch && ch.delta && ch.delta.content) onText(ch.delta.content);
        if (ch && ch.finish_reason) out.finish = ch.finish_reason;
        if (msg.kv_cache) out.kv = msg.kv_cache;
        if (msg.usage) out.usage = msg.usage;
      }
    }
  }
  return out;
}

// ---- pictures ----

function readPicture(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onerror = () => reject(r.error);
    r.onload = () => {
      const img = new Image();
      img.onload = () => resolve({ url: r.result, w: img.naturalWidth, h: img.naturalHeight, name: file.name || "pasted picture" });
      img.onerror = () => reject(new Error(file.name + " is not a picture this browser can read"));
      img.src = r.result;
    };
    r.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    try {
      state.pending.push(await readPicture(f));
    } catch (err) {
      setStatus(err.message, true);
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("#attachments");
  box.replaceChildren();
  state.pending.forEach((p, i) => {
    box.append(el("div", { class: "attachment" },
      el("img", { src: p.url, alt: p.name, title: `${p.name} (${p.w}×${p.h})` }),
      el("button", { type: "button", title: "remove", text: "×", onclick: () => { state.pending.splice(i, 1); renderAttachments(); } })));
  });
}

// ---- settings ----

function updateBudget() {
  $("#budget-value").textContent = Number($("#budget").value).toFixed(2);
  $("#budget").disabled = $("#policy").value === "full";
}

function chosenCache() {
  const policy = $("#policy").value;
  const c = { policy, explain: true };
  if (policy !== "full") {
    c.budget = Number($("#budget").value);
    c.selection = $("#selection").value;
  }
  return c;
}

function cacheLabel(c) {
  if (c.policy === "full") return "full";
  return `${c.policy} ${c.budget.toFixed(2)} (${c.selection})`;
}

// ---- sending a turn ----

async function send() {
  if (state.busy) return;
  const text = $("#prompt").value.trim();
  if (!text && state.pending.length === 0) return;
  if (!state.model) await loadModel();
  const pics = state.pending.slice();
  let content = text;
  if (pics.length) {
    content = pics.map((p) => ({ type: "image_url", image_url: { url: p.url } }));
    if (text) content.push({ type: "text", text });
  }
  const userMsg = { role: "user", content };
  const messages = state.history.concat([userMsg]);
  const pictures = state.pictures.concat(pics);

  $("#intro") && $("#intro").remove();
  $("#chat").append(el("div", { class: "msg user" },
    pics.length ? el("div", { class: "thumbs" }, ...pics.map((p) => el("img", { src: p.url, alt: p.name }))) : null,
    text ? el("div", { class: "bubble", text }) : null));

  const chosen = chosenCache();
  const runs = [];
  if ($("#compare").checked && chosen.policy !== "full") runs.push({ policy: "full", explain: true });
  runs.push(chosen);
  const answers = el("div", { class: "answers" + (runs.length > 1 ? " compare" : "") });
  $("#chat").append(el("div", { class: "msg assistant" }, answers));

  state.busy = true;
  $("#send").disabled = true;
  $("#prompt").value = "";
  state.pending = [];
  renderAttachments();
  setStatus("answering…");
  const maxTokens = Math.max(1, Number($("#max-tokens").value) || 64);
  const results = await Promise.all(runs.map((cache) => runOne(answers, cache, messages, pictures, maxTokens)));
  const primary = results[results.length - 1];
  state.history = messages.concat([{ role: "assistant", content: primary }]);
  state.pictures = pictures;
  state.busy = false;
  $("#send").disabled = false;
  setStatus("ready");
  answers.scrollIntoView({ block: "nearest" });
}

// runOne streams one answer under cache into a new column of answers; it
// resolves to the answer's text.
async function runOne(answers, cache, messages, pictures, maxTokens) {
  const textEl = el("div", { class: "text" });
  const box = el("div", { class: "answer busy", "data-policy": cache.policy },
    el("h3", { text: cacheLabel(cache) }), textEl);
  answers.append(box);
  let text = "";
  try {
    const end = await streamChat({
      model: state.model || undefined,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: maxTokens,
      temperature: 0,
      elastic_cache: cache,
    }, (piece) => {
      text += piece;
      textEl.textContent = text;
    });
    if (end.finish === "length") box.append(el("div", { class: "note", text: `(stopped at ${maxTokens} tokens)` }));
    if (end.kv) box.append(renderKV(end.kv, end.usage, pictures));
  } catch (err) {
    box.append(el("div", { class: "error", text: err.message }));
    setStatus(err.message, true);
  }
  box.classList.remove("busy");
  box.classList.add("done");
  return text;
}

// ---- the kv_cache report ----

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB"];
  let u = -1;
  do {
    n /= 1024;
    u++;
  } while (n >= 1024 && u < units.length - 1);
  return n.toFixed(n < 10 ? 1 : 0) + " " + units[u];
}

function fmtMs(ms) {
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(ms < 10 ? 1 : 0) + " ms";
}

function pct(a, b) {
  return b > 0 ? Math.round((100 * a) / b) : 0;
}

function bar(name, segs, total, title) {
  const b = el("div", { class: "bar", title });
  for (const [cls, v, label] of segs) {
    if (v <= 0 || total <= 0) continue;
    const s = el("span", { class: "seg-" + cls, title: label });
    s.style.width = Math.min(100, (100 * v) / total) + "%";
    b.append(s);
  }
  return el("div", { class: "bar-row" }, el("span", { class: "name", text: name }), b);
}

function renderKV(kv, usage, pictures) {
  const n = kv.prompt_entries;
  const gen = usage ? usage.completion_tokens : 0;
  const words = [];
  if (kv.policy === "full" || kv.kept + kv.merged + kv.evicted === 0) {
    words.push(`Policy ${kv.policy}: every one of the ${n} prompt entries stays in the cache.`);
  } else {
    words.push(`Policy ${kv.policy} at budget ${kv.budget}${kv.selection ? " (" + kv.selection + ")" : ""} kept ${kv.kept} of ${n} prompt entries per layer (${pct(kv.kept, n)}%): ` +
      `${kv.merged} merged into kept ones, ${kv.evicted} evicted.`);
  }
  words.push(`Cells: peak ${kv.peak_cells}, final ${kv.final_cells} (full would hold ${n + gen}); ${fmtBytes(kv.bytes_saved)} of KV not held.`);
  words.push(`Prompt ${fmtMs(kv.prefill_ms)}, compression ${fmtMs(kv.compress_ms)}, generation ${fmtMs(kv.decode_ms)}.`);
  if (kv.reused) words.push(`${kv.reused} prompt entries came from a held conversation.`);
  const t = kv.prefill_ms + kv.compress_ms + kv.decode_ms;
  const box = el("div", { class: "kv" },
    el("p", { class: "kv-words", text: words.join(" ") }),
    bar("prompt entries", [["kept", kv.kept || n, "kept"], ["merged", kv.merged, "merged"], ["evicted", kv.evicted, "evicted"]], n,
      `kept ${kv.kept || n}, merged ${kv.merged}, evicted ${kv.evicted} of ${n}`),
    bar("cells", [["final", kv.final_cells, "final"], ["peak", kv.peak_cells - kv.final_cells, "peak"]], n + gen,
      `final ${kv.final_cells}, peak ${kv.peak_cells}, of ${n + gen} without compression`),
    bar("time", [["prefill", kv.prefill_ms, "prompt"], ["compress", kv.compress_ms, "compression"], ["decode", kv.decode_ms, "generation"]], t,
      `prompt ${fmtMs(kv.prefill_ms)}, compression ${fmtMs(kv.compress_ms)}, generation ${fmtMs(kv.decode_ms)}`));
  if (kv.explain) box.append(renderExplain(kv.explain, pictures));
  return box;
}

// ---- kv_cache.explain: the picture with its patch grid ----

function renderExplain(x, pictures) {
  const nl = x.layers.length;
  const details = el("details", { class: "explain" },
    el("summary", { text: x.images.length ? "What the cache did to the picture" : "What the cache did, per layer" }));
  const body = el("div", { class: "explain-body" });
  details.append(body);
  let built = false;
  details.addEventListener("toggle", () => {
    if (details.open && !built) {
      built = true;
      buildExplain(body, x, pictures, nl);
    }
  });
  return details;
}

function buildExplain(body, x, pictures, nl) {
  const slider = el("input", { type: "range", class: "layer", min: 0, max: Math.max(0, nl - 1), value: 0, step: 1, "aria-label": "layer" });
  const all = el("input", { type: "checkbox", class: "all-layers" });
  const label = el("span", { class: "layer-label" });
  const table = el("table", { class: "regions" });
  const info = el("div", { class: "hover-info" });
  body.append(
    el("div", { class: "layer-controls" }, el("span", { text: "Layer" }), slider, label, el("label", {}, all, " all layers")),
    el("div", { class: "legend" },
      el("span", {}, el("i", { class: "k" }), "kept"), el("span", {}, el("i", { class: "m" }), "merged into an anchor"),
      el("span", {}, el("i", { class: "e" }), "evicted"), el("span", {}, el("i", { class: "d" }), "evicted while generating")),
    table);

  // One grid cell per image entry, tile by tile.
  const views = x.images.map((im, i) => {
    const pic = pictures[i];
    const cells = new Array(im.entries);
    const where = new Array(im.entries); // entry -> {tile, r, c}
    const fig = el("div", { class: "picture" }, el("h4", { text: pictureTitle(im, i, pic) }));
    const tiles = el("div", { class: "tiles" });
    im.tiles.forEach((t, k) => {
      const tile = el("div", { class: "tile" });
      const boxEl = el("div", { class: "tile-box" + (im.tiles.length > 1 ? " small" : "") });
      const grid = el("div", { class: "grid" });
      if (t.rows && t.cols) {
        placePicture(boxEl, pic, t);
        grid.style.gridTemplateColumns = `repeat(${t.cols}, 1fr)`;
        grid.style.gridTemplateRows = `repeat(${t.rows}, 1fr)`;
        boxEl.append(grid);
      } else {
        // A resampler's queries have no place on the picture: a block of cells.
        grid.classList.add("queries");
        const side = Math.ceil(Math.sqrt(t.entries));
        grid.style.gridTemplateColumns = `repeat(${side}, 1fr)`;
        boxEl.classList.add("queries-box");
        boxEl.append(grid);
      }
      for (let j = 0; j < t.entries; j++) {
        const idx = t.offset + j;
        const cell = el("div", { class: "cell", "data-entry": idx });
        cells[idx] = cell;
        where[idx] = t.rows ? { tile: k, r: Math.floor(j / t.cols) + 1, c: (j % t.cols) + 1 } : { tile: k, q: j + 1 };
        grid.append(cell);
      }
      tile.append(boxEl, el("span", { text: tileCaption(im, t, k) }));
      tiles.append(tile);
    });
    fig.append(tiles);
    body.append(fig);
    return { im, cells, where, fig };
  });
  body.append(info);

  const describe = (v, idx) => {
    const w = v.where[idx];
    const tileName = v.im.tiles.length > 1 ? ` of tile ${w.tile + 1}` : "";
    return w.q ? `query ${w.q}${tileName}` : `patch row ${w.r}, column ${w.c}${tileName}`;
  };
  const anchorText = (a) => {
    for (let i = 0; i < views.length; i++) {
      for (const t of views[i].im.tiles) {
        if (a >= t.start && a < t.start + t.entries) {
          const idx = t.offset + (a - t.start);
          return { text: describe(views[i], idx) + (views.length > 1 ? ` of picture ${i + 1}` : ""), view: i, idx };
        }
      }
    }
    const sp = (x.spans || []).find((s) => a >= s.start && a < s.start + s.entries);
    if (sp) {
      const txt = sp.text.length > 40 ? sp.text.slice(0, 40) + "…" : sp.text;
      return { text: `the ${sp.region} text "${txt}" (prompt entry ${a})` };
    }
    return { text: `prompt entry ${a}` };
  };

  let highlighted = null;
  const unhighlight = () => {
    if (highlighted) highlighted.classList.remove("anchor-hl");
    highlighted = null;
  };

  const paint = () => {
    const layer = Number(slider.value);
    const allOn = all.checked;
    slider.disabled = allOn;
    label.textContent = allOn ? `all ${nl} layers` : `${layer + 1} of ${nl} (model layer ${x.layers[layer].layer})`;
    table.replaceChildren(regionTable(x, allOn ? -1 : layer));
    for (const v of views) {
      const { im, cells } = v;
      for (let idx = 0; idx < im.entries; idx++) {
        const cell = cells[idx];
        cell.className = "cell";
        cell.style.removeProperty("--keep");
        if (allOn) {
          let kept = 0;
          for (let l = 0; l < nl; l++) if (im.states[l][idx] === "k") kept++;
          cell.classList.add("s-all");
          if (kept === 0) cell.classList.add("never");
          cell.style.setProperty("--keep", String(kept / Math.max(1, nl)));
          cell.title = `${describe(v, idx)}: kept in ${kept} of ${nl} layers`;
        } else {
          const s = im.states[layer][idx];
          cell.classList.add("s-" + s);
          let t = `${describe(v, idx)}: ${STATE_NAMES[s] || s}`;
          const a = im.anchors[layer][idx];
          if (s === "m" && a >= 0) t += ` into ${anchorText(a).text}`;
          cell.title = t;
        }
      }
    }
    info.textContent = "";
    unhighlight();
  };

  body.addEventListener("mouseover", (ev) => {
    const cell = ev.target.closest && ev.target.closest(".cell");
    if (!cell) return;
    unhighlight();
    info.textContent = cell.title;
    if (all.checked) return;
    const v = views.find((vv) => vv.fig.contains(cell));
    const idx = Number(cell.dataset.entry);
    const a = v.im.anchors[Number(slider.value)][idx];
    if (a >= 0) {
      const at = anchorText(a);
      if (at.view !== undefined) {
        highlighted = views[at.view].cells[at.idx];
        highlighted.classList.add("anchor-hl");
      }
    }
  });
  body.addEventListener("mouseleave", unhighlight);
  slider.addEventListener("input", paint);
  all.addEventListener("change", paint);
  paint();
}

function pictureTitle(im, i, pic) {
  const name = pic ? pic.name : `picture ${i + 1}`;
  let grid;
  if (im.rows && im.cols) grid = `${im.rows}×${im.cols} patches`;
  else if (im.queries) grid = `${im.queries} queries (no grid)`;
  else grid = `${im.tiles.length} tiles`;
  return `${name}: ${im.entries} cache entries, ${grid}`;
}

function tileCaption(im, t, k) {
  if (im.tiles.length === 1) return "";
  let where = t.overview ? "overview" : t.row ? `row ${t.row}, column ${t.col}` : `tile ${k + 1}`;
  const grid = t.rows ? `${t.rows}×${t.cols}` : `${t.queries} queries`;
  return `${where} · ${grid}${t.label ? " · " + t.label : ""}`;
}

// placePicture shows the part of the picture a tile covers behind its grid:
// the whole picture, or its place in the tile layout.
function placePicture(box, pic, t) {
  let aspect = t.cols / t.rows;
  if (pic && pic.w && pic.h) {
    aspect = pic.w / pic.h;
    if (t.row && t.tile_rows && t.tile_cols) aspect = (pic.w / t.tile_cols) / (pic.h / t.tile_rows);
  }
  box.style.aspectRatio = String(aspect);
  if (!pic) return;
  box.style.backgroundImage = `url("${pic.url}")`;
  if (t.row && t.tile_rows && t.tile_cols) {
    box.style.backgroundSize = `${t.tile_cols * 100}% ${t.tile_rows * 100}%`;
    const px = t.tile_cols > 1 ? ((t.col - 1) / (t.tile_cols - 1)) * 100 : 0;
    const py = t.tile_rows > 1 ? ((t.row - 1) / (t.tile_rows - 1)) * 100 : 0;
    box.style.backgroundPosition = `${px}% ${py}%`;
  } else {
    box.style.backgroundSize = "100% 100%";
  }
}

function regionTable(x, layer) {
  const frag = document.createDocumentFragment();
  frag.append(el("tr", {}, ...["region", "entries", "kept", "merged", "evicted", "evicted while generating", "held at the end"].map((h) => el("th", { text: h }))));
  for (const r of REGIONS) {
    const sum = { entries: 0, kept: 0, merged: 0, evicted: 0, decode_evicted: 0, held: 0 };
    const layers = layer < 0 ? x.layers : [x.layers[layer]];
    for (const l of layers) for (const k of Object.keys(sum)) sum[k] += l[r][k];
    if (layer < 0) for (const k of Object.keys(sum)) sum[k] = Math.round((10 * sum[k]) / layers.length) / 10;
    if (sum.entries === 0) continue;
    const dash = (v) => (r === "answer" && v === 0 ? "–" : String(v));
    frag.append(el("tr", {}, el("td", { text: r }), el("td", { text: String(sum.entries) }), el("td", { text: dash(sum.kept) }),
      el("td", { text: dash(sum.merged) }), el("td", { text: dash(sum.evicted) }), el("td", { text: String(sum.decode_evicted) }),
      el("td", { text: String(sum.held) })));
  }
  return frag;
}

// ---- wiring ----

function newChat() {
  state.history = [];
  state.pictures = [];
  $("#chat").replaceChildren();
  setStatus("new chat");
}

function init() {
  $("#composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  $("#file").addEventListener("change", (ev) => {
    addFiles(Array.from(ev.target.files));
    ev.target.value = "";
  });
  document.addEventListener("paste", (ev) => {
    const files = Array.from(ev.clipboardData ? ev.clipboardData.files : []);
    if (files.some((f) => f.type.startsWith("image/"))) {
      ev.preventDefault();
      addFiles(files);
    }
  });
  let depth = 0;
  const overlay = $("#drop-overlay");
  document.addEventListener("dragenter", (ev) => {
    if (!ev.dataTransfer || !Array.from(ev.dataTransfer.types).includes("Files")) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  document.addEventListener("dragover", (ev) => ev.preventDefault());
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    depth = 0;
    overlay.hidden = true;
    if (ev.dataTransfer) addFiles(Array.from(ev.dataTransfer.files));
  });
  $("#policy").addEventListener("change", updateBudget);
  $("#budget").addEventListener("input", updateBudget);
  $("#new-chat").addEventListener("click", newChat);
  $("#key-button").addEventListener("click", () => askKey("API key for this server:"));
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("#api-key").value.trim();
    if (state.key) localStorage.setItem(KEY_STORE, state.key);
    else localStorage.removeItem(KEY_STORE);
    $("#key-form").hidden = true;
    loadModel();
  });
  updateBudget();
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
