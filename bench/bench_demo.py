"""Benchmark: `make demo` from a fresh clone, the issue-6 budget of 10 minutes on 2 CPU cores.

It clones this repository into a temporary folder, then runs `make demo` there with an empty model
cache (so the bundled GGUF is converted again), and times:
  install  the Makefile's venv step (pip may serve wheels from its own cache, as on a CI runner)
  demo     examples/demo.sh: conversion, then the four stages (the teacher in-process)
and, from the run folder's run.json, each stage's wall time. Writes a section into
docs/BENCHMARKS.md (replacing an earlier one) unless --no-write.

    python bench/bench_demo.py [--no-write]
"""

from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_section  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## `make demo` from a fresh clone"
BUDGET_S = 600


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--keep", type=Path, help="copy the run folder (without model weights) and the make log here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rt-demo-bench-") as tmp:
        clone, cache, log = Path(tmp) / "clone", Path(tmp) / "cache", Path(tmp) / "make.log"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "REFLECT_TUNE_CACHE": str(cache)}
        env.pop("VIRTUAL_ENV", None)
        install = timed(["make", "install"], clone, env, log)
        demo = timed(["make", "demo"], clone, env, log)
        record = json.loads((clone / "runs" / "demo" / "run.json").read_text())
        summary = (clone / "runs" / "demo" / "summary.md").read_text()
        if args.keep:
            shutil.copytree(clone / "runs" / "demo", args.keep / "demo", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.safetensors", "checkpoints", "reflect-cache"))
            shutil.copy(log, args.keep / "make.log")
    stages = {s["name"]: s.get("wall_s") for s in record["stages"]}
    total = install + demo
    rows = [("install (venv, CPU torch, package, model wheel)", install), ("demo.sh, all of it", demo)]
    rows += [(f"  stage {name}", wall) for name, wall in stages.items()]
    lines = [SECTION, "",
             f"Machine: {machine()}. Command: `python bench/bench_demo.py` (a fresh `git clone`, then "
             "`make install` and `make demo` with an empty `REFLECT_TUNE_CACHE`; pip's own wheel cache "
             "is left as it is, as on a CI runner that caches pip).", "",
             "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {wall:.0f} |" if wall is not None else f"| {name} | – |" for name, wall in rows]
    ok = re.search(r"\*\*(\d+) of (\d+) variants ok \((\d+)%\)\*\*", summary)
    selected = re.search(r"\*\*(\d+) selected\*\*", summary)
    lines += [f"| **total** | **{total:.0f}** ({total / BUDGET_S:.2f} of the 10-minute budget) |", "",
              "The teacher ran in-process (`backend: transformers`, the bundled 135M model, batched on the CPU). "
              "From the run's `summary.md`: "
              + (f"{ok.group(1)} of {ok.group(2)} teacher variants ok ({ok.group(3)}%)" if ok else "no variant count")
              + (f", {selected.group(1)} pairs selected." if selected else ".")]
    table = summary.split("## Evaluation: before and after training", 1)[1].split("\n## ", 1)[0] if \
        "## Evaluation: before and after training" in summary else ""
    rows_ = [line for line in table.splitlines() if line.startswith("|")]
    if rows_:
        lines += ["", "The run's before/after table (`summary.md`: the starting student against the trained one):", "", *rows_]
    text = "\n".join(lines) + "\n"
    print(text)
    if total > BUDGET_S:
        print(f"over budget: {total:.0f} s > {BUDGET_S} s", file=sys.stderr)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
