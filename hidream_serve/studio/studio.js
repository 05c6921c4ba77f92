// hidream-serve studio: a plain page over the public API (no build step, nothing loaded from elsewhere).
// 1. the server's vocabulary (/v1/models) and optional features (/openapi.json: presets, sweeps)
// 2. the request form: refs with roles, settings, copy as curl / JSON, the server's field errors
// 3. a job: POST /v1/jobs or /v1/sweeps, then its SSE stream (previews, candidates, scores), then its result
// 4. the job list
"use strict";

const $ = (sel) => document.querySelector(sel);
const TERMINAL = ["succeeded", "failed", "cancelled"];
const EVENT_KINDS = ["queued", "started", "progress", "preview", "candidate", "cell", "scored", ...TERMINAL];
const state = { models: null, presets: [], features: { presets: false, sweeps: false }, refs: [], job: null,
                source: null, nextCursor: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmtScore(v) { return v === null || v === undefined ? "—" : Number(v).toFixed(3); }
function fmtTime(t) { return t ? new Date(t * 1000).toLocaleString() : ""; }

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const r = await fetch(path.replace(/^\//, ""), init);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  return { ok: r.ok, status: r.status, data };
}

// -- 1. the server ----------------------------------------------------------------------------------
async function loadServer() {
  const [models, spec] = await Promise.all([api("GET", "v1/models"), api("GET", "openapi.json")]);
  if (!models.ok) { $("#server-info").textContent = `server answered ${models.status} to /v1/models`; return; }
  const m = state.models = models.data;
  $("#server-info").textContent = `${m.checkpoint || ""} · scorer ${m.scorer || "none"} · max n ${m.limits.max_n}`;
  fillSelect($("#mode"), m.modes, m.modes[0]);
  fillSelect($("#recipe"), Object.keys(m.recipes || {}));
  fillSelect($("#scheduler"), m.schedulers || []);
  const d = m.defaults || {};
  $("#n").title = `1 to ${m.limits.max_n}`;
  $("#steps").placeholder = d.steps ? String(d.steps) : "recipe's";
  $("#width").placeholder = String(d.width || "");
  $("#height").placeholder = String(d.height || "");
  $("#exact_size").checked = !!d.exact_size;
  // optional endpoints: asked for only when the schema has them, so a server without them logs no 404
  const paths = (spec.ok && spec.data && spec.data.paths) || {};
  state.features.presets = "/v1/presets" in paths;
  state.features.sweeps = "/v1/sweeps" in paths;
  $("#run-sweep").disabled = !state.features.sweeps;
  $("#sweep-note").textContent = state.features.sweeps
    ? "Runs the request above once per cell and seed; the result is a contact sheet and a ranking."
    : "This server has no sweeps endpoint (POST /v1/sweeps).";
  if (state.features.presets) await loadPresets();
}

function fillSelect(select, values, selected) {
  for (const v of values) select.append(el("option", { value: v, text: v, selected: v === selected }));
}

function presetList(data) {
  // GET /v1/presets: {data: [...]}, a list, or {name: {...}}; each preset named by `name` (or `id`, or its key)
  const items = Array.isArray(data) ? data : Array.isArray(data && data.data) ? data.data
    : Object.entries(data || {}).map(([name, p]) => ({ name, ...(typeof p === "object" ? p : {}) }));
  return items.map((p) => ({ ...p, name: p.name || p.id })).filter((p) => p.name);
}

async function loadPresets() {
  const r = await api("GET", "v1/presets");
  if (!r.ok) return;
  state.presets = presetList(r.data);
  const select = $("#preset");
  for (const p of state.presets) {
    select.append(el("option", { value: p.name, text: p.mode ? `${p.name} (${p.mode})` : p.name,
                                 title: p.rationale || p.description || null }));
  }
  $("#preset-field").hidden = state.presets.length === 0;
}

function onPresetChange() {
  const p = state.presets.find((x) => x.name === $("#preset").value);
  const note = $("#preset-note");
  note.hidden = !p;
  if (!p) return;
  if (p.mode && state.models && state.models.modes.includes(p.mode)) $("#mode").value = p.mode;
  // the preset's own settings are the server's; explicit fields in the form still override them
  const settings = ["recipe", "shift", "guidance", "keep_roles"].filter((k) => p[k] !== undefined)
    .map((k) => `${k.replace("_", " ")} ${Array.isArray(p[k]) ? p[k].join(", ") || "none" : p[k]}`).join(" · ");
  note.textContent = [p.goal || p.description, settings, p.rationale].filter(Boolean).join(" — ");
}

// -- 2. the form ---------------------------------------------------------------------------------------
function addRefFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => { state.refs.push({ name: file.name, image: reader.result, role: "" }); renderRefs(); };
    reader.readAsDataURL(file);
  }
}

