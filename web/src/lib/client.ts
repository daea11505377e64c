// The chat session: one WebSocket (docs/protocol.md), the avatar player and the microphone.
// It writes what the person sees into a reactive `ChatUi` (the Pinia store's state); the transcript
// lives there, so it survives reconnections.

import { t } from "../i18n";
import { AvatarPlayer } from "./player";
import { CAPTURE_DEFAULTS, openMic, MicDeniedError, type CaptureOptions, type MicHandle } from "./mic";
import {
  describeError,
  micFrame,
  parseMedia,
  wsUrl,
  type ClientEvent,
  type ServerEvent,
  type ServerSettings,
  type Timings,
  type UiError,
} from "./protocol";

export type ChatState = "connecting" | "offline" | "ready" | "listening" | "hearing" | "thinking" | "speaking" | "error";

export interface Message {
  id: number;
  role: "user" | "bot" | "note";
  text: string;
  turnId?: number;
  stopped?: boolean;
}

export interface ChatUi {
  state: ChatState;
  messages: Message[];
  partial: string;
  level: number;
  micOn: boolean;
  error: UiError | null;
  sessionId: string | null;
  avatar: string | null;
  server: ServerSettings | null;
  soundBlocked: boolean;
  turnActive: boolean;
  retryAt: number | null;
}

export interface TurnRecord {
  turnId: number;
  userText: string;
  voice: boolean;
  sentAt: number | null;
  speechEndAt: number | null;
  firstMediaAt: number | null;
  firstFrameAt: number | null;
  text: string;
  reason: string | null;
  stalls: number;
  stallsAt: { at: number; ahead: number }[];
  sentences: { start_ms: number; duration_ms: number; text: string }[];
  playedTo: number;
  bufferedTo: number;
  ended: boolean;
  mediaMs: number | null;
  timings: Timings | null;
  heard: string | null;
  /** Barge-in: when the video stopped (the interrupt arrived), and when the speech that cut it began (mic level). */
  interruptedAt: number | null;
  bargeSpeechAt: number | null;
}

/** What the settings ask of the session; only what differs from the server's current values is sent. */
export interface Desired {
  rate?: number;
  silence_ms?: number;
  voice?: string;
  language?: string;
  llm?: { provider: string; model: string };
}

export interface ClientOptions {
  location: { protocol: string; host: string };
  avatar: () => string | null;
  desired: () => Desired;
  /** The browser's capture processing, read each time the mic opens. */
  capture?: () => CaptureOptions;
  /** The avatar asked for no longer exists on the server. */
  avatarGone?: (name: string) => void;
  WebSocketImpl?: typeof WebSocket;
}

const VOICE_LEVEL = 0.02; // peak level above which a mic frame counts as voiced (for the latency figures)
const ONSET_GAP_MS = 300; // voiced after this long without: the start of an utterance (for the barge-in figure)

export function emptyUi(): ChatUi {
  return {
    state: "connecting",
    messages: [],
    partial: "",
    level: 0,
    micOn: false,
    error: null,
    sessionId: null,
    avatar: null,
    server: null,
    soundBlocked: false,
    turnActive: false,
    retryAt: null,
  };
}

export class ChatClient {
  readonly player: AvatarPlayer;
  readonly turns: TurnRecord[] = [];
  readonly heard: string[] = [];
  private ws: WebSocket | null = null;
  private backoff = 500;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private pending: string[] = [];
  private nextId = 1;
  private current: TurnRecord | null = null;
  private bubble: Message | null = null;
  private sentAt: number | null = null;
  private speechEndAt: number | null = null;
  private lastVoiceAt: number | null = null;
  private voiceStartAt: number | null = null;
  private fromVoice = false;
  private lastUserText: string | null = null;
  private mic: MicHandle | null = null;
  private micSeq = 0;
  private micSamples = 0; // sent since the last mic_start: the clock of the playback reports
  private closed = false;
  private noReconnect = false;

