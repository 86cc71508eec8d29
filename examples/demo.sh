#!/usr/bin/env bash
# The demo on the embedded default model (bundled:smollm2-135m-instruct), offline.
# Run it with `make demo`, which installs everything first. Today it runs the stages that exist:
# data inspection with token counts (this converts and caches the bundled model on first use)
# and format conversion. reflect -> select -> train join it as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

MODEL="${MODEL:-bundled:smollm2-135m-instruct}"
RUN="${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$RUN"

echo "== 1. inspect the example data with the student's tokenizer ($MODEL)"
reflect-tune inspect examples/alpaca_small.jsonl --model "$MODEL"
reflect-tune inspect examples/alpaca_small.jsonl --model "$MODEL" --json > "$RUN/inspect.json"

echo "== 2. normalize three shapes into one alpaca JSONL, and write a messages Parquet"
reflect-tune convert examples/sharegpt_small.json "$RUN/sharegpt_as_alpaca.jsonl"
reflect-tune convert examples/messages_small.jsonl "$RUN/messages_as_alpaca.jsonl"
reflect-tune convert examples/alpaca_small.jsonl "$RUN/alpaca_as_messages.parquet" --to messages
reflect-tune inspect "$RUN/alpaca_as_messages.parquet"

echo
echo "run folder: $RUN"
ls -1 "$RUN"
