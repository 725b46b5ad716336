#!/usr/bin/env bash
# `make run`: the stub RAG server and the bridge on localhost, streaming enabled.
set -euo pipefail
BIN=${BIN:-.venv/bin}
STUB_PORT=${STUB_PORT:-50051}
BRIDGE_PORT=${BRIDGE_PORT:-8000}
cleanup() { kill "${stub_pid:-}" "${bridge_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$BIN/rag-stub" --port "$STUB_PORT" --token-delay-ms "${TOKEN_DELAY_MS:-30}" &
stub_pid=$!
export RAG_TARGET="127.0.0.1:$STUB_PORT" ENABLE_SSE_STREAMING=${ENABLE_SSE_STREAMING:-true}
export AUDIT_DB=${AUDIT_DB:-./data/audit.sqlite3}
"$BIN/bali-zero-bridge" --port "$BRIDGE_PORT" &
bridge_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$BRIDGE_PORT/healthz" >/dev/null 2>&1 && break
  kill -0 "$bridge_pid" 2>/dev/null || { echo "bridge failed to start" >&2; exit 1; }
  sleep 0.1
done
cat <<MSG

  Demo page:   http://127.0.0.1:$BRIDGE_PORT/
  Stream:      curl -N "http://127.0.0.1:$BRIDGE_PORT/api/v2/bali-zero/chat-stream?query=B211A%20visa"
  Stop with Ctrl-C.

MSG
wait -n "$stub_pid" "$bridge_pid"