function renderRefs() {
  const list = $("#refs");
  list.replaceChildren();
  const roles = (state.models && state.models.ref_roles) || [];
  state.refs.forEach((ref, i) => {
    const role = el("select", { "aria-label": `role of image ${i + 1}`, onchange: (e) => { ref.role = e.target.value; } },
      el("option", { value: "", text: "no role" }),
      ...roles.map((r) => el("option", { value: r, text: r, selected: r === ref.role })));
    const remove = el("button", { type: "button", class: "small", text: "remove",
                                  onclick: () => { state.refs.splice(i, 1); renderRefs(); } });
    list.append(el("li", { class: "ref field", "data-field": `refs[${i}]` },
      el("img", { src: ref.image, alt: ref.name }),
      el("div", {}, el("div", { class: "small", text: `image ${i + 1}: ${ref.name}` }),
        el("div", { class: "field", "data-field": `refs[${i}].role` }, role, el("div", { class: "field-error" })),
        el("div", { class: "field", "data-field": `refs[${i}].image` }, el("div", { class: "field-error" })), remove),
      el("div", { class: "field-error" })));
  });
}

function numberField(id) {
  // a number, or the text as typed when it is not one: the server's 422 then names the field
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  return Number.isFinite(v) ? v : raw;
}

function buildRequest() {
  const body = { mode: $("#mode").value, prompt: $("#prompt").value };
  if ($("#preset").value) body.preset = $("#preset").value;
  if (state.refs.length) body.refs = state.refs.map((r) => (r.role ? { image: r.image, role: r.role } : { image: r.image }));
  for (const [key, id] of [["n", "#n"], ["steps", "#steps"], ["guidance", "#guidance"], ["shift", "#shift"],
                           ["seed", "#seed"], ["width", "#width"], ["height", "#height"]]) {
    const v = numberField(id);
    if (v !== undefined) body[key] = v;
  }
  if ($("#recipe").value) body.recipe = $("#recipe").value;
  if ($("#scheduler").value) body.scheduler = $("#scheduler").value;
  const defaultExact = !!(state.models && state.models.defaults && state.models.defaults.exact_size);
  if ($("#exact_size").checked !== defaultExact) body.exact_size = $("#exact_size").checked;
  return body;
}

function buildSweep() {
  const base = buildRequest();
  const n = base.n;
  delete base.n;
  let axes;
  try { axes = JSON.parse($("#sweep-axes").value); } catch (e) {
    return { error: { field: "axes", message: `not JSON: ${e.message}`, sweep: true } };
  }
  const body = { base, axes };
  const perCell = numberField("#sweep-n");
  body.n = perCell !== undefined ? perCell : n;
  const maxCells = numberField("#sweep-max-cells");
  if (maxCells !== undefined) body.max_cells = maxCells;
  return { body };
}

