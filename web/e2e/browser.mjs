// Shared by the e2e tests and the browser benchmark: Debian's Chromium, headless, via playwright-core.
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

export function launch({ wav } = {}) {
  const args = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
  ];
  if (wav) {
    args.push(
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${wav}%noloop`,
    );
  }
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args });
}

/** Open the web app and wait for its session. */
export async function openApp(browser, base, { viewport, hash = "", locale = "en-US" } = {}) {
  // English unless a test asks for another language: the tests look for English strings (issue 16).
  const context = await browser.newContext({ viewport: viewport ?? { width: 1200, height: 760 }, locale });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${base}/${hash}`);
  await page.waitForFunction(() => window.avatarChat && window.avatarChat.sessionId, null, { timeout: 60_000 });
  return { page, context, errors };
}
