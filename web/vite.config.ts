import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import type { Plugin } from "vite";
import { defineConfig } from "vitest/config";
import vue from "@vitejs/plugin-vue";

// The Python app serves the build: index.html at "/", assets under "/app/" (src/avatarchat/server/app.py).
const server = process.env.AVATARCHAT_URL ?? "http://127.0.0.1:8000";

// Each built JS/CSS file gets a .gz twin, sent to clients that accept gzip (src/avatarchat/server/assets.py):
// compressed once here at level 9, so no request pays for it. Skipped when gzip would not make it smaller.
function precompress(): Plugin {
  return {
    name: "avatarchat-precompress",
    apply: "build",
    writeBundle(options, bundle) {
      for (const name of Object.keys(bundle)) {
        if (!/\.(js|css)$/.test(name) || !options.dir) continue;
        const file = join(options.dir, name);
        const raw = readFileSync(file);
        const gz = gzipSync(raw, { level: 9 });
        if (gz.length < raw.length) writeFileSync(`${file}.gz`, gz);
      }
    },
  };
}

export default defineConfig({
  plugins: [vue(), precompress()],
  base: "/app/",
  build: {
    outDir: "../src/avatarchat/server/webapp",
    emptyOutDir: true,
    chunkSizeWarningLimit: 600, // kB: the largest chunk is the monitor's ECharts (~520 kB); see BENCHMARKS.md
  },
  server: {
    // `npm run dev`: the Vite dev server proxies the API and the WebSocket to a running `avatarchat serve`.
    proxy: {
      "/ws": { target: server.replace(/^http/, "ws"), ws: true },
      "/api": server,
      "/avatars": server,
      "/static": server,
    },
  },
  test: {
    environment: "jsdom",
    include: ["src/**/*.spec.ts"],
    setupFiles: ["src/__tests__/setup.ts"],
  },
});
