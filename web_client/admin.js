// The admin page: GET /v1/admin/stats with the admin token typed in the page (kept in memory only).
import { initialLang, lang, onLangChange, setLang, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
let timer = null;
let last = null;
let lastMessage = null;

function message(kind, key, ...args) {
  lastMessage = [kind, key, ...args];
  $("message").className = kind;
  $("message").textContent = t(key, ...args);
}

function cell(text, numeric = false) {
  const td = document.createElement(numeric ? "td" : "th");
  if (numeric) td.className = "num";
  td.textContent = text;
  return td;
}

function render(stats) {
  last = stats;
  $("stats-panel").hidden = false;
  $("waiting").replaceChildren(...Object.entries(stats.waiting).map(([tier, w]) => {
    const row = document.createElement("tr");
    row.dataset.tier = tier;
    row.append(cell(tier), cell(String(w.size), true), cell(w.eta_s == null ? "–" : w.eta_s.toFixed(1), true));
    return row;
  }));
  $("slots-busy").textContent = stats.slots.busy;
  $("slots-free").textContent = stats.slots.free;
  $("slots-total").textContent = stats.slots.total;
  $("fps").textContent = stats.frames_per_second.toFixed(1);
  $("clips").textContent = stats.clips_served;
  $("frames").textContent = stats.frames_streamed;
  $("connections").textContent = stats.connections;
  $("sessions").textContent = stats.sessions_active;
  $("engine").textContent = stats.engine;
  const errors = Object.entries(stats.errors).sort((a, b) => b[1] - a[1]);
  $("errors").replaceChildren(...(errors.length ? errors.map(([code, n]) => {
    const row = document.createElement("tr");
    row.append(cell(code), cell(String(n), true));
    return row;
  }) : [(() => { const row = document.createElement("tr"); row.append(cell(t("admin.noerrors")), cell("", true)); return row; })()]));
  message("", "admin.updated", new Date().toLocaleTimeString());
}

async function load() {
  const token = $("token").value.trim();
  if (!token) {
    stop();
    $("stats-panel").hidden = true;
    message("error", "admin.needtoken");
    return;
  }
  let response;
  try {
    response = await fetch("/v1/admin/stats", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  } catch (err) {
    message("error", "admin.refused", "network", String(err));
    return;
  }
  if (!response.ok) {
    stop();
    $("stats-panel").hidden = true;
    const body = await response.json().catch(() => ({}));
    message("error", "admin.refused", response.status, body.message || response.statusText);
    return;
  }
  render(await response.json());
}

function stop() {
  clearInterval(timer);
  timer = null;
}

function schedule() {
  stop();
  if ($("auto").checked) timer = setInterval(load, 2000);
}

$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  load().then(() => { if (!$("stats-panel").hidden) schedule(); });
});
$("auto").addEventListener("change", () => { if (!$("stats-panel").hidden) schedule(); });
$("lang").addEventListener("click", () => setLang(lang() === "zh" ? "en" : "zh"));
onLangChange(() => {
  if (last) render(last);
  else if (lastMessage) message(...lastMessage);
});
setLang(initialLang());
