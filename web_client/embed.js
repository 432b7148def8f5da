// musetalk-stream browser SDK and <musetalk-avatar> widget. One ES module, no dependencies.
//
//   import { MuseTalkClient } from "https://host/embed.js";
//   const client = new MuseTalkClient({ server: "https://host", token });   // both optional
//   client.attach(document.querySelector("video"));
//   client.addEventListener("queued", (e) => console.log(e.detail.position, e.detail.eta_s));
//   await client.connect();
//   const done = await client.speak(wavBlob, { avatar: "astronaut" });     // resolves on `done`
//   await client.say("hello", { avatar: "astronaut" });       // a template phrase, from the store when rendered
//   await client.createAvatar(file, { id: "ann", onProgress: (a) => console.log(a.progress) });  // admin token
//
// Widget:  <script type="module" src="https://host/embed.js"></script>
//          <musetalk-avatar avatar="astronaut" server="https://host"></musetalk-avatar>
//          document.querySelector("musetalk-avatar").speak(blob)
//
// Protocol: docs/protocol.md. Events (CustomEvent, the server message in `detail`): welcome,
// queued, granted, stream, progress, done, error, plus `firstframe` ({latency_s}), `closed`
// ({code, reason}) and `state` ({state}).

const ENDING_CODES = new Set([
  "queue_full", "invalid_token", "unknown_avatar", "bad_audio", "audio_too_long", "rate_limited",
  "busy", "internal", "session_expired", "not_granted", "forbidden_origin",
]);
const DEFAULT_CHUNK = 256 * 1024;
const LIVE_MAX_LAG_S = 1.0;
const MAX_RESUMES = 3;

export class MuseTalkError extends Error {
  constructor(code, message, detail = {}) {
    super(`${code}: ${message}`);
    this.name = "MuseTalkError";
    this.code = code;
    this.detail = detail;
  }
}

// Where this module was served from: the default server (the page's own origin when the page
// and the server are the same, as for the server's own pages).
const HOME = new URL("./", import.meta.url).href;

/** The server's base URL, always ending in "/". */
function baseUrl(server) {
  const url = new URL(server || HOME, typeof location === "undefined" ? HOME : location.href);
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  url.search = "";
  url.hash = "";
  return url;
}

function socketUrl(server) {
  const url = new URL("v1/stream", baseUrl(server));
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/** The container of an audio file from its first bytes: wav, ogg, flac, mp3, or null. */
export function sniffAudioFormat(bytes) {
  const b = new Uint8Array(bytes.buffer ?? bytes, bytes.byteOffset ?? 0, Math.min(12, bytes.byteLength));
  const ascii = (from, to) => String.fromCharCode(...b.subarray(from, to));
  if (b.length >= 12 && ascii(0, 4) === "RIFF" && ascii(8, 12) === "WAVE") return "wav";
  if (ascii(0, 4) === "OggS") return "ogg";
  if (ascii(0, 4) === "fLaC") return "flac";
  if (ascii(0, 3) === "ID3" || (b[0] === 0xff && (b[1] & 0xe0) === 0xe0)) return "mp3";
  return null;
}

/** 16-bit PCM WAV bytes from mono float samples in [-1, 1]. */
export function encodeWav(samples, sampleRate) {
  const data = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) data.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); data.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); data.setUint32(16, 16, true); data.setUint16(20, 1, true); data.setUint16(22, 1, true);
  data.setUint32(24, sampleRate, true); data.setUint32(28, sampleRate * 2, true);
  data.setUint16(32, 2, true); data.setUint16(34, 16, true);
  text(36, "data"); data.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    data.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return data.buffer;
}

/** Any audio the browser can decode (a MediaRecorder webm/opus or mp4 recording, m4a, ...) as a
 * 16 kHz mono WAV ArrayBuffer: the server takes wav, mp3, ogg, flac and raw PCM only. */
