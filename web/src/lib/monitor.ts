// Chart options for the monitoring page, built from /api/monitor samples (pure functions: unit-tested).
import type { MonitorData, TurnSample } from "./api";

export interface Point {
  t: number; // seconds since the epoch
  fps: number;
  sessions: number;
  cpu: number;
  rss: number;
  errors: number;
}

export const HISTORY = 90;

export function pushPoint(history: Point[], m: MonitorData): Point[] {
  const next = [...history, { t: m.time, fps: m.fps, sessions: m.sessions, cpu: m.cpu_percent, rss: m.rss_mb, errors: m.errors_total }];
  return next.slice(-HISTORY);
}

const clock = (t: number): string => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

export const STAGES: { key: keyof TurnSample; name: string }[] = [
  { key: "asr_ms", name: "ASR" },
  { key: "first_text", name: "LLM first token" },
  { key: "first_audio", name: "TTS first audio" },
  { key: "first_video", name: "First video frame" },
];

export function latencyOption(turns: TurnSample[]): Record<string, unknown> {
  const last = turns.slice(-20);
  return {
    tooltip: { trigger: "axis" },
    legend: { top: 0 },
    grid: { left: 48, right: 12, top: 32, bottom: 28 },
    xAxis: { type: "category", data: last.map((t) => `${t.session}#${t.turn_id}`) },
    yAxis: { type: "value", name: "ms" },
    series: STAGES.map((s) => ({
      name: s.name,
      type: "bar",
      data: last.map((t) => (typeof t[s.key] === "number" ? t[s.key] : null)),
    })),
  };
}

function lines(history: Point[], series: { name: string; key: keyof Point; axis?: number }[], yAxis: unknown): Record<string, unknown> {
  return {
    tooltip: { trigger: "axis" },
    legend: { top: 0 },
    grid: { left: 48, right: 48, top: 32, bottom: 28 },
    xAxis: { type: "category", data: history.map((p) => clock(p.t)) },
    yAxis,
    series: series.map((s) => ({
      name: s.name,
      type: "line",
      showSymbol: false,
      yAxisIndex: s.axis ?? 0,
      data: history.map((p) => p[s.key]),
    })),
  };
}

export function fpsOption(history: Point[], target: number): Record<string, unknown> {
  const o = lines(history, [{ name: "render fps", key: "fps" }], { type: "value", name: "fps", min: 0 });
  (o.series as Record<string, unknown>[])[0].markLine = { silent: true, data: [{ yAxis: target, name: "target" }] };
  return o;
}

export function sessionsOption(history: Point[], max: number): Record<string, unknown> {
  return lines(history, [{ name: "active sessions", key: "sessions" }], { type: "value", min: 0, max, minInterval: 1 });
}

export function processOption(history: Point[]): Record<string, unknown> {
  return lines(
    history,
    [
      { name: "CPU %", key: "cpu" },
      { name: "RSS MB", key: "rss", axis: 1 },
    ],
    [
      { type: "value", name: "CPU %", min: 0 },
      { type: "value", name: "MB", min: 0 },
    ],
  );
}

export function errorsOption(errors: Record<string, number>): Record<string, unknown> {
  const codes = Object.keys(errors).sort();
  return {
    tooltip: {},
    grid: { left: 110, right: 16, top: 8, bottom: 24 },
    xAxis: { type: "value", minInterval: 1 },
    yAxis: { type: "category", data: codes.length ? codes : ["(none)"] },
    series: [{ name: "errors", type: "bar", data: codes.length ? codes.map((c) => errors[c]) : [0], itemStyle: { color: "#ff4d4f" } }],
  };
}

/** Median of the given stage over the turns that reached it. */
export function median(turns: TurnSample[], key: keyof TurnSample): number | null {
  const v = turns.map((t) => t[key]).filter((x): x is number => typeof x === "number").sort((a, b) => a - b);
  if (!v.length) return null;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : Math.round((v[mid - 1] + v[mid]) / 2);
}
