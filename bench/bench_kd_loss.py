"""Benchmark: peak memory and time of one KD loss forward+backward, memory-lean vs naive.

The computation is what one training step needs from the loss: the student's and the teacher's
logits from their final hidden states `[B·T, H]` and output weights `[V, H]`, then
`(1 − kd_ratio)·CE + kd_ratio·T²·KL(teacher ‖ student)`, then backward to the student's
hidden states and output weight.

  naive  full `[B·T, V]` float32 logits for both models, `reflect_tune.losses.naive_distill_loss`
  lean   `reflect_tune.losses.chunked_distill_loss` (chunks of ~2^25 logits, default settings)

Method. Every measurement runs in a fresh Python process, so one allocation pattern cannot
hide in another's freed memory. The child builds its inputs, then resets the kernel's
peak-RSS mark (`echo 5 > /proc/self/clear_refs`, which resets VmHWM), runs one
forward+backward and reads VmHWM: the peak is VmHWM minus the RSS just before the pass, i.e.
what the loss itself needs on top of its inputs (torch's CPU allocator returns large blocks to
the OS, so RSS follows live tensors). The same child then times `--repeats` more passes (best
and median). Naive and lean children alternate, round after round, so background load hits
both alike.

    python bench/bench_kd_loss.py [--vocab 49152 128256] [--tokens 4096] [--hidden 576]
                                  [--rounds 2] [--repeats 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from common import machine, torch_line, write_section  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Memory-lean KD loss"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl: str, vocab: int, tokens: int, hidden: int, repeats: int) -> dict:
    import torch

    from reflect_tune.losses import chunked_distill_loss, naive_distill_loss

    torch.manual_seed(0)
    h_s = (torch.randn(tokens, hidden) * 0.5).requires_grad_()
    w_s = (torch.randn(vocab, hidden) * 0.05).requires_grad_()
    h_t = torch.randn(tokens, hidden) * 0.5
    w_t = torch.randn(vocab, hidden) * 0.05
    labels = torch.randint(0, vocab, (tokens,))

    def step() -> float:
        h_s.grad = w_s.grad = None
        start = time.perf_counter()
        if impl == "naive":
            with torch.no_grad():
                t_logits = h_t @ w_t.T
            out = naive_distill_loss(h_s @ w_s.T, labels, t_logits, kd_ratio=0.5)
        else:
            out = chunked_distill_loss(h_s, w_s, labels, h_t, w_t, kd_ratio=0.5)
        out.loss.backward()
        return time.perf_counter() - start

    # allocate the gradient buffers once, so the peak measures the loss, not .grad creation
    h_s.grad, w_s.grad = torch.zeros_like(h_s), torch.zeros_like(w_s)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    first = step()
    peak = _status_kib("VmHWM")
    times = [step() for _ in range(repeats)] or [first]
    return {"impl": impl, "vocab": vocab, "peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "best_s": min(times), "median_s": statistics.median(times), "first_s": first}


def run_child(impl: str, vocab: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--vocab", str(vocab), "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--tokens", type=int, default=4096, help="B×T rows")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size of both models (SmolLM2-135M: 576)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh-process measurements per implementation")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per process after the first")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=["naive", "lean"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.vocab[0], args.tokens, args.hidden, args.repeats)))
        return

    rows = []
    for vocab in args.vocab:
        results: dict[str, list[dict]] = {"naive": [], "lean": []}
        for r in range(args.rounds):
            for impl in ("naive", "lean") if r % 2 == 0 else ("lean", "naive"):
                res = run_child(impl, vocab, args)
                results[impl].append(res)
                print(f"V={vocab} {impl:5s} peak {res['peak_mib']:8.0f} MiB  best {res['best_s']:.2f} s  "
                      f"median {res['median_s']:.2f} s", flush=True)
        naive_mem = max(x["peak_mib"] for x in results["naive"])
        lean_mem = max(x["peak_mib"] for x in results["lean"])
        naive_t = min(x["best_s"] for x in results["naive"])
        lean_t = min(x["best_s"] for x in results["lean"])
        naive_med = statistics.median(x["median_s"] for x in results["naive"])
        lean_med = statistics.median(x["median_s"] for x in results["lean"])
        rows.append((vocab, naive_mem, lean_mem, naive_t, lean_t, naive_med, lean_med))

    lines = [
        "| V | naive peak MiB | lean peak MiB | memory lean/naive | naive s (best / median) | lean s (best / median) | speed lean vs naive (best) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for vocab, nm, lm, nt, lt, nmed, lmed in rows:
        lines.append(f"| {vocab} | {nm:.0f} | {lm:.0f} | {lm / nm:.2f}x | {nt:.2f} / {nmed:.2f} | {lt:.2f} / {lmed:.2f} | {nt / lt:.2f}x |")
        ok_mem, ok_speed = lm / nm <= 0.3, nt / lt >= 0.9
        verdicts.append(
            f"V={vocab}: memory {lm / nm:.2f}x naive (target <= 0.3x: {'met' if ok_mem else 'missed'}), "
            f"speed {nt / lt:.2f}x naive (target >= 0.9x: {'met' if ok_speed else 'missed'})."
        )
    table = "\n".join(lines)
    print(table)
    print("\n".join(verdicts))
    if args.no_write:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "reflect_tune/losses.py", "bench/bench_kd_loss.py"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    commit = f"{commit}, with uncommitted changes to the measured code" if commit and dirty else commit
    from reflect_tune import __version__

    section = (
        f"{SECTION}\n\n"
        f"- Machine: {machine(torch_line())}\n"
        f"- Command: `python bench/bench_kd_loss.py --tokens {args.tokens} --hidden {args.hidden} "
        f"--rounds {args.rounds} --repeats {args.repeats}`\n"
        f"- Date: {time.strftime('%Y-%m-%d')}, reflect-tune {__version__} ({commit or 'uncommitted'})\n"
        f"- What: one forward+backward of `(1 - kd_ratio)·CE + kd_ratio·T²·KL(teacher ‖ student)` at "
        f"B×T = {args.tokens}, hidden {args.hidden} for both models, float32, every token counted; "
        "naive = `naive_distill_loss` on full logits, lean = `chunked_distill_loss`.\n"
        "- Peak memory: the rise of the process's peak RSS (VmHWM, reset through "
        "`/proc/self/clear_refs`) during the first pass, over its RSS just before it, in a fresh "
        "process per measurement; inputs and their .grad buffers are allocated before the reset. "
        f"The worst of {args.rounds} processes is shown.\n"
        f"- Time: best (and median) of {args.repeats} passes after the first in each process, the best "
        f"over {args.rounds} processes; naive and lean processes alternate. The machine was shared with "
        "other work, so single figures are noisy; the ratios come from the same run.\n\n"
        f"{table}\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    )
    write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, section)
    print(f"wrote {SECTION!r} to docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
