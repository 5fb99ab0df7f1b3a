// spear_rt's voice page: microphone -> realtime WebSocket (GA dialect) -> transcript, answers.
// Rules, briefly:
// * every server event carries `seq`; the highest seen is the resume point. A dropped socket is
//   reopened with ?session_id=&last_seq= and the token as subprotocol `spear-resume.<token>`;
//   the server replays what came after, so nothing is shown twice or missed.
// * audio sent is kept (last RESEND_S seconds) with its byte offsets; after a resume the page
//   resends what the server had not applied (`input_audio_bytes`), then the audio captured
//   while the socket was down (bounded: PENDING_S seconds, then the page gives up, loudly).
// * talk mode: answer audio is scheduled gap-free on one AudioContext; speech_started while it
//   plays stops it at once and truncates the item at the audio actually played.
"use strict";

const RATE = 24000;
const FRAME_BYTES = 960; // 20 ms of pcm16
const RESEND_S = 10;
const PENDING_S = 60;
const RETRIES = 8;

const $ = (id) => document.getElementById(id);
const stats = { audioPlayedMs: 0, answersPlayed: 0, lastLatencyMs: null };
window.spearStats = stats;

let run = null; // the live run: socket, mic, playback; null when idle

function setStatus(text) {
  $("status").textContent = text;
}

function note(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 50) $("log").lastChild.remove();
}

function b64encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function b64decode(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toTimeString().slice(0, 8);
}

// --- transcript and answers ------------------------------------------------------------------

function turnLine(itemId) {
  let li = document.querySelector(`#transcript li[data-item="${CSS.escape(itemId)}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.item = itemId;
    li.className = "partial";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock(Date.now());
    li.append(time, document.createTextNode(""));
    $("transcript").append(li);
  }
  return li;
}

function showPartial(itemId, delta) {
  const li = turnLine(itemId);
  if (li.classList.contains("final")) return;
  li.lastChild.textContent += delta;
}

function showFinal(itemId, text) {
  const li = turnLine(itemId);
  li.className = "final";
  li.lastChild.textContent = text.trim();
}

function answerLine(id, cls) {
  let p = document.querySelector(`#answer p[data-id="${CSS.escape(id)}"]`);
  if (!p) {
    p = document.createElement("p");
    p.dataset.id = id;
    p.className = cls;
    $("answer").append(p);
  }
  return p;
}

function transcriptText() {
  return [...document.querySelectorAll("#transcript li.final")]
    .map((li) => `[${li.querySelector(".time").textContent}] ${li.lastChild.textContent}`)
    .join("\n");
}

// --- playback ----------------------------------------------------------------------------------

class Player {
  constructor(ctx) {
    this.ctx = ctx;
    this.head = 0; // context time where the next chunk starts
    this.chunks = []; // {src, start, dur, item} not yet ended
    this.itemPlayed = new Map(); // item id -> seconds played of chunks that ended
    this.doneMs = 0;
  }

  play(itemId, bytes) {
    const pcm = new Int16Array(bytes.buffer, bytes.byteOffset, bytes.length >> 1);
    if (!pcm.length) return;
    const buf = this.ctx.createBuffer(1, pcm.length, RATE);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 0x8000;
    const src = this.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.ctx.destination);
    const start = Math.max(this.head, this.ctx.currentTime + 0.02);
    const chunk = { src, start, dur: buf.duration, item: itemId };
    src.onended = () => this.ended(chunk);
    src.start(start);
    this.head = start + buf.duration;
    this.chunks.push(chunk);
  }

  ended(chunk) {
    const at = this.chunks.indexOf(chunk);
    if (at < 0) return; // stopped by a cut, already counted
    this.chunks.splice(at, 1);
    this.count(chunk, chunk.dur);
    if (run) run.maybeAnswerPlayed();
  }

  count(chunk, seconds) {
    this.doneMs += seconds * 1000;
    this.itemPlayed.set(chunk.item, (this.itemPlayed.get(chunk.item) || 0) + seconds);
  }

  playing() {
    return this.chunks.length > 0;
  }

  playedMs() {
    const now = this.ctx.currentTime;
    let live = 0;
    for (const c of this.chunks) live += Math.min(Math.max(now - c.start, 0), c.dur);
    return this.doneMs + live * 1000;
  }

  /** Stop everything now; returns {item: ms played} of the items that were playing. */
  cut() {
    const now = this.ctx.currentTime;
    const items = new Set(this.chunks.map((c) => c.item));
    for (const c of this.chunks) {
      this.count(c, Math.min(Math.max(now - c.start, 0), c.dur));
      c.src.onended = null;
      try { c.src.stop(); } catch (e) { /* not started yet */ }
    }
    this.chunks = [];
    this.head = 0;
    const out = {};
    for (const item of items) out[item] = Math.floor((this.itemPlayed.get(item) || 0) * 1000);
    return out;
  }
}

