import { defineConfig } from "vitest/config";
import vue from "@vitejs/plugin-vue";

// The Python app serves the build: index.html at "/", assets under "/app/" (src/avatarchat/server/app.py).
const server = process.env.AVATARCHAT_URL ?? "http://127.0.0.1:8000";

export default defineConfig({
  plugins: [vue()],
  base: "/app/",
  build: {
    outDir: "../src/avatarchat/server/webapp",
    emptyOutDir: true,
    chunkSizeWarningLimit: 2500,
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
