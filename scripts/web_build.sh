#!/usr/bin/env bash
# The web app (web/, issue 4): `npm ci` when package-lock.json changed, `npm run build` when a source is newer
# than the build in src/avatarchat/server/webapp. Idempotent; a no-op (well under a second) when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
WEB=web
OUT=src/avatarchat/server/webapp

if ! command -v npm >/dev/null 2>&1; then
  say "npm not found: install Node.js 20+ and npm (the web app is built with them; the plain page at /basic works without)"
  exit 1
fi

stamp="$WEB/node_modules/.avatarchat-lock"
want=$(sha256sum "$WEB/package-lock.json" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing the web app's npm packages (npm ci)"
  (cd "$WEB" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >"$stamp"
fi

built="$OUT/index.html"
if [ ! -f "$built" ] || [ -n "$(find "$WEB/src" "$WEB/index.html" "$WEB/vite.config.ts" "$WEB/tsconfig.json" "$WEB/package-lock.json" -newer "$built" -print -quit)" ]; then
  say "building the web app (npm run build → $OUT)"
  (cd "$WEB" && npm run build --silent)
  touch "$built"
else
  say "web app up to date"
fi