// --- one run: connect, stream, resume ----------------------------------------------------------

class Run {
  constructor(opts) {
    this.opts = opts; // {mode, ptt, model, key}
    this.ws = null;
    this.stopped = false;
    this.session = null; // {id, token}
    this.lastSeq = 0;
    this.sentBytes = 0; // audio bytes written to sockets (the server's count when all applied)
    this.sent = []; // [{end, b64}] for resends
    this.pending = []; // frames captured while no socket is open
    this.control = []; // [{at, id, event}] non-audio events, for resends after a resume
    this.nextId = 0;
    this.talking = !opts.ptt; // push-to-talk: only while the button is held
    this.stoppedAt = null; // performance.now() of the last speech_stopped / commit
    this.awaitFirstAudio = false;
    this.responses = new Map(); // response id -> {item, cut, done}
    this.cutResponses = new Set();
  }

  async start() {
    setStatus("connecting");
    this.ctx = new AudioContext({ sampleRate: RATE });
    await this.ctx.resume();
    this.player = new Player(this.ctx);
    const talk = this.opts.mode === "talk";
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: talk, noiseSuppression: false, autoGainControl: false },
    });
    await this.ctx.audioWorklet.addModule("/web/worklet.js");
    this.mic = this.ctx.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.ctx, "pcm16-capture");
    this.capture.port.onmessage = (m) => this.frame(m.data);
    this.mic.connect(this.capture);
    this.meterTimer = setInterval(() => { stats.audioPlayedMs = Math.round(this.player.playedMs()); }, 100);
    await this.open(false);
  }

  url(resume) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const q = new URLSearchParams();
    if (this.opts.mode === "transcribe") q.set("intent", "transcription");
    if (this.opts.model) q.set("model", this.opts.model);
    if (resume) {
      q.set("session_id", this.session.id);
      q.set("last_seq", String(this.lastSeq));
    }
    return `${scheme}://${location.host}/v1/realtime?${q}`;
  }

  open(resume) {
    const protocols = ["realtime"];
    if (this.opts.key) protocols.push(`openai-insecure-api-key.${this.opts.key}`);
    if (resume) protocols.push(`spear-resume.${this.session.token}`);
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(this.url(resume), protocols);
      } catch (e) {
        reject(e);
        return;
      }
      this.ws = ws;
      let opened = false;
      ws.onopen = () => { opened = true; resolve(); };
      ws.onmessage = (m) => this.event(JSON.parse(m.data));
      ws.onclose = (e) => {
        if (!opened) reject(new Error(`connection refused (${e.code})`));
        if (this.ws === ws) this.closed(e);
      };
    });
  }

  send(event) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.live) {
      this.ws.send(JSON.stringify(event));
      return true;
    }
    return false;
  }

  sendControl(event) {
    event.event_id = `page_${++this.nextId}`;
    this.control.push({ at: this.sentBytes, id: event.event_id, event });
    if (this.control.length > 200) this.control.shift();
    this.send(event);
  }

  frame({ pcm, rms }) {
    $("level").value = Math.min(1, rms * 4);
    if (!this.talking) return;
    const bytes = new Uint8Array(pcm);
    const b64 = b64encode(bytes);
    if (!this.live) {
      this.pending.push(b64);
      if (this.pending.length > PENDING_S * 50) this.fail("reconnecting took too long: audio would be lost");
      return;
    }
    this.append(b64, bytes.length);
  }

  append(b64, n) {
    this.ws.send(`{"type":"input_audio_buffer.append","audio":"${b64}"}`);
    this.sentBytes += n;
    this.sent.push({ end: this.sentBytes, b64 });
    while (this.sent.length > RESEND_S * 50) this.sent.shift();
  }

  sessionUpdate() {
    const turn = this.opts.ptt ? null : { type: "server_vad" };
    const input = { format: { type: "audio/pcm", rate: RATE }, turn_detection: turn };
    const session = this.opts.mode === "talk"
      ? { type: "realtime", audio: { input, output: { format: { type: "audio/pcm", rate: RATE } } } }
      : { type: "transcription", audio: { input } };
    this.sendControl({ type: "session.update", session });
  }

  event(ev) {
    if (typeof ev.seq === "number" && ev.seq > this.lastSeq) this.lastSeq = ev.seq;
    switch (ev.type) {
      case "session.created":
        this.session = { id: ev.session.id, token: ev.spear && ev.spear.resume_token };
        this.live = true;
        $("backend").textContent = `backend: ${(ev.spear && ev.spear.backend) || "?"}` +
          (ev.session.model ? ` (${ev.session.model})` : "");
        this.sessionUpdate();
        setStatus("live");
        $("ptt").disabled = !this.opts.ptt;
        break;
      case "spear.session.resumed":
        this.resumed(ev);
        break;
      case "input_audio_buffer.speech_started":
        if (this.player.playing()) this.bargeIn();
        break;
      case "input_audio_buffer.speech_stopped":
        this.stoppedAt = performance.now();
        this.awaitFirstAudio = this.opts.mode === "talk";
        break;
      case "conversation.item.input_audio_transcription.delta":
        showPartial(ev.item_id, ev.delta || "");
        break;
      case "conversation.item.input_audio_transcription.completed":
        showFinal(ev.item_id, ev.transcript || "");
        if (this.opts.mode === "talk") answerLine(ev.item_id, "user").textContent = `you: ${ev.transcript.trim()}`;
        if (this.stoppedAt !== null && this.opts.mode === "transcribe") this.latency("transcript");
        break;
      case "response.created":
        this.responses.set(ev.response.id, { item: null, done: false, audio: false });
        break;
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta":
        answerLine(ev.item_id, "assistant").textContent += ev.delta;
        break;
      case "response.output_audio.delta":
        this.answerAudio(ev);
        break;
      case "response.done":
        this.responseDone(ev.response);
        break;
      case "error":
        note(`server: ${ev.error && ev.error.message}`);
        break;
      case "spear.upstream.reconnected":
        note("the server reconnected its upstream");
        break;
      default:
        if (ev.type === "spear.session.expiring") note("the session is about to expire");
    }
  }

  latency(what) {
    const ms = Math.round(performance.now() - this.stoppedAt);
    stats.lastLatencyMs = ms;
    $("latency").textContent = `latency: speech stop → ${what} ${ms} ms`;
    this.stoppedAt = null;
  }

  answerAudio(ev) {
    if (this.cutResponses.has(ev.response_id)) return;
    const r = this.responses.get(ev.response_id);
    if (r) { r.item = ev.item_id; r.audio = true; }
    if (this.stoppedAt !== null && this.awaitFirstAudio) {
      this.awaitFirstAudio = false;
      this.latency("first answer audio");
    }
    this.player.play(ev.item_id, b64decode(ev.delta));
  }

  responseDone(response) {
    const r = this.responses.get(response.id);
    if (!r) return;
    r.done = true;
    if (response.status !== "completed" && r.item) {
      answerLine(r.item, "assistant").classList.add("cut");
    }
    this.maybeAnswerPlayed();
  }

  maybeAnswerPlayed() {
    if (this.player.playing()) return;
    for (const [id, r] of this.responses) {
      if (!r.done) continue;
      if (r.audio && !this.cutResponses.has(id)) stats.answersPlayed += 1;
      this.responses.delete(id);
    }
  }

  bargeIn() {
    const played = this.player.cut();
    for (const [id, r] of this.responses) {
      if (r.item && played[r.item] !== undefined) this.cutResponses.add(id);
    }
    for (const [item, ms] of Object.entries(played)) {
      this.sendControl({ type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: ms });
      answerLine(item, "assistant").classList.add("cut");
    }
    note("barge-in: playback stopped");
  }

  pushToTalk(down) {
    if (!this.opts.ptt || !this.live) return;
    $("ptt").setAttribute("aria-pressed", String(down));
    this.talking = down;
    if (down && this.player.playing()) this.bargeIn();
    if (!down) {
      this.stoppedAt = performance.now();
      this.awaitFirstAudio = this.opts.mode === "talk";
      this.sendControl({ type: "input_audio_buffer.commit" });
      if (this.opts.mode === "talk") this.sendControl({ type: "response.create" });
    }
  }

  resumed(ev) {
    // resend, in the order first sent, what the server had not applied; then the backlog
    const have = ev.input_audio_bytes;
    const after = ev.last_event_id ? this.control.findIndex((c) => c.id === ev.last_event_id) + 1 : 0;
    const controls = this.control.slice(after);
    const audio = this.sent.filter((s) => s.end > have);
    const oldest = audio.length ? audio[0].end - b64decode(audio[0].b64).length : have;
    if (oldest > have) {
      this.fail("the server lost more audio than this page kept to resend");
      return;
    }
    const backlog = this.pending;
    this.pending = [];
    this.sent = this.sent.filter((s) => s.end <= have);
    this.sentBytes = have;
    for (const s of audio) {
      while (controls.length && controls[0].at <= this.sentBytes) this.ws.send(JSON.stringify(controls.shift().event));
      this.append(s.b64, b64decode(s.b64).length);
    }
    for (const c of controls) this.ws.send(JSON.stringify(c.event));
    for (const b64 of backlog) this.append(b64, FRAME_BYTES);
    this.live = true;
    setStatus("resumed");
    note(`resumed session ${ev.session_id} after seq ${ev.last_seq}`);
  }

  async closed(e) {
    this.live = false;
    if (this.stopped) return;
    if (!this.session || !this.session.token || e.code === 4004 || e.code === 1008) {
      this.fail(e.reason || `the connection closed (${e.code})`);
      return;
    }
    setStatus("reconnecting");
    note(`connection lost (${e.code}): reconnecting`);
    for (let attempt = 0; attempt < RETRIES && !this.stopped; attempt++) {
      await new Promise((r) => setTimeout(r, Math.min(200 * 2 ** attempt, 3000) * (0.5 + Math.random())));
      try {
        await this.open(true); // live again at spear.session.resumed
        return;
      } catch (err) {
        note(`reconnect ${attempt + 1} failed: ${err.message}`);
      }
    }
    if (!this.stopped) this.fail("could not reconnect");
  }

  fail(message) {
    this.stop();
    setStatus(`error: ${message}`);
  }

  stop() {
    this.stopped = true;
    this.live = false;
    clearInterval(this.meterTimer);
    if (this.ws) { this.ws.onclose = null; this.ws.close(1000); }
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.player) stats.audioPlayedMs = Math.round(this.player.playedMs());
    if (this.ctx) this.ctx.close();
    $("level").value = 0;
    $("ptt").disabled = true;
    $("connect").textContent = "Start";
    if (run === this) run = null;
  }
}

