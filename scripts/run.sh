#!/usr/bin/env bash
# `make run`: the stub RAG server and the bridge on localhost, streaming enabled.
set -euo pipefail
BIN=${BIN:-.venv/bin}
STUB_PORT=${STUB_PORT:-50051}
BRIDGE_PORT=${BRIDGE_PORT:-8000}
# Refuse before starting anything: otherwise the health check below could greet somebody else's
# server on the same port and print its URL as ours.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for spec in "BRIDGE_PORT=$BRIDGE_PORT" "STUB_PORT=$STUB_PORT"; do
  if port_taken "${spec#*=}"; then
    echo "make run: port ${spec#*=} (${spec%%=*}) is already in use on 127.0.0.1." >&2
    echo "  Stop what is listening there, or choose other ports, e.g.: BRIDGE_PORT=8080 STUB_PORT=50052 make run" >&2
    exit 1
  fi
done
cleanup() { kill "${stub_pid:-}" "${bridge_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$BIN/rag-stub" --port "$STUB_PORT" --token-delay-ms "${TOKEN_DELAY_MS:-30}" &
stub_pid=$!
export RAG_TARGET="127.0.0.1:$STUB_PORT" ENABLE_SSE_STREAMING=${ENABLE_SSE_STREAMING:-true}
export AUDIT_DB=${AUDIT_DB:-./data/audit.sqlite3}
"$BIN/bali-zero-bridge" --port "$BRIDGE_PORT" &
bridge_pid=$!
for _ in $(seq 1 100); do
  kill -0 "$stub_pid" 2>/dev/null || { echo "rag-stub failed to start" >&2; exit 1; }
  kill -0 "$bridge_pid" 2>/dev/null || { echo "bridge failed to start" >&2; exit 1; }
  curl -fsS "http://127.0.0.1:$BRIDGE_PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
cat <<MSG

  Demo page:   http://127.0.0.1:$BRIDGE_PORT/
  Stream:      curl -N "http://127.0.0.1:$BRIDGE_PORT/api/v2/bali-zero/chat-stream?query=B211A%20visa"
  OpenAI API:  base URL http://127.0.0.1:$BRIDGE_PORT/v1, model bali-zero (any api_key)
  Stop with Ctrl-C.

MSG
wait -n "$stub_pid" "$bridge_pid"
