"""Benchmark: distilling from a live teacher vs from a `reflect-tune teacher-logits` cache (issue 17).

Side by side in one run, on the same data and settings, every command in its own subprocess (as a user
runs it, so each process's peak RSS is its own):

    reflect-tune make-student --teacher bundled:smollm2-135m-instruct --layers 10 -o OUT/student
    reflect-tune teacher-logits DATA --teacher bundled:smollm2-135m-instruct --model OUT/student \\
        -o OUT/cache-k64 --top-k 64 --template alpaca --max-length 256
    reflect-tune train DATA -o OUT/train-... --model OUT/student --full --template alpaca --max-length 256 \\
        --batch-size 4 --grad-accum 1 --kd-ratio 0.5 --save-every 0 --epochs E \\
        (--teacher bundled:smollm2-135m-instruct | --teacher-logits OUT/cache-k64)

for E = 1 and 3, --repeats times each, the arms alternating (live, cache, cache, live, ...: a drift in
the machine's load hits both alike), then the caches at k = 16 and 256 (float16) and k = 64 with
--logprob-dtype float32. Every run is shown; the ratios use each arm's best (lowest) figure over its
repeats, as other work on a shared machine only ever adds time.

Reported:
  1. training: the median step time (train_log.csv `wall_s`, kind=train rows, step 1 skipped), the
     ratio cache/live, and each train process's peak RSS (meta.json result.peak_rss_mib);
  2. total cost for 1 and 3 epochs: live = train wall time (meta.json result.wall_s), cache = the
     cache build (manifest.json stats.seconds, once) + train wall time; and the same from the whole
     processes' wall times (start-up and model loads included);
  3. the cache's bytes per response token (manifest.json stats.bytes_per_token) at each k and dtype,
     beside the payload alone, k·(4 + log-prob bytes) + 4 (int32 ids, the log-probs, a float32 tail).
The CPU seconds of each process (user + system, from wait4) are shown too: on a shared machine they
move less with other work than wall times do.

Writes OUT/results.json and prints a section for docs/BENCHMARKS.md (it writes no file outside OUT).

    python bench/bench_teacher_logits.py --out DIR [--records N] [--epochs 1 3] [--repeats 2]
    python bench/bench_teacher_logits.py --report DIR/results.json   # print the section again
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_ablation import commit, reflect_tune  # bench/ is on sys.path
from common import machine

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Teacher logits: live teacher vs cache"
DATA = ROOT / "examples" / "alpaca_small.jsonl"
TEACHER = "bundled:smollm2-135m-instruct"
COMMON = ["--template", "alpaca", "--max-length", "256"]
TRAIN = ["--full", "--batch-size", "4", "--grad-accum", "1", "--kd-ratio", "0.5", "--save-every", "0", "--no-progress"]
SIZES = ((16, "float16"), (64, "float16"), (256, "float16"), (64, "float32"))  # (k, log-prob dtype); k=64 float16 trains
DTYPE_BYTES = {"float16": 2, "float32": 4}


def run(cmd: list[str], log: Path) -> dict:
    """Run `cmd` as a child process; its wall seconds, CPU seconds (user + system) and peak RSS (MiB), from wait4."""
    load = os.getloadavg()[0]
    with open(log, "wb") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n" + "\n".join(tail))
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "process_peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def build_cache(out: Path, data: Path, k: int, dtype: str) -> dict:
    folder = out / f"cache-k{k}-{dtype}"
    cmd = [*reflect_tune(), "teacher-logits", str(data), "--teacher", TEACHER, "--model", str(out / "student"), "-o", str(folder),
           "--top-k", str(k), "--logprob-dtype", dtype, *COMMON, "--no-progress"]
    proc = run(cmd, out / f"{folder.name}.log")
    stats = json.loads((folder / "manifest.json").read_text())["stats"]
    return {"k": k, "logprob_dtype": dtype, "path": str(folder), **proc,
            **{key: stats[key] for key in ("examples", "tokens", "bytes", "bytes_per_token", "seconds")},
            "payload_bytes_per_token": k * (4 + DTYPE_BYTES[dtype]) + 4}


def train(out: Path, data: Path, arm: str, epochs: int, cache: Path, rep: int) -> dict:
    folder = out / f"train-{arm}-{epochs}ep-{rep}"
    source = ["--teacher", TEACHER] if arm == "live" else ["--teacher-logits", str(cache)]
    cmd = [*reflect_tune(), "train", str(data), "-o", str(folder), "--model", str(out / "student"), *source, *COMMON, *TRAIN,
           "--epochs", str(epochs)]
    proc = run(cmd, out / f"{folder.name}.log")
    result = json.loads((folder / "meta.json").read_text())["result"]
    with open(folder / "train_log.csv", newline="") as fh:
        steps = [float(r["wall_s"]) for r in csv.DictReader(fh) if r["kind"] == "train"]
    return {"arm": arm, "epochs": epochs, "repeat": rep, **proc, "steps": result["steps"], "step_wall_s": steps,
            "median_step_s": round(statistics.median(steps[1:] or steps), 3), "train_wall_s": result["wall_s"],
            "peak_rss_mib": result["peak_rss_mib"], "final_loss": result["final_loss"], "loss_after": result["loss_after"]}


def measure(out: Path, records: int | None, epochs: list[int], repeats: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        sys.exit(f"{out}: not empty; choose a new --out")
    data = DATA
    if records:  # the first N records of the data
        data = out / "data.jsonl"
        data.write_text("".join(DATA.read_text().splitlines(keepends=True)[:records]))
    started = time.perf_counter()
    student = run([*reflect_tune(), "make-student", "--teacher", TEACHER, "--layers", "10", "-o", str(out / "student")],
                  out / "student.log")
    caches = [build_cache(out, data, 64, "float16")]  # the one train reads
    k64 = Path(caches[0]["path"])
    runs, i = [], 0
    for e in epochs:
        for rep in range(1, repeats + 1):  # live, cache, then cache, live, ...: alternating the arm that goes first
            for arm in (("live", "cache") if i % 2 == 0 else ("cache", "live")):
                runs.append(train(out, data, arm, e, k64, rep))
                print(f"{arm} {e} epoch(s) #{rep}: median step {runs[-1]['median_step_s']} s, train "
                      f"{runs[-1]['train_wall_s']} s", file=sys.stderr, flush=True)
            i += 1
    caches += [build_cache(out, data, k, d) for k, d in SIZES if (k, d) != (64, "float16")]
    return {"machine": machine(torch_line()), "commit": commit(), "records": records or len(DATA.read_text().splitlines()),
            "epochs": epochs, "repeats": repeats, "student": student, "caches": caches, "runs": runs,
            "bench_wall_s": round(time.perf_counter() - started, 1)}


def torch_line() -> str:
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {sys.version.split()[0]}"


def best(runs: list[dict], key: str) -> float:
    """An arm's lowest figure over its repeats (other work on the machine only adds time)."""
    return min(r[key] for r in runs)


