// The evertrain dashboard: polls the JSON API every 2 s and redraws what changed.
// Everything from the run (file names, texts) goes into the page as text nodes, never as HTML.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
// Tick spacings for the global-step axis: whole steps only.
const STEP_INCRS = [1, 2, 5].flatMap((m) => [0, 1, 2, 3, 4, 5, 6, 7, 8].map((e) => m * 10 ** e)).sort((a, b) => a - b);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k === "title" || k === "style") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

const fmt = {
  num: (x, d = 4) => (x === null || x === undefined ? "—" : Number(x).toPrecision(d)),
  loss: (x) => (x === null || x === undefined ? "—" : Number(x).toFixed(3)),
  pct: (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(0) + "%"),
  int: (x) => (x === null || x === undefined ? "—" : Number(x).toLocaleString("en-US")),
  bytes: (b) => {
    if (b === null || b === undefined) return "—";
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return b.toFixed(i ? 1 : 0) + " " + u[i];
  },
  secs: (s) => {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
  },
  time: (t) => (t ? new Date(t * 1000).toLocaleString() : "—"),
};

async function get(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${path}: ${r.status} ${body.error || r.statusText}`);
  return body;
}

// ---------------------------------------------------------------------------------------------- controls
// Each change is a POST to the page's own origin (the browser adds the Origin header and the token's cookie);
// its answer is shown, and the page polls at once so the result is seen.

let isWorkspace = false;

async function post(path, body) {
  let text, ok = false;
  try {
    const r = await fetch(path, { method: "POST", body, cache: "no-store" });
    const answer = await r.json().catch(() => ({}));
    ok = r.ok;
    text = answer.message || answer.error || `${r.status} ${r.statusText}`;
  } catch (e) {
    text = `cannot reach the dashboard: ${e.message}`;
  }
  $("ctl-message").textContent = text;
  $("ctl-message").dataset.ok = ok ? "1" : "0";
  lastState = "";  // redraw the tables: a pin or a priority changed them
  await poll();
}

for (const button of document.querySelectorAll("#controls button[data-action]")) {
  button.addEventListener("click", () => post(`/api/control/${button.dataset.action}`));
}
$("upload-send").addEventListener("click", () => {
  const file = $("upload-file").files[0];
  if (!file) { $("ctl-message").textContent = "choose a file first"; return; }
  post(`/api/upload?name=${encodeURIComponent(file.name)}`, file);
});

// ---------------------------------------------------------------------------------------------- status

function renderStatus(st, root, kind) {
  $("root").textContent = `${root} (${kind})`;
  isWorkspace = kind === "workspace";
  $("controls").hidden = !isWorkspace;
  $("intake").hidden = !st.intake;
  $("intake").textContent = st.intake || "";
  const state = st.state || "unknown";
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("updated").textContent = st.updated_at ? "updated " + new Date(st.updated_at * 1000).toLocaleTimeString() : "";
  $("current-file").textContent = st.current_file || "—";
  // Progress only while a file is in hand: a finished file's 100% would read as work going on.
  const done = st.current_file ? st.file_step || 0 : 0, total = st.current_file ? st.file_total_steps || 0 : 0;
  const preparing = state === "preparing";
  const pct = preparing ? st.prepare_percent || 0 : total ? Math.min(100, (100 * done) / total) : 0;
  $("progress-bar").style.width = pct + "%";
  $("progress-bar").dataset.pct = pct.toFixed(1);
  $("progress-text").textContent = preparing
    ? `preparing this file: ${pct.toFixed(0)}% read and tokenized` +
      (st.eta_prepare_seconds != null ? `, about ${fmt.secs(st.eta_prepare_seconds)} left` : "")
    : total ? `step ${done} / ${total} of this file (${pct.toFixed(0)}%)` : "";
  const items = [
    ["global step", fmt.int(st.global_step)],
    ["loss", fmt.loss(st.loss)],
    ["learning rate", fmt.num(st.learning_rate, 3)],
    ["tokens / s", st.tokens_per_second ? fmt.int(Math.round(st.tokens_per_second)) : "—"],
    ["file ETA", fmt.secs(st.eta_file_seconds)],
    ["queue ETA", fmt.secs(st.eta_queue_seconds)],
    ["queued", fmt.int(st.queue_length)],
    ["done", fmt.int(st.files_done)],
    ["failed", fmt.int(st.files_failed)],
    ["rejected", st.files_rejected ? fmt.int(st.files_rejected) : "—"],
    ["last checkpoint", st.last_checkpoint || "—"],
  ];
  // A train output dir has no daemon: no queue, no ETA; show only what the run has.
  const shown = items.filter(([k, v]) => v !== "—" || st.source === "daemon");
  $("numbers").replaceChildren(...shown.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
  if (st.alert) showError(st.alert);
}

// ---------------------------------------------------------------------------------------------- files

const PRIORITY_RANK = { urgent: 0, high: 1, normal: 2, low: 3 };

function stateChip(state) {
  return el("span", { class: "chip", "data-state": state, text: state });
}

function renderFiles(files) {
  const queue = files.filter((f) => f.state === "training" || f.state === "queued" || f.state === "interrupted");
  queue.sort((a, b) => (a.state !== "training") - (b.state !== "training")
    || (PRIORITY_RANK[a.priority] ?? 2) - (PRIORITY_RANK[b.priority] ?? 2) || (a.id ?? 0) - (b.id ?? 0));
  const past = files.filter((f) => !queue.includes(f)).reverse();
  const steps = (f) => `${fmt.int(f.steps_trained)} / ${fmt.int(f.expected_steps)}`;
  $("queue").tBodies[0].replaceChildren(...(queue.length ? queue.map((f, i) => el("tr",
    { "data-sha256": f.sha256 || "", "data-state": f.state },
    el("td", { text: f.id ?? i + 1 }), el("td", { class: "name", text: f.original_name, title: f.sha256 || "" }),
    el("td", {}, stateChip(f.state)), el("td", {}, priorityCell(f)), el("td", { text: steps(f) }),
    el("td", { text: fmt.int(f.examples) }))) : [emptyRow(6, "The queue is empty.")]));
  $("files").tBodies[0].replaceChildren(...(past.length ? past.map((f, i) => el("tr",
    { "data-sha256": f.sha256 || "", "data-state": f.state },
    el("td", { text: f.id ?? past.length - i }),
    el("td", { class: "name", text: f.original_name, title: f.sha256 || "" }),
    el("td", {}, stateChip(f.state)), el("td", { text: steps(f) }),
    el("td", { text: f.first_step ? `${f.first_step}–${f.last_step ?? "…"}` : "—" }),
    el("td", { text: fmt.int(f.examples) }), el("td", { text: fmt.int(f.tokens) }),
    el("td", { class: "snaps", text: snapshotsText(f.snapshots) }),
    el("td", { class: "note", text: f.duplicate_of ? `same content as #${f.duplicate_of}: not trained again`
      : oneLine(f.error || gateNote(f.forgetting)), title: f.error || gateNote(f.forgetting) }))) :
    [emptyRow(9, "No file has finished yet.")]));
}

