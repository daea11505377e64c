// The UI's language (issue 16): English or simplified Chinese, from the browser's languages unless the
// person picked one in the settings drawer (kept in this browser). A few lines instead of vue-i18n: all
// the app needs is `t(key, {name})` that re-renders when the language changes, and vue-i18n (with its
// message compiler) added ~31 kB gzip to the chat view's first load (+21 %, BENCHMARKS.md "Web app bundle").
// `t` reads a reactive ref, so components re-render on a switch without installing a plugin. Ant Design's
// few own texts are given explicitly (Popconfirm's buttons): its ConfigProvider would cost another ~10 kB gzip.
import { ref } from "vue";
import en from "./locales/en";
import zhCN from "./locales/zh-CN";

export const LOCALES = ["en", "zh-CN"] as const;
export type Locale = (typeof LOCALES)[number];
export const LOCALE_NAMES: Record<Locale, string> = { en: "English", "zh-CN": "简体中文" };
export const LOCALE_KEY = "avatarchat.locale";
type Messages = typeof en;
const MESSAGES: Record<Locale, Messages> = { en, "zh-CN": zhCN };

/** The saved choice if it is one we have, else the first browser language we speak, else English. */
export function pickLocale(saved: string | null, languages: readonly string[]): Locale {
  if (saved && (LOCALES as readonly string[]).includes(saved)) return saved as Locale;
  for (const lang of languages) {
    const l = lang.toLowerCase();
    if (l.startsWith("zh")) return "zh-CN";
    if (l.startsWith("en")) return "en";
  }
  return "en";
}

function saved(): string | null {
  try {
    return localStorage.getItem(LOCALE_KEY);
  } catch {
    return null;
  }
}

const browser = typeof navigator === "undefined" ? [] : navigator.languages?.length ? navigator.languages : [navigator.language];
const locale = ref<Locale>(pickLocale(saved(), browser));

function lookup(messages: Messages, key: string): string | undefined {
  let node: unknown = messages;
  for (const part of key.split(".")) node = node && typeof node === "object" ? (node as Record<string, unknown>)[part] : undefined;
  return typeof node === "string" ? node : undefined;
}

/** Whether ``key`` names a string. */
export function te(key: string): boolean {
  return lookup(MESSAGES[locale.value], key) !== undefined;
}

/** The string ``key`` in the current language (English if missing there), with {name} filled from ``params``. */
export function t(key: string, params: Record<string, string | number> = {}): string {
  const text = lookup(MESSAGES[locale.value], key) ?? lookup(en, key) ?? key;
  return text.replace(/\{(\w+)\}/g, (m, name: string) => (name in params ? String(params[name]) : m));
}

export function currentLocale(): Locale {
  return locale.value;
}

export function useLocale(): typeof locale {
  return locale;
}

export function setLocale(next: Locale): void {
  locale.value = next;
  document.documentElement.lang = next;
  try {
    localStorage.setItem(LOCALE_KEY, next);
  } catch {
    /* private mode: the choice lasts this visit */
  }
}

if (typeof document !== "undefined") document.documentElement.lang = locale.value;
