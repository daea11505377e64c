// WebSocket protocol v1 (docs/protocol.md): event types and the 8-byte binary frame header.

export const PROTOCOL = 1;
export const MEDIA_FMP4 = 1;
export const MIC_PCM16 = 2;

export interface ServerSettings {
  rate: number;
  silence_ms: number;
  voice: string;
  language: string;
  llm: { provider: string; model: string };
  avatar: string;
  options: {
    voices: string[];
    languages: string[];
    llm: { provider: string; model: string }[];
    avatars: string[];
  };
}

export type Timings = Partial<Record<"first_text" | "first_piece" | "first_audio" | "first_video" | "turn", number>>;

export type ServerEvent =
  | { type: "session"; protocol: number; session_id: string; avatar: string; media: { mime: string; width: number; height: number; fps: number }; settings?: ServerSettings }
  | { type: "session.updated"; settings: ServerSettings }
  | { type: "turn_start"; turn_id: number; user_text: string }
  | { type: "text_delta"; turn_id: number; delta: string }
  | { type: "sentence"; turn_id: number; index: number; text: string; start_ms: number; duration_ms: number }
  | { type: "media_start"; turn_id: number; mime: string }
  | { type: "turn_done"; turn_id: number; reason: "complete" | "stopped" | "interrupted" | "error"; text: string; media_ms: number; timings: Timings }
  | { type: "error"; code: string; message: string; fatal: boolean; turn_id?: number; retry_after_ms?: number }
  | { type: "pong"; id?: unknown }
  | { type: "mic_ready"; sample_rate: number; format: string }
  | { type: "speech_start"; voiced_ms: number }
  | { type: "transcript"; final: boolean; text: string; utterance_id: number; timings?: Record<string, number | boolean> }
  | { type: "interrupt"; turn_id: number; heard: string };

export type ClientEvent =
  | { type: "hello"; protocol: number }
  | { type: "user_text"; text: string }
  | { type: "stop" }
  | { type: "ping"; id?: unknown }
  | { type: "mic_start"; sample_rate: 16000; format: "pcm_s16le" }
  | { type: "mic_stop" }
  | { type: "playback"; turn_id: number; position_ms: number; playing: boolean; mic_samples?: number }
  | { type: "session.update"; rate?: number; silence_ms?: number; voice?: string; language?: string; llm?: { provider: string; model: string }; avatar?: string };

/** A media frame from the server: its turn id and fMP4 payload, or null when the header is not ours. */
export function parseMedia(buf: ArrayBuffer): { turnId: number; payload: Uint8Array } | null {
  if (buf.byteLength < 8) return null;
  const v = new DataView(buf);
  if (v.getUint8(0) !== 0x41 || v.getUint8(1) !== 0x43 || v.getUint8(2) !== PROTOCOL || v.getUint8(3) !== MEDIA_FMP4) return null;
  return { turnId: v.getUint32(4), payload: new Uint8Array(buf, 8) };
}

/** A microphone frame: header (kind 2, sequence number) + 16 kHz mono PCM16 little-endian. */
export function micFrame(pcm: ArrayBuffer, seq: number): Uint8Array {
  const bytes = new Uint8Array(pcm);
  const frame = new Uint8Array(8 + bytes.length);
  const v = new DataView(frame.buffer);
  v.setUint8(0, 0x41);
  v.setUint8(1, 0x43);
  v.setUint8(2, PROTOCOL);
  v.setUint8(3, MIC_PCM16);
  v.setUint32(4, seq >>> 0);
  frame.set(bytes, 8);
  return frame;
}

export function wsUrl(loc: { protocol: string; host: string }, avatar?: string | null): string {
  const scheme = loc.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${loc.host}/ws${avatar ? `?avatar=${encodeURIComponent(avatar)}` : ""}`;
}

/** What the person should see for an error code, and what the retry button does. */
export interface UiError {
  code: string;
  title: string;
  message: string;
  action: "reconnect" | "mic" | "resend" | "none";
}

export function describeError(code: string, message: string): UiError {
  switch (code) {
    case "session_limit":
    case "server_busy":
      return { code, title: "The server is busy", message: `${message}. Retrying automatically.`, action: "reconnect" };
    case "unreachable":
      return { code, title: "Cannot reach the server", message, action: "reconnect" };
    case "mic_denied":
      return { code, title: "Microphone blocked", message, action: "mic" };
    case "llm_failed":
      return { code, title: "The language model failed", message, action: "resend" };
    case "tts_failed":
      return { code, title: "Speech synthesis failed", message, action: "resend" };
    case "render_failed":
      return { code, title: "Rendering the avatar failed", message, action: "resend" };
    case "asr_failed":
      return { code, title: "Speech recognition failed", message: `${message}. Please say it again.`, action: "none" };
    case "idle_timeout":
      return { code, title: "Session closed after being idle", message, action: "reconnect" };
    case "slow_client":
      return { code, title: "The connection is too slow for the video", message, action: "reconnect" };
    case "internal_error":
      return { code, title: "Something went wrong on the server", message, action: "resend" };
    default:
      return { code, title: "Error", message, action: "none" };
  }
}
