"""`score`: fidelity against a plain batch-1 implementation of issue 4's definitions, edge cases,
de-duplication, resume after a kill, and errors.

The reference below is written from the issue text, independently of reflect_tune.score: one
sequence at a time, a plain `model(input_ids, labels=...)` forward in fp32, the templates spelled
out literally.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli, write_jsonl

from reflect_tune.config import ScoreConfig
from reflect_tune.score import run as run_score


REVERSE = (
    "Below is the response to an instruction, please guess the corresponding instruction for the given response.\n"
    "{answer}\nGenerate the instruction for the above response."
)
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def ref_prompt(template: str, instruction: str, input: str) -> str:
    if template == "alpaca" and input:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        )
    if template == "alpaca":
        return (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:"
        )
    text = instruction + "\n" + input if input else instruction
    if template == "vicuna":
        return VICUNA + " USER: " + text + " ASSISTANT:"
    assert template == "none"
    return text + "\n"


def ref_loss(model, ids: list[int], start: int, end: int | None = None) -> tuple[float, int]:
    """HF's own loss on one sequence: labels before `start` (and from `end`) are ignored."""
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :start] = -100
    if end is not None:
        labels[0, end:] = -100
    scored = int((labels[0, 1:] != -100).sum())
    with torch.no_grad():
        loss = model(input_ids=x, labels=labels).loss.item() if scored else math.nan
    return loss, scored


def ref_conditional(model, tok, template, user, assistant, max_length):
    if template == "chat":
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        full = tok.apply_chat_template(turns, tokenize=False)
        prompt = tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt)
        content_end = full.index(assistant, len(prompt)) + len(assistant)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        end = len(tok(full[:content_end], add_special_tokens=False)["input_ids"])
        return ref_loss(model, ids[:max_length], start, end), len(ids) > max_length
    ids = tok(user + assistant)["input_ids"]
    start = len(tok(user)["input_ids"])
    return ref_loss(model, ids[:max_length], start), len(ids) > max_length


def ref_scores(model, tok, template, instruction, input, output, max_length=2048) -> dict:
    q = instruction + "\n" + input if input else instruction
    reverse = REVERSE.replace("{answer}", output)
    if template == "chat":
        (laq, naq), taq = ref_conditional(model, tok, "chat", q, output, max_length)
        (lqa, nqa), tqa = ref_conditional(model, tok, "chat", reverse, q, max_length)
    else:
        (laq, naq), taq = ref_conditional(model, tok, template, ref_prompt(template, instruction, input), output, max_length)
        (lqa, nqa), tqa = ref_conditional(model, tok, template, ref_prompt(template, reverse, ""), q, max_length)
    a_ids, q_ids = tok(output)["input_ids"], tok(q)["input_ids"]
    la, na = ref_loss(model, a_ids[:max_length], 0)
    lq, nq = ref_loss(model, q_ids[:max_length], 0)
    return {
        "loss_a_given_q": laq, "loss_a": la, "ifd": math.exp(laq - la), "ifd_loss_ratio": laq / la,
        "loss_q_given_a": lqa, "loss_q": lq, "rifd": math.exp(lqa - lq), "rifd_loss_ratio": lqa / lq,
        "tokens_a_given_q": naq, "tokens_a": na, "tokens_q_given_a": nqa, "tokens_q": nq,
        "truncated": taq or tqa or len(a_ids) > max_length or len(q_ids) > max_length,
    }


LONG = " ".join(["The mitochondria converts nutrients into energy the cell can use, through respiration."] * 4)
RECORDS = [
    # (instruction, input, output): mixed lengths, with and without input
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "Good morning, my friend.", "Bonjour, mon ami."),
    ("Summarize the passage in one sentence.", LONG, "Mitochondria turn nutrients into usable energy."),
    ("Explain what mitochondria do.", "", LONG),
    ("What is 12 times 7?", "", "12 times 7 is 84."),
]


def reflected_rows() -> list[dict]:
    rows = []
    for i, (ins, inp, out) in enumerate(RECORDS):
        rows.append({
            "id": f"r{i}",
            "original": {"instruction": ins, "input": inp, "output": out, "system": ""},
            "variants": {
                "ins": {"status": "ok", "reason": None, "instruction": ins + " Give one example.", "input": inp,
                        "output": out + " For example, this holds in everyday use.", "usage": {}},
                "res": ({"status": "ok", "reason": None, "output": "In short: " + out, "usage": {}} if i != 2 else
                        {"status": "api_failed", "reason": "HTTP 429: retries exhausted (6)", "output": None, "usage": {}}),
                "res_ins": {"status": "ok", "reason": None, "output": "Here is a fuller answer. " + out, "usage": {}},
            },
            "usage": {},
        })
    return rows


