// Keel's web UI: the little that HTML alone cannot do. Every page works
// without it except live updates, the ISO upload and the consoles.

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content ?? "";

// ----- theme: the system's, unless chosen here (kept in localStorage) -----
function applyTheme() {
  const t = localStorage.getItem("keel-theme");
  if (t === "light" || t === "dark") document.documentElement.dataset.theme = t;
  else delete document.documentElement.dataset.theme;
}
applyTheme();
for (const b of document.querySelectorAll("[data-theme-toggle]")) {
  b.addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme
      ? document.documentElement.dataset.theme === "dark"
      : matchMedia("(prefers-color-scheme: dark)").matches;
    localStorage.setItem("keel-theme", dark ? "light" : "dark");
    applyTheme();
  });
}

// ----- destructive actions: enabled once the name is typed -----
for (const f of document.querySelectorAll("form[data-confirm]")) {
  const input = f.querySelector('input[name="confirm"]');
  const button = f.querySelector('button[type="submit"]');
  const check = () => { button.disabled = input.value.trim() !== f.dataset.confirm; };
  input.addEventListener("input", check);
  check();
}

// ----- sizes: warn before sending what the quota will refuse -----
const UNITS = { "": 1, B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };
function parseSize(s) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(s);
  return m ? Math.round(parseFloat(m[1]) * UNITS[m[2].toUpperCase()]) : NaN;
}
export function human(b) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return `${i ? b.toFixed(1) : b} ${u[i]}`;
}
for (const input of document.querySelectorAll("input[data-size-max]")) {
  const max = Number(input.dataset.sizeMax);
  const warn = input.form.querySelector("[data-size-warning]");
  input.addEventListener("input", () => {
    const n = parseSize(input.value);
    const over = Number.isFinite(n) && n > max;
    if (warn) {
      warn.hidden = !over;
      warn.textContent = over ? `That is more than your quota has left (${human(max)}): it will be refused.` : "";
    }
    input.setCustomValidity(over ? `at most ${human(max)} left in your quota` : "");
  });
}

// ----- live jobs and events (server-sent events) -----
const seen = new Map(); // job id -> [first time, first bytes]
const runningJobs = new Set();

function updateJob(j) {
  const els = document.querySelectorAll(`[data-job="${j.id}"]`);
  if (!els.length) addJobRow(j);
  const pct = j.progress_percent ?? (j.state === "done" ? 100 : 0);
  if (!seen.has(j.id)) seen.set(j.id, [Date.now(), j.done_bytes]);
  const [t0, b0] = seen.get(j.id);
  const rate = (j.done_bytes - b0) / Math.max(1, (Date.now() - t0) / 1000);
  for (const el of document.querySelectorAll(`[data-job="${j.id}"]`)) {
    const p = el.querySelector("progress");
    if (p) p.value = pct;
    el.querySelector("[data-pct]").textContent = `${Math.floor(pct)} %`;
    el.querySelector("[data-bytes]").textContent =
      `${human(j.done_bytes)} of ${j.total_bytes ? human(j.total_bytes) : "?"}`;
    const eta = el.querySelector("[data-eta]");
    if (j.state === "running" && rate > 0 && j.total_bytes > j.done_bytes) {
      eta.textContent = `about ${Math.ceil((j.total_bytes - j.done_bytes) / rate)} s left`;
    } else {
      eta.textContent = "";
    }
    const st = el.querySelector("[data-state]");
    st.innerHTML = "";
    const badge = document.createElement("span");
    badge.className = `badge s-${j.state}`;
    badge.textContent = j.state;
    st.append(badge);
    const err = el.querySelector("[data-error]");
    if (err) { err.hidden = !j.error; err.textContent = j.error ?? ""; }
    el.dataset.state = j.state;
  }
  // The stream sends every running job once at its start, then changes.
  if (j.state === "running") runningJobs.add(j.id);
  else runningJobs.delete(j.id);
  const running = document.querySelector("[data-running-jobs]");
  if (running) running.textContent = String(runningJobs.size);
}

function cell(tr, text, href) {
  const td = document.createElement("td");
  if (href) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    td.append(a);
  } else {
    td.textContent = text;
  }
  tr.append(td);
  return td;
}