  constructor(
    readonly ui: ChatUi,
    private opts: ClientOptions,
  ) {
    this.player = new AvatarPlayer({
      firstFrame: (id, now) => {
        const r = this.record(id);
        if (r && r.firstFrameAt === null) r.firstFrameAt = now;
        if (r && this.player.active) this.setState("speaking"); // the face moves: before play() settles
      },
      firstMedia: (id) => {
        const r = this.record(id);
        if (r && r.firstMediaAt === null) r.firstMediaAt = performance.now();
      },
      playing: (id, blocked) => {
        // play() settles later: the turn may have been stopped or cut meanwhile.
        if (this.player.turn?.id !== id || !this.player.active) return;
        this.ui.soundBlocked = blocked;
        this.setState("speaking");
      },
      // With the mic on, each report says which mic sample it was read at: the server lines the avatar's voice
      // up with what the mic heard on this clock (its echo check), whatever the network does meanwhile.
      report: (id, position_ms, playing) =>
        this.send({ type: "playback", turn_id: id, position_ms, playing, ...(this.mic ? { mic_samples: this.micSamples } : {}) }),
      stalled: (id, at, ahead) => {
        const r = this.record(id);
        if (r && !r.ended) {
          r.stalls += 1;
          r.stallsAt.push({ at, ahead });
        }
      },
      progress: (id, t) => {
        const r = this.record(id);
        if (r && !r.ended) r.playedTo = Math.max(r.playedTo, t);
      },
      ended: (id, playedTo, bufferedTo) => {
        const r = this.record(id);
        if (r) Object.assign(r, { ended: true, playedTo, bufferedTo });
        this.ui.turnActive = false;
        this.setState(this.restState());
      },
      error: (message) => this.note(message),
    });
  }

  get lastTurn(): TurnRecord | null {
    return this.turns[this.turns.length - 1] ?? null;
  }

  // ---- connection -----------------------------------------------------------------------------

  connect(): void {
    this.clearTimer();
    this.closed = false;
    this.noReconnect = false;
    const Impl = this.opts.WebSocketImpl ?? WebSocket;
    const ws = new Impl(wsUrl(this.opts.location, this.opts.avatar()));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    if (this.ui.state !== "offline") this.setState("connecting");
    ws.onmessage = (ev: MessageEvent) => {
      if (this.ws !== ws) return;
      if (typeof ev.data === "string") this.onEvent(JSON.parse(ev.data) as ServerEvent);
      else {
        const m = parseMedia(ev.data as ArrayBuffer);
        if (m) this.player.media(m.turnId, m.payload);
      }
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ui.sessionId = null;
      this.player.endTurn();
      this.ui.turnActive = false;
      if (this.closed || this.noReconnect) {
        if (!this.closed) this.setState("offline");
        return;
      }
      this.setState("offline");
      const delay = this.backoff;
      this.backoff = Math.min(this.backoff * 2, 10_000);
      this.ui.retryAt = Date.now() + delay;
      if (!this.ui.error || this.ui.error.action !== "reconnect" || this.ui.error.code === "unreachable") {
        this.ui.error = describeError("unreachable", `The connection to the server was lost. Retrying in ${Math.round(delay / 1000) || 1} s; your conversation is kept.`);
      }
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  /** The retry button of a connection error: try again now. */
  reconnectNow(): void {
    this.backoff = 500;
    const ws = this.ws;
    this.ws = null;
    ws?.close();
    this.connect();
  }

  close(): void {
    this.closed = true;
    this.clearTimer();
    this.stopMic();
    this.ws?.close();
    this.ws = null;
  }

  private clearTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.ui.retryAt = null;
  }

  send(event: ClientEvent): boolean {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.ui.sessionId) {
      this.ws.send(JSON.stringify(event));
      return true;
    }
    return false;
  }

  // ---- actions --------------------------------------------------------------------------------

  sendText(raw: string): void {
    const text = raw.trim();
    if (!text) return;
    this.player.element && (this.player.element.muted = false);
    this.sentAt = performance.now();
    this.fromVoice = false;
    this.lastUserText = text;
    this.add("user", text);
    if (!this.send({ type: "user_text", text })) {
      this.pending.push(text);
      this.note(t("chat.offline"));
    }
  }

  stop(): void {
    this.send({ type: "stop" });
  }

  /** The retry path of the error on screen. */
  retry(): void {
    const e = this.ui.error;
    this.ui.error = null;
    if (!e) return;
    if (e.action === "reconnect") this.reconnectNow();
    else if (e.action === "mic") void this.startMic();
    else if (e.action === "resend" && this.lastUserText) this.sendText(this.lastUserText);
  }

  dismissError(): void {
    this.ui.error = null;
  }