def report(res: dict) -> str:
    arms = {(a, e): [r for r in res["runs"] if (r["arm"], r["epochs"]) == (a, e)] for a in ("live", "cache") for e in res["epochs"]}
    k64 = next(c for c in res["caches"] if (c["k"], c["logprob_dtype"]) == (64, "float16"))
    n, repeats = res["records"], res.get("repeats", 1)
    flags = (f" --records {n}" if n != 32 else "") + (f" --epochs {' '.join(map(str, res['epochs']))}" if res["epochs"] != [1, 3] else "")
    flags += f" --repeats {repeats}" if repeats != 2 else ""
    lines = [SECTION, "",
             f"- Machine: {res['machine']}; load average (1 min) {min(r['load_before'] for r in res['runs']):.1f}–"
             f"{max(r['load_after'] for r in res['runs']):.1f} around the train runs",
             f"- Command: `python bench/bench_teacher_logits.py --out DIR{flags}` (the whole run {res['bench_wall_s']:.0f} s)",
             f"- Commit {res['commit']}",
             f"- Student: the 10-layer cut of `{TEACHER}` (`make-student --layers 10`, 63.7M parameters); teacher: "
             f"`{TEACHER}` (30 layers, 134.5M), fp32. Data: {n} records of examples/alpaca_small.jsonl "
             f"({k64['tokens']} response tokens). Every train: `{' '.join(COMMON + TRAIN)}`, with `--teacher {TEACHER}` (live) "
             "or `--teacher-logits` a k=64 float16 cache (cache); each command in its own process, the arms alternating.", "",
             "| arm | epochs | run | steps | median step s (step 1 skipped) | train wall s | process wall s | process CPU s "
             "| peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["runs"]:
        lines.append(f"| {r['arm']} | {r['epochs']} | {r.get('repeat', 1)} | {r['steps']} | {r['median_step_s']:.2f} | "
                     f"{r['train_wall_s']:.1f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    what = f"best of {repeats} runs per arm" if repeats > 1 else "one run per arm"
    lines += ["", f"Cache build (k=64, float16, once): {k64['seconds']:.1f} s (manifest `stats.seconds`; the whole process "
              f"{k64['wall_s']:.1f} s, {k64['cpu_s']:.1f} CPU s, peak RSS {k64['process_peak_rss_mib']:.0f} MiB).", "",
              f"Cache against live ({what}):", "",
              "| epochs | median step: live / cache s | step cache/live | peak RSS MiB: live / cache | live: train s "
              "| cache: build s + train s | total cache/live | same from whole processes |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in res["epochs"]:
        live, cache = arms[("live", e)], arms[("cache", e)]
        step_l, step_c = best(live, "median_step_s"), best(cache, "median_step_s")
        train_l, train_c = best(live, "train_wall_s"), best(cache, "train_wall_s")
        total = k64["seconds"] + train_c
        proc_ratio = (k64["wall_s"] + best(cache, "wall_s")) / best(live, "wall_s")
        lines.append(f"| {e} | {step_l:.2f} / {step_c:.2f} | {step_c / step_l:.2f}x | {max(r['peak_rss_mib'] for r in live):.0f} / "
                     f"{max(r['peak_rss_mib'] for r in cache):.0f} | {train_l:.1f} | {k64['seconds']:.1f} + {train_c:.1f} = "
                     f"{total:.1f} | {total / train_l:.2f}x | {proc_ratio:.2f}x |")
    lines += ["", "| k | log-probs | response tokens | bytes | bytes / token | payload k·(4+b)+4 | build s |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in sorted(res["caches"], key=lambda c: (c["logprob_dtype"], c["k"])):
        lines.append(f"| {c['k']} | {c['logprob_dtype']} | {c['tokens']} | {c['bytes']:,} | {c['bytes_per_token']:.1f} | "
                     f"{c['payload_bytes_per_token']} | {c['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="scratch folder (new or empty): student, caches, train outputs, logs, results.json")
    ap.add_argument("--records", type=int, help="use the first N records of examples/alpaca_small.jsonl (default: all 32)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="the train lengths compared (default: 1 3)")
    ap.add_argument("--repeats", type=int, default=2, help="train runs per arm and length, alternating (default: 2)")
    ap.add_argument("--report", type=Path, help="run nothing: print the section again from a results.json")
    args = ap.parse_args()
    if args.report:
        res = json.loads(args.report.read_text())
    else:
        if not args.out:
            ap.error("--out is required (or --report)")
        res = measure(args.out, args.records, args.epochs, args.repeats)
        (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(report(res))


if __name__ == "__main__":
    main()
