"""`--match-reference srt|cherry`: score and select reproduce the released selection code.

The transcriptions below are written from the released code's rules as docs/FORMATS.md §8.2a and
the reference notes state them (Reflection_Tuning selection_code/data_analysis.py and
get_select_data.py, Cherry_LLM cherry_seletion/data_analysis.py and data_by_IFD.py), one sample at
a time, with a plain `model(input_ids, labels=...)` forward in fp32: no project code computes them.
Each convention also gets a test that fails when it is switched the wrong way (`test_each_...`).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import one_error_line, run_cli, write_jsonl

from reflect_tune.config import ScoreConfig, SelectConfig
from reflect_tune.score import run as run_score
from reflect_tune.score import write_scores
from reflect_tune.selection import run as run_select

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.")
GUESS = "Below is the response to an instruction, please guess the corresponding instruction for the given response.\n"
GUESS_END = "\nGenerate the instruction for the above response."
MAX = 512

LONG = " ".join(["The mitochondria converts nutrients into energy the cell can use, through respiration."] * 40)
RECORDS = [
    # (instruction, input, output)
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "Good morning, my friend.", "Bonjour, mon ami."),
    # the input repeats the instruction: the released rfind finds it there (row 5)
    ("Count the words.", "Count the words. In this sentence there are seven.", "There are fifteen words in all."),
    # a long answer: every pass with the answer is cut at 512 tokens (rows 2 and 6)
    ("Explain what mitochondria do.", "", LONG),
    # a long input: the instruction passes are cut
    ("Summarize the passage in one sentence.", LONG, "Mitochondria turn nutrients into usable energy."),
    ("What is 12 times 7?", "", "12 times 7 is 84."),
]


# ----------------------------------------------------------------------------- the transcriptions


def enc(tok, text: str, max_length: int | None = None) -> list[int]:
    """tokenizer.encode(text, truncation=True, max_length=...): special tokens added, cut from the right."""
    ids = tok(text)["input_ids"]
    return ids[: max(max_length, 0)] if max_length is not None else ids


SCORED: list[int] = []  # the scored-token count of each hf_loss call, in order


def hf_loss(model, ids: list[int], start: int) -> float:
    """model(input_ids, labels=labels).loss with labels[:start] = -100 (NaN when nothing is scored)."""
    SCORED.append(max(0, len(ids) - max(start, 1)))
    if len(ids) < 2 or start >= len(ids):
        return math.nan
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :start] = -100
    with torch.no_grad():
        return model(input_ids=x, labels=labels).loss.item()


def whole_text(model, tok, text, max_length):
    return hf_loss(model, enc(tok, text, max_length), 0)


def part_text(model, tok, text, target, max_length):
    ids = enc(tok, text, max_length)
    return hf_loss(model, ids, len(enc(tok, text[: text.rfind(target)])))


def vicuna(instruction: str, input: str) -> str:
    if input:
        return f"{SYSTEM} USER: {instruction}\nInput:\n{input} ASSISTANT:"
    return f"{SYSTEM} USER: {instruction} ASSISTANT:"


def alpaca(instruction: str, input: str) -> str:
    if input:
        return f"{ALPACA_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    return f"{ALPACA}\n\n### Instruction:\n{instruction}\n\n### Response:"


def released_srt_scores(model, tok, ins: str, inp: str, out: str, max_length: int = MAX) -> dict:
    """Reflection_Tuning's four passes for one sample (vicuna prompt)."""
    prompt = vicuna(ins, inp)
    prompt_len = len(enc(tok, prompt, max_length))
    reverse = vicuna(GUESS + out + GUESS_END, "")
    reverse_len = len(enc(tok, reverse, max_length))
    SCORED.clear()
    loss_q = whole_text(model, tok, ins + inp, max_length - reverse_len + 1)
    loss_a = whole_text(model, tok, out, max_length - prompt_len + 1)
    loss_q_given_a = part_text(model, tok, reverse + ins + inp, ins, max_length)
    loss_a_given_q = part_text(model, tok, prompt + out, out, max_length)
    tokens = dict(zip(("tokens_q", "tokens_a", "tokens_q_given_a", "tokens_a_given_q"), SCORED))
    return {"loss_a_given_q": loss_a_given_q, "loss_a": loss_a, "loss_q_given_a": loss_q_given_a, "loss_q": loss_q,
            "ifd": math.exp(loss_a_given_q) / math.exp(loss_a), "rifd": math.exp(loss_q_given_a) / math.exp(loss_q), **tokens}


