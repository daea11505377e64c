// Browser side of bench/bench_web.py: in Debian's Chromium, the time from send (text) or from the end of the
// fake-mic speech (voice) to the first avatar video frame painted (requestVideoFrameCallback), per turn,
// next to the server's own figure for the same turn. Prints one JSON line per turn.
// Env: AVATARCHAT_URL, MODE (text|voice|barge), TURNS, WARMUP, BENCH_WAV (voice, barge).
import { launch, openApp } from "../web/e2e/browser.mjs";

const BASE = process.env.AVATARCHAT_URL;
const MODE = process.env.MODE ?? "text";
const TURNS = Number(process.env.TURNS ?? 12);
const WARMUP = Number(process.env.WARMUP ?? 2);
const PROMPTS = [
  "Hello! Tell me about the moon.",
  "What do cats like to eat?",
  "Why is the sky blue?",
  "Give me a tip for sleeping well.",
  "What is your favourite season?",
  "How do bees make honey?",
  "Tell me something about the ocean.",
  "What is a good name for a dog?",
];

const browser = await launch({ wav: MODE === "text" ? undefined : process.env.BENCH_WAV });
const { page } = await openApp(browser, BASE);

async function finish(turnId) {
  // Measure the first frame only: stop the turn after it, so the next turn starts from a quiet avatar.
  // A voice turn can also be cut before its first frame (the next question barged in on a slow machine).
  await page.waitForFunction((id) => { const t = window.avatarChat.turns.find((x) => x.turnId === id); return t && (t.firstFrameAt || t.reason); }, turnId, { timeout: 120_000 });
  await page.waitForTimeout(300);
  await page.evaluate(() => window.avatarChat.stop());
  await page.waitForFunction((id) => { const t = window.avatarChat.turns.find((x) => x.turnId === id); return t && t.timings; }, turnId, { timeout: 30_000 });
  return page.evaluate((id) => JSON.parse(JSON.stringify(window.avatarChat.turns.find((x) => x.turnId === id))), turnId);
}

function emit(i, t) {
  if (!t.firstFrameAt || !t.timings || t.timings.first_video === undefined || (MODE === "voice" && !t.speechEndAt)) {
    console.error(`turn ${t.turnId} skipped: no first frame (${t.reason})`);
    return;
  }
  const from = MODE === "voice" ? t.speechEndAt : t.sentAt;
  console.log(JSON.stringify({
    i,
    warmup: i < WARMUP,
    mode: MODE,
    browser_first_frame_ms: t.firstFrameAt - from,
    browser_first_media_ms: t.firstMediaAt - from,
    server_first_video_ms: t.timings.first_video ?? null,
    sent_to_final_transcript_ms: MODE === "voice" ? t.sentAt - t.speechEndAt : 0,
    text: t.userText,
  }));
}

if (MODE === "text") {
  for (let i = 0; i < TURNS + WARMUP; i++) {
    const n = await page.evaluate(() => window.avatarChat.turns.length);
    await page.evaluate((text) => window.avatarChat.send(text), PROMPTS[i % PROMPTS.length]);
    await page.waitForFunction((k) => window.avatarChat.turns.length > k, n, { timeout: 60_000 });
    const id = await page.evaluate(() => window.avatarChat.lastTurn.turnId);
    emit(i, await finish(id));
  }
} else if (MODE === "barge") {
  // The fake mic asks for a long answer, then talks over it: each interrupt, from the onset of the speech that
  // cut the reply (the page's mic level) to the video stopping (the interrupt event). Every barge-in counts.
  await page.evaluate(() => window.avatarChat.startMic());
  const want = TURNS + WARMUP;
  await page.waitForFunction((k) => window.avatarChat.turns.filter((t) => t.interruptedAt).length >= k, want, { timeout: want * 60_000 });
  const cut = await page.evaluate(() => JSON.parse(JSON.stringify(window.avatarChat.turns.filter((t) => t.interruptedAt))));
  cut.slice(0, want).forEach((t, i) => console.log(JSON.stringify({
    i, warmup: i < WARMUP, mode: MODE, barge_stop_ms: t.bargeSpeechAt === null ? null : t.interruptedAt - t.bargeSpeechAt,
    played_ms: t.playedTo * 1000, heard: t.heard, text: t.userText,
  })));
} else {
  await page.evaluate(() => window.avatarChat.startMic());
  for (let i = 0; i < TURNS + WARMUP; i++) {
    await page.waitForFunction((k) => window.avatarChat.turns.length > k, i, { timeout: 60_000 });
    const id = await page.evaluate((k) => window.avatarChat.turns[k].turnId, i);
    emit(i, await finish(id));
  }
}
await browser.close();
