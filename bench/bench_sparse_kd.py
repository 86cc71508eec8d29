"""Benchmark: the error of a top-k teacher cache in the KD term, on the bundled model (issue 17).

`train --teacher-logits` computes the divergence on k + 1 buckets: the teacher's k most likely
tokens and one tail bucket (reflect_tune/losses.py). This measures how far that is from the KD
term on the full distribution, as tests/test_sparse_kd.py does (the test holds the bounds; this
prints the figures the README quotes):

- teacher: the bundled SmolLM2-135M-Instruct's logits on 4 sentences (float32 model);
- student: the same logits plus N(0, 1) noise (seed 0), so the two differ as a student and its
  teacher do early in distillation;
- the relative error (sparse − full) / full of the forward-KL term, summed over every token, at
  k = 16, 64, 256 and T = 1, 2 (the cache's log-probs in float32 and float16, as stored);
- at k = 64, the total variation between the buckets the loss uses at T ≠ 1 and the full tempered
  teacher's own buckets, against two simpler tail rules.

    python bench/bench_sparse_kd.py [--no-write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_ablation import commit  # bench/ is on sys.path
from common import machine, torch_line, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Teacher logits: the error of a top-k cache"
SENTENCES = [  # the sentences of tests/test_sparse_kd.py
    "The capital of France is Paris, a city known for its museums and cafes.",
    "To reverse a list in Python, you can use slicing with a step of minus one.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She opened the window and the cold morning air filled the quiet room.",
]


def measure() -> dict:
    from transformers import AutoTokenizer

    from reflect_tune import losses
    from reflect_tune.losses import kd_divergence, sparse_kd_divergence, topk_from_logits
    from reflect_tune.models import load_model, resolve_model

    path = resolve_model("bundled:smollm2-135m-instruct").path
    tok = AutoTokenizer.from_pretrained(path)
    model = load_model(path, dtype="float32", device="cpu")
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits[enc["attention_mask"].bool()]
    V, t = logits.shape[-1], logits.double()
    s = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for k in (16, 64, 256):
        ids, lp, tail = topk_from_logits(logits, k)
        for T in (1.0, 2.0):
            full = kd_divergence("forward_kl", s, t, temperature=T, reduction="sum").item()
            err = {}
            for name, stored in (("float32", lp), ("float16", lp.half())):
                sparse = sparse_kd_divergence("forward_kl", s, ids, stored.double(), tail.double(), temperature=T,
                                              reduction="sum").item()
                err[name] = (sparse - full) / full
            top_mass = torch.softmax(t / T, -1).gather(-1, ids.long()).sum(-1).mean().item()
            rows.append({"k": k, "T": T, "error_float32": err["float32"], "error_float16": err["float16"],
                         "tempered_top_k_mass": top_mass})
    ids, lp, tail = (x.double() if x.is_floating_point() else x.long() for x in topk_from_logits(logits, 64))
    tv = []
    for T in (2.0, 0.5):
        pt = torch.softmax(t / T, -1)
        truth = torch.cat([pt.gather(-1, ids), (1 - pt.gather(-1, ids).sum(-1)).unsqueeze(-1)], -1)
        ours = losses._teacher_buckets(lp, tail, T, V).exp()
        keep_share = torch.cat([(lp.logsumexp(-1, keepdim=True) + F.log_softmax(lp / T, -1)).exp(), tail.exp()[:, None]], -1)
        no_tail = torch.cat([torch.softmax(lp / T, -1), torch.zeros_like(tail)[:, None]], -1)
        tv.append({"T": T, **{n: 0.5 * (b - truth).abs().sum(-1).mean().item()
                              for n, b in (("ours", ours), ("keep_share", keep_share), ("no_tail", no_tail))}})
    return {"tokens": int(logits.shape[0]), "vocab": V, "rows": rows, "tv": tv}


def report(r: dict, seconds: float) -> str:
    lines = [SECTION, "",
             f"Machine: {machine(torch_line())}. Commit {commit()}. Command: `python bench/bench_sparse_kd.py` "
             f"({seconds:.0f} s). Teacher: the bundled SmolLM2-135M-Instruct's logits on {r['tokens']} tokens of 4 "
             f"sentences (V = {r['vocab']:,}); student: those logits plus N(0, 1) noise (seed 0). The error is "
             "(sparse − full) / full of the forward-KL term T²·KL summed over the tokens, with the cache's log-probs "
             "as float32 and as stored by default (float16). tests/test_sparse_kd.py holds the bounds.", "",
             "| k | T | error (float32 log-probs) | error (float16, the default) | teacher mass in the top k at T |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for x in r["rows"]:
        lines.append(f"| {x['k']} | {x['T']:g} | {100 * x['error_float32']:+.1f}% | {100 * x['error_float16']:+.1f}% | "
                     f"{x['tempered_top_k_mass']:.2f} |")
    lines += ["", "At k = 64, total variation between the k + 1 buckets the loss uses at T ≠ 1 and the full tempered "
              "teacher's own buckets (ours: the tail's tempered weight from the geometric-mean rule of losses.py; "
              "keep share: the tail keeps its T = 1 mass; no tail: the top k renormalized):", "",
              "| T | ours | keep share | no tail |", "| ---: | ---: | ---: | ---: |"]
    for x in r["tv"]:
        lines.append(f"| {x['T']:g} | {x['ours']:.4f} | {x['keep_share']:.4f} | {x['no_tail']:.4f} |")
    by = {(x["k"], x["T"]): x for x in r["rows"]}
    lines += ["", f"At T = 1 the sparse term is below the full one by exactly the divergence inside the tail "
              f"({100 * -by[64, 1.0]['error_float32']:.0f}% at k = 64), and it shrinks as k grows. At T = 2 the tempered "
              f"teacher keeps only {by[64, 2.0]['tempered_top_k_mass']:.2f} of its mass in the top 64, so most of the "
              "divergence lies in the tail bucket, which the cache cannot resolve: use T = 1, or a large k, when the "
              "KD term's value matters. Storing the log-probs as float16 changes the error by less than 0.1 point."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print the section; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    t0 = time.time()
    r = measure()
    text = report(r, time.time() - t0)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