def released_cherry_scores(model, tok, ins: str, inp: str, out: str, max_length: int = MAX) -> dict:
    """Cherry's two passes (alpaca prompt): s(A) after "### Response:", cut at max_length - prompt - 2."""
    prompt = alpaca(ins, inp)
    prompt_len = len(enc(tok, prompt, max_length))
    SCORED.clear()
    loss_a = part_text(model, tok, "### Response:" + out, out, max_length - prompt_len - 2)
    loss_a_given_q = part_text(model, tok, prompt + out, out, max_length)
    return {"loss_a_given_q": loss_a_given_q, "loss_a": loss_a, "ifd_loss_ratio": loss_a_given_q / loss_a,
            "tokens_a": SCORED[0], "tokens_a_given_q": SCORED[1]}


def same(a: float, b: float, tol: float = 1e-4) -> bool:
    """Equal within 1e-4, absolute (batched fp32 differs from batch-1 by about 1e-6)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference-data")
    return write_jsonl(folder / "data.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in RECORDS])


def score_rows(tiny_model_dir, data: Path, out: Path, **settings) -> list[dict]:
    run_score(ScoreConfig(input=str(data), output=str(out), model=str(tiny_model_dir), dtype="float32",
                          max_length=MAX, progress=False, **settings))
    return pq.read_table(out).to_pylist()


def test_score_srt_equals_the_released_passes(tiny_model_dir, tiny, plain_data, tmp_path):
    """`score --match-reference srt --template vicuna --max-length 512`: every loss within 1e-4 of the transcription."""
    out = tmp_path / "scores.parquet"
    run = run_cli("score", str(plain_data), "-o", str(out), "--model", str(tiny_model_dir), "--dtype", "float32",
                  "--match-reference", "srt", "--template", "vicuna", "--max-length", str(MAX), "--no-progress")
    assert run.returncode == 0, run.stderr
    rows = pq.read_table(out).to_pylist()
    model, tok = tiny
    assert [r["truncated"] for r in rows] == [False, False, False, True, True, False]
    for r, (ins, inp, o) in zip(rows, RECORDS):
        want = released_srt_scores(model, tok, ins, inp, o)
        for k, v in want.items():
            assert same(r[k], v), (r["id"], k, r[k], v)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["scoring"]["template"] == "vicuna"
    assert meta["scoring"]["conventions"] == {"input_join": "labelled", "alone_cut": "matched", "rifd_text": "concat",
                                              "span": "rfind", "answer_alone": "bare"}


def test_score_srt_defaults_to_the_vicuna_template(tiny_model_dir, tiny, plain_data, tmp_path):
    """Row 4: the tokenizer has a chat template, so "auto" is chat by default and vicuna under srt."""
    model, tok = tiny
    assert tok.chat_template
    rows = score_rows(tiny_model_dir, plain_data, tmp_path / "s.parquet", match_reference="srt")
    meta = json.loads((tmp_path / "s.parquet.meta.json").read_text())
    assert meta["scoring"]["template"] == "vicuna"
    want = released_srt_scores(model, tok, *RECORDS[1])
    assert same(rows[1]["loss_a_given_q"], want["loss_a_given_q"])
    default = score_rows(tiny_model_dir, plain_data, tmp_path / "d.parquet")
    assert json.loads((tmp_path / "d.parquet.meta.json").read_text())["scoring"]["template"] == "chat"
    assert not same(default[1]["loss_a_given_q"], want["loss_a_given_q"])


# which record and which value each scoring convention changes (the others stay as srt sets them)
FLIPS = {
    "input_join": ("newline", 1, "loss_a_given_q"),  # row 3: "Input:" in the vicuna prompt
    "alone_cut": ("full", 3, "loss_a"),  # row 2: the long answer alone is cut at 512, not matched
    "rifd_text": ("newline", 1, "loss_q"),  # row 5: instruction + "\n" + input instead of no separator
    "span": ("exact", 2, "loss_q_given_a"),  # row 5: the input repeats the instruction
}


@pytest.mark.parametrize("name", sorted(FLIPS))
def test_each_scoring_convention_switched_back_breaks_the_match(tiny_model_dir, tiny, plain_data, tmp_path, name):
    value, index, column = FLIPS[name]
    model, tok = tiny
    want = released_srt_scores(model, tok, *RECORDS[index])
    rows = score_rows(tiny_model_dir, plain_data, tmp_path / "s.parquet", match_reference="srt", **{name: value})
    assert not same(rows[index][column], want[column]), f"{name}={value} should change {column} of record {index}"
    others = [k for k in ("loss_a_given_q", "loss_a", "loss_q_given_a", "loss_q") if k != column]
    unchanged = [k for k in others if same(rows[index][k], want[k])]
    assert unchanged, "the flip should leave some pass of the record as srt scores it"


def test_score_cherry_equals_the_released_passes(tiny_model_dir, tiny, plain_data, tmp_path):
    """Row 6: s(A) after "### Response:" cut at max_length - prompt - 2, alpaca, loss ratio."""
    model, tok = tiny
    rows = score_rows(tiny_model_dir, plain_data, tmp_path / "c.parquet", match_reference="cherry", only="ifd")
    for r, rec in zip(rows, RECORDS):
        want = released_cherry_scores(model, tok, *rec)
        for k, v in want.items():
            assert same(r[k], v), (r["id"], k, r[k], v)
    bare = score_rows(tiny_model_dir, plain_data, tmp_path / "b.parquet", match_reference="cherry", only="ifd",
                      answer_alone="bare")
    assert sum(not same(b["loss_a"], r["loss_a"]) for b, r in zip(bare, rows)) >= 3


def test_default_scoring_is_unchanged_by_the_conventions(tiny_model_dir, plain_data, tmp_path):
    """Setting every convention to its default value gives the default's numbers bit for bit."""
    default = score_rows(tiny_model_dir, plain_data, tmp_path / "d.parquet")
    explicit = score_rows(tiny_model_dir, plain_data, tmp_path / "e.parquet", input_join="newline", alone_cut="full",
                          rifd_text="newline", span="exact", answer_alone="bare")
    assert json.dumps(default) == json.dumps(explicit)


