"""GPU benchmark (for a lent H200 or any CUDA GPU): `select` against the reference procedure with a
1B-class student built from a config (random weights, seeded; Llama-3.2-1B-like shape, SmolLM2
tokenizer).

  reference   batch 1, fp32, all 4 passes on each of the 4 variants, on the first --ref-records
              records (the reference's cost is strictly per record, so seconds per record compare)
  select      the default `select` (method srt, dtype auto = bf16 on this GPU) on --records records,
              end to end (model load, scoring, outputs), and once more in fp32
  Spearman    IFD and r-IFD of select (bf16) vs the fp32 reference on the records both scored
  ideal       bare `model(input_ids)` vs the scorer's `batch_losses` on one full batch

The target is >= 30x per record for bf16 select. Results go to OUT/gpu_score.json and
OUT/gpu_score.md (a section for docs/BENCHMARKS.md). Run it through bench/gpu_check.sh.

    python bench/gpu_score.py [--records 1024] [--ref-records 96] [--out DIR]
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

from bench_score import bare_vs_scorer, reference_scores, reflected_rows, run_select_timed, spearman  # noqa: E402


def build_student(folder: Path, tokenizer_dir: str, args) -> tuple[Path, int]:
    """A seeded random Llama of about 1.1B parameters, saved as safetensors with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--ref-records", type=int, default=96)
    parser.add_argument("--tokenizer", default="bundled:smollm2-135m-instruct", help="model spec whose tokenizer to use")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from reflect_tune.models import resolve_model

    if not torch.cuda.is_available():
        sys.exit("gpu_score.py needs a CUDA GPU")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reflect-tune-gpu-"))
    t = time.perf_counter()
    student, params = build_student(work / "student", resolve_model(args.tokenizer).path, args)
    build_s = time.perf_counter() - t
    print(f"built a {params / 1e9:.2f}B student in {build_s:.0f} s", flush=True)

    full, subset = work / "reflected.jsonl", work / "reflected_ref.jsonl"
    rows = reflected_rows(args.records)
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.ref_records]))

    ref, ref_s, forwards = reference_scores(str(student), subset, device="cuda")
    print(f"reference: {ref_s:.1f} s for {args.ref_records} records ({forwards} forwards)", flush=True)
    results = {}
    for dtype in ("auto", "float32"):
        sel_rows, secs, stats = run_select_timed(str(student), full, dtype, work / dtype, device="cuda")
        results[dtype] = {"seconds": secs, "stats": stats}
        print(f"select {dtype}: {secs:.1f} s for {args.records} records; {stats}", flush=True)
        if dtype == "auto":
            corr = {}
            for col in ("ifd", "rifd"):
                pairs = [(r[col], ref[(r["id"], r["variant"])][col]) for r in sel_rows
                         if (r["id"], r["variant"]) in ref and r[col] is not None and not math.isnan(r[col])]
                corr[col] = {"spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]), "pairs": len(pairs),
                             "max_abs_diff": max(abs(p[0] - p[1]) for p in pairs)}
    ideal = {d: bare_vs_scorer(str(student), 16, 1024, d, 3, device="cuda") for d in ("bfloat16", "float32")}

    ref_per = ref_s / args.ref_records
    report = {
        "device": torch.cuda.get_device_name(0), "params": params, "records": args.records, "ref_records": args.ref_records,
        "reference_seconds": ref_s, "reference_forwards": forwards, "reference_s_per_record": ref_per,
        "select": {d: {**v, "s_per_record": v["seconds"] / args.records, "speedup": ref_per / (v["seconds"] / args.records)}
                   for d, v in results.items()},
        "spearman_bf16_vs_fp32_reference": corr,
        "ideal_batches_16x1024": {d: {"bare_tok_s": b, "scorer_tok_s": o, "ratio": o / b} for d, (b, o) in ideal.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
    }
    (out / "gpu_score.json").write_text(json.dumps(report, indent=2) + "\n")
    sb = report["select"]["auto"]["speedup"]
    lines = [
        "## Scoring and selection on GPU",
        "",
        f"- Machine: {report['device']}, torch {torch.__version__}; command `bash bench/gpu_check.sh`; date {report['date']}",
        f"- Student: random {params / 1e9:.2f}B Llama ({args.layers} layers, hidden {args.hidden}), SmolLM2 tokenizer, template chat",
        "",
        "| procedure | records | seconds | s / record | speed-up | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| reference: batch 1, fp32, 16 passes | {args.ref_records} | {ref_s:.1f} | {ref_per:.3f} | 1.0x | |",
        f"| `select` bf16 (default) | {args.records} | {results['auto']['seconds']:.1f} | "
        f"{results['auto']['seconds'] / args.records:.4f} | {sb:.1f}x | >= 30x: {'met' if sb >= 30 else '**missed**'} |",
        f"| `select` fp32 | {args.records} | {results['float32']['seconds']:.1f} | "
        f"{results['float32']['seconds'] / args.records:.4f} | {report['select']['float32']['speedup']:.1f}x | |",
        "",
        *[f"- Spearman {c} (bf16 vs fp32 reference, {v['pairs']} pairs): {v['spearman']:.5f}" for c, v in corr.items()],
        *[f"- Ideal 16 x 1024 batch, {d}: bare {b:,.0f} tok/s, scorer {o:,.0f} tok/s ({o / b:.2f})" for d, (b, o) in ideal.items()],
        "",
    ]
    (out / "gpu_score.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
