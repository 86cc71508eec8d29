"""Benchmark: `reflect-tune eval` (evaluate.run) against lm-eval's `simple_evaluate` + `HFLM` called
directly, on the same task and model, side by side in one process.

Both run the same harness, so the ratio should be about 1; what eval adds is its checks, the task
build, the output folder. Each side is timed end to end (model load included), alternated, best
of `--repeats`. The model is the bundled SmolLM2-135M-Instruct in fp32 on the CPU; the task is
examples/lm_eval_tasks/reflect_tiny_mc.yaml (12 items, 3-4 choices each) repeated `--copies`
times under different names, so there are a few dozen items.

    python bench/bench_eval.py [--repeats 2] [--copies 3] [--batch-size 8]

Prints the section for docs/BENCHMARKS.md (it is appended there by hand).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine, torch_line, write_section  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "lm_eval_tasks" / "reflect_tiny_mc.yaml"
SPEC = "bundled:smollm2-135m-instruct"


def task_copies(folder: Path, copies: int) -> list[Path]:
    """`copies` YAMLs of the tiny task under distinct names, with absolute data files (for lm-eval direct)."""
    data = TASK.with_suffix(".jsonl").resolve()
    out = []
    for i in range(copies):
        p = folder / f"bench_tiny_mc_{i}.yaml"
        p.write_text(TASK.read_text().replace("task: reflect_tiny_mc", f"task: bench_tiny_mc_{i}")
                     .replace("test: reflect_tiny_mc.jsonl", f"test: {data}"))
        out.append(p)
    return out


def via_reflect_tune(yamls: list[Path], out: Path, batch_size: int) -> int:
    from reflect_tune.config import EvalConfig
    from reflect_tune.evaluate import run

    shutil.rmtree(out, ignore_errors=True)
    summary = run(EvalConfig(model=SPEC, tasks=tuple(map(str, yamls)), output=str(out), batch_size=batch_size,
                             dtype="float32", device="cpu", progress=False))
    return summary["items"]


def via_lm_eval(yamls: list[Path], batch_size: int) -> int:
    import torch
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from reflect_tune.models import resolve_model

    path = resolve_model(SPEC).path  # the cached safetensors folder (converted once)
    lm = HFLM(pretrained=path, batch_size=batch_size, device="cpu", dtype=torch.float32)
    results = simple_evaluate(model=lm, tasks=[str(y) for y in yamls], task_manager=TaskManager(include_defaults=False))
    return sum(v["effective"] for v in results["n-samples"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

    from reflect_tune.evaluate import harness_output, quiet_lm_eval
    from reflect_tune.models import resolve_model

    resolve_model(SPEC)  # convert the GGUF once, outside the timings
    quiet_lm_eval()
    work = Path(tempfile.mkdtemp(prefix="reflect-tune-bench-eval-"))
    yamls = task_copies(work, args.copies)
    ours, direct = [], []
    items = 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        items = via_reflect_tune(yamls, work / "out", args.batch_size)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with harness_output(False):
            n = via_lm_eval(yamls, args.batch_size)
        direct.append(time.perf_counter() - t)
        assert n == items, (n, items)
    shutil.rmtree(work, ignore_errors=True)
    a, b = min(ours), min(direct)
    import lm_eval

    command = "python bench/bench_eval.py " + " ".join(sys.argv[1:])
    lines = [
        "## reflect-tune eval vs lm-eval called directly",
        "",
        f"- Machine: {machine(torch_line(), f'lm_eval {lm_eval.__version__}')}",
        f"- Command: `{command.strip()}`",
        f"- Date: {time.strftime('%Y-%m-%d')}",
        f"- Model {SPEC} (fp32, CPU), {items} items of {args.copies} copies of reflect_tiny_mc (multiple choice, "
        f"3-4 choices each), batch size {args.batch_size}; end to end, model load "
        f"included, best of {args.repeats}, the two alternated",
        "",
        "| path | seconds | items/s |",
        "| --- | ---: | ---: |",
        f"| `reflect-tune eval` (evaluate.run: checks, task build, HFLM, simple_evaluate, output folder) | {a:.1f} | {items / a:.2f} |",
        f"| `lm_eval.simple_evaluate` + `HFLM(pretrained=folder)` | {b:.1f} | {items / b:.2f} |",
        "",
        f"Ratio of throughputs, reflect-tune / lm-eval direct: **{(items / a) / (items / b):.2f}** (same harness, same "
        "requests; the difference is set-up: reflect-tune's checks and output files, the model loaded by "
        "reflect_tune.models instead of HFLM).",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", lines[0], "\n".join(lines))


if __name__ == "__main__":
    main()