export async function toWav(audio, sampleRate = 16000) {
  const bytes = audio instanceof Blob ? await audio.arrayBuffer() : audio;
  const ctx = new OfflineAudioContext(1, 1, sampleRate);
  const decoded = await ctx.decodeAudioData(bytes.slice(0));
  const length = Math.max(1, Math.ceil(decoded.duration * sampleRate));
  const offline = new OfflineAudioContext(1, length, sampleRate);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const rendered = await offline.startRendering();
  return encodeWav(rendered.getChannelData(0), sampleRate);
}

/** Plays one request's fMP4 stream in a <video> through Media Source Extensions. */
class MsePlayer {
  constructor(video) {
    this.video = video;
    this.mediaSource = null;
    this.buffer = null;
    this.queue = [];
    this.ending = false;
    this.live = false;
    this.url = null;
    this.onError = () => {};
    this._pump = () => this.pump();
  }

  begin(mime, { live = false } = {}) {
    this.reset();
    if (!("MediaSource" in window) || !MediaSource.isTypeSupported(mime)) {
      this.onError(new MuseTalkError("unsupported_media", `this browser cannot play ${mime}`));
      return;
    }
    this.live = live;
    const ms = (this.mediaSource = new MediaSource());
    this.url = URL.createObjectURL(ms);
    this.video.srcObject = null;
    this.video.src = this.url;
    ms.addEventListener("sourceopen", () => {
      if (this.mediaSource !== ms) return;
      try {
        this.buffer = ms.addSourceBuffer(mime);
      } catch (err) {
        this.onError(new MuseTalkError("unsupported_media", String(err)));
        return;
      }
      this.buffer.mode = "segments";
      this.buffer.addEventListener("updateend", this._pump);
      this.pump();
    }, { once: true });
    this.video.play().catch(() => {});
  }

  append(data) {
    if (!this.mediaSource) return;
    this.queue.push(data);
    this.pump();
  }

  end() {
    this.ending = true;
    this.pump();
  }

  pump() {
    const sb = this.buffer;
    if (!sb || sb.updating || this.mediaSource?.readyState !== "open") return;
    if (this.live && this._trim(sb)) return;
    if (this.queue.length) {
      try {
        sb.appendBuffer(this.queue[0]);
        this.queue.shift();
      } catch (err) {
        if (err.name === "QuotaExceededError" && this._trim(sb, 2)) return;
        this.onError(new MuseTalkError("media_error", String(err)));
        this.queue = [];
      }
      return;
    }
    if (this.ending) {
      this.mediaSource.endOfStream();
      return;
    }
    if (this.live) this._chase();
  }

  /** Live: drop what is well behind the playhead; true if a removal started. */
  _trim(sb, keep = 10) {
    const ranges = sb.buffered;
    if (!ranges.length) return false;
    const start = ranges.start(0);
    const cut = this.video.currentTime - keep;
    if (cut - start < (keep === 10 ? 20 : 0.5)) return false;
    sb.remove(start, cut);
    return true;
  }

  /** Live: stay within LIVE_MAX_LAG_S of the newest media. */
  _chase() {
    const ranges = this.video.buffered;
    if (!ranges.length) return;
    const end = ranges.end(ranges.length - 1);
    if (end - this.video.currentTime > LIVE_MAX_LAG_S) this.video.currentTime = Math.max(0, end - 0.3);
  }

  reset() {
    if (this.buffer) this.buffer.removeEventListener("updateend", this._pump);
    this.buffer = null;
    this.queue = [];
    this.ending = false;
    this.mediaSource = null;
    if (this.url) {
      URL.revokeObjectURL(this.url);
      this.url = null;
    }
  }
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

/**
 * One session socket. At most one request (clip or live) at a time, as the server allows.
 *
 * options: server (URL; default the server that served this module), token (JWT; none means guest, tier low),
 * transport ("mse" | "webrtc", default "mse"), iceServers (RTCIceServer[], default []),
 * chunkBytes (audio frame size, capped by the server's max_message_bytes).
 */
export class MuseTalkClient extends EventTarget {
  constructor(options = {}) {
    super();
    if (typeof options === "string") options = { server: options };
    this.server = baseUrl(options.server);
    this.token = options.token || null;
    this.transport = options.transport || "mse";
    this.iceServers = options.iceServers || [];
    this.chunkBytes = options.chunkBytes || DEFAULT_CHUNK;
    this.ws = null;
    this.welcome = null;
    this.video = null;
    this.player = null;
    this.pc = null;
    this.request = null;
    this.state = "closed";
    this._connecting = null;
    this._ids = 0;
    this._pending = new Map();
  }

