// Browser side of bench/web_bundle.py: what the chat view (/) loads on a first visit, in Debian's Chromium
// (fresh context, empty cache), until its session is up and the network is quiet. Prints one JSON line per run:
// bytes on the wire (encoded) and decoded, per kind of resource, and the page's load timings.
// Env: AVATARCHAT_URL, RUNS.
import { launch } from "../web/e2e/browser.mjs";

const BASE = process.env.AVATARCHAT_URL;
const RUNS = Number(process.env.RUNS ?? 5);
const CODE = new Set(["document", "script", "stylesheet"]);

const browser = await launch();
try {
  for (let i = 0; i < RUNS; i++) {
    const context = await browser.newContext({ viewport: { width: 1200, height: 760 } });
    const page = await context.newPage();
    const done = [];
    page.on("requestfinished", (req) => done.push(req));
    const t0 = Date.now();
    await page.goto(`${BASE}/`);
    await page.waitForFunction(() => window.avatarChat && window.avatarChat.sessionId, null, { timeout: 60_000 });
    const sessionMs = Date.now() - t0;
    await page.waitForLoadState("networkidle");
    const kinds = {};
    const files = [];
    for (const req of done) {
      const kind = req.resourceType();
      const sizes = await req.sizes();
      const res = await req.response();
      // Decoded sizes only for the app's code (the idle clip and API answers are not the bundle).
      const decoded = CODE.has(kind) && res ? (await res.body()).length : 0;
      const k = (kinds[kind] ??= { count: 0, wire: 0, decoded: 0 });
      k.count += 1;
      k.wire += sizes.responseBodySize;
      k.decoded += decoded;
      if (CODE.has(kind)) {
        files.push({ path: new URL(req.url()).pathname, wire: sizes.responseBodySize, decoded, encoding: (await res.allHeaders())["content-encoding"] ?? null });
      }
    }
    const timing = await page.evaluate(() => {
      const nav = performance.getEntriesByType("navigation")[0];
      const fcp = performance.getEntriesByName("first-contentful-paint")[0];
      return { dcl_ms: nav.domContentLoadedEventEnd, load_ms: nav.loadEventEnd, fcp_ms: fcp ? fcp.startTime : null };
    });
    console.log(JSON.stringify({ run: i, kinds, files, session_ms: sessionMs, ...timing }));
    await context.close();
  }
} finally {
  await browser.close();
}
