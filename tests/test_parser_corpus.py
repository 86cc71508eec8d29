"""`reflect_tune.layout.parse_blocks` on a fixed corpus of REAL teacher replies.

tests/data/teacher_replies/ holds replies of the bundled SmolLM2-135M-Instruct to the project's
own reflection requests (prompts, tags and messages as `reflect` builds them) for the first 10
records of examples/alpaca_small.jsonl; capture.py there made them and says how. They were recorded
with the prompts that are now the `conservative` set (`--prompts conservative`; the default set
`paper` came later), so this test reads the layout's filler from that set. Two kinds:

- free: what a server answers; the 135M model mostly ignores the marker layout;
- prefill: the assistant turn was started with the start marker and generation stopped at the
  end marker, so the layout holds, and the outcome turns on the text and finish_reason.

Each file states the outcome a careful reader gives the reply under the layout's rules
(reflect_tune/prompts/README.md): the text of every block for a usable one, the exact problem
for an unusable one. Usable means the layout holds and the block is an answer text, complete and
not the layout's filler; whether the answer is any good is not the parser's business (select
judges that). Every reply was read by hand; the file's "review" says what the reader saw. Where
the parser disagrees with the reader, the file says so ("parser_disagrees", with what the parser
says today under "parser_says"), and that case is a strict xfail: it fails the day the parser
gets it right, so the expectation can be turned into a plain one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflect_tune.layout import choose_tag, load_prompts, marker, parse_blocks

CORPUS = Path(__file__).resolve().parent / "data" / "teacher_replies"
FILES = sorted(CORPUS.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cases() -> list:
    out = []
    for path in FILES:
        disagrees = load(path).get("parser_disagrees")
        marks = [pytest.mark.xfail(strict=True, reason=f"parser bug: {disagrees}")] if disagrees else []
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


@pytest.fixture(scope="module")
def placeholders() -> set[str]:
    return load_prompts("conservative").placeholders  # the set the corpus was recorded with


@pytest.mark.parametrize("path", cases())
def test_parser_reads_each_real_reply_as_a_reader_does(path, placeholders):
    entry = load(path)
    assert entry["reviewed"] is True, f"{path.name}: expectation not reviewed by hand yet"
    blocks, problem = parse_blocks(entry["reply"], tuple(entry["names"]), entry["tag"], placeholders,
                                   entry["finish_reason"])
    want = entry["expected"]
    assert problem == want["problem"], f"{path.name}: {entry.get('review', '')}"
    assert blocks == want["blocks"], f"{path.name}: {entry.get('review', '')}"


def test_corpus_is_real_small_and_covers_both_outcomes():
    assert len(FILES) >= 60, "the corpus is missing (run tests/data/teacher_replies/capture.py, then review)"
    entries = [load(p) for p in FILES]
    total = sum(p.stat().st_size for p in FILES)
    assert total < 300_000, f"the corpus is {total} bytes; keep it small"
    assert {e["model"] for e in entries} == {"bundled:smollm2-135m-instruct"}
    modes = ("free", "prefill", "sampled")
    assert {(e["mode"], e["kind"]) for e in entries} == {(m, k) for m in modes for k in ("ins", "res")}
    ok = [e for e in entries if e["expected"]["problem"] is None]
    failed = [e for e in entries if e["expected"]["problem"] is not None]
    assert len(ok) >= 5 and len(failed) >= 5, (len(ok), len(failed))
    assert {e["finish_reason"] for e in entries} == {"stop", "length"}
    for e in entries:
        rec = e["record"]
        # the tag of the request reflect sends for this record, and absent from the record's texts
        assert e["tag"] == choose_tag(rec["instruction"], rec["input"], rec["output"]), e["record"]["line"]
        names = ("NEW INSTRUCTION", "NEW ANSWER") if e["kind"] == "ins" else ("BETTER ANSWER",)
        assert tuple(e["names"]) == names
        if e["mode"] != "free":  # the layout by construction: the reply starts with the first marker
            assert e["reply"].startswith(marker(names[0], e["tag"]) + "\n")
        if e["expected"]["blocks"] is not None:
            assert set(e["expected"]["blocks"]) == set(names)
        if e.get("parser_disagrees"):
            assert e["parser_says"] != e["expected"]
    # what the corpus holds that a parser must get right (so a broken rule shows):
    problems = [e["expected"]["problem"] or "" for e in entries]
    assert sum(p.startswith("no [[END") and p.endswith("(the reply hit --max-tokens)") for p in problems) >= 10
    assert sum(e["finish_reason"] == "stop" and e["expected"]["problem"] is None for e in entries) >= 5  # no [[END]]
    assert any(e["reply"].count(marker(e["names"][-1], e["tag"])) > 1 for e in entries)  # a start marker twice