def candidate_texts(row: dict) -> dict[str, tuple[str, str, str]]:
    """(instruction, input, output) of every ok variant, as FORMATS §8.1 defines them."""
    o, v = row["original"], row["variants"]
    out = {"original": (o["instruction"], o["input"], o["output"])}
    if v["ins"]["status"] == "ok":
        out["ins"] = (v["ins"]["instruction"], v["ins"]["input"], v["ins"]["output"])
    if v["res"]["status"] == "ok":
        out["res"] = (o["instruction"], o["input"], v["res"]["output"])
    if v["res_ins"]["status"] == "ok" and "ins" in out:
        out["res_ins"] = (out["ins"][0], out["ins"][1], v["res_ins"]["output"])
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def assert_matches_reference(rows, refs, tol=1e-4):
    worst = 0.0
    for row in rows:
        ref = refs[(row["id"], row["variant"])]
        for col, want in ref.items():
            got = row[col]
            if isinstance(want, float):
                assert math.isnan(got) == math.isnan(want), (row["id"], row["variant"], col, got, want)
                if not math.isnan(want):
                    worst = max(worst, abs(got - want))
            else:
                assert got == want, (row["id"], row["variant"], col, got, want)
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("template", ["chat", "alpaca", "vicuna", "none"])
def test_scores_match_plain_batch1_reference(template, tmp_path, tiny, tiny_model_dir):
    model, tok = tiny
    src = write_jsonl(tmp_path / "reflected.jsonl", reflected_rows())
    out = tmp_path / "scores.parquet"
    # one batch holds every pass: the long and the short rows are padded together
    result = run_score(ScoreConfig(input=str(src), output=str(out), model=str(tiny_model_dir), template=template,
                                   dtype="float32", batch_tokens=1_000_000, progress=False))
    assert result.stats.padded_tokens > result.stats.tokens  # padding really happened
    if template != "none":  # the template's opening is run once per batch and shared by its rows
        assert result.stats.shared_tokens > 0
    rows = read_rows(out)
    refs = {}
    for r in reflected_rows():
        for variant, (ins, inp, outp) in candidate_texts(r).items():
            refs[(r["id"], variant)] = ref_scores(model, tok, template, ins, inp, outp)
    assert [(r["id"], r["variant"]) for r in rows] == list(refs)  # input order, only ok variants
    assert ("r2", "res") not in refs
    assert_matches_reference(rows, refs)
    assert all(r["reason"] is None for r in rows)
    meta = json.loads((tmp_path / "scores.parquet.meta.json").read_text())
    assert meta["stage"] == "score" and meta["scoring"]["template"] == template
    assert meta["scoring"]["reverse"] == REVERSE and meta["inputs"][0]["sha256"]
    # s(Q) of (x, y) and (x, y_res) is one unit; s(Q) of (x_ins, y_ins) and (x_ins, y_res_ins) too
    stats = meta["scoring"]["stats"]
    assert stats["units"] < stats["passes"] and stats["units"] == stats["computed"]
    assert not (tmp_path / "scores.parquet.parts").exists()  # shards go once the artifact is written


def test_small_batches_truncation_and_undefined_scores(tmp_path, tiny, tiny_model_dir):
    """Many small batches, --max-length cutting some passes, and rows that get NaN with a reason."""
    model, tok = tiny
    records = [{"id": f"p{i}", "instruction": ins, "input": inp, "output": out} for i, (ins, inp, out) in enumerate(RECORDS)]
    records += [
        {"id": "one-token", "instruction": "Name a colour.", "input": "", "output": "Blue"},  # no BOS: s(A) undefined
        {"id": "empty", "instruction": "Say nothing.", "input": "", "output": "  "},
    ]
    src = write_jsonl(tmp_path / "plain.jsonl", records)
    out = tmp_path / "s.parquet"
    run_score(ScoreConfig(input=str(src), output=str(out), model=str(tiny_model_dir), template="alpaca",
                          dtype="float32", batch_tokens=96, max_length=48, progress=False))
    rows = {r["id"]: r for r in read_rows(out)}
    refs = {(f"p{i}", "original"): ref_scores(model, tok, "alpaca", *rec, max_length=48) for i, rec in enumerate(RECORDS)}
    assert_matches_reference([rows[i] for i, _ in refs], refs)
    long_answer = rows["p3"]  # the long answer is cut at 48 tokens but keeps scored tokens
    assert long_answer["truncated"] and long_answer["tokens_a"] == 47
    cut = rows["p2"]  # the prompt with the long input fills all 48 tokens: nothing of the answer is left
    assert cut["truncated"] and cut["tokens_a_given_q"] == 0 and math.isnan(cut["loss_a_given_q"]) and math.isnan(cut["ifd"])
    assert "a_given_q: no scored tokens after truncation at --max-length 48" in cut["reason"]
    one = rows["one-token"]
    assert one["tokens_a"] == 0 and math.isnan(one["loss_a"]) and math.isnan(one["ifd"]) and not math.isnan(one["loss_a_given_q"])
    assert one["reason"].startswith("a: no scored tokens (nothing to predict); q_given_a: no scored tokens after truncation")
    empty = rows["empty"]
    assert empty["reason"] == "empty output" and all(math.isnan(empty[c]) for c in ("ifd", "rifd", "loss_a", "loss_q"))
    meta = json.loads((tmp_path / "s.parquet.meta.json").read_text())
    assert meta["report"]["with_reason"] == sum(1 for r in rows.values() if r["reason"]) >= 3
    assert meta["report"]["reasons"]["empty output"] == 1


