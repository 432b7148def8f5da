// The live-preview page: pick an avatar, give audio, wait in line, watch the stream.
import { MuseTalkClient } from "./embed.js";
import { babble, captureMicrophone, recordMicrophone, toneSweep, vowelSequence, wav } from "./audio.js";
import { fmtSeconds, initialLang, lang, onLangChange, setLang, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
const form = $("request");
const video = $("video");
const statusEl = $("status");
const queueBar = $("queue-bar");
const genBar = $("gen-bar");

const SAMPLES = {
  vowels: () => vowelSequence("a e i o u a o"),
  hello: () => babble("Hello, how are you today?"),
  long: () => babble("MuseTalk moves the lips of a face to match the audio. This is a longer test, spoken by nobody at all."),
  tone: () => toneSweep(2),
};

// Everything the console (and the browser tests) may want to look at.
const page = (window.mts = { client: null, positions: [], recorded: null, stopMic: null, latency: null });
let clientKey = null;
let lastStatus = ["status.idle"];
let stateName = "idle";
let firstPosition = 0;
let received = 0;

// ----- status -----

function setStatus(state, key, ...args) {
  stateName = state;
  lastStatus = [key, ...args];
  statusEl.dataset.state = state;
  statusEl.textContent = t(key, ...args);
}

function setBusy(busy) {
  $("start").disabled = busy;
  $("cancel").disabled = !busy;
}

function log(text) {
  const list = $("log");
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  list.append(item);
  while (list.children.length > 200) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

function stat(name, value) {
  $(`stat-${name}`).textContent = value;
}

// ----- the client -----

function clientFor(token) {
  const key = token || "";
  if (page.client && clientKey === key) return page.client;
  page.client?.close();
  const client = new MuseTalkClient({ token: token || undefined });
  client.attach(video);
  clientKey = key;
  page.client = client;

  client.addEventListener("welcome", ({ detail }) => {
    stat("tier", detail.tier);
    stat("engine", detail.engine ?? "–");
    $("engine-note").hidden = detail.engine !== "lite";
  });
  client.addEventListener("queued", ({ detail }) => {
    page.positions.push(detail.position);
    statusEl.dataset.position = detail.position;
    firstPosition = Math.max(firstPosition, detail.position);
    queueBar.max = firstPosition;
    queueBar.value = firstPosition - detail.position;
    setStatus("queued", "status.queued", detail.position, detail.queue_size, detail.eta_s);
  });
  client.addEventListener("reconnecting", () => setStatus("reconnecting", "status.reconnecting"));
  client.addEventListener("granted", ({ detail }) => {
    queueBar.max = 1;
    queueBar.value = 1;
    delete statusEl.dataset.position;
    stat("waited", fmtSeconds(detail.waited_s));
    setStatus("granted", "status.granted", detail.waited_s);
    notifyGranted();
  });
  client.addEventListener("stream", ({ detail }) => {
    stat("size", `${detail.width} × ${detail.height} @ ${detail.fps}`);
    stat("transport", detail.transport);
    if (stateName === "granted") setStatus("streaming", "status.streaming");
    if (client.request?.mode === "live") setStatus("live", "status.live");
  });
  client.addEventListener("progress", ({ detail }) => {
    if (detail.total) {
      genBar.max = detail.total;
      genBar.value = Math.min(detail.frames, detail.total);
    }
  });
  client.addEventListener("firstframe", ({ detail }) => {
    page.latency = detail.latency_s;
    stat("latency", detail.latency_s == null ? "–" : `${Math.round(detail.latency_s * 1000)} ms`);
  });
  client.addEventListener("media", ({ detail }) => {
    received += detail.bytes;
    stat("received", `${(received / 1e6).toFixed(2)} MB`);
  });
  client.addEventListener("done", ({ detail }) => {
    genBar.max = 1;
    genBar.value = 1;
    if (detail.clip) {
      const link = $("download");
      link.href = client.url(detail.clip);
      link.hidden = false;
    }
  });
  client.addEventListener("error", ({ detail }) => { page.lastError = detail; });
  client.addEventListener("state", ({ detail }) => {
    // A live session that the server ended (an error, the time limit, a closed socket).
    if ((detail.state === "idle" || detail.state === "closed") && page.stopMic && !client.request) {
      if (stateName === "live" && page.lastError) setStatus("error", "status.error", page.lastError.code, page.lastError.message);
      finishRun();
    }
  });
  for (const type of ["welcome", "reconnecting", "queued", "granted", "stream", "webrtc_answer", "progress", "done", "error", "closed"]) {
    client.addEventListener(type, ({ detail }) => {
      const { sdp, ...rest } = detail || {};
      log(`${type} ${JSON.stringify(sdp ? { ...rest, sdp: `${sdp.length} chars` } : rest)}`);
    });
  }
  return client;
}

// ----- notifications -----

function askNotificationPermission() {
  if ("Notification" in window && Notification.permission === "default") {
    Notification.requestPermission().catch(() => {});
  }
}

function notifyGranted() {
  if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
  const note = new Notification(t("notify.title"), { body: t("notify.body"), tag: "musetalk-granted" });
  note.onclick = () => { window.focus(); note.close(); };
}

// ----- audio sources -----

function source() {
  return form.elements.source.value;
}

function showSourcePane() {
  for (const pane of document.querySelectorAll(".source-pane")) pane.hidden = pane.dataset.source !== source();
}

let recording = null;
let recordTimer = null;

async function toggleRecording() {
  const button = $("record");
  if (recording) {
    clearInterval(recordTimer);
    const blob = await recording.stop();
    const seconds = (performance.now() - recording.started) / 1000;
    recording = null;
    button.setAttribute("aria-pressed", "false");
    button.textContent = t("record.start");
    page.recorded = blob;
    $("record-status").textContent = t("record.ready", seconds);
    const preview = $("record-preview");
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
    return;
  }
  try {
    recording = await recordMicrophone();
  } catch (err) {
    setStatus("error", "status.error", "microphone", String(err.message || err));
    return;
  }
  recording.started = performance.now();
  button.setAttribute("aria-pressed", "true");
  button.textContent = t("record.stop");
  const tick = () => { $("record-status").textContent = t("record.running", (performance.now() - recording.started) / 1000); };
  tick();
  recordTimer = setInterval(tick, 500);
}

function clipAudio() {
  switch (source()) {
    case "sample":
      return wav(SAMPLES[$("sample").value]());
    case "file":
      return $("file").files[0] || null;
    case "record":
      return page.recorded;
    default:
      return null;
  }
}

// ----- start and cancel -----

function resetRun() {
  firstPosition = 0;
  received = 0;
  page.positions = [];
  page.latency = null;
  page.lastError = null;
  queueBar.max = 1;
  queueBar.value = 0;
  genBar.max = 1;
  genBar.value = 0;
  $("download").hidden = true;
  for (const name of ["waited", "latency", "size", "transport", "received"]) stat(name, "–");
}

async function start(event) {
  event.preventDefault();
  askNotificationPermission();
  const avatar = $("avatar").value;
  const transport = form.elements.transport.value;
  const live = source() === "live";
  const audio = live ? null : clipAudio();
  if (!live && !audio) {
    setStatus("error", "status.needaudio");
    return;
  }
  resetRun();
  setBusy(true);
  const client = clientFor($("token").value.trim());
  try {
    setStatus("connecting", "status.connecting");
    await client.connect();
    if (live) {
      await client.startLive({ avatar, transport });
      setStatus("live", "status.live");
      page.stopMic = await captureMicrophone((chunk) => client.request && client.sendAudio(chunk));
      return; // runs until Cancel
    }
    const done = await client.speak(audio, { avatar, transport });
    setStatus("done", "status.done", done.frames, done.duration_s);
  } catch (err) {
    if (err.code === "cancelled") setStatus("idle", "status.cancelled");
    else setStatus("error", "status.error", err.code || "error", err.detail?.message || err.message);
  } finally {
    if (!live || !client.request) finishRun();
  }
}

function finishRun() {
  page.stopMic?.();
  page.stopMic = null;
  setBusy(false);
}

function cancel() {
  page.client?.cancel();
  if (stateName === "live") setStatus("idle", "status.cancelled");
  finishRun();
}

// ----- live stats -----

let frameCount = 0;
function countFrames() {
  frameCount += 1;
  video.requestVideoFrameCallback(countFrames);
}
if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) video.requestVideoFrameCallback(countFrames);

let lastTick = performance.now();
let lastFrames = 0;
setInterval(() => {
  const now = performance.now();
  const elapsed = (now - lastTick) / 1000;
  const quality = video.getVideoPlaybackQuality?.();
  const frames = "requestVideoFrameCallback" in video ? frameCount : quality?.totalVideoFrames ?? 0;
  const fps = (frames - lastFrames) / elapsed;
  lastTick = now;
  lastFrames = frames;
  page.fps = fps;
  stat("fps", video.paused && fps === 0 ? "–" : fps.toFixed(1));
  if (quality) stat("dropped", String(quality.droppedVideoFrames));
}, 1000);

// ----- avatars -----

// An avatar still being prepared is listed, disabled, with its job's progress (GET /v1/avatars/{id}),
// and the list is read again until no preparation is left.
async function loadAvatars() {
  const select = $("avatar");
  const chosen = select.value;
  try {
    const response = await fetch("/v1/avatars", { cache: "no-store" });
    const avatars = await response.json();
    const jobs = await Promise.all(avatars.map((a) => a.ready ? null
      : fetch(`/v1/avatars/${encodeURIComponent(a.id)}`, { cache: "no-store" }).then((r) => r.json()).catch(() => null)));
    select.replaceChildren(...avatars.map((a, i) => {
      const job = jobs[i];
      let label = `${a.name} (${a.id})`;
      if (job?.status === "preparing") label += ` — ${t("avatar.preparing", Math.round((job.progress || 0) * 100))}`;
      else if (job?.status === "failed") label += ` — ${t("avatar.unusable", job.reason || "")}`;
      const option = new Option(label, a.id);
      option.disabled = !a.ready;
      return option;
    }));
    if (avatars.some((a) => a.id === chosen && a.ready)) select.value = chosen;
    if (!avatars.some((a) => a.ready)) select.replaceChildren(new Option(t("avatar.none"), ""));
    if (jobs.some((j) => j?.status === "preparing")) setTimeout(loadAvatars, 1000);
  } catch {
    select.replaceChildren(new Option(t("avatar.failed"), ""));
  }
}

// ----- wiring -----

form.addEventListener("submit", start);
$("cancel").addEventListener("click", cancel);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && !$("cancel").disabled) cancel();
});
for (const radio of form.elements.source) radio.addEventListener("change", showSourcePane);
$("record").addEventListener("click", toggleRecording);
$("sample-play").addEventListener("click", () => {
  const url = URL.createObjectURL(new Blob([wav(SAMPLES[$("sample").value]())], { type: "audio/wav" }));
  const audio = new Audio(url);
  audio.onended = () => URL.revokeObjectURL(url);
  audio.play();
});
$("lang").addEventListener("click", () => setLang(lang() === "zh" ? "en" : "zh"));
onLangChange(() => {
  statusEl.textContent = t(...lastStatus);
  if (recording) $("record").textContent = t("record.stop");
});
video.addEventListener("error", () => {
  const err = video.error;
  if (err) setStatus("error", "status.error", "media_error", err.message || `code ${err.code}`);
});

setLang(initialLang());
showSourcePane();
loadAvatars();
