// The avatar's video: the idle loop, and one MediaSource per turn fed with the server's fMP4 fragments
// (ported from the plain page, src/avatarchat/server/static/app.js). Sentences of a turn are one
// continuous stream, so playback is gapless across them.

export interface TurnMedia {
  id: number;
  ms: MediaSource | null;
  sb: SourceBuffer | null;
  url: string | null;
  queue: Uint8Array[];
  done: boolean;
  shown: boolean;
  lastReport: number;
}

export interface PlayerHooks {
  /** The first frame of a turn was painted (requestVideoFrameCallback's `now`). */
  firstFrame(turnId: number, now: number): void;
  /** First media bytes of a turn arrived. */
  firstMedia(turnId: number): void;
  /** Playback started (or was blocked by the autoplay policy). */
  playing(turnId: number, blocked: boolean): void;
  /** Where the player is; the server needs it for barge-in (what was heard). */
  report(turnId: number, positionMs: number, playing: boolean): void;
  stalled(turnId: number, at: number, bufferedAhead: number): void;
  progress(turnId: number, currentTime: number): void;
  /** The turn's media played to its end. */
  ended(turnId: number, playedTo: number, bufferedTo: number): void;
  error(message: string): void;
}

export class AvatarPlayer {
  turn: TurnMedia | null = null;
  private idle: HTMLVideoElement | null = null;
  private video: HTMLVideoElement | null = null;
  private idleSrc = "";

  constructor(private hooks: PlayerHooks) {}

  attach(idle: HTMLVideoElement, video: HTMLVideoElement): void {
    this.idle = idle;
    this.video = video;
    video.addEventListener("waiting", () => {
      const t = this.turn;
      if (!t || !t.shown || video.currentTime <= 0) return;
      // How much media was buffered past the playhead: ~0 means the stream ran dry (the server was late);
      // more means the player itself stalled with data in hand (a client bug).
      const b = t.sb?.buffered;
      const ahead = b && b.length ? b.end(b.length - 1) - video.currentTime : 0;
      this.hooks.stalled(t.id, video.currentTime, ahead);
      this.report(t, false); // not moving: the server must not assume it plays on (its echo check would drift)
    });
    video.addEventListener("playing", () => {
      const t = this.turn;
      if (!t || !t.shown) return;
      t.lastReport = 0; // moving again: say so at once
      this.report(t, true);
    });
    video.addEventListener("timeupdate", () => {
      const t = this.turn;
      if (!t || !t.shown) return;
      this.hooks.progress(t.id, video.currentTime);
      this.report(t, !video.paused);
    });
    video.addEventListener("ended", () => {
      const t = this.turn;
      if (!t || !t.done) return;
      this.report(t, false);
      const sb = t.sb;
      const bufferedTo = sb && sb.buffered.length ? sb.buffered.end(sb.buffered.length - 1) : 0;
      this.hooks.ended(t.id, video.currentTime, bufferedTo);
      this.endTurn();
    });
    if (this.idleSrc) this.setIdle(this.idleSrc);
  }

  get element(): HTMLVideoElement | null {
    return this.video;
  }

  setIdle(src: string): void {
    this.idleSrc = src;
    const idle = this.idle;
    if (!idle) return;
    if (idle.getAttribute("src") !== src) idle.src = src;
    idle.play().catch(() => {});
  }

  /** A new turn: drop whatever the previous one still had queued. */
  startTurn(id: number): void {
    this.endTurn();
    this.turn = { id, ms: null, sb: null, url: null, queue: [], done: false, shown: false, lastReport: 0 };
  }

  openMedia(id: number, mime: string): void {
    const t = this.turn;
    const video = this.video;
    if (!t || t.id !== id || !video) return;
    if (typeof MediaSource === "undefined" || !MediaSource.isTypeSupported(mime)) {
      this.hooks.error(`This browser cannot play ${mime}`);
      return;
    }
    const ms = new MediaSource();
    t.ms = ms;
    t.url = URL.createObjectURL(ms);
    video.src = t.url;
    ms.addEventListener(
      "sourceopen",
      () => {
        if (this.turn !== t) return;
        const sb = ms.addSourceBuffer(mime);
        sb.mode = "segments";
        sb.addEventListener("updateend", () => this.pump(t));
        t.sb = sb;
        this.pump(t);
      },
      { once: true },
    );
  }

  /** A media frame's payload; frames of any turn but the current one are dropped (e.g. in flight after stop). */
  media(turnId: number, payload: Uint8Array): void {
    const t = this.turn;
    if (!t || t.id !== turnId || !t.ms) return;
    if (!t.queue.length && !t.shown && !t.sb?.buffered.length) this.hooks.firstMedia(t.id);
    t.queue.push(payload);
    this.pump(t);
  }

  /** The server sent turn_done: end the stream once the queue is appended. */
  finish(id: number): void {
    const t = this.turn;
    if (!t || t.id !== id) return;
    t.done = true;
    if (t.sb && !t.sb.updating && !t.queue.length && t.ms?.readyState === "open") t.ms.endOfStream();
  }

  /** Is the current turn's media still playing or about to? */
  get active(): boolean {
    return !!this.turn && !!this.turn.ms;
  }

  endTurn(): void {
    const t = this.turn;
    const video = this.video;
    if (video) {
      video.pause();
      video.classList.add("hidden");
      if (t?.url) {
        video.removeAttribute("src");
        video.load();
      }
    }
    this.idle?.classList.remove("hidden");
    if (t) {
      if (t.url) URL.revokeObjectURL(t.url);
      t.url = null;
      t.queue = [];
      t.sb = null;
      t.ms = null;
    }
  }

  resume(): void {
    this.video?.play().catch(() => {});
  }

  private pump(t: TurnMedia): void {
    if (this.turn !== t || !t.sb || t.sb.updating) return;
    if (t.queue.length) {
      try {
        t.sb.appendBuffer(t.queue.shift() as Uint8Array);
      } catch (err) {
        this.hooks.error(`media error: ${(err as Error).message}`);
        this.endTurn();
        return;
      }
      if (!t.shown) this.startPlayback(t);
      this.trimPlayed(t);
      return;
    }
    if (t.done && t.ms?.readyState === "open") t.ms.endOfStream();
  }

  private trimPlayed(t: TurnMedia): void {
    const video = this.video;
    if (!video || !t.sb) return;
    const played = video.currentTime - 10;
    if (played > 0 && !t.sb.updating && t.sb.buffered.length && t.sb.buffered.start(0) < played) t.sb.remove(0, played);
  }

  private startPlayback(t: TurnMedia): void {
    const video = this.video;
    if (!video) return;
    t.shown = true;
    const show = (): void => {
      video.classList.remove("hidden");
      this.idle?.classList.add("hidden");
    };
    video.play().then(
      () => this.hooks.playing(t.id, false),
      () => this.hooks.playing(t.id, true),
    );
    if ("requestVideoFrameCallback" in video) {
      video.requestVideoFrameCallback((now) => {
        if (this.turn !== t) return;
        this.hooks.firstFrame(t.id, now);
        show();
      });
    } else {
      show();
    }
  }

  private report(t: TurnMedia, playing: boolean): void {
    if (!t.ms) return; // not open yet, or played out / flushed: the element is reset (currentTime 0), no position
    const now = performance.now();
    if (playing && now - t.lastReport < 200) return;
    t.lastReport = now;
    this.hooks.report(t.id, Math.round((this.video?.currentTime ?? 0) * 1000), playing);
  }
}