function gateNote(v) {
  // The forgetting gate's verdict on a file (gate.py): shown when it tripped, or when a retry made it pass.
  if (!v || (!v.tripped && v.attempt < 2)) return "";
  if (!v.tripped) return `forgetting gate: passed when trained again with a stronger replay dose`;
  return `forgetting gate (${v.action}): ${v.reason}`;
}

function priorityCell(f) {
  if (!isWorkspace || f.state !== "queued" || f.id === undefined) return f.priority || "—";
  const sel = el("select", { class: "priority", "data-file-id": f.id },
    ...Object.keys(PRIORITY_RANK).reverse().map((p) => el("option", { value: p, text: p, selected: p === f.priority })));
  sel.addEventListener("change", () => post(`/api/priority/${f.id}/${sel.value}`));
  return sel;
}

function snapshotsText(c) {
  if (!c) return "—";
  return c.skipped ? `${c.taken} (${c.skipped} skipped by the budget)` : `${c.taken}`;
}

function oneLine(text) {
  // An error names the file, then its problems line by line: all of it, on one line, clipped.
  const flat = (text || "").split("\n").map((l) => l.trim()).filter(Boolean).join(" · ");
  return flat.length > 160 ? flat.slice(0, 160) + "…" : flat;
}

function emptyRow(cols, text) {
  return el("tr", {}, el("td", { colSpan: cols, class: "muted", text }));
}

// ---------------------------------------------------------------------------------------------- loss chart

