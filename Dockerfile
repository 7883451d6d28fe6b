# syntax=docker/dockerfile:1
#
# codex-auth-broker image: compiled JavaScript and production dependencies only.
# No embedded Postgres, no codex CLI, no test tools (they are devDependencies), so the
# image needs DATABASE_URL (see docker-compose.yml). test/deploy.test.ts checks the rules
# this file follows; `docker build -t codex-auth-broker .` builds it.

# Node 22, an LTS line with security support (Node 20 reached end of life in April 2026).
# The code also runs on Node 20.19+ and 24 (package.json engines); it uses nothing that
# exists in only one of them.
ARG NODE_IMAGE=node:22-bookworm-slim

# ---- build: dev dependencies, tsc -> dist/ -------------------------------------------
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
# Dev dependencies (tsc, @types). tsc needs neither install scripts nor the optional
# platform binaries (embedded Postgres, codex, esbuild: test tools): ~85 MB instead of ~560.
RUN npm ci --ignore-scripts --omit=optional --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build

# ---- runtime: production dependencies only -------------------------------------------
FROM ${NODE_IMAGE} AS runtime
# V8's heap, sized for a broker with 10,000 clients (docs/performance.md, "Heap sizing"):
# --max-semi-space-size=8 bounds the young generation at 8 MB per semi-space (V8's default,
# 16 MB, adds about 30 MB of RSS under load; 4 MB costs 1.4x the CPU per request, measured
# with two processes loaded at the same moments, 2 MB more still). --heap-growing-percent=20 (in CMD: NODE_OPTIONS refuses it) collects
# the old generation before it fills with garbage (about 30 MB less RSS after 1,000,000
# requests).
# MALLOC_ARENA_MAX=2: glibc keeps at most 2 malloc arenas instead of 8 per core; the event
# loop is one thread, and the arenas of V8's helper threads held about 5 MB of RSS
# (docs/performance.md, "Heap sizing").
ENV NODE_ENV=production \
    NODE_OPTIONS=--max-semi-space-size=8 \
    MALLOC_ARENA_MAX=2 \
    HOST=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/app/data
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
    && npm cache clean --force \
    && mkdir -p /app/data \
    && chown node:node /app/data \
    && ln -s /app/bin/codex-auth-broker.js /usr/local/bin/codex-auth-broker
# dist/db.js reads ../migrations/ (/app/migrations); dist/routes/ops.js serves
# ../../openapi.yaml (/app/openapi.yaml); dist/routes/page.js serves the operator page from
# ../../web/ (/app/web) and its version from ../../package.json.
COPY --from=build /app/dist ./dist
# The launcher behind `npx codex-auth-broker …` (and `codex-auth-broker …` on PATH): with no
# src/ here it runs dist/cli.js.
COPY bin ./bin
COPY migrations ./migrations
COPY openapi.yaml ./
COPY web ./web

# The code stays root-owned and read-only to the process; only DATA_DIR is writable.
USER node
EXPOSE 8080
# No curl in the slim image: Node's fetch does the probe, on $PORT (8080 unless overridden).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.PORT||8080)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
# serve finishes a refresh in flight (SHUTDOWN_TIMEOUT_SECONDS, default 30 s) on SIGTERM:
# give it `docker stop -t 45` / compose stop_grace_period: 45s.
STOPSIGNAL SIGTERM
CMD ["node", "--heap-growing-percent=20", "dist/cli.js", "serve"]