function curlFor(path, body) {
  const url = new URL(path.replace(/^\//, ""), document.baseURI).href;
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  return `curl -sS -X POST '${url}' -H 'Content-Type: application/json' -d '${json}'`;
}

async function copyText(text) {
  const out = $("#copy-out");
  out.hidden = false;
  out.value = text;
  out.select();
  try { await navigator.clipboard.writeText(text); out.title = "copied to the clipboard"; }
  catch (_) { out.title = "select and copy (the clipboard is not available here)"; }
}

function clearErrors() {
  for (const f of document.querySelectorAll(".field.invalid")) f.classList.remove("invalid");
  for (const e of document.querySelectorAll(".field-error")) e.textContent = "";
  $("#form-error").hidden = true;
  $("#job-error").hidden = true;
}

function fieldWrapper(field, sweep) {
  // the field's own wrapper, else its nearest named parent ("refs[0].role" -> "refs[0]" -> "refs")
  const attr = sweep ? "data-sweep-field" : "data-field";
  let name = field;
  while (name) {
    const node = document.querySelector(`[${attr}="${CSS.escape(name)}"]`);
    if (node) return node;
    const cut = Math.max(name.lastIndexOf("."), name.lastIndexOf("["));
    name = cut > 0 ? name.slice(0, cut) : "";
  }
  return null;
}

function showError(error, sweep = false) {
  // the server's {"error": {field, message}}: next to the field it names, else above the form
  const field = error.field || "";
  let node = null;
  if (sweep && field.startsWith("base.")) node = fieldWrapper(field.slice(5), false);
  else if (sweep) node = fieldWrapper(field, true) || fieldWrapper(field, false);
  else if (field) node = fieldWrapper(field, false);
  if (node) {
    node.classList.add("invalid");
    const box = node.querySelector(":scope > .field-error") || node.querySelector(".field-error");
    box.textContent = error.message || "invalid";
    if (node.closest("details")) node.closest("details").open = true;
    node.scrollIntoView({ block: "nearest" });
  } else {
    const box = $("#form-error");
    box.hidden = false;
    box.textContent = field ? `${field}: ${error.message}` : error.message || "the request was refused";
  }
}

// -- 3. a job ------------------------------------------------------------------------------------------
async function submit(path, body) {
  clearErrors();
  $("#submit").disabled = true;
  try {
    const r = await api("POST", path, body);
    if (r.status === 404 && path === "v1/sweeps") {
      showError({ message: "this server has no sweeps endpoint (POST /v1/sweeps)" });
      return;
    }
    if (!r.ok) {
      const err = (r.data && r.data.error) || { message: `HTTP ${r.status}` };
      showError(err, path === "v1/sweeps");
      return;
    }
    openJob(r.data.id);
    refreshJobs();
  } catch (e) {
    showError({ message: `the server could not be reached: ${e.message}` });
  } finally {
    $("#submit").disabled = false;
  }
}

function newJobView(id) {
  if (state.source) { state.source.close(); state.source = null; }
  state.job = { id, cards: new Map(), status: "", steps: new Map(), kind: "generate", cellLabels: new Map() };
  $("#job").hidden = false;
  $("#job-id").textContent = id;
  $("#candidates").replaceChildren();
  $("#job-warnings").replaceChildren();
  $("#winner").hidden = true;
  $("#sweep-result").hidden = true;
  $("#job-error").hidden = true;
  $("#job-progress").value = 0;
  $("#job-message").textContent = "";
  setStatus("queued");
}

function setStatus(status) {
  state.job.status = status;
  const badge = $("#job-status");
  badge.textContent = status;
  badge.className = `status ${status}`;
  $("#cancel").hidden = TERMINAL.includes(status);
}

function hasCell(data) { return data.cell !== undefined && data.cell !== null; }
function cardKey(data) { return hasCell(data) ? `${data.cell}:${data.seed}` : String(data.seed); }
function labelsText(labels) { return Object.entries(labels || {}).map(([k, v]) => `${k} ${v}`).join(" · "); }

function cardLabel(data) {
  if (!hasCell(data)) return `seed ${data.seed}`;
  const labels = state.job.cellLabels.get(data.cell);
  return `${labels ? labelsText(labels) : `cell ${data.cell}`} · seed ${data.seed}`;
}

function card(data) {
  const key = cardKey(data);
  let c = state.job.cards.get(key);
  if (c) return c;
  const img = el("img", { alt: `candidate seed ${data.seed}` });
  const c2 = {
    root: el("figure", { class: "candidate", "data-seed": String(data.seed), "data-cell": hasCell(data) ? String(data.cell) : null }),
    label: el("strong", { text: cardLabel(data) }),
    img, step: el("span", { class: "step", text: "waiting" }),
    score: el("span", { class: "score" }), bar: el("progress", { max: 1, value: 0 }),
    breakdown: el("table", { class: "breakdown" }),
    download: el("a", { class: "download", hidden: true, text: "download" }),
  };
  c2.root.append(el("div", { class: "frame" }, img, el("span", { class: "badge", text: "winner" })),
    el("figcaption", {}, el("div", { class: "line" }, c2.label, c2.step), c2.bar,
      el("div", { class: "line" }, c2.score, c2.download), c2.breakdown));
  $("#candidates").append(c2.root);
  state.job.cards.set(key, c2);
  return c2;
}

function setImage(c, url, seed) {
  c.img.src = url;
  c.download.href = url;
  c.download.download = `${seed}.png`;
  c.download.hidden = false;
}

function updateProgress() {
  let done = 0, total = 0;
  for (const [, s] of state.job.steps) { done += s.step; total += s.steps; }
  $("#job-progress").value = total ? done / total : 0;
}

function markWinner(seed, score) {
  for (const [key, c] of state.job.cards) c.root.classList.toggle("winner", key === String(seed));
  const w = $("#winner");
  w.hidden = false;
  w.textContent = `winner: seed ${seed}, score ${fmtScore(score)}`;
}

function renderBreakdown(c, scores) {
  c.breakdown.replaceChildren(el("tr", {}, el("th", { text: "scorer" }), el("th", { text: "raw" }),
                                          el("th", { text: "z" }), el("th", { text: "weight" })));
  for (const [name, s] of Object.entries(scores || {})) {
    c.breakdown.append(el("tr", {}, el("td", { text: name }), el("td", { text: fmtScore(s.raw) }),
                                    el("td", { text: fmtScore(s.z) }), el("td", { text: fmtScore(s.weight) })));
  }
}

const handlers = {
  queued(d) { setStatus("queued"); $("#job-message").textContent = `queued, position ${d.position}`; },
  started(d) {
    setStatus("running");
    $("#job-message").textContent = "running";
    if (state.job.kind === "sweep") $("#job-message").textContent = `running ${d.cells} cells × ${d.seeds} seeds`;
    else for (const seed of d.seeds || []) card({ seed });
  },
  progress(d) {
    const c = card(d);
    c.step.textContent = `step ${d.step}/${d.steps}`;
    c.bar.value = d.steps ? d.step / d.steps : 0;
    state.job.steps.set(cardKey(d), { step: d.step, steps: d.steps });
    updateProgress();
  },
  preview(d) {
    const c = card(d);
    c.img.src = `data:${d.media_type};base64,${d.image}`;
    c.img.title = `preview at step ${d.step}`;
    c.root.classList.add("previewed");
  },
  candidate(d) {
    const c = card(d);
    if (d.url) setImage(c, d.url, d.seed);
    c.step.textContent = d.pruned ? `pruned at step ${d.pruned_at_step}` : `done, ${d.steps_computed} steps`;
    c.root.classList.toggle("pruned", !!d.pruned);
    c.root.classList.add("done");
  },
  cell(d) {
    // a sweep's cell is scored: its candidates' scores, and its winner marked
    state.job.cellLabels.set(d.cell, d.values);
    for (const s of d.candidates || []) {
      const c = card({ cell: d.cell, seed: s.seed });
      c.label.textContent = cardLabel({ cell: d.cell, seed: s.seed });
      c.score.textContent = `score ${fmtScore(s.score)}`;
      c.root.classList.toggle("winner", s.seed === d.winner);
    }
  },
  scored(d) {
    for (const s of d.candidates || []) card(s).score.textContent = `score ${fmtScore(s.score)}`;
    if (d.winner !== undefined && d.winner !== null && state.job.kind !== "sweep") {
      markWinner(d.winner, (d.candidates || []).find((s) => s.seed === d.winner)?.score);
    }
  },
  succeeded() { setStatus("succeeded"); $("#job-progress").value = 1; $("#job-message").textContent = "done"; },
  failed(d) {
    setStatus("failed");
    const err = d.error || {};
    const box = $("#job-error");
    box.hidden = false;
    box.textContent = `failed${err.field ? ` (${err.field})` : ""}: ${err.message || ""}`;
    if (err.field) showError(err, state.job.kind === "sweep");
  },
  cancelled() { setStatus("cancelled"); $("#job-message").textContent = "cancelled"; },
};

async function openJob(id) {
  newJobView(id);
  const first = await api("GET", `v1/jobs/${encodeURIComponent(id)}`);
  if (first.ok) state.job.kind = first.data.kind || "generate";
  const job = state.job;
  // late clients get every event so far, previews included, then the live ones
  const source = new EventSource(`v1/jobs/${encodeURIComponent(id)}/events`);
  state.source = source;
  source.addEventListener("error", () => {
    // a dropped connection is retried by the browser (with Last-Event-ID); a refused one is final
    if (source.readyState === EventSource.CLOSED && state.job === job && !TERMINAL.includes(job.status)) {
      $("#job-message").textContent = "the event stream was refused; open the job again from the list";
    }
  });
  for (const kind of EVENT_KINDS) {
    source.addEventListener(kind, (ev) => {
      if (state.job !== job) return;
      handlers[kind](JSON.parse(ev.data));
      if (TERMINAL.includes(kind)) { source.close(); finishJob(id); }
    });
  }
}

async function finishJob(id) {
  const r = await api("GET", `v1/jobs/${encodeURIComponent(id)}`);
  if (!r.ok || !state.job || state.job.id !== id) return;
  const job = r.data;
  for (const w of job.warnings || []) $("#job-warnings").append(el("li", { text: w }));
  if (job.kind === "sweep") renderSweep(job);
  else if (job.result) renderResult(job.result);
  refreshJobs();
}

function renderResult(result) {
  for (const cand of result.candidates || []) {
    const c = card(cand);
    if (cand.url) setImage(c, cand.url, cand.seed);
    c.score.textContent = `score ${fmtScore(cand.score)}`;
    if (cand.pruned) c.step.textContent = `pruned at step ${cand.pruned_at_step}`;
    renderBreakdown(c, cand.scores);
  }
  if (result.winner) markWinner(result.winner.seed, result.winner.score);
}

function renderSweep(job) {
  $("#sweep-result").hidden = job.status !== "succeeded" || !job.result;
  if ($("#sweep-result").hidden) return;
  const result = job.result;
  const files = result.files || {};
  const sheet = (files.contact_sheet || `/v1/jobs/${job.id}/contact-sheet.png`).replace(/^\//, "");
  $("#contact-sheet").src = sheet;
  $("#contact-sheet-link").href = sheet;
  $("#contact-sheet-link").download = `${job.id}-contact-sheet.png`;
  for (const [id, name] of [["#table-csv", files.table_csv], ["#table-json", files.table_json]]) {
    $(id).hidden = !name;
    if (name) $(id).href = name.replace(/^\//, "");
  }
  const cells = result.cells || [];
  const order = (result.ranking || cells.map((_, i) => i)).map((i) => cells.find((c) => c.cell === i) || cells[i]);
  const table = $("#ranking");
  table.replaceChildren(el("tr", {}, el("th", { text: "rank" }), el("th", { text: "cell" }), el("th", { text: "best" }),
                                     el("th", { text: "best seed" }), el("th", { text: "mean" })));
  order.filter(Boolean).forEach((cell, i) => {
    table.append(el("tr", { "data-cell": String(cell.cell) }, el("td", { text: String(i + 1) }),
      el("td", { text: labelsText(cell.labels || cell.values) }), el("td", { text: fmtScore(cell.best) }),
      el("td", { text: cell.best_seed === null || cell.best_seed === undefined ? "—" : String(cell.best_seed) }),
      el("td", { text: fmtScore(cell.mean) })));
    for (const cand of cell.candidates || []) {
      const c = card({ cell: cell.cell, seed: cand.seed });
      if (cand.url) setImage(c, cand.url, `cell${cell.cell}-${cand.seed}`);
      c.score.textContent = `score ${fmtScore(cand.score)}`;
      renderBreakdown(c, cand.scores);
    }
  });
  const top = order[0];
  if (top) {
    const w = $("#winner");
    w.hidden = false;
    w.textContent = `best cell: ${labelsText(top.labels || top.values)}, seed ${top.best_seed}, score ${fmtScore(top.best)}`;
  }
}

async function cancelJob() {
  if (!state.job) return;
  await api("POST", `v1/jobs/${encodeURIComponent(state.job.id)}/cancel`);
}

// -- 4. the job list -----------------------------------------------------------------------------------
async function refreshJobs(more = false) {
  const query = more && state.nextCursor ? `?limit=20&cursor=${state.nextCursor}` : "?limit=20";
  const r = await api("GET", `v1/jobs${query}`);
  if (!r.ok) return;
  const body = $("#job-list");
  if (!more) body.replaceChildren();
  for (const job of r.data.data || []) {
    body.append(el("tr", { class: "job-row", "data-id": job.id, onclick: () => openJob(job.id) },
      el("td", { text: fmtTime(job.created_at) }), el("td", {}, el("code", { text: job.id.slice(0, 12) })),
      el("td", { text: job.kind || "generate" }), el("td", { text: job.mode }),
      el("td", {}, el("span", { class: `status ${job.status}`, text: job.status })),
      el("td", { text: `${job.steps_done}/${job.steps_total}` })));
  }
  state.nextCursor = r.data.next_cursor;
  $("#more-jobs").hidden = !state.nextCursor;
}

// -- wiring --------------------------------------------------------------------------------------------
function wire() {
  $("#request-form").addEventListener("submit", (e) => { e.preventDefault(); submit("v1/jobs", buildRequest()); });
  $("#copy-json").addEventListener("click", () => copyText(JSON.stringify(buildRequest(), null, 2)));
  $("#copy-curl").addEventListener("click", () => copyText(curlFor("v1/jobs", buildRequest())));
  $("#run-sweep").addEventListener("click", () => {
    const s = buildSweep();
    clearErrors();
    if (s.error) showError(s.error, true);
    else submit("v1/sweeps", s.body);
  });
  $("#preset").addEventListener("change", onPresetChange);
  $("#cancel").addEventListener("click", cancelJob);
  $("#refresh-jobs").addEventListener("click", () => refreshJobs());
  $("#more-jobs").addEventListener("click", () => refreshJobs(true));
  $("#ref-files").addEventListener("change", (e) => { addRefFiles(e.target.files); e.target.value = ""; });
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); addRefFiles(e.dataTransfer.files); });
  // typing in a field clears its error
  $("#request-form").addEventListener("input", (e) => {
    const f = e.target.closest(".field.invalid");
    if (f) { f.classList.remove("invalid"); f.querySelector(".field-error").textContent = ""; }
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  wire();
  try { await loadServer(); } catch (e) { $("#server-info").textContent = `server not reachable: ${e.message}`; }
  await refreshJobs().catch(() => {});
  document.body.dataset.ready = "1";
});