// A job this page did not list yet (the jobs page): a new row on top.
function addJobRow(j) {
  const table = document.querySelector("[data-jobs-table] tbody");
  if (!table) return;
  const tr = document.createElement("tr");
  cell(tr, `#${j.id}`, `/jobs/${j.id}`);
  cell(tr, j.kind); cell(tr, j.target); cell(tr, j.owner);
  cell(tr, new Date(j.started * 1000).toISOString().replace("T", " ").replace(/\..*/, " UTC"));
  const td = cell(tr, "");
  const div = document.createElement("div");
  div.className = "job";
  div.dataset.job = String(j.id);
  const p = document.createElement("progress");
  p.max = 100;
  p.value = 0;
  p.setAttribute("aria-label", `job ${j.id} progress`);
  div.append(p);
  for (const k of ["pct", "bytes", "eta", "state"]) {
    const span = document.createElement("span");
    span.setAttribute(`data-${k}`, "");
    if (k === "pct") span.className = "pct";
    div.append(" ", span);
  }
  const err = document.createElement("p");
  err.className = "error";
  err.setAttribute("data-error", "");
  err.hidden = true;
  div.append(err);
  td.append(div);
  table.prepend(tr);
}

function addEvent(e) {
  const body = document.querySelector("[data-events]");
  if (!body) return;
  const tr = document.createElement("tr");
  for (const v of [e.id, new Date(e.time * 1000).toISOString().replace("T", " ").replace(/\..*/, " UTC"),
    e.user, e.action, e.target, e.detail]) cell(tr, String(v ?? ""));
  body.prepend(tr);
}

// A VM's state changed: its page is drawn again (its buttons depend on
// the state) unless a form is being filled in or was just sent (its answer
// is the new page); a list just updates.
let submitting = false;
document.addEventListener("submit", () => { submitting = true; });
function updateVm(v) {
  for (const el of document.querySelectorAll(`[data-vm-state][data-vm="${CSS.escape(v.name)}"]`)) {
    if (el.dataset.vmState === v.state) continue;
    const editing = document.activeElement?.matches("input, select, textarea");
    if (el.hasAttribute("data-vm-page") && !editing) {
      if (!submitting) location.reload();
      return;
    }
    el.dataset.vmState = v.state;
    const badge = document.createElement("span");
    badge.className = `badge s-${v.state}`;
    badge.textContent = v.state;
    el.replaceChildren(badge);
  }
}

const wantsLive = document.querySelector("[data-job], [data-jobs-table], [data-events], [data-running-jobs], [data-vm-state]");
if (wantsLive) {
  const from = document.querySelector("[data-events-from]")?.dataset.eventsFrom;
  const es = new EventSource(from ? `/ui/live?after=${from}` : "/ui/live");
  es.addEventListener("job", (m) => updateJob(JSON.parse(m.data)));
  es.addEventListener("log", (m) => addEvent(JSON.parse(m.data)));
  es.addEventListener("vm", (m) => updateVm(JSON.parse(m.data)));
  window.keelLive = es;
}

// ----- ISO upload: a streamed PUT, with its progress -----
const up = document.getElementById("iso-upload");
if (up) {
  up.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = up.querySelector('[name="name"]').value.trim();
    const file = up.querySelector('[name="file"]').files[0];
    const status = up.querySelector("[data-upload-status]");
    const max = up.dataset.uploadMax ? Number(up.dataset.uploadMax) : Infinity;
    if (!file || !name) return;
    if (file.size > max) {
      status.textContent = `The file (${human(file.size)}) is more than your quota has left (${human(max)}).`;
      return;
    }
    const x = new XMLHttpRequest();
    x.open("PUT", `/isos/${encodeURIComponent(name)}`);
    x.setRequestHeader("X-CSRF-Token", csrf());
    x.upload.addEventListener("progress", (p) => {
      if (p.lengthComputable) status.textContent = `Uploading: ${Math.floor((p.loaded * 100) / p.total)} % of ${human(p.total)}`;
    });
    x.addEventListener("load", () => {
      if (x.status === 201) {
        location.assign("/isos");
      } else {
        let why = x.statusText;
        try { why = JSON.parse(x.responseText).error; } catch { /* not JSON */ }
        status.textContent = `Refused: ${why}`;
      }
    });
    x.addEventListener("error", () => { status.textContent = "The upload failed: the connection dropped."; });
    x.send(file);
  });
}

// ----- consoles: a one-time ticket for the WebSocket -----
export async function consoleSocket(vm, kind) {
  const r = await fetch("/ui/tickets", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: JSON.stringify({ vm, kind }),
  });
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error; } catch { /* not JSON */ }
    throw new Error(why);
  }
  const { ticket } = await r.json();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ui/ws/${kind}?ticket=${encodeURIComponent(ticket)}`;
}
