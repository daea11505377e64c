import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { reactive } from "vue";
import { ChatClient, emptyUi } from "../lib/client";
import type { ServerSettings } from "../lib/protocol";

class FakeSocket {
  static OPEN = 1;
  static last: FakeSocket | null = null;
  static all: FakeSocket[] = [];
  readyState = 0;
  binaryType = "";
  sent: string[] = [];
  onmessage: ((e: { data: unknown }) => void) | null = null;
  onclose: (() => void) | null = null;
  constructor(readonly url: string) {
    FakeSocket.last = this;
    FakeSocket.all.push(this);
  }
  send(data: string) {
    this.sent.push(data);
  }
  close() {
    this.readyState = 3;
    this.onclose?.();
  }
  open() {
    this.readyState = 1;
  }
  emit(event: object) {
    this.onmessage?.({ data: JSON.stringify(event) });
  }
  events() {
    return this.sent.map((s) => JSON.parse(s));
  }
}

const settings: ServerSettings = {
  rate: 1,
  silence_ms: 500,
  voice: "joe",
  language: "en",
  llm: { provider: "llama_cpp", model: "m" },
  avatar: "default",
  options: { voices: ["joe"], languages: ["en"], llm: [{ provider: "llama_cpp", model: "m" }], avatars: ["default"] },
};

function setup(desired = {}) {
  vi.stubGlobal("WebSocket", FakeSocket);
  const ui = reactive(emptyUi());
  const gone: string[] = [];
  const client = new ChatClient(ui, {
    location: { protocol: "http:", host: "x" },
    avatar: () => "astro",
    desired: () => desired,
    avatarGone: (n) => gone.push(n),
    WebSocketImpl: FakeSocket as unknown as typeof WebSocket,
  });
  client.connect();
  const ws = FakeSocket.last!;
  ws.open();
  ws.emit({ type: "session", session_id: "s1", avatar: "default", protocol: 1, media: {}, settings });
  return { ui, client, ws, gone };
}

