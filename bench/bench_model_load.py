"""Benchmark: what the GGUF -> safetensors cache buys when loading the bundled model.

Side by side, in one process on one machine:
  convert  first `load_model("bundled:...")` with an empty cache (dequantize + save + load)
  cached   a later `load_model("bundled:...")` (read the cached safetensors folder)
  gguf     `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, what every load would cost
           without the cache
Each timing covers the load and one short forward pass (so lazily mapped weights are really read),
and is the best of `--repeats` runs (the convert one runs once, on a fresh cache).
Writes a section into docs/BENCHMARKS.md (replacing an earlier one) unless --no-write.

    python bench/bench_model_load.py [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from common import machine, torch_line, write_section  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Loading the bundled model"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["REFLECT_TUNE_CACHE"] = tempfile.mkdtemp(prefix="reflect-tune-bench-")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from reflect_tune.models import bundled_gguf_path, load_model

    hf_logging.disable_progress_bar()
    spec = "bundled:smollm2-135m-instruct"
    gguf = bundled_gguf_path("smollm2-135m-instruct")

    import torch

    probe = torch.tensor([[1, 9690, 198, 2683, 359, 253]])

    def forward(model) -> None:
        with torch.no_grad():
            model(probe)

    convert = timed(lambda: forward(load_model(spec)))
    cached = min(timed(lambda: forward(load_model(spec))) for _ in range(args.repeats))
    direct = min(
        timed(lambda: forward(AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)))
        for _ in range(args.repeats)
    )
    rows = [
        ("first load, empty cache (convert + load)", convert),
        ("cached load (safetensors folder)", cached),
        ("direct GGUF load, no cache", direct),
    ]
    command = "python bench/bench_model_load.py " + " ".join(sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"- Machine: {machine(torch_line())}",
        f"- Command: `{command.strip()}` (also `make bench`)",
        f"- Date: {time.strftime('%Y-%m-%d')}, reflect-tune {_version()}",
        "",
        "| load + one forward pass | seconds (best of runs) | relative to cached |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {secs:.1f} | {secs / cached:.1f}x |" for name, secs in rows],
        "",
        f"The cache makes every load after the first {direct / cached:.1f}x faster than reading the GGUF again.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)
    shutil.rmtree(os.environ["REFLECT_TUNE_CACHE"], ignore_errors=True)  # 540 MB of converted weights


def _version() -> str:
    from reflect_tune import __version__

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    return f"{__version__}" + (f" ({rev})" if rev else "")


if __name__ == "__main__":
    main()