def test_bad_convention_and_chat_rfind_are_one_line(tiny_model_dir, plain_data, tmp_path):
    run = run_cli("score", str(plain_data), "-o", str(tmp_path / "s.parquet"), "--model", str(tiny_model_dir),
                  "--alone-cut", "half")
    assert run.returncode == 2 and "--alone-cut must be one of full, matched, got 'half'" in one_error_line(run.stderr)
    run = run_cli("score", str(plain_data), "-o", str(tmp_path / "s.parquet"), "--model", str(tiny_model_dir),
                  "--match-reference", "srt", "--template", "chat")
    assert run.returncode == 2 and "--span rfind applies to the text templates" in one_error_line(run.stderr)
    run = run_cli("select", str(plain_data), "-o", str(tmp_path / "x.jsonl"), "--model", str(tiny_model_dir),
                  "--match-reference", "alpaca")
    assert run.returncode == 2 and "--match-reference must be srt or cherry" in one_error_line(run.stderr)


# ----------------------------------------------------------------------------- selection on a score table

N = 400
VARIANTS = ("original", "ins", "res", "res_ins")


def synthetic(seed: int = 7) -> tuple[list[dict], list[dict]]:
    """400 reflected records and a score table of made-up losses: IFD and r-IFD around 1, some NaN."""
    rng = random.Random(seed)
    records, rows = [], []
    for i in range(N):
        rid = f"r{i}"
        records.append({"id": rid, "original": {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}.", "system": ""},
                        "variants": {v: {"status": "ok", "reason": None, "output": f"Better answer {i} ({v}).",
                                         **({"instruction": f"Harder question {i}?", "input": ""} if v == "ins" else {}),
                                         "usage": {}} for v in ("ins", "res", "res_ins")},
                        "usage": {}})
        for v in VARIANTS:
            la, lq = rng.uniform(1.5, 4.0), rng.uniform(2.0, 5.0)
            laq, lqa = la + rng.gauss(-0.25, 0.3), lq + rng.gauss(-0.3, 0.3)
            reason = None
            if rng.random() < 0.03:  # no scored token: NaN in the released code too
                lqa, reason = math.nan, "q_given_a: no scored tokens after truncation at --max-length 512"
            elif rng.random() < 0.03:  # where the released code's try/except records 0
                laq, reason = math.nan, "a_given_q: assistant content not found in the chat template's rendering"
            rows.append({"id": rid, "variant": v, "loss_a_given_q": laq, "loss_a": la, "ifd": math.exp(laq - la),
                         "ifd_loss_ratio": laq / la, "loss_q_given_a": lqa, "loss_q": lq, "rifd": math.exp(lqa - lq),
                         "rifd_loss_ratio": lqa / lq, "tokens_a_given_q": 10, "tokens_a": 10, "tokens_q_given_a": 8,
                         "tokens_q": 8, "truncated": rng.random() < 0.1, "reason": reason})
    return records, rows