  update(desired: Desired): void {
    const s = this.ui.server;
    if (!s) return;
    const event: ClientEvent & { type: "session.update" } = { type: "session.update" };
    if (desired.rate !== undefined && desired.rate !== s.rate) event.rate = desired.rate;
    if (desired.silence_ms !== undefined && desired.silence_ms !== s.silence_ms) event.silence_ms = desired.silence_ms;
    if (desired.voice && desired.voice !== s.voice) event.voice = desired.voice;
    if (desired.language && desired.language !== s.language) event.language = desired.language;
    if (desired.llm && (desired.llm.provider !== s.llm.provider || desired.llm.model !== s.llm.model)) event.llm = desired.llm;
    if (Object.keys(event).length > 1) this.send(event);
  }

  switchAvatar(name: string): void {
    if (this.ui.server && name !== this.ui.avatar) this.send({ type: "session.update", avatar: name });
  }

  /** What the browser applied to the open mic's track (for tests and benchmarks). */
  get micSettings(): MediaTrackSettings | null {
    return this.mic?.track?.getSettings() ?? null;
  }

  async startMic(): Promise<void> {
    if (this.mic) return;
    try {
      const capture = this.opts.capture?.() ?? CAPTURE_DEFAULTS;
      this.mic = await openMic((pcm, level) => this.onMicFrame(pcm, level), capture);
    } catch (err) {
      const message = err instanceof MicDeniedError ? err.message : `The microphone could not start: ${(err as Error).message}`;
      this.ui.error = describeError("mic_denied", message);
      return;
    }
    this.micSeq = 0;
    this.micSamples = 0;
    this.ui.micOn = true;
    if (this.player.element) this.player.element.muted = false;
    this.send({ type: "mic_start", sample_rate: 16000, format: "pcm_s16le" });
    if (this.ui.state === "ready") this.setState("listening");
  }

  stopMic(): void {
    const mic = this.mic;
    if (!mic) return;
    this.mic = null;
    this.send({ type: "mic_stop" });
    mic.stop();
    this.ui.micOn = false;
    this.ui.level = 0;
    this.ui.partial = "";
    if (this.ui.state === "listening" || this.ui.state === "hearing") this.setState("ready");
  }