const series = { step: [], loss: [], lr: [] };
let spans = [];
let lastStep = 0;
let rewrites = null;  // the server's count of history rewrites: a change means our points are stale
let lossPlot = null;

function boundaryPlugin(getSpans) {
  // Dashed vertical line and the file's name where each file's first step is.
  return {
    hooks: {
      draw: (u) => {
        const ctx = u.ctx, top = u.bbox.top, height = u.bbox.height;
        ctx.save();
        ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
        ctx.fillStyle = "#555";
        ctx.strokeStyle = "#9aa3ad";
        ctx.lineWidth = devicePixelRatio;
        ctx.setLineDash([4 * devicePixelRatio, 4 * devicePixelRatio]);
        for (const s of getSpans()) {
          let x = Math.round(u.valToPos(s.first_step - 0.5, "x", true));
          if (x > u.bbox.left + u.bbox.width + 1) continue;
          x = Math.max(x, u.bbox.left);  // the first file starts at the left edge
          ctx.beginPath();
          ctx.moveTo(x, top);
          ctx.lineTo(x, top + height);
          ctx.stroke();
          ctx.fillText(" " + (s.file_name || (s.file || "").slice(0, 12)), x, top + 12 * devicePixelRatio);
        }
        ctx.restore();
      },
    },
  };
}

function chartWidth(node) {
  return Math.max(300, node.clientWidth || node.parentElement.clientWidth - 32);
}

function drawLoss() {
  const node = $("loss-chart");
  node.dataset.points = series.step.length;
  node.dataset.lastStep = lastStep;
  node.dataset.boundaries = spans.length;
  node.dataset.files = spans.map((s) => s.file_name).join("|");
  $("loss-empty").hidden = series.step.length > 0;
  if (!series.step.length) return;
  const data = [series.step, series.loss, series.lr];
  if (!lossPlot) {
    lossPlot = new uPlot({
      width: chartWidth(node), height: 300,
      plugins: [boundaryPlugin(() => spans)],
      scales: { x: { time: false } },
      axes: [
        { label: "global step", incrs: STEP_INCRS },
        { scale: "loss", label: "loss", stroke: "#1f6feb", grid: { stroke: "#eef1f4" } },
        { scale: "lr", label: "learning rate", side: 1, stroke: "#c2410c", grid: { show: false },
          values: (u, vals) => vals.map((v) => v.toExponential(1)) },
      ],
      series: [
        { label: "step" },
        { label: "loss", scale: "loss", stroke: "#1f6feb", width: 1.5, value: (u, v) => fmt.loss(v) },
        { label: "learning rate", scale: "lr", stroke: "#c2410c", width: 1.5, dash: [6, 3],
          value: (u, v) => (v === null ? "—" : v.toExponential(2)) },
      ],
    }, data, node);
  } else {
    lossPlot.setData(data);
  }
}

async function pollMetrics() {
  const m = await get(`/api/metrics?since=${lastStep}`);
  if (rewrites !== null && m.history !== rewrites) {  // the run resumed from an older checkpoint: start over
    series.step = []; series.loss = []; series.lr = []; lastStep = 0; rewrites = null;
    return pollMetrics();
  }
  rewrites = m.history;
  const c = m.columns;
  series.step.push(...c.step);
  series.loss.push(...c.loss);
  series.lr.push(...c.lr);
  if (c.step.length) lastStep = c.step[c.step.length - 1];
  spans = m.files;
  if (c.step.length || !lossPlot) drawLoss();
}

// ---------------------------------------------------------------------------------------------- forgetting