def released_get_select_data(rows: list[dict]) -> tuple[list[tuple[str, str]], int]:
    """get_select_data.py: Python comparisons (NaN compares false), only winning rewrites appended.
    Also its count_2 + count_4: the records whose rewrite lost but whose kept pair passes both filters."""
    t = {(r["id"], r["variant"]): r for r in rows}
    new, lost_passing = [], 0
    for i in range(N):
        ori, q, a, qa = (t[(f"r{i}", v)] for v in VARIANTS)
        if q["ifd"] > ori["ifd"]:
            if qa["rifd"] < q["rifd"]:
                if qa["rifd"] < 1 and qa["ifd"] < 1:
                    new.append((f"r{i}", "res_ins"))
            elif q["rifd"] < 1 and q["ifd"] < 1:
                lost_passing += 1
        else:
            if a["rifd"] < ori["rifd"]:
                if a["rifd"] < 1 and a["ifd"] < 1:
                    new.append((f"r{i}", "res"))
            elif ori["rifd"] < 1 and ori["ifd"] < 1:
                lost_passing += 1
    return new, lost_passing


def released_data_by_ifd(rows: list[dict], rate: float) -> list[str]:
    """data_by_IFD.py on the originals: skip truncated, drop a loss ratio above 1, keep int(rate x survivors)."""
    rates = []
    for i, r in enumerate(x for x in rows if x["variant"] == "original"):
        if r["truncated"] or math.isnan(r["ifd_loss_ratio"]):
            continue
        if r["ifd_loss_ratio"] > 1:
            continue
        rates.append((r["ifd_loss_ratio"], i))
    rates.sort()
    number = int(len(rates) * rate)
    return [f"r{i}" for i in sorted(i for _, i in rates[-number:])]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    records, rows = synthetic()
    data = write_jsonl(folder / "reflected.jsonl", records)
    write_scores(rows, folder / "scores.parquet")
    return data, folder / "scores.parquet", rows


def select(table, tmp_path, **settings) -> tuple[list[tuple[str, str]], dict]:
    data, scores, _ = table
    out = tmp_path / f"sel-{len(list(tmp_path.iterdir()))}.jsonl"
    result = run_select(SelectConfig(input=str(data), output=str(out), scores=str(scores), progress=False, **settings))
    return [(r["id"], r["variant"]) for r in result.selected], result.summary


