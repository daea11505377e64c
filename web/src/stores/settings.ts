// Settings the person picks; persisted in localStorage and applied to the session with `session.update`.
import { defineStore } from "pinia";
import { reactive, watch } from "vue";
import { CAPTURE_DEFAULTS } from "../lib/mic";

export const STORAGE_KEY = "avatarchat.settings.v1";

export interface Settings {
  llmProvider: string;
  llmModel: string;
  voice: string;
  rate: number;
  avatar: string | null;
  language: string;
  silenceMs: number;
  // Chromium's capture processing (getUserMedia constraints); applied the next time the mic opens.
  echoCancellation: boolean;
  noiseSuppression: boolean;
  autoGainControl: boolean;
}

export const DEFAULTS: Settings = {
  llmProvider: "",
  llmModel: "",
  voice: "",
  rate: 1.0,
  avatar: null,
  language: "",
  silenceMs: 500,
  ...CAPTURE_DEFAULTS,
};

/** Read saved settings; anything malformed falls back to its default. */
export function loadSettings(storage: Pick<Storage, "getItem"> = localStorage): Settings {
  let saved: Record<string, unknown> = {};
  try {
    const raw = JSON.parse(storage.getItem(STORAGE_KEY) ?? "{}") as unknown;
    if (raw && typeof raw === "object") saved = raw as Record<string, unknown>;
  } catch {
    saved = {};
  }
  const str = (k: keyof Settings): string => (typeof saved[k] === "string" ? (saved[k] as string) : (DEFAULTS[k] as string));
  const num = (k: keyof Settings, lo: number, hi: number): number => {
    const v = saved[k];
    return typeof v === "number" && v >= lo && v <= hi ? v : (DEFAULTS[k] as number);
  };
  const bool = (k: keyof Settings): boolean => (typeof saved[k] === "boolean" ? (saved[k] as boolean) : (DEFAULTS[k] as boolean));
  return {
    llmProvider: str("llmProvider"),
    llmModel: str("llmModel"),
    voice: str("voice"),
    rate: num("rate", 0.5, 2.0),
    avatar: typeof saved.avatar === "string" && saved.avatar ? saved.avatar : null,
    language: str("language"),
    silenceMs: Math.round(num("silenceMs", 200, 3000)),
    echoCancellation: bool("echoCancellation"),
    noiseSuppression: bool("noiseSuppression"),
    autoGainControl: bool("autoGainControl"),
  };
}

export const useSettings = defineStore("settings", () => {
  const s = reactive<Settings>(loadSettings());
  watch(s, (v) => localStorage.setItem(STORAGE_KEY, JSON.stringify(v)), { deep: true });
  function reset(): void {
    Object.assign(s, DEFAULTS);
  }
  return { s, reset };
});
