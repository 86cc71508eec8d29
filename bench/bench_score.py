"""Benchmark: `select` (batched, de-duplicated, only the passes the rule needs) against the reference
procedure (batch 1, fp32, all 4 passes on each of the 4 variants), same model, same data, one run.

Measured side by side in one process:
  reference   for every record and every variant (original, ins, res, res_ins): s(A|Q), s(A), s(Q|A'),
              s(Q), each a plain batch-1 `model(input_ids, labels=...)` forward in fp32 (full logits)
  select fp32 `run_select` with the default method (srt), --dtype float32
  select bf16 the same with --dtype bfloat16
  Spearman    of IFD and of r-IFD, select vs the fp32 reference, over every (record, variant) select scored
  bare forward tokens/s of `model(input_ids)` on ideal batches (equal lengths, no padding, full logits),
              against the scorer on the same batches (every position scored: its worst case)
Each select timing includes loading the model and writing the outputs; the reference includes
loading the model. The figures go into docs/BENCHMARKS.md (section "Scoring and selection")
unless --no-write.

    python bench/bench_score.py [--records 32] [--repeats 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SECTION = "## Scoring and selection"
MODEL_INFO: dict = {}

from bench_model_load import _version  # noqa: E402
from common import machine, torch_line, write_section  # noqa: E402


def reflected_rows(n: int) -> list[dict]:
    """The example data with deterministic stand-in reflections (a longer instruction, fuller answers)."""
    src = [json.loads(line) for line in (ROOT / "examples" / "alpaca_small.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n):
        r = src[i % len(src)]
        tag = f" (case {i})" if i >= len(src) else ""
        ins_instruction = r["instruction"] + " Explain your reasoning step by step and give one example." + tag
        rows.append({
            "id": f"b{i}",
            "original": {"instruction": r["instruction"] + tag, "input": r["input"], "output": r["output"], "system": ""},
            "variants": {
                "ins": {"status": "ok", "reason": None, "instruction": ins_instruction, "input": r["input"],
                        "output": "Let us work through it. " + r["output"] + " For example, the same reasoning "
                        "applies to similar questions, which is why this answer holds.", "usage": {}},
                "res": {"status": "ok", "reason": None, "output": "Here is a clear and complete answer. " + r["output"]
                        + " In short, that is the answer to the question.", "usage": {}},
                "res_ins": {"status": "ok", "reason": None, "output": "Step by step: " + r["output"] + " As an "
                            "example, one can check the result in the same way.", "usage": {}},
            },
            "usage": {},
        })
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x), dtype=float)
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average ranks for ties
            tied = x == v
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def reference_scores(spec: str, src: Path, device: str = "cpu") -> tuple[dict, float, int]:
    """The reference procedure: every variant, all 4 passes, batch 1, fp32, full logits."""
    import torch

    from reflect_tune.score import build_passes, open_scorer
    from reflect_tune.records import load_candidates

    started = time.perf_counter()
    scorer = open_scorer(spec, dtype="float32", device=device)
    model = scorer.model
    MODEL_INFO["params"] = sum(p.numel() for p in model.parameters())
    MODEL_INFO["vocab"] = model.config.vocab_size
    out, forwards = {}, 0
    for cand in load_candidates(str(src)).candidates:
        passes, reason = build_passes(scorer, cand, ("ifd", "rifd"))
        assert reason is None
        losses = {}
        for name, p in passes.items():
            x = torch.tensor([p.ids], device=scorer.device)
            labels = x.clone()
            labels[0, : p.start] = -100
            labels[0, p.end :] = -100
            with torch.no_grad():
                losses[name] = model(input_ids=x, labels=labels).loss.item()  # .item() syncs a GPU
            forwards += 1
            MODEL_INFO["reference_tokens"] = MODEL_INFO.get("reference_tokens", 0) + len(p.ids)
        out[(cand.id, cand.variant)] = {
            "ifd": math.exp(losses["a_given_q"] - losses["a"]),
            "rifd": math.exp(losses["q_given_a"] - losses["q"]),
        }
    return out, time.perf_counter() - started, forwards


def run_select_timed(spec: str, src: Path, dtype: str, out_dir: Path, device: str = "cpu") -> tuple[list[dict], float, dict]:
    from reflect_tune.config import SelectConfig
    from reflect_tune.selection import run as run_select

    started = time.perf_counter()
    result = run_select(SelectConfig(input=str(src), output=str(out_dir / "selected.jsonl"), model=spec, top=0.1,
                                     dtype=dtype, device=device, progress=False))
    seconds = time.perf_counter() - started
    meta = json.loads((out_dir / "selected.jsonl.meta.json").read_text())
    return result.rows, seconds, meta["scoring"]["stats"]


def bare_vs_scorer(spec: str, rows: int, length: int, dtype: str, repeats: int, device: str = "cpu") -> tuple[float, float]:
    """Tokens/s of a bare forward (full logits) and of the scorer, on the same ideal batch."""
    import torch

    from reflect_tune.score import Pass, batch_losses, open_scorer

    scorer = open_scorer(spec, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if scorer.device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    vocab = scorer.model.config.vocab_size
    ids = torch.randint(100, vocab - 1, (rows, length), generator=g)
    passes_ids = ids
    ids = ids.to(scorer.device)
    passes = [Pass(ids=passes_ids[r].tolist(), start=1, end=length, truncated=False) for r in range(rows)]
    with torch.no_grad():
        scorer.model(input_ids=ids[:1, :16])  # warm-up
        batch_losses(scorer.model, passes[:1], scorer.device, scorer.head)
        bare, ours = [], []
        for _ in range(repeats):  # alternate, so load changes hit both alike
            sync()
            t = time.perf_counter()
            scorer.model(input_ids=ids)
            sync()
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            batch_losses(scorer.model, passes, scorer.device, scorer.head)  # returns floats: synced
            ours.append(time.perf_counter() - t)
    tokens = rows * length
    return tokens / min(bare), tokens / min(ours)


def _cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3, help="bare-forward comparison repeats (best of)")
    parser.add_argument("--bf16-records", type=int, default=4,
                        help="records for the bf16 run when the CPU has no native bf16 (it is ~8x slower there)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="reflect-tune-bench-score-"))
    src = work / "reflected.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in reflected_rows(args.records)))
    from reflect_tune.models import resolve_model

    spec = resolve_model(args.model).path  # convert once, outside the timings
    loads = [load_average()]

    from reflect_tune.score import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    n_records = {"float32": args.records, "bfloat16": args.records if native else min(args.records, args.bf16_records)}
    sub = work / "reflected_bf16.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in reflected_rows(n_records["bfloat16"])))
    ref, ref_s, forwards = reference_scores(spec, src)
    print(f"reference: {ref_s:.1f} s, {forwards} forwards", flush=True)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        rows, secs, stats = run_select_timed(spec, src if n_records[dtype] == args.records else sub, dtype, work / dtype)
        runs[dtype] = (rows, secs, stats)
        print(f"select {dtype}: {secs:.1f} s, {stats}", flush=True)
    loads.append(load_average())
    corr = {}
    for dtype, (rows, _, _) in runs.items():
        for col in ("ifd", "rifd"):
            pairs = [(r[col], ref[(r["id"], r["variant"])][col]) for r in rows if r[col] is not None and not math.isnan(r[col])]
            corr[(dtype, col)] = (spearman([p[0] for p in pairs], [p[1] for p in pairs]), len(pairs),
                                  max(abs(p[0] - p[1]) for p in pairs))
    shapes = {"float32": (8, 256), "bfloat16": (8, 256) if native else (4, 64)}
    ideal = {dtype: bare_vs_scorer(spec, *shapes[dtype], dtype, args.repeats) for dtype in ("float32", "bfloat16")}
    loads.append(load_average())

    per_record = ref_s / args.records
    speed = {d: per_record / (runs[d][1] / n_records[d]) for d in runs}
    stats = runs["float32"][2]
    command = "python bench/bench_score.py " + " ".join(sys.argv[1:])
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    lines = [
        SECTION,
        "",
        f"- Machine: {machine(torch_line())}; load average {' / '.join(loads)} (start / after select / end): the machine was shared",
        f"- Command: `{command.strip()}`",
        f"- Date: {time.strftime('%Y-%m-%d')}, reflect-tune {_version()}",
        f"- Model: `{args.model}` ({MODEL_INFO['params'] / 1e6:.1f}M parameters, vocab {MODEL_INFO['vocab']}), template chat; "
        f"data: {args.records} records of "
        "examples/alpaca_small.jsonl with stand-in reflections (4 variants each)",
        "",
        "| procedure | records | forwards | seconds | s / record | speed-up | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| reference: batch 1, fp32, 4 passes x 4 variants | {args.records} | {forwards} | {ref_s:.1f} | {per_record:.2f} | 1.0x | |",
        *[f"| `select` (srt), {'fp32' if d == 'float32' else 'bf16'} | {n_records[d]} | {runs[d][2]['units']} units | "
          f"{runs[d][1]:.1f} | {runs[d][1] / n_records[d]:.2f} | {speed[d]:.2f}x | "
          f">= {2 if d == 'float32' else 4}x: {ok(speed[d] >= (2 if d == 'float32' else 4))} |" for d in runs],
        "",
        *([] if native else [
            "This CPU has no native bfloat16 (no avx512_bf16 / amx_bf16; torch reports "
            f"{_cpu_capability()}): PyTorch emulates bf16 matmuls, measured about 8x slower than fp32 here, "
            f"so bf16 cannot beat fp32 on it and the bf16 run uses only {n_records['bfloat16']} records "
            "(compared per record). `score`/`select` warn when asked for bf16 on such a CPU; on a CPU with "
            "native bf16 and on GPUs, bf16 is the fast path.", ""]),
        "Fidelity against the fp32 reference, over every (record, variant) that `select` scored:",
        "",
        "| dtype | score | pairs | Spearman | max abs diff | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        *[f"| {d} | {c} | {n} | {s:.5f} | {m:.2e} | >= 0.999: {ok(s >= 0.999)} |" for (d, c), (s, n, m) in corr.items()],
        "",
        "bf16 runs the model body in bf16: on this model its losses differ from fp32 by up to about 0.1 (mostly "
        "s(A) of short answers), so its rank agreement is weaker than fp32's, and here it rests on few pairs. "
        "fp32 (the CPU default) reproduces the reference to about 1e-6; use it when exact ranks matter.",
        "",
        f"Ideal batches (equal lengths, no padding, every position scored: the scorer's worst case), tokens/s, best of {args.repeats}:",
        "",
        "| dtype | batch | bare `model(input_ids)` | scorer (`batch_losses`) | ratio | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        *[f"| {d} | {shapes[d][0]} x {shapes[d][1]} | {b:,.0f} | {o:,.0f} | {o / b:.2f} | >= 0.85: {ok(o / b >= 0.85)} |"
          for d, (b, o) in ideal.items()],
        "",
        f"Where the time goes: the reference runs {forwards} forwards; `select` needs {stats['passes']} passes "
        f"(phase 1: IFD of original and ins; phase 2: r-IFD of the winner and its response reflection; then IFD of the "
        "response reflections that won phase 2), "
        f"of which {stats['units']} are distinct after de-duplication: {stats['tokens']:,} tokens against the "
        f"reference's {MODEL_INFO['reference_tokens']:,}. They are packed into length-sorted batches "
        f"({stats['padded_tokens']:,} padded tokens), a prefix shared by a batch's rows (the chat template's opening) "
        f"is run once ({stats['shared_tokens']:,} tokens not run again), and only scored positions go through "
        "the LM head.",
        "",
        "GPU: `bash bench/gpu_check.sh` runs the same comparison with a 1B-class student built from a config "
        "(target >= 30x) and writes `$OUT/gpu_score.md` for this file.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