  private onMicFrame(pcm: ArrayBuffer, level: number): void {
    this.ui.level = level;
    if (level > VOICE_LEVEL) {
      const now = performance.now();
      if (this.lastVoiceAt === null || now - this.lastVoiceAt > ONSET_GAP_MS) this.voiceStartAt = now;
      this.lastVoiceAt = now;
    }
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.ui.sessionId) {
      this.ws.send(micFrame(pcm, this.micSeq++));
      this.micSamples += pcm.byteLength / 2;
    }
  }

  // ---- events ---------------------------------------------------------------------------------

  private onEvent(e: ServerEvent): void {
    switch (e.type) {
      case "session":
        this.ui.sessionId = e.session_id;
        this.backoff = 500;
        this.ui.retryAt = null;
        if (this.ui.error?.action === "reconnect") this.ui.error = null;
        this.setAvatar(e.avatar);
        if (e.settings) this.ui.server = e.settings;
        this.setState(this.restState());
        this.update(this.opts.desired());
        for (const text of this.pending.splice(0)) this.send({ type: "user_text", text });
        if (this.mic) {
          this.micSamples = 0; // the server counts again from this mic_start
          this.send({ type: "mic_start", sample_rate: 16000, format: "pcm_s16le" });
        }
        break;
      case "session.updated":
        this.ui.server = e.settings;
        this.setAvatar(e.settings.avatar);
        break;
      case "speech_start":
        this.setState("hearing");
        break;
      case "transcript":
        if (!e.final) {
          this.ui.partial = e.text;
          break;
        }
        this.ui.partial = "";
        if (e.text) {
          this.heard.push(e.text);
          this.add("user", e.text);
          this.lastUserText = e.text;
          this.sentAt = performance.now();
          this.speechEndAt = this.lastVoiceAt;
          this.fromVoice = true;
          this.setState("thinking");
        } else if (this.ui.state === "hearing") {
          this.setState(this.restState());
        }
        break;
      case "interrupt":
        // Barge-in: drop everything queued for that turn at once; the server keeps what was heard.
        if (this.current && this.current.turnId === e.turn_id) {
          this.current.reason = "interrupted";
          this.current.heard = e.heard;
          this.current.interruptedAt = performance.now();
          this.current.bargeSpeechAt = this.voiceStartAt;
          if (this.bubble) this.bubble.stopped = true;
          this.player.endTurn();
          this.ui.turnActive = false;
        }
        break;
      case "turn_start": {
        this.player.startTurn(e.turn_id);
        const record: TurnRecord = {
          turnId: e.turn_id,
          userText: e.user_text,
          voice: this.fromVoice,
          sentAt: this.sentAt,
          speechEndAt: this.fromVoice ? this.speechEndAt : null,
          firstMediaAt: null,
          firstFrameAt: null,
          text: "",
          reason: null,
          stalls: 0,
          stallsAt: [],
          sentences: [],
          playedTo: 0,
          bufferedTo: 0,
          ended: false,
          mediaMs: null,
          timings: null,
          heard: null,
          interruptedAt: null,
          bargeSpeechAt: null,
        };
        this.current = record;
        this.bubble = null;
        this.turns.push(record);
        this.ui.turnActive = true;
        if (this.ui.state !== "hearing") this.setState("thinking");
        break;
      }
      case "text_delta": {
        const r = this.current;
        if (!r || r.turnId !== e.turn_id) break;
        if (!this.bubble) this.bubble = this.add("bot", "", e.turn_id);
        r.text += e.delta;
        this.bubble.text = r.text;
        break;
      }
      case "sentence":
        if (this.current?.turnId === e.turn_id) this.current.sentences.push({ start_ms: e.start_ms, duration_ms: e.duration_ms, text: e.text });
        break;
      case "media_start":
        this.player.openMedia(e.turn_id, e.mime);
        break;
      case "turn_done":
        this.onTurnDone(e);
        break;
      case "error":
        this.onError(e);
        break;
      default:
        break;
    }
  }

  private onTurnDone(e: Extract<ServerEvent, { type: "turn_done" }>): void {
    const r = this.current;
    if (!r || r.turnId !== e.turn_id) return;
    r.reason = r.reason ?? e.reason;
    if (r.reason !== "interrupted") r.reason = e.reason;
    r.mediaMs = e.media_ms;
    r.timings = e.timings;
    if (e.reason !== "complete") {
      if (this.bubble) this.bubble.stopped = true;
      this.player.endTurn();
      this.ui.turnActive = false;
      if (this.ui.state !== "hearing") this.setState(this.restState());
      return;
    }
    this.player.finish(e.turn_id);
    if (!this.player.active) {
      this.ui.turnActive = false;
      if (this.ui.state !== "hearing") this.setState(this.restState());
    }
  }

  private onError(e: Extract<ServerEvent, { type: "error" }>): void {
    if (e.fatal && e.code === "invalid_field" && e.message.startsWith("no avatar named")) {
      // The saved avatar was deleted: fall back to the server's default.
      const name = this.opts.avatar();
      if (name) this.opts.avatarGone?.(name);
      this.note(`The avatar ${name ?? ""} no longer exists; using the default.`);
      return; // the server closes; onclose reconnects
    }
    if (e.fatal) {
      if (e.code === "idle_timeout") this.noReconnect = true;
      // A busy server says when to try again: wait that long before reconnecting (backoff grows from there).
      if (e.retry_after_ms !== undefined) this.backoff = Math.min(Math.max(e.retry_after_ms, 500), 30_000);
      this.ui.error = describeError(e.code, e.message);
      return;
    }
    if (["llm_failed", "tts_failed", "render_failed", "asr_failed"].includes(e.code)) {
      this.ui.error = describeError(e.code, e.message);
    } else {
      this.note(`⚠ ${e.message}`);
    }
    if (!this.ui.turnActive && this.ui.state !== "hearing") this.setState(this.restState());
  }

  // ---- helpers --------------------------------------------------------------------------------

  private record(id: number): TurnRecord | null {
    return this.current && this.current.turnId === id ? this.current : null;
  }

  private restState(): ChatState {
    return this.mic ? "listening" : "ready";
  }

  private setState(s: ChatState): void {
    this.ui.state = s;
  }

  private setAvatar(name: string): void {
    if (this.ui.avatar === name) return;
    this.ui.avatar = name;
    this.player.setIdle(`/avatars/${encodeURIComponent(name)}/idle.mp4`);
  }

  private add(role: Message["role"], text: string, turnId?: number): Message {
    this.ui.messages.push({ id: this.nextId++, role, text, turnId });
    // The reactive proxy of the message just pushed: later edits must go through it to re-render.
    return this.ui.messages[this.ui.messages.length - 1];
  }

  private note(text: string): void {
    this.add("note", text);
  }
}
