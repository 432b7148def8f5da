// UI strings, English and Chinese. Elements carry data-i18n="key" (text), data-i18n-placeholder,
// data-i18n-aria-label or data-i18n-title; t(key, ...args) for strings built in code.

const STRINGS = {
  en: {
    "title": "MuseTalk live preview",
    "lang.switch": "中文",
    "lang.switch.label": "Switch the page to Chinese",
    "skip": "Skip to the player",
    "engine.lite": "Lite engine: a CPU stand-in that moves the mouth with the loudness of the audio, not real lip-sync.",
    "req.legend": "Request",
    "avatar": "Avatar",
    "avatar.loading": "loading…",
    "avatar.none": "no avatar is ready",
    "avatar.failed": "could not load the avatars",
    "source": "Audio",
    "source.sample": "Generated sample",
    "source.file": "Audio file",
    "source.record": "Record the microphone",
    "source.live": "Live microphone",
    "sample.kind": "Sample",
    "sample.vowels": "Vowels a e i o u (3 s)",
    "sample.hello": "“Hello, how are you today?” as babble (3 s)",
    "sample.long": "A longer passage as babble (9 s)",
    "sample.tone": "Tone sweep (2 s)",
    "sample.play": "Listen",
    "file": "File (wav, mp3, ogg, flac; other formats are converted)",
    "record.start": "Record",
    "record.stop": "Stop recording",
    "record.none": "Nothing recorded yet.",
    "record.ready": (s) => `Recorded ${s.toFixed(1)} s.`,
    "record.running": (s) => `Recording… ${s.toFixed(0)} s`,
    "live.hint": "Live mode streams the microphone while you talk; stop with Cancel.",
    "transport": "Playback",
    "transport.mse": "MSE (over the socket)",
    "transport.webrtc": "WebRTC",
    "token": "Token (optional)",
    "token.hint": "A signed token gives your tier (vip, normal); without one you are a guest (low).",
    "start": "Start",
    "cancel": "Cancel",
    "status.heading": "Status",
    "status.idle": "Ready.",
    "status.connecting": "Connecting…",
    "status.queued": (p, n, eta) => `In line: position ${p} of ${n}` + (eta == null ? ", estimating the wait…" : `, about ${fmtSeconds(eta)} left`),
    "status.granted": (w) => `Your turn after ${fmtSeconds(w)}: generating…`,
    "status.reconnecting": "The connection dropped: reconnecting to keep your place in line…",
    "status.streaming": "Playing.",
    "status.done": (f, d) => `Done: ${f} frames, ${d.toFixed(1)} s.`,
    "status.live": "Live: talk into the microphone.",
    "status.cancelled": "Cancelled.",
    "status.error": (code, m) => `Error (${code}): ${m}`,
    "status.needaudio": "Choose a file or record something first.",
    "queue.label": "Queue",
    "gen.label": "Generation",
    "download": "Download the clip",
    "player.heading": "Player",
    "player.label": "Avatar video",
    "stats.heading": "Stats",
    "stats.fps": "Frames per second",
    "stats.dropped": "Dropped frames",
    "stats.waited": "Waited in line",
    "stats.latency": "Granted → first frame",
    "stats.size": "Video size",
    "stats.transport": "Transport",
    "stats.tier": "Tier",
    "stats.engine": "Engine",
    "stats.received": "Media received",
    "log.heading": "Message log",
    "notify.title": "Your avatar video is starting",
    "notify.body": "It is your turn: the stream has begun.",
    "admin.title": "musetalk-stream admin",
    "admin.token": "Admin token",
    "admin.load": "Show stats",
    "admin.auto": "Refresh every 2 s",
    "admin.waiting": "Waiting",
    "admin.tier": "Tier",
    "admin.eta": "ETA of the last (s)",
    "admin.slots": "Slots",
    "admin.busy": "busy",
    "admin.free": "free",
    "admin.total": "total",
    "admin.fps": "Rendered frames per second",
    "admin.clips": "Clips served",
    "admin.errors": "Errors sent, by code",
    "admin.code": "Code",
    "admin.count": "Count",
    "admin.noerrors": "none",
    "admin.other": "Other",
    "admin.connections": "Open sockets",
    "admin.sessions": "Sessions holding a slot",
    "admin.engine": "Engine",
    "admin.frames": "Frames streamed",
    "admin.updated": (time) => `Updated ${time}.`,
    "admin.refused": (status, m) => `Refused (${status}): ${m}`,
    "admin.needtoken": "Type an admin token first.",
  },
  zh: {
    "title": "MuseTalk 实时预览",
    "lang.switch": "English",
    "lang.switch.label": "切换为英文界面",
    "skip": "跳到播放器",
    "engine.lite": "Lite 引擎：在 CPU 上按音频响度驱动嘴型的替身，并非真正的唇形同步。",
    "req.legend": "请求",
    "avatar": "数字人",
    "avatar.loading": "加载中…",
    "avatar.none": "没有可用的数字人",
    "avatar.failed": "无法加载数字人列表",
    "source": "音频",
    "source.sample": "生成的样例",
    "source.file": "音频文件",
    "source.record": "麦克风录音",
    "source.live": "实时麦克风",
    "sample.kind": "样例",
    "sample.vowels": "元音 a e i o u（3 秒）",
    "sample.hello": "“Hello, how are you today?”的模拟语音（3 秒）",
    "sample.long": "一段较长的模拟语音（9 秒）",
    "sample.tone": "扫频音（2 秒）",
    "sample.play": "试听",
    "file": "文件（wav、mp3、ogg、flac；其他格式会自动转换）",
    "record.start": "录音",
    "record.stop": "停止录音",
    "record.none": "尚未录音。",
    "record.ready": (s) => `已录制 ${s.toFixed(1)} 秒。`,
    "record.running": (s) => `录音中… ${s.toFixed(0)} 秒`,
    "live.hint": "实时模式会在你说话时持续发送麦克风音频；点击“取消”结束。",
    "transport": "播放方式",
    "transport.mse": "MSE（经由 WebSocket）",
    "transport.webrtc": "WebRTC",
    "token": "令牌（可选）",
    "token.hint": "签名令牌决定你的等级（vip、normal）；没有令牌则为访客（low）。",
    "start": "开始",
    "cancel": "取消",
    "status.heading": "状态",
    "status.idle": "就绪。",
    "status.connecting": "连接中…",
    "status.queued": (p, n, eta) => `排队中：第 ${p} 位，共 ${n} 位` + (eta == null ? "，正在估算等待时间…" : `，约剩 ${fmtSeconds(eta, "zh")}`),
    "status.granted": (w) => `等待 ${fmtSeconds(w, "zh")} 后轮到你：正在生成…`,
    "status.reconnecting": "连接中断：正在重新连接，保留你的排队位置…",
    "status.streaming": "正在播放。",
    "status.done": (f, d) => `完成：${f} 帧，${d.toFixed(1)} 秒。`,
    "status.live": "实时：请对着麦克风说话。",
    "status.cancelled": "已取消。",
    "status.error": (code, m) => `错误（${code}）：${m}`,
    "status.needaudio": "请先选择文件或录音。",
    "queue.label": "排队",
    "gen.label": "生成",
    "download": "下载视频",
    "player.heading": "播放器",
    "player.label": "数字人视频",
    "stats.heading": "统计",
    "stats.fps": "每秒帧数",
    "stats.dropped": "丢帧",
    "stats.waited": "排队等待",
    "stats.latency": "获得名额 → 首帧",
    "stats.size": "视频尺寸",
    "stats.transport": "传输方式",
    "stats.tier": "等级",
    "stats.engine": "引擎",
    "stats.received": "已接收媒体",
    "log.heading": "消息日志",
    "notify.title": "你的数字人视频开始了",
    "notify.body": "轮到你了：视频流已开始。",
    "admin.title": "musetalk-stream 管理",
    "admin.token": "管理员令牌",
    "admin.load": "查看统计",
    "admin.auto": "每 2 秒刷新",
    "admin.waiting": "排队人数",
    "admin.tier": "等级",
    "admin.eta": "队尾预计等待（秒）",
    "admin.slots": "名额",
    "admin.busy": "占用",
    "admin.free": "空闲",
    "admin.total": "总数",
    "admin.fps": "每秒渲染帧数",
    "admin.clips": "已提供的视频",
    "admin.errors": "已发送的错误（按代码）",
    "admin.code": "代码",
    "admin.count": "次数",
    "admin.noerrors": "无",
    "admin.other": "其他",
    "admin.connections": "打开的连接",
    "admin.sessions": "占用名额的会话",
    "admin.engine": "引擎",
    "admin.frames": "已推送帧数",
    "admin.updated": (time) => `更新于 ${time}。`,
    "admin.refused": (status, m) => `被拒绝（${status}）：${m}`,
    "admin.needtoken": "请先输入管理员令牌。",
  },
};

