"""Benchmark: what `--tpm` costs in wall time, for the README's `reflect --rpm 500 --tpm 200000` example.

`--tpm` charges each request its prompt estimate plus its whole `--max-tokens` when it starts (as
OpenAI's limiter counts `max_tokens` against TPM). So the cap decides whether a run fits in one
minute's budget. Side by side in one run, against one `python tests/fakes/openai_server.py
--latency 0.2` child process: `reflect-tune reflect examples/alpaca_small.jsonl` (32 records,
96 requests), each arm with a fresh request cache and output, run as a user would (a subprocess
of the CLI), at `--rpm 500` with
  no --tpm, --max-tokens 2048 (the default)
  --tpm 200000, --max-tokens 2048
  --tpm 200000, --max-tokens 512
Reported: wall time of the command, requests per second, and the ratio to the arm without --tpm.
Writes a section into docs/BENCHMARKS.md (replacing an earlier one) unless --no-write.

    python bench/bench_tpm.py [--no-write]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench_ablation import commit, reflect_tune  # bench/ is on sys.path
from bench_teacher import Server
from common import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Reflect: `--tpm` and `--max-tokens`"
DATA = ROOT / "examples" / "alpaca_small.jsonl"
ARMS = (("no --tpm, --max-tokens 2048", []), ("--tpm 200000, --max-tokens 2048", ["--tpm", "200000"]),
        ("--tpm 200000, --max-tokens 512", ["--tpm", "200000", "--max-tokens", "512"]))


def run_arm(base_url: str, extra: list[str]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="reflect-tune-bench-tpm-") as tmp:
        cmd = [*reflect_tune(), "reflect", str(DATA), "-o", f"{tmp}/reflected.jsonl", "--model", "gpt-4o-mini",
               "--base-url", base_url, "--cache-dir", f"{tmp}/cache", "--rpm", "500", "--no-progress", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "OPENAI_API_KEY": "bench-key"}, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        answered = next((line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("requests:")), "")
        return wall, answered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    server = Server(0.2)
    try:
        rows = [(label, *run_arm(server.base_url, extra)) for label, extra in ARMS]
    finally:
        server.close()
    base = rows[0][1]
    lines = [SECTION, "",
             f"Machine: {machine()}. Commit {commit()}. Command: `python bench/bench_tpm.py`: `reflect-tune reflect "
             "examples/alpaca_small.jsonl --model gpt-4o-mini --rpm 500` (32 records, 96 requests) against the fake "
             "server with 0.2 s latency (`tests/fakes/openai_server.py --latency 0.2`), a fresh cache per arm.", "",
             "| arm | wall s | req/s | × the arm without --tpm | summary |", "| --- | ---: | ---: | ---: | --- |"]
    for label, wall, answered in rows:
        lines.append(f"| {label} | {wall:.1f} | {96 / wall:.1f} | {wall / base:.2f}× | {answered} |")
    lines += ["", "Each request is charged its prompt estimate plus its whole `--max-tokens` when it starts. At "
              "2048, 96 requests reserve more than 200,000 tokens, so the last ones wait for the first minute's "
              "charges to leave the window; at 512 they fit in one minute's budget."]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, section)


if __name__ == "__main__":
    main()
