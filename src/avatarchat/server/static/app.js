// Avatar Chat page: WebSocket protocol v1 (docs/protocol.md), one MediaSource per turn.
"use strict";

const $ = (id) => document.getElementById(id);
const idleVideo = $("idle");
const turnVideo = $("turn");
const transcript = $("transcript");
const input = $("text");
const stopButton = $("stop");
const statusLine = $("status");
const unmute = $("unmute");
const micButton = $("mic");
const hearing = $("hearing");
const partialLine = $("partial");
const levelDot = $("level");

const state = {
  ws: null,
  sessionId: null,
  avatar: null,
  backoff: 500,
  turn: null, // {id, bubble, ms, queue, sb, url, done, shown}
  pending: [], // texts typed while disconnected
  turns: [],
  sentAt: null,
  mic: null, // {ctx, node, stream, seq}
  heard: [], // final transcripts of what the person said
};

function setState(name, message) {
  document.body.dataset.state = name;
  statusLine.textContent = message || name;
  statusLine.classList.toggle("error", name === "error");
}

function bubble(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  transcript.appendChild(li);
  transcript.scrollTop = transcript.scrollHeight;
  return li;
}

// ---- connection -------------------------------------------------------------------------------

function connect() {
  const params = new URLSearchParams(location.search);
  const avatar = params.get("avatar");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${avatar ? `?avatar=${encodeURIComponent(avatar)}` : ""}`;
  setState("connecting", "connecting…");
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onEvent(JSON.parse(ev.data)) : onMedia(ev.data));
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    endTurnMedia();
    stopButton.disabled = true;
    setState("offline", `disconnected, retrying in ${Math.round(state.backoff / 1000)} s…`);
    setTimeout(connect, state.backoff);
    state.backoff = Math.min(state.backoff * 2, 10000);
  };
}

function send(event) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(event));
    return true;
  }
  return false;
}

function onEvent(e) {
  switch (e.type) {
    case "session":
      state.sessionId = e.session_id;
      state.backoff = 500;
      if (state.avatar !== e.avatar) {
        state.avatar = e.avatar;
        idleVideo.src = `/avatars/${encodeURIComponent(e.avatar)}/idle.mp4`;
        idleVideo.play().catch(() => {});
      }
      setState("ready", "ready");
      for (const text of state.pending.splice(0)) send({ type: "user_text", text });
      if (state.mic) {
        state.mic.samples = 0; // the server counts again from this mic_start
        send({ type: "mic_start", sample_rate: 16000, format: "pcm_s16le" });
      }
      break;
    case "speech_start":
      setState("hearing", "hearing you…");
      break;
    case "transcript":
      if (e.final) {
        partialLine.textContent = "";
        if (e.text) {
          state.heard.push(e.text);
          bubble("user", e.text);
          state.sentAt = performance.now();
        }
      } else {
        partialLine.textContent = e.text;
      }
      break;
    case "interrupt":
      // Barge-in: drop everything queued for that turn at once; the server keeps what was heard.
      if (state.turn && state.turn.id === e.turn_id) {
        state.turn.done = true;
        state.turn.record.reason = "interrupted";
        state.turn.record.heard = e.heard;
        if (state.turn.bubble) state.turn.bubble.classList.add("stopped");
        endTurnMedia();
      }
      break;
    case "turn_start":
      endTurnMedia();
      state.turn = {
        id: e.turn_id, bubble: null, text: "", queue: [], sb: null, ms: null, url: null, done: false, shown: false,
        record: {
          turnId: e.turn_id, sentAt: state.sentAt, firstMediaAt: null, firstFrameAt: null, text: "", reason: null,
          stalls: 0, stallsAt: [], playedTo: 0, bufferedTo: 0, ended: false,
        },
      };
      state.turns.push(state.turn.record);
      stopButton.disabled = false;
      setState("thinking", "thinking…");
      break;
    case "text_delta":
      if (!state.turn || e.turn_id !== state.turn.id) break;
      if (!state.turn.bubble) state.turn.bubble = bubble("bot", "");
      state.turn.text += e.delta;
      state.turn.bubble.textContent = state.turn.text;
      state.turn.record.text = state.turn.text;
      transcript.scrollTop = transcript.scrollHeight;
      break;
    case "media_start":
      if (state.turn && e.turn_id === state.turn.id) openMedia(state.turn, e.mime);
      break;
    case "turn_done":
      onTurnDone(e);
      break;
    case "error":
      if (e.code === "session_limit") setState("error", "The server is busy (session limit). Retrying…");
      else if (e.fatal) setState("error", e.message);
      else {
        bubble("note", `⚠ ${e.message}`);
        if (!state.turn || state.turn.done) setState("ready", "ready");
      }
      break;
    default:
      break;
  }
}

function onTurnDone(e) {
  const t = state.turn;
  if (!t || e.turn_id !== t.id) return;
  t.done = true;
  t.record.reason = e.reason;
  t.record.mediaMs = e.media_ms;
  stopButton.disabled = true;
  if (e.reason === "stopped" || e.reason === "interrupted" || e.reason === "error") {
    if (t.bubble) t.bubble.classList.add("stopped");
    endTurnMedia();
    setState("ready", "ready");
    return;
  }
  finishStream(t);
  if (!t.ms) setState("ready", "ready");
}

// ---- media ------------------------------------------------------------------------------------

function openMedia(t, mime) {
  if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
    bubble("note", `This browser cannot play ${mime}`);
    return;
  }
  const ms = new MediaSource();
  t.ms = ms;
  t.url = URL.createObjectURL(ms);
  turnVideo.src = t.url;
  ms.addEventListener("sourceopen", () => {
    if (state.turn !== t) return;
    t.sb = ms.addSourceBuffer(mime);
    t.sb.mode = "segments";
    t.sb.addEventListener("updateend", () => pump(t));
    pump(t);
  }, { once: true });
}

function onMedia(buf) {
  const view = new DataView(buf);
  if (buf.byteLength < 8 || view.getUint8(0) !== 0x41 || view.getUint8(1) !== 0x43 || view.getUint8(2) !== 1 || view.getUint8(3) !== 1) return;
  const t = state.turn;
  if (!t || view.getUint32(4) !== t.id || !t.ms) return; // media of an old turn: drop
  if (t.record.firstMediaAt === null) t.record.firstMediaAt = performance.now();
  t.queue.push(new Uint8Array(buf, 8));
  pump(t);
}

function pump(t) {
  if (state.turn !== t || !t.sb || t.sb.updating) return;
  if (t.queue.length) {
    try {
      t.sb.appendBuffer(t.queue.shift());
    } catch (err) {
      bubble("note", `media error: ${err.message}`);
      endTurnMedia();
      return;
    }
    if (!t.shown) startPlayback(t);
    trimPlayed(t);
    return;
  }
  if (t.done && t.ms.readyState === "open") t.ms.endOfStream();
}

function finishStream(t) {
  if (t.sb && !t.sb.updating && !t.queue.length && t.ms.readyState === "open") t.ms.endOfStream();
}

function trimPlayed(t) {
  const played = turnVideo.currentTime - 10;
  if (played > 0 && !t.sb.updating && t.sb.buffered.length && t.sb.buffered.start(0) < played) {
    t.sb.remove(0, played);
  }
}

function startPlayback(t) {
  t.shown = true;
  setState("speaking", "speaking");
  const p = turnVideo.play();
  if (p) p.catch(() => { unmute.classList.remove("hidden"); });
  if ("requestVideoFrameCallback" in turnVideo) {
    turnVideo.requestVideoFrameCallback((now) => {
      if (state.turn === t) {
        t.record.firstFrameAt = now;
        turnVideo.classList.remove("hidden");
        idleVideo.classList.add("hidden");
      }
    });
  } else {
    turnVideo.classList.remove("hidden");
    idleVideo.classList.add("hidden");
  }
}

function endTurnMedia() {
  const t = state.turn;
  turnVideo.pause();
  turnVideo.classList.add("hidden");
  idleVideo.classList.remove("hidden");
  if (t && t.url) {
    turnVideo.removeAttribute("src");
    turnVideo.load();
    URL.revokeObjectURL(t.url);
    t.url = null;
  }
  if (t) {
    t.queue = [];
    t.sb = null;
    t.ms = null;
  }
}

// A "waiting" event mid-playback means the stream ran dry: a gap the user would see.
turnVideo.addEventListener("waiting", () => {
  const t = state.turn;
  if (t && t.shown && !t.record.ended && turnVideo.currentTime > 0) {
    t.record.stalls += 1;
    t.record.stallsAt.push(turnVideo.currentTime);
  }
});

turnVideo.addEventListener("timeupdate", () => {
  const t = state.turn;
  if (t && t.shown && !t.record.ended) {
    t.record.playedTo = Math.max(t.record.playedTo, turnVideo.currentTime);
    reportPlayback(t, !turnVideo.paused);
  }
});

// The server needs to know what the person actually heard (for barge-in) and when the avatar is quiet.
function reportPlayback(t, playing) {
  const now = performance.now();
  if (playing && t.lastReport && now - t.lastReport < 200) return;
  t.lastReport = now;
  // Read at a known mic sample: the server lines the avatar's voice up with what the mic heard (echo check).
  const mic = state.mic ? { mic_samples: state.mic.samples } : {};
  send({ type: "playback", turn_id: t.id, position_ms: Math.round(turnVideo.currentTime * 1000), playing, ...mic });
}

turnVideo.addEventListener("ended", () => {
  const t = state.turn;
  if (t && t.done) {
    reportPlayback(t, false);
    t.record.ended = true;
    t.record.playedTo = turnVideo.currentTime;
    if (t.sb && t.sb.buffered.length) t.record.bufferedTo = t.sb.buffered.end(t.sb.buffered.length - 1);
    endTurnMedia();
    setState("ready", "ready");
  }
});

// ---- input ------------------------------------------------------------------------------------

function sendText(text) {
  text = text.trim();
  if (!text) return;
  // A click is a user gesture: let the turn video play with sound later.
  turnVideo.muted = false;
  state.sentAt = performance.now();
  bubble("user", text);
  if (!send({ type: "user_text", text })) {
    state.pending.push(text);
    bubble("note", "offline: will send when reconnected");
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sendText(input.value);
  input.value = "";
  input.focus();
});

stopButton.addEventListener("click", () => send({ type: "stop" }));

unmute.addEventListener("click", () => {
  unmute.classList.add("hidden");
  turnVideo.play().catch(() => {});
});

// ---- microphone ---------------------------------------------------------------------------------

async function startMic() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      // As the web app's defaults (web/src/lib/mic.ts): noise suppression cost words, bench/bench_voice_page.py.
      audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    bubble("note", `Microphone unavailable: ${err.message}. Allow it in the browser and press Talk again.`);
    return;
  }
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/mic-worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "mic-processor");
  const mic = { ctx, node, stream, seq: 0, samples: 0 };
  node.port.onmessage = (ev) => {
    levelDot.style.transform = `scale(${1 + Math.min(2, ev.data.level * 8)})`;
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    const pcm = new Uint8Array(ev.data.pcm);
    const frame = new Uint8Array(8 + pcm.length);
    const view = new DataView(frame.buffer);
    view.setUint8(0, 0x41); view.setUint8(1, 0x43); view.setUint8(2, 1); view.setUint8(3, 2);
    view.setUint32(4, mic.seq++);
    frame.set(pcm, 8);
    state.ws.send(frame);
    mic.samples += pcm.length / 2;
  };
  source.connect(node);
  state.mic = mic;
  send({ type: "mic_start", sample_rate: 16000, format: "pcm_s16le" });
  micButton.setAttribute("aria-pressed", "true");
  micButton.textContent = "Listening…";
  hearing.classList.remove("hidden");
  turnVideo.muted = false;
}

function stopMic() {
  const mic = state.mic;
  if (!mic) return;
  state.mic = null;
  send({ type: "mic_stop" });
  mic.stream.getTracks().forEach((track) => track.stop());
  mic.ctx.close();
  micButton.setAttribute("aria-pressed", "false");
  micButton.textContent = "Talk";
  hearing.classList.add("hidden");
}

micButton.addEventListener("click", () => (state.mic ? stopMic() : startMic()));

window.avatarChat = {
  get state() { return document.body.dataset.state; },
  get sessionId() { return state.sessionId; },
  get turns() { return state.turns; },
  get lastTurn() { return state.turns[state.turns.length - 1] || null; },
  send: sendText,
  stop: () => send({ type: "stop" }),
  startMic,
  stopMic,
  get micOn() { return !!state.mic; },
  get heard() { return state.heard; },
};

connect();