// --- controls ----------------------------------------------------------------------------------

async function toggle() {
  if (run) {
    run.stop();
    setStatus("idle");
    return;
  }
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem("spear-key", key); else sessionStorage.removeItem("spear-key");
  run = new Run({ mode: $("mode").value, ptt: $("turns").value === "ptt", model: $("model").value.trim(), key });
  $("connect").textContent = "Stop";
  try {
    await run.start();
  } catch (e) {
    if (run) run.fail(e.message || String(e));
  }
}

function download() {
  const blob = new Blob([transcriptText() + "\n"], { type: "text/plain" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `transcript-${new Date().toISOString().slice(0, 19).replace(/:/g, "")}.txt`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem("spear-key") || "";
  $("connect").addEventListener("click", toggle);
  $("download").addEventListener("click", download);
  const ptt = $("ptt");
  ptt.addEventListener("pointerdown", () => run && run.pushToTalk(true));
  ptt.addEventListener("pointerup", () => run && run.pushToTalk(false));
  ptt.addEventListener("pointerleave", () => run && run.talking && run.opts.ptt && run.pushToTalk(false));
  ptt.addEventListener("keydown", (e) => { if ((e.key === " " || e.key === "Enter") && !e.repeat) { e.preventDefault(); run && run.pushToTalk(true); } });
  ptt.addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); run && run.pushToTalk(false); } });
});
