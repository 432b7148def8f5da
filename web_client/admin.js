// The admin page: GET /v1/admin/stats with the admin token typed in the page (kept in memory only).
import { MuseTalkClient } from "./embed.js";
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
    $("avatars-panel").hidden = true;
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
    $("avatars-panel").hidden = true;
    const body = await response.json().catch(() => ({}));
    message("error", "admin.refused", response.status, body.message || response.statusText);
    return;
  }
  render(await response.json());
  $("avatars-panel").hidden = false;
  await loadAvatars();
}

// ----- avatars: upload (a job with progress), status, delete -----

const sdk = () => new MuseTalkClient({ server: location.origin, token: $("token").value.trim() });

function avatarStatus(a) {
  if (a.status === "preparing") return t("admin.avatar.preparing", Math.round((a.progress || 0) * 100));
  if (a.status === "failed") return t("admin.avatar.failed", a.reason || "");
  return t("admin.avatar.ready");
}

async function loadAvatars() {
  const client = sdk();
  const listed = await client.avatars();
  const views = await Promise.all(listed.map((a) => client.avatar(a.id).catch(() => null)));
  $("avatars").replaceChildren(...views.filter(Boolean).map((a) => {
    const row = document.createElement("tr");
    row.dataset.avatar = a.id;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = t("admin.avatar.delete");
    remove.disabled = a.status === "preparing";
    remove.addEventListener("click", async () => {
      try {
        await client.deleteAvatar(a.id);
      } catch (err) {
        message("error", "admin.refused", err.code, err.message.replace(`${err.code}: `, ""));
      }
      await loadAvatars();
    });
    const actions = document.createElement("td");
    actions.append(remove);
    row.append(cell(`${a.name} (${a.id})`), cell(avatarStatus(a), true), actions);
    return row;
  }));
}

async function upload(e) {
  e.preventDefault();
  const file = $("avatar-file").files[0];
  const id = $("avatar-id").value.trim();
  const bar = $("avatar-progress");
  const text = $("avatar-job-text");
  bar.hidden = false;
  bar.value = 0;
  text.textContent = t("admin.avatar.preparing", 0);
  try {
    const ready = await sdk().createAvatar(file, {
      id, name: $("avatar-name").value.trim() || undefined,
      onProgress: (a) => { bar.value = a.progress || 0; text.textContent = avatarStatus(a); loadAvatars(); },
    });
    bar.value = 1;
    text.textContent = avatarStatus(ready);
  } catch (err) {
    bar.hidden = true;
    text.textContent = err.code === "avatar_failed" ? t("admin.avatar.failed", err.detail?.reason || err.message)
      : t("admin.refused", err.code, err.message.replace(`${err.code}: `, ""));
  }
  await loadAvatars();
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
$("upload").addEventListener("submit", upload);
$("auto").addEventListener("change", () => { if (!$("stats-panel").hidden) schedule(); });
$("lang").addEventListener("click", () => setLang(lang() === "zh" ? "en" : "zh"));
onLangChange(() => {
  if (last) render(last);
  else if (lastMessage) message(...lastMessage);
});
setLang(initialLang());
