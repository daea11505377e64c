// The avatar service API (/api/avatar/list|preview|add|delete|start) and the monitor endpoint.
import { t } from "../i18n";

export interface AvatarInfo {
  name: string;
  builtin?: boolean;
  video?: boolean; // made from a video clip
  [key: string]: unknown;
}

export const MAX_UPLOAD_BYTES = 10 * 1024 * 1024; // the server's default avatar.max_upload_bytes
export const MAX_VIDEO_BYTES = 64 * 1024 * 1024; // the server's default avatar.clip.max_bytes
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];
const VIDEO_TYPES = ["video/mp4", "video/webm", "video/quicktime", "video/x-m4v"];
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Client-side checks before an upload; the server checks again and its 4xx message is shown as is. */
export function checkUpload(name: string, file: { name: string; type: string; size: number } | null, maxBytes = MAX_UPLOAD_BYTES,
  maxVideoBytes = MAX_VIDEO_BYTES): string | null {
  if (!NAME_RE.test(name)) return t("avatars.badName");
  if (!file) return t("avatars.noFile");
  const looksImage = IMAGE_TYPES.includes(file.type) || (!file.type && /\.(png|jpe?g|webp)$/i.test(file.name));
  const looksVideo = VIDEO_TYPES.includes(file.type) || (!file.type && /\.(mp4|m4v|webm|mov)$/i.test(file.name));
  if (!looksImage && !looksVideo) return t("avatars.notImage", { file: file.name });
  if (looksVideo) maxBytes = maxVideoBytes;
  if (file.size > maxBytes) return t("avatars.tooBig", { file: file.name, mb: (file.size / 2 ** 20).toFixed(1), limit: (maxBytes / 2 ** 20).toFixed(0) });
  if (file.size === 0) return t("avatars.empty", { file: file.name });
  return null;
}

async function detail(r: Response): Promise<string> {
  try {
    const body = (await r.json()) as { detail?: unknown };
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d: { msg?: string }) => d.msg ?? "").join("; ");
  } catch {
    /* not JSON */
  }
  return `${r.status} ${r.statusText}`;
}

async function call<T>(url: string, init?: RequestInit): Promise<T> {
  let r: Response;
  try {
    r = await fetch(url, init);
  } catch {
    throw new ApiError(0, "Cannot reach the server.");
  }
  if (!r.ok) throw new ApiError(r.status, await detail(r));
  return (await r.json()) as T;
}

export async function listAvatars(): Promise<AvatarInfo[]> {
  return (await call<{ avatars: AvatarInfo[] }>("/api/avatar/list")).avatars;
}

export function previewUrl(name: string, size = 160, bust = 0): string {
  return `/api/avatar/preview?name=${encodeURIComponent(name)}&size=${size}${bust ? `&v=${bust}` : ""}`;
}

export async function deleteAvatar(name: string): Promise<void> {
  await call("/api/avatar/delete", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }) });
}

export async function startAvatar(name: string): Promise<{ name: string; ready: boolean }> {
  return call("/api/avatar/start", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }) });
}

/** Upload with progress (fetch has no upload progress; XMLHttpRequest does). */
export function uploadAvatar(name: string, file: File, onProgress: (fraction: number) => void): Promise<AvatarInfo> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const form = new FormData();
    form.append("name", name);
    form.append("file", file, file.name);
    xhr.open("POST", "/api/avatar/add");
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, "Cannot reach the server."));
    xhr.onload = () => {
      const body = xhr.response as { detail?: unknown } | null;
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve(body as AvatarInfo);
        return;
      }
      const msg = typeof body?.detail === "string" ? body.detail : `upload failed (${xhr.status})`;
      reject(new ApiError(xhr.status, msg));
    };
    xhr.send(form);
  });
}

export interface TurnSample {
  at: number;
  session: string;
  turn_id: number;
  reason: string;
  asr_ms: number | null;
  first_text?: number;
  first_audio?: number;
  first_video?: number;
  turn?: number;
}

export interface MonitorData {
  time: number;
  uptime_s: number;
  ready: boolean;
  sessions: number;
  max_sessions: number;
  capacity_sessions?: number; // live conversations the CPU holds (measured); beyond it, server_busy
  cost_per_speech_s?: number | null;
  degrade_level?: number; // 1: overloaded, each face rendered for two frames
  half_rate_batches?: Record<string, number>; // batches shown at half the face rate, by reason (overload, due)
  cpu_percent: number;
  cpu_count: number;
  rss_mb: number;
  threads: number; // what a leak grows (bench/bench_soak.py): process threads, open fds, asyncio tasks
  fds: number;
  tasks: number;
  fps: number;
  target_fps: number;
  frames_total: number;
  errors: Record<string, number>;
  errors_total: number;
  turns_total: Record<string, number>;
  turns: TurnSample[];
}

export async function fetchMonitor(): Promise<MonitorData> {
  return call<MonitorData>("/api/monitor");
}