  // ----- connection -----

  /** Open the socket and say hello; resolves with the `welcome` message. */
  connect() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN && this._connecting) return this._connecting;
    this._closing = false;
    this._connecting = new Promise((resolve, reject) => {
      this._setState("connecting");
      this._open({}, { resolve, reject });
    });
    return this._connecting;
  }

  /** A new socket whose first message is hello (with `fields`, e.g. resume), to the server or
   * to `url` (a redirect's node). */
  _open(fields, pending, url) {
    const ws = (this.ws = new WebSocket(url || socketUrl(this.server)));
    ws.binaryType = "arraybuffer";
    const id = this._nextId();
    this._pending.set(id, pending);
    ws.onopen = () => this._send({ type: "hello", id, ...(this.token ? { token: this.token } : {}), ...fields });
    ws.onmessage = (event) => this._onMessage(event.data);
    ws.onclose = (event) => this._onClose(ws, event);
  }

  /** Close the socket (any request ends with it). */
  close() {
    this._closing = true;
    this.ws?.close(1000);
  }

  /** GET /v1/avatars on the same server. */
  async avatars() {
    const response = await fetch(new URL("v1/avatars", this.server));
    if (!response.ok) throw new MuseTalkError("http_" + response.status, await response.text());
    return response.json();
  }

  /** GET /v1/avatars/{id}: `status` is "preparing" (with `progress`, 0 to 1), "ready" or "failed"
   * (with a `reason` a person can act on). */
  async avatar(id) {
    const response = await fetch(new URL(`v1/avatars/${encodeURIComponent(id)}`, this.server), { cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new MuseTalkError(body.code || "http_" + response.status, body.message || response.statusText);
    return body;
  }

  /**
   * Admin (the client's token must carry the admin role): make avatar `id` from an image or video
   * (Blob/File). Calls onProgress(avatar) while it is prepared; resolves with the ready avatar;
   * rejects with MuseTalkError("avatar_failed", reason) when the preparation failed, or with the
   * server's code when the upload was refused.
   */
  async createAvatar(file, { id, name, onProgress, pollMs = 500 } = {}) {
    if (!id) throw new MuseTalkError("bad_message", "an avatar id is required");
    const url = new URL("v1/avatars", this.server);
    url.searchParams.set("id", id);
    if (name) url.searchParams.set("name", name);
    const response = await fetch(url, {
      method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream", ...this._authHeader() },
    });
    const body = await response.json().catch(() => ({}));
    if (response.status !== 202) throw new MuseTalkError(body.code || "http_" + response.status, body.message || response.statusText);
    onProgress?.({ id, name: body.name, status: "preparing", progress: body.job?.progress ?? 0, job: body.job });
    for (;;) {
      await new Promise((resolve) => setTimeout(resolve, pollMs));
      const avatar = await this.avatar(id);
      if (avatar.status === "ready") return avatar;
      if (avatar.status === "failed") throw new MuseTalkError("avatar_failed", avatar.reason || "the preparation failed", avatar);
      onProgress?.(avatar);
    }
  }

  /** Admin: delete an avatar and every clip made with it. */
  async deleteAvatar(id) {
    const response = await fetch(new URL(`v1/avatars/${encodeURIComponent(id)}`, this.server), {
      method: "DELETE", headers: this._authHeader(),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new MuseTalkError(body.code || "http_" + response.status, body.message || response.statusText);
    return body;
  }

  _authHeader() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  /** An absolute URL for a server path such as `done.clip`. */
  url(path) {
    return new URL(path.replace(/^\//, ""), this.server).href;
  }

  // ----- requests -----

  /**
   * Lip-sync one clip. audio: Blob, File, ArrayBuffer or typed array. format: "wav" | "mp3" |
   * "ogg" | "flac" (sniffed when omitted; anything else the browser can decode is converted to WAV).
   * Resolves with the `done` message; rejects with a MuseTalkError.
   */
  async speak(audio, { avatar, format, transport } = {}) {
    let bytes = audio instanceof Blob ? await audio.arrayBuffer() : audio;
    if (ArrayBuffer.isView(bytes)) bytes = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    format = format || sniffAudioFormat(bytes);
    if (!format) {
      bytes = await toWav(bytes);
      format = "wav";
    }
    const request = await this._start({ avatar, mode: "clip", transport, audio: { format } });
    request.audio = bytes; // kept: a redirect (or a resume on another node) sends it again
    this._sendClipAudio(request);
    return request.finished;
  }

  _sendClipAudio(request) {
    const bytes = request.audio;
    const chunk = Math.min(this.chunkBytes, this.welcome?.limits?.max_message_bytes || Infinity);
    for (let at = 0; at < bytes.byteLength; at += chunk) {
      if (this.request !== request || this.ws?.readyState !== WebSocket.OPEN) break;
      this.ws.send(bytes.slice(at, at + chunk));
    }
    if (this.request === request) {
      this._send({ type: "audio_end", id: request.ids.audioEnd });
      request.audioSent = true;
    }
  }

  /** The slot granted is on another node: move there with the grant, send the same start (and
   * a clip's audio) again; the caller notices nothing but a short `redirecting` state. */
  _followRedirect(request, msg) {
    const old = this.ws;
    this._setState("redirecting");
    this.welcome = null;
    this._open({ resume: msg.grant }, {
      resolve: () => {
        if (this.request !== request) return;
        this._send({ ...request.startMessage, id: request.ids.start });
        if (request.mode === "clip" && request.audio) this._sendClipAudio(request);
      },
      reject: (err) => this._finish(request, err),
    }, msg.url);
    old?.close(1000);
  }

  /** Say a template phrase (configs/templates.toml on the server) with `avatar`: a clip with no
   * audio of its own, streamed from the clip store at once when rendered before. Resolves on `done`. */
  async say(template, { avatar, transport } = {}) {
    const request = await this._start({ avatar, mode: "clip", transport, template });
    request.audioSent = true;
    return request.finished;
  }

  /** Start a live session (pcm_s16le 16 kHz mono by default). Resolves on `granted`. */
  async startLive({ avatar, transport, audio } = {}) {
    const request = await this._start({
      avatar, mode: "live", transport,
      audio: audio || { format: "pcm_s16le", sample_rate: 16000, channels: 1 },
    });
    request.finished.catch(() => {});
    return request.granted;
  }

  /** Live: a chunk of audio in the declared format (by default Int16Array / ArrayBuffer PCM). */
  sendAudio(chunk) {
    if (!this.request) throw new MuseTalkError("no_request", "startLive() first");
    if (ArrayBuffer.isView(chunk)) chunk = chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength);
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(chunk); // dropped while reconnecting
  }

  /** Live: the utterance is complete. */
  endUtterance() {
    if (this.request) this._send({ type: "audio_end" });
  }

  /** Live: drop pending speech and go back to idle frames. */
  interrupt() {
    if (this.request) this._send({ type: "interrupt" });
  }

  /** Leave the queue or stop the stream; the socket stays usable. */
  cancel() {
    const request = this.request;
    if (!request) return;
    this._send({ type: "cancel" });
    this._finish(request, new MuseTalkError("cancelled", "cancelled by the client"));
  }

  // ----- playback -----

  /** Play media in this <video>: MSE (`stream` + fMP4) or WebRTC (srcObject). */
  attach(video) {
    this.video = video;
    this.player = new MsePlayer(video);
    this.player.onError = (err) => this._emit("error", { code: err.code, message: err.message });
    return this;
  }

  // ----- internals -----

  async _start({ avatar, mode, transport, audio, template }) {
    if (!avatar) throw new MuseTalkError("bad_message", "an avatar id is required");
    if (this.request) throw new MuseTalkError("busy", "this client already has a request; cancel() it first");
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || !this.welcome) await this.connect();
    transport = transport || this.transport;
    const ids = { start: this._nextId(), audioEnd: this._nextId(), offer: this._nextId() };
    this._streamTransport = null;
    const request = {
      mode, transport, ids, phase: "starting", grantedAt: null, resumes: 0,
      audioSent: mode === "live", // a clip can resume only once all its audio is with the server
    };
    let grantedResolve, grantedReject, finishedResolve, finishedReject, ackResolve, ackReject;
    request.granted = new Promise((res, rej) => { grantedResolve = res; grantedReject = rej; });
    request.finished = new Promise((res, rej) => { finishedResolve = res; finishedReject = rej; });
    const ack = new Promise((res, rej) => { ackResolve = res; ackReject = rej; });
    request.granted.catch(() => {});
    request.finished.catch(() => {});
    request.resolveGranted = grantedResolve;
    request.resolve = (msg) => { ackResolve(); grantedResolve(msg); finishedResolve(msg); };
    request.reject = (err) => { ackReject(err); grantedReject(err); finishedReject(err); };
    request.ack = ackResolve;
    this.request = request;
    request.startMessage = {
      type: "start", avatar, mode, transport, ...(audio ? { audio } : {}), ...(template ? { template } : {}),
    };
    this._send({ ...request.startMessage, id: ids.start });
    // `start` has no reply of its own: the first `queued` or `granted` says it was taken.
    await ack;
    return request;
  }

  _nextId() {
    this._ids += 1;
    return this._ids;
  }

  _send(message) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _onMessage(data) {
    if (typeof data !== "string") {
      this._emit("media", { bytes: data.byteLength });
      if (this._streamTransport === "mse") this.player?.append(data);
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    const request = this.request;
    switch (msg.type) {
      case "welcome": {
        this.welcome = msg;
        this._resumeToken = msg.resume;
        if (!request) this._setState("idle");
        const pending = this._pending.get(msg.id);
        this._pending.delete(msg.id);
        pending?.resolve(msg);
        break;
      }
      case "redirect":
        if (request) this._followRedirect(request, msg);
        break;
      case "queued":
        if (request) {
          request.resuming = false;
          request.phase = "queued";
          request.ack();
          this._setState("queued");
        }
        break;
      case "granted":
        if (request) {
          request.phase = "granted";
          request.grantedAt = performance.now();
          request.ack();
          request.resolveGranted(msg);
          this._setState("granted");
          if (request.transport === "webrtc") {
            this._offer(request).catch((err) => this._fail(request, "webrtc_failed", String(err)));
          }
        }
        break;
      case "stream":
        if (request) {
          request.ack(); // a stored template clip streams at once, with no queued or granted first
          request.phase = "streaming";
          this._setState("streaming");
        }
        // A repeated clip comes from the cache over MSE, even for a WebRTC request.
        this._streamTransport = msg.transport;
        if (msg.transport === "mse" && this.player) this.player.begin(msg.mime, { live: request?.mode === "live" });
        this._watchFirstFrame(request);
        break;
      case "webrtc_answer":
        if (request && this.pc) {
          this.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp })
            .catch((err) => this._fail(request, "webrtc_failed", String(err)));
        }
        break;
      case "done":
        if (this._streamTransport === "mse") this.player?.end();
        break;
      case "error":
        break;
      default:
        break;
    }
    this._emit(msg.type, msg);
    if (msg.type === "done" && request) this._finish(request, null, msg);
    if (msg.type === "error" && request?.resuming && msg.code === "bad_audio" && request.audio) {
      // Resumed on another node (the first one went away): the place is kept, the audio is not.
      request.resuming = false;
      this._sendClipAudio(request);
      return;
    }
    if (msg.type === "error") this._onError(msg);
  }

  _onError(msg) {
    const pending = this._pending.get(msg.id);
    if (pending) {
      this._pending.delete(msg.id);
      pending.reject(new MuseTalkError(msg.code, msg.message, msg));
      return;
    }
    const request = this.request;
    if (!request) return;
    const ours = (msg.id !== undefined && Object.values(request.ids).includes(msg.id)) || msg.code === "session_expired";
    const waitingForAnswer = request.transport === "webrtc" && request.phase === "granted";
    if (ours || (msg.id === undefined && (ENDING_CODES.has(msg.code) || waitingForAnswer))) {
      this._finish(request, new MuseTalkError(msg.code, msg.message, msg));
    }
  }

  _fail(request, code, message) {
    if (this.request !== request) return;
    this._emit("error", { type: "error", code, message });
    this._send({ type: "cancel" });
    this._finish(request, new MuseTalkError(code, message));
  }

  _finish(request, error, done) {
    if (this.request !== request) return;
    this.request = null;
    if (error) {
      request.reject(error);
      if (this._streamTransport === "mse") this.player?.end();
    } else {
      request.resolve(done);
    }
    if (this.pc && (error || request.transport === "webrtc")) {
      const pc = this.pc;
      this.pc = null;
      // Let the last frames of a finished clip show before the connection goes.
      setTimeout(() => pc.close(), error ? 0 : 500);
    }
    if (this.ws?.readyState === WebSocket.OPEN) this._setState("idle");
  }

  _onClose(ws, event) {
    if (this.ws !== ws) return;
    this.ws = null;
    const resume = this._resumeToken;
    this.welcome = null;
    this._connecting = null;
    const request = this.request;
    if (request?.phase === "queued" && request.audioSent && resume && !this._closing && request.resumes < MAX_RESUMES) {
      // The server keeps a queued ticket for a grace period: reconnect and take the place back.
      request.resumes += 1;
      request.resuming = true;
      this._setState("reconnecting");
      this._emit("reconnecting", { attempt: request.resumes, code: event.code });
      setTimeout(() => {
        if (this.request !== request) return;
        this._open({ resume }, { resolve: () => {}, reject: (err) => this._finish(request, err) });
      }, 300 * request.resumes);
      return;
    }
    this._setState("closed");
    const error = new MuseTalkError("closed", `the socket closed (${event.code}${event.reason ? ": " + event.reason : ""})`);
    for (const pending of this._pending.values()) pending.reject(error);
    this._pending.clear();
    if (this.request) this._finish(this.request, error);
    this._emit("closed", { code: event.code, reason: event.reason });
  }

  async _offer(request) {
    const pc = (this.pc = new RTCPeerConnection({ iceServers: this.iceServers }));
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const media = new MediaStream();
    pc.addEventListener("track", (event) => {
      const stream = event.streams[0] || media;
      if (!event.streams[0]) media.addTrack(event.track);
      if (this.video && this.video.srcObject !== stream) {
        this.player?.reset();
        this.video.removeAttribute("src");
        this.video.srcObject = stream;
        this.video.play().catch(() => {});
      }
    });
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed" && this.pc === pc) this._fail(request, "webrtc_failed", "the peer connection failed");
    });
    await pc.setLocalDescription(await pc.createOffer());
    // The protocol has no trickle ICE: the offer carries every candidate.
    await waitForIceGathering(pc, 3000);
    if (this.request !== request) return;
    this._send({ type: "webrtc_offer", id: request.ids.offer, sdp: pc.localDescription.sdp });
  }

  _watchFirstFrame(request) {
    const video = this.video;
    if (!video || !request || request.firstFrameWatched) return;
    request.firstFrameWatched = true;
    const report = () => {
      if (request.firstFrameAt) return;
      request.firstFrameAt = performance.now();
      const latency = request.grantedAt ? (request.firstFrameAt - request.grantedAt) / 1000 : null;
      this._emit("firstframe", { latency_s: latency });
    };
    if ("requestVideoFrameCallback" in video) {
      video.requestVideoFrameCallback(report);
    } else {
      video.addEventListener("playing", report, { once: true });
    }
  }
}

