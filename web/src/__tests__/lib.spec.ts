import { describe, expect, it } from "vitest";
import { describeError, micFrame, parseMedia, wsUrl } from "../lib/protocol";
import { checkUpload, MAX_UPLOAD_BYTES, MAX_VIDEO_BYTES } from "../lib/api";
import { DEFAULTS, loadSettings, STORAGE_KEY } from "../stores/settings";
import { HISTORY, errorsOption, latencyOption, median, pushPoint } from "../lib/monitor";
import type { MonitorData, TurnSample } from "../lib/api";

describe("protocol frames", () => {
  it("parses a media frame and refuses foreign ones", () => {
    const buf = new Uint8Array([0x41, 0x43, 1, 1, 0, 0, 1, 2, 9, 8, 7]).buffer;
    const m = parseMedia(buf);
    expect(m?.turnId).toBe(258);
    expect(Array.from(m!.payload)).toEqual([9, 8, 7]);
    expect(parseMedia(new Uint8Array([0x41, 0x43, 1, 2, 0, 0, 0, 1]).buffer)).toBeNull(); // kind 2 is mic audio
    expect(parseMedia(new Uint8Array([0x41, 0x43, 2, 1, 0, 0, 0, 1]).buffer)).toBeNull(); // another protocol version
    expect(parseMedia(new Uint8Array([0x41, 0x43, 1]).buffer)).toBeNull();
  });

  it("builds mic frames with the kind-2 header and a big-endian sequence number", () => {
    const pcm = new Int16Array([1, -1]).buffer;
    const f = micFrame(pcm, 0x01020304);
    expect(Array.from(f.slice(0, 8))).toEqual([0x41, 0x43, 1, 2, 1, 2, 3, 4]);
    expect(Array.from(f.slice(8))).toEqual([1, 0, 255, 255]);
  });

  it("builds the WebSocket URL with the avatar", () => {
    expect(wsUrl({ protocol: "http:", host: "h:1" })).toBe("ws://h:1/ws");
    expect(wsUrl({ protocol: "https:", host: "h" }, "a b")).toBe("wss://h/ws?avatar=a%20b");
  });

  it("gives every error the person can act on a retry path", () => {
    expect(describeError("session_limit", "full").action).toBe("reconnect");
    expect(describeError("unreachable", "x").action).toBe("reconnect");
    expect(describeError("slow_client", "x").action).toBe("reconnect");
    expect(describeError("internal_error", "x").action).toBe("resend");
    expect(describeError("mic_denied", "x").action).toBe("mic");
    expect(describeError("llm_failed", "x").action).toBe("resend");
    expect(describeError("tts_failed", "x").action).toBe("resend");
    expect(describeError("whatever", "x").action).toBe("none");
  });
});

describe("upload checks", () => {
  const png = { name: "me.png", type: "image/png", size: 1000 };
  it("accepts a named image within the limit", () => expect(checkUpload("me", png)).toBeNull());
  it("refuses non-images, huge files, empty files and bad names", () => {
    expect(checkUpload("me", { name: "notes.txt", type: "text/plain", size: 10 })).toMatch(/not an image/);
    expect(checkUpload("me", { ...png, size: MAX_UPLOAD_BYTES + 1 })).toMatch(/the limit is 10 MB/);
    expect(checkUpload("me", { ...png, size: 0 })).toMatch(/empty/);
    expect(checkUpload("../x", png)).toMatch(/name/);
    expect(checkUpload("me", null)).toMatch(/Choose/);
  });
  it("takes a video within its own, larger limit", () => {
    const mp4 = { name: "talk.mp4", type: "video/mp4", size: 20 * 2 ** 20 };
    expect(checkUpload("me", mp4)).toBeNull();
    expect(checkUpload("me", { ...mp4, type: "" })).toBeNull(); // known by its extension
    expect(checkUpload("me", { ...mp4, size: MAX_VIDEO_BYTES + 1 })).toMatch(/the limit is 64 MB/);
    expect(checkUpload("me", { name: "talk.avi", type: "", size: 10 })).toMatch(/not an image or a video/);
  });
});

describe("settings", () => {
  const store = (v: unknown) => ({ getItem: (k: string) => (k === STORAGE_KEY ? JSON.stringify(v) : null) });
  it("loads saved values", () => {
    const s = loadSettings(store({ rate: 1.5, silenceMs: 900, avatar: "astro", voice: "v" }));
    expect(s).toMatchObject({ rate: 1.5, silenceMs: 900, avatar: "astro", voice: "v" });
  });
  it("falls back to defaults for malformed or out-of-range values", () => {
    const s = loadSettings(store({ rate: 9, silenceMs: "long", avatar: 3 }));
    expect(s).toMatchObject({ rate: 1, silenceMs: 500, avatar: null });
    expect(loadSettings({ getItem: () => "{not json" }).rate).toBe(1);
  });
  it("loads the capture switches, and only booleans", () => {
    const on = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
    expect(loadSettings(store(on))).toMatchObject(on);
    const s = loadSettings(store({ echoCancellation: "yes", noiseSuppression: 1, autoGainControl: null }));
    expect(s).toMatchObject({
      echoCancellation: DEFAULTS.echoCancellation,
      noiseSuppression: DEFAULTS.noiseSuppression,
      autoGainControl: DEFAULTS.autoGainControl,
    });
  });
});

describe("monitor charts", () => {
  const turn = (id: number, v: number, asr: number | null = null): TurnSample => ({
    at: id, session: "s", turn_id: id, reason: "complete", asr_ms: asr, first_text: v, first_audio: v + 100, first_video: v + 150,
  });
  it("charts the four stages per turn, with gaps for stages a turn did not have", () => {
    const o = latencyOption([turn(1, 100), turn(2, 300, 250)]) as { series: { name: string; data: (number | null)[] }[] };
    expect(o.series.map((s) => s.name)).toEqual(["ASR", "LLM first token", "TTS first audio", "First video frame"]);
    expect(o.series[0].data).toEqual([null, 250]);
    expect(o.series[3].data).toEqual([250, 450]);
  });
  it("computes medians and keeps a bounded history", () => {
    expect(median([turn(1, 100), turn(2, 300), turn(3, 200)], "first_text")).toBe(200);
    expect(median([], "first_text")).toBeNull();
    let h: ReturnType<typeof pushPoint> = [];
    const m = { time: 1, fps: 25, sessions: 1, cpu_percent: 50, rss_mb: 900, errors_total: 0 } as MonitorData;
    for (let i = 0; i < HISTORY + 10; i++) h = pushPoint(h, m);
    expect(h.length).toBe(HISTORY);
  });
  it("lists errors by code", () => {
    const o = errorsOption({ llm_failed: 2, bad_json: 1 }) as { yAxis: { data: string[] }; series: { data: number[] }[] };
    expect(o.yAxis.data).toEqual(["bad_json", "llm_failed"]);
    expect(o.series[0].data).toEqual([1, 2]);
  });
});
