// Sample audio made in the page (there is no text-to-speech here): a voice-like buzz shaped by
// vowel formants, and microphone helpers. Everything is 16 kHz mono.
import { encodeWav } from "./embed.js";

export const RATE = 16000;

// First three formants (Hz) of five vowels, a rough adult average.
const FORMANTS = {
  a: [730, 1090, 2440],
  e: [530, 1840, 2480],
  i: [270, 2290, 3010],
  o: [570, 840, 2410],
  u: [300, 870, 2240],
};
const VOWELS = Object.keys(FORMANTS);

/** Append `seconds` of a sung vowel (additive synthesis of a glottal buzz through formants). */
function vowel(out, v, seconds, { f0 = 130, level = 0.5 } = {}) {
  const n = Math.round(seconds * RATE);
  const formants = FORMANTS[v];
  const harmonics = [];
  for (let k = 1; k * f0 * 1.05 < RATE / 2 - 500; k++) {
    const f = k * f0;
    let gain = 0;
    for (const [i, F] of formants.entries()) {
      const bw = 60 + 40 * i;
      gain += (1 / (1 + ((f - F) / bw) ** 2)) / (i + 1);
    }
    harmonics.push([k, gain / Math.sqrt(k)]);
  }
  const norm = harmonics.reduce((s, [, g]) => s + g, 0) || 1;
  const attack = Math.min(0.03 * RATE, n / 3);
  const release = Math.min(0.05 * RATE, n / 3);
  let phase = 0;
  for (let t = 0; t < n; t++) {
    const pitch = f0 * (1 + 0.02 * Math.sin((2 * Math.PI * 5 * t) / RATE) - (0.08 * t) / n);
    phase += (2 * Math.PI * pitch) / RATE;
    let s = 0;
    for (const [k, g] of harmonics) s += g * Math.sin(k * phase);
    const env = Math.min(1, t / attack, (n - t) / release);
    out.push((level * env * s) / norm * 2.5);
  }
}

function silence(out, seconds) {
  for (let i = Math.round(seconds * RATE); i > 0; i--) out.push(0);
}

// Seeded noise, so the same text always makes the same audio (and the server's clip cache hits).
let seed = 1;
function noise() {
  seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
  return seed / 2 ** 31 - 1;
}

function hiss(out, seconds, level = 0.08) {
  const n = Math.round(seconds * RATE);
  let last = 0;
  for (let t = 0; t < n; t++) {
    const white = noise();
    last = white - 0.6 * last; // a little brighter than white noise, like a fricative
    out.push(level * last * Math.min(1, t / 80, (n - t) / 80));
  }
}

/** Vowels separated by short pauses: "a e i o u" by default. */
export function vowelSequence(pattern = "a e i o u a o", { syllable = 0.38, gap = 0.14 } = {}) {
  const out = [];
  silence(out, 0.1);
  for (const v of pattern.split(/\s+/).filter((x) => FORMANTS[x])) {
    vowel(out, v, syllable);
    silence(out, gap);
  }
  return Float32Array.from(out);
}

/** Speech-like babble that follows the letters of `text`: vowels sing, consonants hiss or pause,
 * spaces and punctuation pause; other scripts (e.g. Chinese) make one syllable per character. */
export function babble(text, { maxSeconds = 20 } = {}) {
  const out = [];
  seed = 1;
  silence(out, 0.08);
  let pitch = 125;
  for (const ch of text.toLowerCase()) {
    if (out.length > maxSeconds * RATE) break;
    if (FORMANTS[ch]) {
      vowel(out, ch, 0.15, { f0: pitch });
    } else if (ch === "y") {
      vowel(out, "i", 0.1, { f0: pitch });
    } else if ("sfzhcx".includes(ch)) {
      hiss(out, 0.07);
    } else if (/[a-z0-9]/.test(ch)) {
      silence(out, 0.04);
      hiss(out, 0.015, 0.15);
    } else if (/\s/.test(ch)) {
      silence(out, 0.09);
    } else if (/[.,!?;:，。！？；：]/.test(ch)) {
      silence(out, 0.3);
      pitch = 125;
    } else if (ch.codePointAt(0) > 0x2e80) {
      vowel(out, VOWELS[ch.codePointAt(0) % VOWELS.length], 0.22, { f0: pitch });
      silence(out, 0.05);
    }
    pitch = 115 + ((pitch - 110 + 7) % 30);
  }
  silence(out, 0.15);
  return Float32Array.from(out);
}

/** A 440 Hz tone gliding to 660 Hz, pulsed four times a second. */
export function toneSweep(seconds = 2) {
  const n = Math.round(seconds * RATE);
  const out = new Float32Array(n);
  let phase = 0;
  for (let t = 0; t < n; t++) {
    phase += (2 * Math.PI * (440 + (220 * t) / n)) / RATE;
    out[t] = 0.4 * Math.sin(phase) * (0.5 + 0.5 * Math.sin((2 * Math.PI * 4 * t) / RATE));
  }
  return out;
}

/** WAV bytes (ArrayBuffer) from samples made above. */
export function wav(samples) {
  return encodeWav(samples, RATE);
}

/** Float samples to pcm_s16le. */
export function toPcm16(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  return pcm;
}

const WORKLET = `
registerProcessor("mts-capture", class extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
});`;

/** Stream the microphone as 16 kHz pcm_s16le chunks of about `chunkMs`; returns stop(). */
export async function captureMicrophone(onChunk, { chunkMs = 100 } = {}) {
  const media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  const ctx = new AudioContext({ sampleRate: RATE });
  const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
  await ctx.audioWorklet.addModule(url);
  URL.revokeObjectURL(url);
  const source = ctx.createMediaStreamSource(media);
  const node = new AudioWorkletNode(ctx, "mts-capture");
  const target = Math.round((RATE * chunkMs) / 1000);
  let pending = [];
  let size = 0;
  node.port.onmessage = ({ data }) => {
    pending.push(data);
    size += data.length;
    if (size < target) return;
    const joined = new Float32Array(size);
    let at = 0;
    for (const part of pending) { joined.set(part, at); at += part.length; }
    pending = [];
    size = 0;
    onChunk(toPcm16(joined));
  };
  source.connect(node);
  return () => {
    source.disconnect();
    node.disconnect();
    media.getTracks().forEach((t) => t.stop());
    ctx.close();
  };
}

/** Record the microphone with MediaRecorder; returns { stop(): Promise<Blob> }. */
export async function recordMicrophone() {
  const media = await navigator.mediaDevices.getUserMedia({ audio: true });
  // Firefox records Ogg/Opus, which the server takes as is; Chromium records WebM or MP4, which
  // MuseTalkClient.speak converts to WAV in the page (the server does not take those containers).
  const type = ["audio/ogg;codecs=opus", "audio/webm;codecs=opus", "audio/mp4"].find((t) => MediaRecorder.isTypeSupported(t));
  const recorder = new MediaRecorder(media, type ? { mimeType: type } : {});
  const parts = [];
  recorder.ondataavailable = (e) => e.data.size && parts.push(e.data);
  recorder.start(250);
  return {
    recorder,
    stop: () => new Promise((resolve) => {
      recorder.onstop = () => {
        media.getTracks().forEach((t) => t.stop());
        resolve(new Blob(parts, { type: recorder.mimeType }));
      };
      recorder.stop();
    }),
  };
}