function heatColor(x, lo, hi) {
  // green (low loss) -> yellow -> red (high loss), on a log scale: losses span decades.
  const t = hi > lo ? (Math.log(x) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : 0;
  const hue = 130 * (1 - Math.min(1, Math.max(0, t)));
  return `hsl(${hue}, 65%, 78%)`;
}

function renderForgetting(fm) {
  const table = $("forgetting");
  $("forgetting-empty").hidden = fm.rows.length > 0 || fm.before.some((x) => x !== null);
  if ($("forgetting-empty").hidden === false) {
    table.replaceChildren();
    $("no-slice").textContent = (fm.no_slice || []).map((f) => `${f.file_name} (${fmt.int(f.examples)} examples) is `
      + "too small for a held-out slice").join("; ");
    return;
  }
  // Losses of one kind share a colour scale; a file of judgments (a DPO or KTO loss, not a token loss) has its own.
  const column = (j) => [fm.before[j], ...fm.rows.map((r) => r.cells[j])];
  const range = (values) => {
    const v = values.filter((x) => x !== null && x !== undefined && x > 0);
    return [Math.min(...v), Math.max(...v)];
  };
  const tokenScale = range(fm.files.flatMap((f, j) => (f.judged ? [] : column(j))));
  const scales = fm.files.map((f, j) => (f.judged ? range(column(j)) : tokenScale));
  // Each file's loss right after it trained: the reference for what later files made it forget.
  const fresh = fm.files.map((f, j) => {
    const own = fm.rows.find((r) => r.after_file === f.file);
    return own ? own.cells[j] : null;
  });
  const head = el("tr", {}, el("th", { class: "corner", text: "after ↓   evaluated on →" }),
    ...fm.files.map((f) => el("th", { class: "col", title: f.file, text: f.file_name || f.file.slice(0, 12) })));
  const cell = (x, j, rowFile, kind, judged) => {
    if (x === null || x === undefined) return el("td", { class: "empty", text: "" });
    let title = `${fm.files[j].file_name}: loss ${x.toFixed(4)}`;
    // A file of pairs or rated answers: its held-out accuracy beside the loss, the margin in the title.
    const acc = judged ? ` · ${fmt.pct(judged.accuracy)}` : "";
    if (judged) title += `, accuracy ${fmt.pct(judged.accuracy)}, margin ${judged.margin.toFixed(3)}`;
    if (kind === "after" && fresh[j] !== null && rowFile !== fm.files[j].file) {
      const d = x - fresh[j];
      title += ` (${d >= 0 ? "+" : ""}${d.toFixed(4)} since it trained)`;
    }
    return el("td", { class: rowFile === fm.files[j].file ? "cell own" : "cell", style: `background:${heatColor(x, ...scales[j])}`,
      title, "data-loss": x.toFixed(4), "data-col-file": fm.files[j].file_name || "",
      "data-accuracy": judged ? judged.accuracy : "", text: x.toFixed(3) + acc });
  };
  const rows = [];
  if (fm.before.some((x) => x !== null)) {
    rows.push(el("tr", { "data-row": "before" }, el("th", { class: "rowh", text: "before its training" }),
      ...fm.before.map((x, j) => cell(x, j, null, "before", (fm.before_judged || [])[j]))));
  }
  for (const r of fm.rows) {
    const label = r.after_file ? `after ${r.after_file_name || r.after_file.slice(0, 12)}` : "periodic";
    rows.push(el("tr", { "data-row": r.after_file_name || "periodic", "data-step": r.step },
      el("th", { class: "rowh", title: r.after_file || "" }, label, el("span", { class: "muted small", text: `  step ${r.step}` })),
      ...r.cells.map((x, j) => cell(x, j, r.after_file, "after", (r.judged || [])[j]))));
  }
  // A file too small for a held-out slice has no losses to show: its column says so instead.
  const small = fm.no_slice || [];
  head.append(...small.map((f) => el("th", { class: "col no-slice", title: f.file, text: f.file_name })));
  for (const row of rows) {
    row.append(...small.map((f) => el("td", { class: "no-slice", "data-col-file": f.file_name,
      text: "no held-out slice", title: `${f.file_name}: ${fmt.int(f.examples)} examples, too small for a held-out ` +
        "slice (held_out_fraction and held_out_min_file give none), so its forgetting is not measured" })));
  }
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  const note = small.map((f) => `${f.file_name} (${fmt.int(f.examples)} examples) is too small for a held-out slice`);
  $("no-slice").textContent = note.length ? note.join("; ") + ": its forgetting is not measured." : "";
}

// ---------------------------------------------------------------------------------------------- drift

let driftPlot = null;

function renderDrift(points) {
  const node = $("drift-chart");
  $("drift-empty").hidden = points.length > 0;
  node.dataset.points = points.length;
  if (!points.length) return;
  const data = [points.map((p) => p.step), points.map((p) => p.loss), points.map((p) => p.kl)];
  if (!driftPlot) {
    driftPlot = new uPlot({
      width: chartWidth(node), height: 200,
      scales: { x: { time: false } },
      axes: [{ label: "global step", incrs: STEP_INCRS },
        { scale: "loss", label: "anchor loss", stroke: "#1f6feb", grid: { stroke: "#eef1f4" } },
        { scale: "kl", label: "KL to the base", side: 1, stroke: "#7c3aed", grid: { show: false } }],
      series: [{ label: "step" },
        { label: "anchor loss", scale: "loss", stroke: "#1f6feb", width: 2, points: { show: true },
          value: (u, v) => fmt.loss(v) },
        { label: "KL to the base", scale: "kl", stroke: "#7c3aed", width: 2, dash: [6, 3], points: { show: true },
          value: (u, v) => (v === null ? "—" : v.toFixed(4)) }],
    }, data, node);
  } else {
    driftPlot.setData(data);
  }
}

// ---------------------------------------------------------------------------------------------- evolution

let index = { steps: [], examples: [] };
const snapshotCache = new Map();
let exPlot = null;

function selection() {
  const h = new URLSearchParams(location.hash.slice(1));
  return { example: h.get("example"), step: h.get("step") === null ? null : Number(h.get("step")) };
}

function select(example, step) {
  const h = new URLSearchParams(location.hash.slice(1));
  if (example !== undefined) h.set("example", example);
  if (step !== undefined) h.set("step", step);
  history.replaceState(null, "", "#" + h.toString());
  renderEvolution();
}

function renderIndex(idx) {
  index = idx;
  const has = idx.steps.length > 0 && idx.examples.length > 0;
  $("evolution-empty").hidden = has;
  $("evolution-body").hidden = !has;
  if (!has) return;
  const sel = $("example");
  const current = sel.value;
  sel.replaceChildren(...idx.examples.map((e) => el("option", { value: e.id, text: e.label })));
  if (current) sel.value = current;
  const slider = $("step-slider");
  const atEnd = Number(slider.value) === Number(slider.max);
  slider.max = idx.steps.length - 1;
  if (atEnd && selection().step === null) slider.value = slider.max;  // follow the newest snapshot
  renderEvolution();
}

async function renderEvolution() {
  if (!index.steps.length || !index.examples.length) return;
  const sel = selection();
  const example = index.examples.find((e) => e.id === sel.example) || index.examples[0];
  $("example").value = example.id;
  let pos = index.steps.length - 1;
  if (sel.step !== null) {  // the snapshot nearest to the asked step
    const dist = index.steps.map((s) => Math.abs(s.step - sel.step));
    pos = dist.indexOf(Math.min(...dist));
  } else {
    pos = Number($("step-slider").value);
  }
  $("step-slider").value = pos;
  const step = index.steps[pos].step;
  $("step-label").textContent = `step ${step}  (${pos + 1} of ${index.steps.length})`;
  const snap = await snapshotAt(step);
  const ex = snap && snap.examples.find((e) => e.id === example.id);
  const box = $("evolution");
  box.dataset.example = example.id;
  box.dataset.step = step;
  if (!ex) {
    $("ev-input").textContent = "";
    $("ev-expected").textContent = "(this example is not in the snapshot of this step)";
    $("ev-tokens").replaceChildren();
    $("ev-generation").textContent = "";
    $("ev-scores").textContent = "";
  } else {
    $("ev-input").textContent = ex.input || "";
    $("ev-input").hidden = !ex.input;
    $("ev-expected").textContent = ex.expected;
    // Each target token: the model's guess on top, and under a wrong guess, what was expected.
    $("ev-tokens").replaceChildren(...ex.tokens.map((t) => el("span", {
      class: "tok " + (t.correct ? "ok" : "bad"), "data-correct": t.correct ? "1" : "0",
      title: t.correct ? `right: ${JSON.stringify(t.expected)}  (loss ${t.loss.toFixed(3)})`
        : `predicted ${JSON.stringify(t.predicted)}, expected ${JSON.stringify(t.expected)}  (loss ${t.loss.toFixed(3)})`,
    }, el("span", { class: "pred", text: visible(t.predicted) }),
    el("span", { class: "exp", text: t.correct ? "\u00a0" : visible(t.expected) }))));
    $("ev-scores").textContent = `loss ${fmt.loss(ex.loss)} · ${fmt.pct(ex.token_accuracy)} of ${ex.tokens.length} tokens right`
      + judgedText(ex);
    $("ev-generation").textContent = ex.generation ?? "(no generation in this snapshot)";
    box.dataset.accuracy = ex.token_accuracy;
  }
  renderExampleHistory(example, step);
}

function judgedText(x) {
  // A pair: how far its chosen answer's reward is above its rejected one's; a rated answer: its reward.
  if (x.margin !== null && x.margin !== undefined) return ` · margin ${x.margin.toFixed(3)}`;
  if (x.reward !== null && x.reward !== undefined) return ` · reward ${x.reward.toFixed(3)}`;
  return "";
}

function visible(token) {
  // Whitespace and newlines as visible marks, so a wrong space shows as a coloured box.
  return token.replace(/\n/g, "↵").replace(/ /g, "·") || "∅";
}

async function snapshotAt(step) {
  if (!snapshotCache.has(step)) {
    const snap = await get(`/api/snapshot/${step}`).catch(() => null);
    if (!snap) return null;
    snapshotCache.set(step, snap);
  }
  return snapshotCache.get(step);
}

const evolutionCache = new Map();  // example id -> [snapshot marker, /api/evolution answer]

async function exampleEvolution(id) {
  const hit = evolutionCache.get(id);
  if (hit && hit[0] === lastSnapshots) return hit[1];
  const found = await get(`/api/evolution/${encodeURIComponent(id)}`).catch(() => null);
  evolutionCache.set(id, [lastSnapshots, found]);
  return found;
}

async function renderExampleHistory(example, step) {
  // Grouped by the file in training at each snapshot: the example's own file first (what it taught, step by
  // step), then every later file (what they kept or undid).
  const evo = await exampleEvolution(example.id);
  const rows = [];
  for (const g of (evo ? evo.files : []).slice().reverse()) {
    const first = g.snapshots[0], last = g.snapshots[g.snapshots.length - 1];
    rows.push(el("tr", { class: "group" + (g.own ? " own" : ""), "data-own": g.own ? "1" : "0" },
      el("td", { colSpan: 6, text: `${g.own ? "while its own file trained" : "while a later file trained"}: `
        + `${g.file_name || "?"} · ${g.snapshots.length} snapshot(s) · loss ${fmt.loss(first.loss)} → ${fmt.loss(last.loss)}` })));
    for (const s of g.snapshots.slice().reverse()) {
      rows.push(el("tr", { class: s.step === step ? "selected" : "", "data-step": s.step,
        onclick: () => select(example.id, s.step) },
      el("td", { text: s.step }), el("td", { text: g.file_name || "" }), el("td", { text: fmt.loss(s.loss) }),
      el("td", { text: fmt.pct(s.token_accuracy) + judgedText(s) }),
      el("td", { class: "text-cell", text: s.prediction ?? "" }),
      el("td", { class: "text-cell", text: s.generation ?? "—" })));
    }
  }
  $("ev-history").tBodies[0].replaceChildren(...rows);
  const node = $("example-chart");
  const data = [example.steps.map((s) => s.step), example.steps.map((s) => s.loss),
    example.steps.map((s) => s.token_accuracy)];
  if (!exPlot) {
    exPlot = new uPlot({
      width: chartWidth(node), height: 180,
      scales: { x: { time: false }, acc: { range: [0, 1] } },
      axes: [{ label: "global step", incrs: STEP_INCRS }, { scale: "loss", label: "loss", stroke: "#1f6feb" },
        { scale: "acc", label: "token accuracy", side: 1, grid: { show: false }, stroke: "#15803d",
          values: (u, vals) => vals.map((v) => Math.round(v * 100) + "%") }],
      series: [{ label: "step" },
        { label: "loss", scale: "loss", stroke: "#1f6feb", width: 2, points: { show: true } },
        { label: "token accuracy", scale: "acc", stroke: "#15803d", width: 2, points: { show: true },
          value: (u, v) => fmt.pct(v) }],
    }, data, node);
  } else {
    exPlot.setData(data);
  }
}

// ---------------------------------------------------------------------------------------------- feedback

function renderFeedback(fb) {
  // Hidden unless `evertrain serve --collect-feedback` keeps a log in this workspace.
  $("feedback-card").hidden = !fb.kept;
  if (!fb.kept) return;
  $("feedback-problem").hidden = !fb.problem;
  $("feedback-problem").textContent = fb.problem || "";
  const items = fb.problem ? [] : [
    ["answers kept", fmt.int(fb.answers)],
    ["rated good", fmt.int(fb.ratings.good)],
    ["rated bad", fmt.int(fb.ratings.bad)],
    ["corrections", fmt.int(fb.corrections)],
    ["waiting for a file", fmt.int(fb.waiting.ratings + fb.waiting.corrections)],
    ["log size", fmt.bytes(fb.bytes)],
  ];
  $("feedback-numbers").replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
  const files = [...fb.files].reverse();
  $("feedback-files").tBodies[0].replaceChildren(...(files.length ? files.map((f) => el("tr",
    { "data-name": f.name, "data-state": f.state },
    el("td", { class: "name", text: f.name, title: f.sha256 }), el("td", { text: `${fmt.int(f.records)} ${f.kind}` }),
    el("td", { text: f.kind === "ratings" ? `${fmt.int(f.good)} / ${fmt.int(f.bad)}` : "—" }),
    el("td", { text: fmt.time(f.dropped_at) }),
    el("td", { title: f.ledger.map((r) => `#${r.id} ${r.state}`).join(", ") }, stateChip(f.state)))) :
    [emptyRow(5, "No file of feedback yet.")]));
  $("feedback-more").textContent = fb.files_total > fb.files.length
    ? `the newest ${fb.files.length} of ${fmt.int(fb.files_total)} files` : "";
}

// ---------------------------------------------------------------------------------------------- checkpoints

function renderCheckpoints(list) {
  $("checkpoints").tBodies[0].replaceChildren(...(list.length ? list.map((c) => el("tr", { "data-step": c.step },
    el("td", { class: "name" }, c.name, c.pinned ? el("span", { class: "chip pin", text: "pinned" }) : ""),
    el("td", { text: fmt.int(c.step) }),
    el("td", { text: fmt.time(c.created_at) }), el("td", { text: fmt.bytes(c.bytes) }),
    el("td", { text: c.files }), el("td", {}, isWorkspace ? el("button", {
      class: "pin-button", "data-step": c.step, text: c.pinned ? "unpin" : "pin",
      onclick: () => post(`/api/${c.pinned ? "unpin" : "pin"}/${c.step}`) }) : "")))
    : [emptyRow(6, "No checkpoint yet.")]));
}

// ---------------------------------------------------------------------------------------------- polling

let lastState = "", lastSnapshots = "", lastFeedback = "";

function showError(text) {
  $("error").hidden = !text;
  $("error").textContent = text || "";
}

async function poll() {
  try {
    const s = await get("/api/state");
    renderStatus(s.status, s.root, s.kind);
    const key = JSON.stringify([s.files, s.checkpoints, s.forgetting, s.drift]);
    if (key !== lastState) {  // redraw tables only when they changed: keeps hover and selection steady
      lastState = key;
      renderFiles(s.files);
      renderCheckpoints(s.checkpoints);
      renderForgetting(s.forgetting);
      renderDrift(s.drift || []);
    }
    if (isWorkspace) {
      const fb = await get("/api/feedback"), fbKey = JSON.stringify(fb);
      if (fbKey !== lastFeedback) { lastFeedback = fbKey; renderFeedback(fb); }
    }
    await pollMetrics();
    const snapKey = JSON.stringify(s.snapshots);
    if (snapKey !== lastSnapshots) {
      lastSnapshots = snapKey;
      renderIndex(await get("/api/snapshots"));
    }
    if (!s.status.alert) showError("");
    document.body.dataset.loaded = "1";
  } catch (e) {
    showError(`Cannot read the run: ${e.message}`);
  }
}

$("example").addEventListener("change", (e) => select(e.target.value, undefined));
$("step-slider").addEventListener("input", (e) => select(undefined, index.steps[Number(e.target.value)].step));
window.addEventListener("hashchange", renderEvolution);
window.addEventListener("resize", () => {
  for (const [plot, id] of [[lossPlot, "loss-chart"], [exPlot, "example-chart"], [driftPlot, "drift-chart"]]) {
    if (plot) plot.setSize({ width: chartWidth($(id)), height: plot.height });
  }
});

poll();
setInterval(poll, POLL_MS);