def test_only_one_direction_leaves_the_other_null(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": a, "input": b, "output": c} for a, b, c in RECORDS])
    out = tmp_path / "ifd.parquet"
    result = run_score(ScoreConfig(input=str(src), output=str(out), model=str(tiny_model_dir), only="ifd", progress=False))
    rows = read_rows(out)
    assert result.template == "chat"  # the tokenizer has a chat template: it is the default
    assert all(r["ifd"] > 0 and r["rifd"] is None and r["loss_q"] is None and r["tokens_q"] is None for r in rows)
    assert result.stats.passes == 2 * len(RECORDS)


def test_bfloat16_is_close_to_float32(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": a, "input": b, "output": c} for a, b, c in RECORDS])
    runs = {}
    for dtype in ("float32", "bfloat16"):
        run_score(ScoreConfig(input=str(src), output=str(tmp_path / f"{dtype}.parquet"), model=str(tiny_model_dir),
                              dtype=dtype, progress=False))
        runs[dtype] = read_rows(tmp_path / f"{dtype}.parquet")
        assert json.loads((tmp_path / f"{dtype}.parquet.meta.json").read_text())["scoring"]["dtype"] == dtype
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        assert abs(a["loss_a_given_q"] - b["loss_a_given_q"]) < 0.05 and abs(a["rifd"] - b["rifd"]) < 0.05


def test_bad_input_is_one_line_error(tmp_path, tiny_model_dir):
    rows = reflected_rows()
    rows[1]["variants"]["res"] = {"status": "done", "output": "x"}
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    r = run_cli("score", str(src), "-o", str(tmp_path / "s.parquet"), "--model", str(tiny_model_dir))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {src}:2: field 'variants.res.status': expected one of ok, parse_failed, "
                                "api_failed, skipped, got 'done'")
    rows = reflected_rows()
    rows[0]["variants"]["ins"]["output"] = None
    src = write_jsonl(tmp_path / "bad2.jsonl", rows)
    r = run_cli("score", str(src), "-o", str(tmp_path / "s.csv"), "--model", str(tiny_model_dir))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 's.csv'}: the output must be a .parquet file"
    r = run_cli("score", str(src), "-o", str(tmp_path / "s.parquet"), "--model", str(tiny_model_dir))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {src}:1: field 'variants.ins.output': expected a string, got null"
    r = run_cli("score", str(src), "-o", str(tmp_path / "s.parquet"), "--model", str(tiny_model_dir), "--reverse", "no placeholder")
    assert r.returncode == 2 and r.stderr.strip() == "error: --reverse must contain the placeholder {answer}"  # checked first


@pytest.mark.slow
def test_killed_run_resumes_and_loses_at_most_one_batch(tmp_path, tiny_model_dir):
    """SIGKILL a real `reflect-tune score` mid-run, rerun it: every unit in the shards is reused."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    records = [
        {"id": f"k{i}", "instruction": f"Write {i % 9 + 1} words about {words[i % 12]}.", "input": "",
         "output": " ".join(words[(i + j) % 12] for j in range(3 + i % 40))}
        for i in range(240)
    ]
    src = write_jsonl(tmp_path / "big.jsonl", records)
    out = tmp_path / "scores.parquet"
    args = ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--template", "none", "--batch-tokens", "128"]
    exe = Path(sys.executable).with_name("reflect-tune")
    proc = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    parts = tmp_path / "scores.parquet.parts"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = sum(len(p.read_text().splitlines()) for p in parts.glob("*/part-*.jsonl"))
        if lines >= 30:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    kept = 0
    for part in parts.glob("*/part-*.jsonl"):
        for line in part.read_text().splitlines():
            try:
                json.loads(line)
                kept += 1
            except json.JSONDecodeError:
                pass  # a line torn by the kill: the batch being written
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {kept} scored units found" in r.stderr
    stats = json.loads((tmp_path / "scores.parquet.meta.json").read_text())["scoring"]["stats"]
    assert stats["resumed"] == kept and stats["computed"] == stats["units"] - kept
    fresh = tmp_path / "fresh.parquet"
    run_score(ScoreConfig(input=str(src), output=str(fresh), model=str(tiny_model_dir), template="none", progress=False))
    a, b = read_rows(out), read_rows(fresh)
    assert [(r["id"], r["tokens_a_given_q"]) for r in a] == [(r["id"], r["tokens_a_given_q"]) for r in b]
    for col in ("loss_a_given_q", "loss_a", "loss_q_given_a", "loss_q"):
        assert max(abs(x[col] - y[col]) for x, y in zip(a, b)) <= 1e-4
    assert not parts.exists()