describe("ChatClient", () => {
  beforeEach(() => {
    vi.useFakeTimers();
    FakeSocket.all = [];
  });
  afterEach(() => {
    vi.useRealTimers();
    vi.unstubAllGlobals();
  });

  it("connects with the chosen avatar and applies only the settings that differ", () => {
    const { ui, ws } = setup({ rate: 1.4, silence_ms: 500, voice: "joe" });
    expect(ws.url).toBe("ws://x/ws?avatar=astro");
    expect(ui.state).toBe("ready");
    expect(ws.events()).toEqual([{ type: "session.update", rate: 1.4 }]);
  });

  it("streams a turn into the transcript", () => {
    const { ui, client, ws } = setup();
    client.sendText("  hello  ");
    expect(ws.events().at(-1)).toEqual({ type: "user_text", text: "hello" });
    ws.emit({ type: "turn_start", turn_id: 1, user_text: "hello" });
    expect(ui.state).toBe("thinking");
    expect(ui.turnActive).toBe(true);
    ws.emit({ type: "text_delta", turn_id: 1, delta: "Hi" });
    ws.emit({ type: "text_delta", turn_id: 1, delta: " there" });
    ws.emit({ type: "text_delta", turn_id: 2, delta: "ignored" });
    expect(ui.messages.map((m) => [m.role, m.text])).toEqual([["user", "hello"], ["bot", "Hi there"]]);
    ws.emit({ type: "turn_done", turn_id: 1, reason: "stopped", text: "Hi there", media_ms: 0, timings: {} });
    expect(ui.messages[1].stopped).toBe(true);
    expect(ui.state).toBe("ready");
    expect(client.lastTurn?.reason).toBe("stopped");
  });

  it("shows an LLM failure with a retry that sends the message again", () => {
    const { ui, client, ws } = setup();
    client.sendText("tell me");
    ws.emit({ type: "turn_start", turn_id: 1, user_text: "tell me" });
    ws.emit({ type: "error", code: "llm_failed", message: "upstream 500", fatal: false, turn_id: 1 });
    ws.emit({ type: "turn_done", turn_id: 1, reason: "error", text: "", media_ms: 0, timings: {} });
    expect(ui.error?.code).toBe("llm_failed");
    client.retry();
    expect(ui.error).toBeNull();
    expect(ws.events().filter((e) => e.type === "user_text")).toHaveLength(2);
  });

  it("reconnects after a dropped connection, keeps the transcript and sends what was typed offline", () => {
    const { ui, client, ws } = setup();
    client.sendText("one");
    ws.close();
    expect(ui.state).toBe("offline");
    expect(ui.error?.code).toBe("unreachable");
    client.sendText("two"); // offline: queued
    vi.advanceTimersByTime(600);
    const ws2 = FakeSocket.last!;
    expect(ws2).not.toBe(ws);
    ws2.open();
    ws2.emit({ type: "session", session_id: "s2", avatar: "default", protocol: 1, media: {}, settings });
    expect(ui.error).toBeNull();
    expect(ui.sessionId).toBe("s2");
    expect(ws2.events()).toEqual([{ type: "user_text", text: "two" }]);
    expect(ui.messages.filter((m) => m.role === "user").map((m) => m.text)).toEqual(["one", "two"]);
  });

  it("reports the session limit and retries on demand", () => {
    vi.stubGlobal("WebSocket", FakeSocket);
    const ui = reactive(emptyUi());
    const client = new ChatClient(ui, { location: { protocol: "http:", host: "x" }, avatar: () => null, desired: () => ({}), WebSocketImpl: FakeSocket as unknown as typeof WebSocket });
    client.connect();
    const ws = FakeSocket.last!;
    ws.emit({ type: "error", code: "session_limit", message: "at its limit of 4 sessions", fatal: true });
    ws.close();
    expect(ui.error?.code).toBe("session_limit");
    expect(ui.error?.action).toBe("reconnect");
    client.retry();
    expect(FakeSocket.all.length).toBe(2);
  });

  it("waits as long as a busy server asks before reconnecting", () => {
    vi.useFakeTimers();
    try {
      vi.stubGlobal("WebSocket", FakeSocket);
      const ui = reactive(emptyUi());
      const client = new ChatClient(ui, { location: { protocol: "http:", host: "x" }, avatar: () => null, desired: () => ({}), WebSocketImpl: FakeSocket as unknown as typeof WebSocket });
      client.connect();
      const before = FakeSocket.all.length;
      const ws = FakeSocket.last!;
      ws.emit({ type: "error", code: "server_busy", message: "holding all the live conversations it can serve (4)", fatal: true, retry_after_ms: 5000 });
      ws.close();
      expect(ui.error?.title).toBe("The server is busy");
      expect(ui.retryAt! - Date.now()).toBeGreaterThanOrEqual(4900);
      vi.advanceTimersByTime(4000);
      expect(FakeSocket.all.length).toBe(before);
      vi.advanceTimersByTime(1100);
      expect(FakeSocket.all.length).toBe(before + 1);
    } finally {
      vi.useRealTimers();
    }
  });

  it("falls back to the default avatar when the saved one was deleted", () => {
    const { client, ws, gone } = setup();
    void client;
    ws.emit({ type: "error", code: "invalid_field", message: "no avatar named 'astro'", fatal: true });
    expect(gone).toEqual(["astro"]);
  });

  it("tracks voice turns: partial, final transcript, barge-in", () => {
    const { ui, client, ws } = setup();
    ws.emit({ type: "speech_start", voiced_ms: 250 });
    expect(ui.state).toBe("hearing");
    ws.emit({ type: "transcript", final: false, text: "what is", utterance_id: 1 });
    expect(ui.partial).toBe("what is");
    ws.emit({ type: "transcript", final: true, text: "what is up", utterance_id: 1 });
    expect(ui.partial).toBe("");
    expect(client.heard).toEqual(["what is up"]);
    ws.emit({ type: "turn_start", turn_id: 1, user_text: "what is up" });
    expect(client.lastTurn?.voice).toBe(true);
    ws.emit({ type: "text_delta", turn_id: 1, delta: "Not much" });
    ws.emit({ type: "interrupt", turn_id: 1, heard: "Not" });
    expect(client.lastTurn?.reason).toBe("interrupted");
    expect(client.lastTurn?.heard).toBe("Not");
    expect(ui.messages.at(-1)?.stopped).toBe(true);
    ws.emit({ type: "turn_done", turn_id: 1, reason: "interrupted", text: "Not much", media_ms: 0, timings: {} });
    expect(client.lastTurn?.reason).toBe("interrupted");
  });
});