def test_select_srt_keeps_exactly_what_the_released_rule_keeps(table, tmp_path):
    _, _, rows = table
    want, lost_passing = released_get_select_data(rows)
    got, summary = select(table, tmp_path, match_reference="srt")
    assert sorted(got) == sorted(want)
    paper, _ = select(table, tmp_path)
    assert len(paper) > len(got)  # the paper's rule keeps the phase-1 winner when the rewrite loses
    print(f"released rule keeps {len(want)} of {N}; the paper's rule keeps {len(paper)}")
    # the released code's own counters: count_2 + count_4, the losers that would pass the filter
    assert summary["rewrite_lost_would_pass"] == lost_passing > 0
    # --top 0.05 is 5% of the survivors (the 2,316 of 46,325), highest IFD first
    top, _ = select(table, tmp_path, match_reference="srt", top=0.05)
    by_ifd = sorted(want, key=lambda k: -next(r["ifd"] for r in rows if (r["id"], r["variant"]) == k))
    assert sorted(top) == sorted(by_ifd[: int(0.05 * len(want))])


def test_select_srt_reports_the_nan_the_released_code_would_keep(table, tmp_path):
    """Row 7: NaN stays dropped; the pairs whose NaN the released code records as 0 are counted."""
    _, _, rows = table
    got, summary = select(table, tmp_path, match_reference="srt")
    t = {(r["id"], r["variant"]): r for r in rows}
    nan_ids = {rid for rid, v in got if math.isnan(t[(rid, v)]["ifd"]) or math.isnan(t[(rid, v)]["rifd"])}
    assert not nan_ids
    assert summary["nan"]["dropped"] > 0
    # the released code on the same table, with the errors' NaN recorded as 0 (its try/except)
    zeroed = [{**r, "ifd": 0.0} if r["reason"] and "assistant content" in r["reason"] else r for r in rows]
    extra = {rid for rid, _ in released_get_select_data(zeroed)[0]} - {rid for rid, _ in got}
    assert summary["nan"]["released_code_would_keep"] == len(extra) > 0


# what each selection convention, switched back to the paper's way, does to the srt match
SELECT_FLIPS = {"rewrite_loses": "keep", "phase_nan": "loses", "top_of": "records"}


@pytest.mark.parametrize("name", sorted(SELECT_FLIPS))
def test_each_selection_convention_switched_back_breaks_the_match(table, tmp_path, name):
    top = 0.05 if name == "top_of" else None
    reference, _ = select(table, tmp_path, match_reference="srt", top=top)
    flipped, _ = select(table, tmp_path, match_reference="srt", top=top, **{name: SELECT_FLIPS[name]})
    assert sorted(flipped) != sorted(reference)


def test_select_cherry_keeps_exactly_what_data_by_ifd_keeps(table, tmp_path):
    """Row 6: loss-ratio ranking, truncated pairs skipped, --top 0.06 of the survivors (Cherry's script)."""
    _, _, rows = table
    want = released_data_by_ifd(rows, 0.06)
    got, summary = select(table, tmp_path, match_reference="cherry", method="ifd", top=0.06)
    assert sorted(rid for rid, _ in got) == sorted(want)
    assert summary["decisions"]["dropped_truncated"] > 0
    for name, value in {"ratio": "ppl", "truncated": "keep", "top_of": "records"}.items():
        flipped, _ = select(table, tmp_path, match_reference="cherry", method="ifd", top=0.06, **{name: value})
        assert sorted(rid for rid, _ in flipped) != sorted(want), name


def test_select_scores_table_errors(table, tmp_path):
    data, scores, rows = table
    part = tmp_path / "part.parquet"
    write_scores([r for r in rows if r["id"] != "r5"], part)
    run = run_cli("select", str(data), "-o", str(tmp_path / "s.jsonl"), "--scores", str(part))
    assert run.returncode != 0
    assert "has no row for id 'r5', variant 'original'" in one_error_line(run.stderr)
    run = run_cli("select", str(data), "-o", str(tmp_path / "s.jsonl"), "--scores", str(scores),
                  "--match-reference", "cherry")
    assert run.returncode == 2 and "--match-reference cherry reproduces Cherry's IFD selection" in one_error_line(run.stderr)