export function fmtSeconds(s, lang = currentLang) {
  if (s == null || Number.isNaN(s)) return "–";
  if (s < 60) return lang === "zh" ? `${s.toFixed(s < 10 ? 1 : 0)} 秒` : `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  const r = Math.round(s % 60);
  return lang === "zh" ? `${m} 分 ${r} 秒` : `${m} min ${r} s`;
}

let currentLang = "en";
const listeners = [];

export function initialLang() {
  const saved = localStorage.getItem("mts.lang");
  if (saved && STRINGS[saved]) return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

export function lang() {
  return currentLang;
}

export function t(key, ...args) {
  const value = STRINGS[currentLang][key] ?? STRINGS.en[key] ?? key;
  return typeof value === "function" ? value(...args) : value;
}

/** Apply `code` to every marked element under `root`, remember it, and tell the listeners. */
export function setLang(code, root = document) {
  currentLang = STRINGS[code] ? code : "en";
  localStorage.setItem("mts.lang", currentLang);
  document.documentElement.lang = currentLang === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const attr of ["placeholder", "aria-label", "title"]) {
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) {
      el.setAttribute(attr, t(el.getAttribute(`data-i18n-${attr}`)));
    }
  }
  listeners.forEach((fn) => fn(currentLang));
}

export function onLangChange(fn) {
  listeners.push(fn);
}
