"""Benchmark: `reflect-tune judge` throughput, its two phases measured apart.

1. Answer generation: two tiny random Llamas (2 layers, 64 wide, the SmolLM2 tokenizer; seeded,
   blank tokens suppressed so the text is visible) answer N prompts, greedy, batched with left
   padding (`judge.generate_answers`, the stage's own code). Rate = answers / wall time per model,
   model load included.
2. Judging: `judge.run` with the answers already on disk, against the fake OpenAI server
   (`tests/fakes/openai_server.py`, in this process's thread) answering every request after a fixed
   latency with the `longer` verdict rule; both orders per prompt, fresh request cache, so every
   request is sent. Rate = prompts judged / wall time of the run (answers read, requests, outputs).

Writes its section into docs/BENCHMARKS.md (replacing an earlier one) unless --no-write.

    REFLECT_TUNE_CACHE=/tmp/rt-cache HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_judge.py [--prompts 64] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from common import machine, torch_line, write_section  # noqa: E402


def tiny(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from fakes.tiny import make_tiny_llama
    from transformers import AutoTokenizer, GenerationConfig

    out = make_tiny_llama(folder, tokenizer_dir, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    GenerationConfig(suppress_tokens=blank, eos_token_id=tok.eos_token_id).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    from fakes.openai_server import FakeOpenAI

    from reflect_tune import judge
    from reflect_tune.config import JudgeConfig
    from reflect_tune.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    tok_dir = Path(resolve_model("bundled:smollm2-135m-instruct").path)
    a, b = tiny(work / "a", tok_dir, 2), tiny(work / "b", tok_dir, 3)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"Question {i}: explain topic number {i} briefly."}) + "\n"
                            for i in range(args.prompts)))
    with FakeOpenAI(latency=args.latency, judge="longer") as fake:
        cfg = JudgeConfig(model=str(a), baseline=str(b), data=str(data), judge="judge-model", output=str(work / "out"),
                          base_url=fake.base_url, api_key_env="BENCH_NO_KEY", cache_dir=str(work / "cache"),
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, concurrency=args.concurrency,
                          progress=False)
        records = judge.validate(cfg)
        from reflect_tune.artifacts import claim_folder

        claim_folder(work / "out", "judge", judge.OUTPUT_NAMES)  # the stage's own folder, as run() marks it
        gen = {}
        for side, spec in (("model", cfg.model), ("baseline", cfg.baseline)):
            t0 = time.perf_counter()
            _, n = judge.generate_answers(side, spec, records, cfg, work / "out" / f"answers_{side}.jsonl")
            gen[side] = (n, time.perf_counter() - t0)
        t0 = time.perf_counter()
        s = judge.run(cfg)["summary"]
        wall = time.perf_counter() - t0
        sent = fake.stats()["chat_requests"]
    assert s["answers_generated"] == {"model": 0, "baseline": 0} and s["judged"] == args.prompts
    cmd = "REFLECT_TUNE_CACHE=... HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_judge.py " + " ".join(sys.argv[1:])
    ideal = args.prompts / (2 * args.prompts / args.concurrency * args.latency)
    lines = ["## Judge throughput (`reflect-tune judge`)", "",
             f"Machine: {machine(torch_line())}. Command: `{cmd.strip()}`.", "",
             "| phase | work | wall s | rate |", "| --- | --- | --- | --- |"]
    for side, (n, sec) in gen.items():
        lines.append(f"| answers, {side} (tiny 2-layer Llama, load included, batch {args.batch_size}, "
                     f"{args.max_new_tokens} new tokens, greedy) | {n} answers | {sec:.2f} | {n / sec:.1f} answers/s |")
    lines.append(f"| judging, fake server {args.latency * 1000:.0f} ms latency, concurrency {args.concurrency}, both orders "
                 f"| {args.prompts} prompts, {sent} requests | {wall:.2f} | {args.prompts / wall:.1f} prompts/s "
                 f"(ideal {ideal:.1f}) |")
    lines += ["", "Judging is bound by the server's latency and `--concurrency` (each prompt is two requests); "
              "the client's own overhead is the gap to the ideal. A real judge's latency is seconds, not 200 ms: "
              "scale the rate by concurrency / latency. `transformers serve` as the judge was not measured here "
              "(a 135M judge on 2 shared cores answers in seconds per request; see the slow test).", ""]
    print("\n".join(lines))
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", lines[0], "\n".join(lines))


if __name__ == "__main__":
    main()
