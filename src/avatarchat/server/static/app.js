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

const state = {
  ws: null,
  sessionId: null,
  avatar: null,
  backoff: 500,
  turn: null, // {id, bubble, ms, queue, sb, url, done, shown}
  pending: [], // texts typed while disconnected
  turns: [],
  sentAt: null,
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
      break;
    case "turn_start":
      endTurnMedia();
      state.turn = {
        id: e.turn_id, bubble: null, text: "", queue: [], sb: null, ms: null, url: null, done: false, shown: false,
        record: { turnId: e.turn_id, sentAt: state.sentAt, firstMediaAt: null, firstFrameAt: null, text: "", reason: null },
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
  if (buf.byteLength < 8 || view.getUint8(0) !== 0x41 || view.getUint8(1) !== 0x43 || view.getUint8(2) !== 1) return;
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

turnVideo.addEventListener("ended", () => {
  const t = state.turn;
  if (t && t.done) {
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

window.avatarChat = {
  get state() { return document.body.dataset.state; },
  get sessionId() { return state.sessionId; },
  get turns() { return state.turns; },
  get lastTurn() { return state.turns[state.turns.length - 1] || null; },
  send: sendText,
  stop: () => send({ type: "stop" }),
};

connect();
