"""Benchmark: examples/ablation.yaml, the demo-scale distillation study of issue 16 (budget: 20 minutes
on 2 CPU cores, offline).

It runs `reflect-tune run examples/ablation.yaml --runs-dir TMP --no-progress` as a user would, with
this checkout's model cache (the bundled GGUF is converted once per cache; bench_demo.py times that),
and times the whole command and, from the run folder's run.json, each stage (student, select,
teacher_sft, every arm's train and eval). It prints a section with the machine, the commit, the
command, the per-stage times, teacher_sft's effect on the teacher (meta.json result: CE on its training
pairs before and after) and the run's comparison table (compare/compare.md). Writes the section into
docs/BENCHMARKS.md (replacing an earlier one) unless --no-write.

    python bench/bench_ablation.py [--no-write] [--keep DIR] [--images DIR]

--keep copies the run folder (without model weights and checkpoints) to DIR/runs/ablation, the log and
the timing (bench.json) to DIR, and `--report DIR` prints the section again from them; --images
copies compare/'s PNGs (heldout_ce.png, heldout_kd.png, train_loss.png) to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_section  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "examples" / "ablation.yaml"
SECTION = "## The demo-scale ablation (`examples/ablation.yaml`)"
BUDGET_S = 20 * 60
PLOTS = ("heldout_ce.png", "heldout_kd.png", "train_loss.png")


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "reflect_tune", "examples"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def reflect_tune() -> list[str]:
    exe = Path(sys.executable).with_name("reflect-tune")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "reflect_tune.cli"]


def stage_rows(run_dir: Path, runs: Path, record: dict) -> list[tuple[str, str, float | None]]:
    """(stage, what it is, seconds) per stage of run.json, in run order; an arm's train and eval are named by the arm."""
    from reflect_tune.pipeline import load_pipeline, plan
    from reflect_tune.sweep import arm_name

    arms = {(st.name, st.key): arm_name(st.extra["arm"]) for st in plan(load_pipeline(PIPELINE, str(runs)))
            if st.extra.get("arm") is not None}
    rows = []
    for s in record["stages"]:
        meta_path = run_dir / s["folder"] / "meta.json"
        summary = (json.loads(meta_path.read_text()).get("summary") or {}) if meta_path.is_file() else {}
        what = arms.get((s["name"], s["key"]), "")
        if s["name"] == "teacher_sft":
            what = "LoRA fine-tune of the teacher, merged"
        elif s["name"] == "select":
            what = (f"IFD: {summary.get('selected', '?')} of {summary.get('candidates', '?')} candidates kept, "
                    f"{summary.get('heldout', '?')} records held out")
        elif s["name"] == "student":
            what = "the 15-layer cut of the teacher"
        elif s["name"] == "eval":
            what += " (lm-eval before and after)"
        rows.append((f"{s['name']} `{s['folder']}`", what, s.get("wall_s")))
    return rows


def report(run_dir: Path, runs: Path, timing: dict) -> str:
    """The section for docs/BENCHMARKS.md, from a finished run folder and the command's timing."""
    record = json.loads((run_dir / "run.json").read_text())
    rows = stage_rows(run_dir, runs, record)
    compare_md = (run_dir / "compare" / "compare.md").read_text()
    sft = next((run_dir / s["folder"] / "meta.json" for s in record["stages"] if s["name"] == "teacher_sft"), None)
    sft_result = (json.loads(sft.read_text()).get("result") or {}) if sft and sft.is_file() else {}
    wall, (load_before, load_after) = timing["wall_s"], timing["load"]
    shown = "reflect-tune run examples/ablation.yaml --runs-dir TMP --no-progress"
    lines = [SECTION, "",
             (f"Machine: {timing['machine']}. Commit {timing['commit']}. Command: `python bench/bench_ablation.py` "
              f"(`{shown}` with this checkout's model cache, the bundled model already converted). "
              f"Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f}: other work on the "
              "machine slows every stage."), "",
             "| stage | what | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {what} | {w:.0f} |" if w is not None else f"| {name} | {what} | – |" for name, what, w in rows]
    staged = sum(w for _, _, w in rows if w is not None)
    lines += [(f"| **the whole command** | the stages {staged:.0f} s; the rest: start-up, checks, compare/, summary.md | "
               f"**{wall:.0f}** ({wall / BUDGET_S:.2f} of the 20-minute budget) |"), ""]
    if sft_result:
        lines += [(f"teacher_sft moved the teacher: its CE on the {sft_result.get('eval_examples', '?')} pairs it trained on "
                   f"went from {sft_result['loss_before']:.3f} to {sft_result['loss_after']:.3f} in "
                   f"{sft_result.get('steps', '?')} LoRA steps (meta.json `result.loss_before` / `loss_after`)."), ""]
    table = [line for line in compare_md.splitlines() if line.startswith("|")]
    note = [line for line in compare_md.splitlines() if line.startswith("Bold")]
    lines += ["The run's comparison (`compare/compare.md`):", "", *table, *([""] + note if note else [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--keep", type=Path, help="copy the run folder (without model weights) and the log here")
    ap.add_argument("--images", type=Path, help="copy compare/'s PNGs here (e.g. docs/images/ablation)")
    ap.add_argument("--report", type=Path, help="run nothing: print the section again from a --keep folder")
    args = ap.parse_args()
    if args.report:
        timing = json.loads((args.report / "bench.json").read_text())
        text = report(args.report / "runs" / "ablation", Path(timing["runs"]), timing)
    else:
        with tempfile.TemporaryDirectory(prefix="rt-ablation-bench-") as tmp:
            runs = Path(tmp) / "runs"
            cmd = [*reflect_tune(), "run", str(PIPELINE), "--runs-dir", str(runs), "--no-progress"]
            log = Path(tmp) / "run.log"
            load_before = os.getloadavg()[0]
            t0 = time.monotonic()
            with open(log, "wb") as fh:
                code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
            wall = time.monotonic() - t0
            timing = {"wall_s": round(wall, 1), "load": [load_before, os.getloadavg()[0]], "machine": machine(),
                      "commit": commit(), "runs": str(runs), "exit": code}
            run_dir = runs / "ablation"
            if args.keep:  # before anything can fail: the run is kept as it is
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copytree(run_dir, args.keep / "runs" / "ablation", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
                shutil.copy(log, args.keep / "run.log")
                (args.keep / "bench.json").write_text(json.dumps(timing, indent=2) + "\n")
            if code != 0:
                tail = log.read_text(errors="replace").splitlines()[-20:]
                sys.exit(f"{' '.join(cmd)} failed ({code}):\n" + "\n".join(tail))
            if args.images:
                args.images.mkdir(parents=True, exist_ok=True)
                for name in PLOTS:
                    if (run_dir / "compare" / name).is_file():
                        shutil.copy(run_dir / "compare" / name, args.images / name)
            text = report(run_dir, runs, timing)
    print(text)
    if timing["wall_s"] > BUDGET_S:
        print(f"over budget: {timing['wall_s']:.0f} s > {BUDGET_S} s", file=sys.stderr)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