// ----- the <musetalk-avatar> widget -----

const WIDGET_STYLE = `
:host { display: inline-block; position: relative; width: 320px; aspect-ratio: 1; background: #111;
        border-radius: 8px; overflow: hidden; font: 13px/1.3 system-ui, sans-serif; color: #fff; }
video { width: 100%; height: 100%; object-fit: cover; display: block; }
.status { position: absolute; left: 0; right: 0; bottom: 0; padding: 4px 8px; background: rgba(0,0,0,.55); }
.status:empty { display: none; }
`;

const WIDGET_TEXT = {
  en: { connecting: "connecting…", queued: (p, eta) => `in line: ${p}${eta == null ? "" : `, about ${Math.ceil(eta)} s`}`,
        granted: "starting…", error: (m) => `error: ${m}` },
  zh: { connecting: "连接中…", queued: (p, eta) => `排队中：第 ${p} 位${eta == null ? "" : `，约 ${Math.ceil(eta)} 秒`}`,
        granted: "即将开始…", error: (m) => `错误：${m}` },
};

/** <musetalk-avatar avatar="astronaut" server="https://host" token="..." transport="mse|webrtc">.
 * Methods: speak(audio, options) -> Promise<done>, startLive(), sendAudio(), endUtterance(),
 * interrupt(), cancel(). Re-dispatches the client's events on the element. `.client` is the
 * MuseTalkClient, `.video` the <video>. */
