// The conversation: reactive UI state written by the ChatClient (src/lib/client.ts). One client per tab,
// created on first use; the transcript lives here and outlives reconnections and page switches.
import { defineStore } from "pinia";
import { reactive, watch } from "vue";
import { ChatClient, emptyUi, type Desired, type TurnRecord } from "../lib/client";
import { useSettings, type Settings } from "./settings";

declare global {
  interface Window {
    avatarChat?: Record<string, unknown>;
  }
}

export function desiredFrom(s: Settings): Desired {
  const d: Desired = { rate: s.rate, silence_ms: s.silenceMs };
  if (s.voice) d.voice = s.voice;
  if (s.language) d.language = s.language;
  if (s.llmProvider && s.llmModel) d.llm = { provider: s.llmProvider, model: s.llmModel };
  return d;
}

export const useChat = defineStore("chat", () => {
  const settings = useSettings();
  const ui = reactive(emptyUi());
  const client = new ChatClient(ui, {
    location: window.location,
    avatar: () => settings.s.avatar,
    desired: () => desiredFrom(settings.s),
    capture: () => ({
      echoCancellation: settings.s.echoCancellation,
      noiseSuppression: settings.s.noiseSuppression,
      autoGainControl: settings.s.autoGainControl,
    }),
    avatarGone: () => {
      settings.s.avatar = null;
    },
  });
  // Settings changed while connected: apply them to this session.
  watch(
    () => desiredFrom(settings.s),
    (d) => client.update(d),
    { deep: true },
  );
  watch(
    () => settings.s.avatar,
    (name) => name && client.switchAvatar(name),
  );
  // The test and benchmark hook (the plain page has the same one).
  window.avatarChat = {
    get state() {
      return ui.state;
    },
    get sessionId() {
      return ui.sessionId;
    },
    get turns(): TurnRecord[] {
      return client.turns;
    },
    get lastTurn(): TurnRecord | null {
      return client.lastTurn;
    },
    get heard() {
      return client.heard;
    },
    get micOn() {
      return ui.micOn;
    },
    get micSettings() {
      return client.micSettings;
    },
    get avatar() {
      return ui.avatar;
    },
    get server() {
      return ui.server;
    },
    get error() {
      return ui.error;
    },
    send: (text: string) => client.sendText(text),
    stop: () => client.stop(),
    startMic: () => client.startMic(),
    stopMic: () => client.stopMic(),
    dropConnection: () => (client as unknown as { ws: WebSocket | null }).ws?.close(),
  };
  return { ui, client };
});