export class MuseTalkAvatarElement extends HTMLElement {
  static get observedAttributes() {
    return ["server", "token", "transport"];
  }

  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = `<style>${WIDGET_STYLE}</style><video playsinline part="video"></video>` +
      `<div class="status" part="status" role="status" aria-live="polite"></div>`;
    this.video = root.querySelector("video");
    this.statusLine = root.querySelector(".status");
    this._client = null;
  }

  get client() {
    if (!this._client) {
      const client = new MuseTalkClient({
        server: this.getAttribute("server") || undefined,
        token: this.getAttribute("token") || undefined,
        transport: this.getAttribute("transport") || "mse",
      });
      client.attach(this.video);
      const text = WIDGET_TEXT[(this.getAttribute("lang") || navigator.language || "en").startsWith("zh") ? "zh" : "en"];
      const show = (s) => { this.statusLine.textContent = s; };
      for (const type of ["welcome", "queued", "granted", "stream", "progress", "done", "error", "firstframe", "closed", "state"]) {
        client.addEventListener(type, (e) => {
          if (type === "state" && e.detail.state === "connecting") show(text.connecting);
          if (type === "queued") show(text.queued(e.detail.position, e.detail.eta_s));
          if (type === "granted") show(text.granted);
          if (type === "firstframe" || type === "done") show("");
          if (type === "error") show(text.error(e.detail.message));
          this.dispatchEvent(new CustomEvent(type, { detail: e.detail }));
        });
      }
      this._client = client;
    }
    return this._client;
  }

  attributeChangedCallback() {
    // A new server, token or transport takes effect with a new client.
    if (this._client && !this._client.request) {
      this._client.close();
      this._client = null;
    }
  }

  disconnectedCallback() {
    this._client?.close();
    this._client = null;
  }

  get avatar() {
    return this.getAttribute("avatar") || "astronaut";
  }

  speak(audio, options = {}) {
    return this.client.speak(audio, { avatar: this.avatar, ...options });
  }

  startLive(options = {}) {
    return this.client.startLive({ avatar: this.avatar, ...options });
  }

  sendAudio(chunk) { this.client.sendAudio(chunk); }
  endUtterance() { this.client.endUtterance(); }
  interrupt() { this.client.interrupt(); }
  cancel() { this._client?.cancel(); }
}

if (typeof customElements !== "undefined" && !customElements.get("musetalk-avatar")) {
  customElements.define("musetalk-avatar", MuseTalkAvatarElement);
}
