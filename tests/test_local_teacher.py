"""`reflect --backend transformers`: the in-process teacher writes the layout's markers itself.

On a tiny random model (the layout is there whatever the model writes; batching changes nothing;
the cache makes a rerun free) and on the bundled 135M model (most variants are `ok`, where the
same model behind a server keeps to the markers almost never).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import run_cli, write_jsonl
from reflect_tune.layout import choose_tag, load_prompts, marker, parse_blocks, render
from reflect_tune.local_teacher import LocalTeacher, layout_of

PROMPTS = load_prompts()
ROWS = [
    {"instruction": "Name a prime number.", "input": "", "output": "7."},
    {"instruction": "Give the opposite of hot.", "input": "", "output": "Cold."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
]


def request(row: dict, kind: str) -> tuple[list[dict], tuple[str, ...], str]:
    template = PROMPTS.texts["instruction" if kind == "ins" else "response"]
    tag = choose_tag(row["instruction"], row["input"], row["output"])
    text = render(template, {"instruction": row["instruction"], "output": row["output"]}, tag)
    names = ("NEW INSTRUCTION", "NEW ANSWER") if kind == "ins" else ("BETTER ANSWER",)
    return [{"role": "system", "content": PROMPTS.texts["system"]}, {"role": "user", "content": text}], names, tag


def test_layout_of_reads_the_requests_own_markers():
    msgs, names, tag = request(ROWS[0], "ins")
    # a marker quoted by the data, with another tag, is not the request's
    msgs[1]["content"] = "[[BETTER ANSWER 0badc0de]] quoted\n" + msgs[1]["content"]
    assert layout_of(msgs) == (names, tag)
    with pytest.raises(Exception, match="needs the markers layout"):
        layout_of([{"role": "user", "content": "no layout here"}])


def replies(teacher: LocalTeacher, kinds: list[tuple[dict, str]], max_tokens: int) -> list:
    async def go():
        return await asyncio.gather(*(teacher.reply(request(row, kind)[0], {"max_tokens": max_tokens}) for row, kind in kinds))

    return asyncio.run(go())


def test_tiny_model_the_layout_is_forced_and_batching_changes_nothing(tiny_model_dir):
    kinds = [(row, kind) for row in ROWS for kind in ("ins", "res")]
    wide = LocalTeacher(spec=str(tiny_model_dir), device="cpu", batch_size=8)
    batched = replies(wide, kinds, 24)
    assert wide.batches < 2 * len(kinds)  # requests really shared generate calls
    narrow = LocalTeacher(spec=str(tiny_model_dir), device="cpu", batch_size=1)
    one_by_one = replies(narrow, kinds, 24)
    assert [r.text for r in batched] == [r.text for r in one_by_one]  # left padding is invisible
    for (row, kind), reply in zip(kinds, batched):
        _, names, tag = request(row, kind)
        assert reply.text.startswith(marker(names[0], tag) + "\n")  # written for the model, tagged
        assert 0 < reply.completion_tokens <= 24 and reply.prompt_tokens > 100
        blocks, problem = parse_blocks(reply.text, names, tag, PROMPTS.placeholders, reply.finish_reason)
        if reply.finish_reason == "length":  # a random model runs to the budget: reported as cut, never misread
            assert blocks is None and "hit --max-tokens" in problem
        else:
            assert reply.text.endswith(marker("END", tag)) and (blocks is not None or "no " not in problem)


@pytest.mark.slow
def test_bundled_teacher_in_process_gives_ok_variants_and_resumes_from_the_cache(tmp_path):
    data, out, cache = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out.jsonl", tmp_path / "cache"
    args = ["reflect", str(data), "-o", str(out), "--model", "bundled:smollm2-135m-instruct", "--backend", "transformers",
            "--device", "cpu", "--max-tokens", "96", "--no-reask", "--cache-dir", str(cache), "--no-progress"]
    r = run_cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    statuses = [v["status"] for row in rows for v in row["variants"].values()]
    ok = statuses.count("ok")
    assert ok >= len(statuses) / 2, statuses
    for row in rows:
        for kind, v in row["variants"].items():
            if v["status"] == "ok":
                text = v["output"] + (v.get("instruction") or "")
                assert "[[" not in text and text.strip() == text and text  # the markers never leak into the text
    summary = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["summary"]
    assert summary["backend"] == "transformers" and summary["response_format"] == "markers"
    assert summary["cost_usd"] == 0.0
    r = run_cli(*args, timeout=900)  # a rerun generates nothing: every reply comes from the cache
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["summary"]
    assert again["requests_sent"] == 0 and again["requests_cached"] == summary["requests_sent"]


@pytest.mark.parametrize("text, expect", [
    ("It is fine. It is complete and accurate. It is complete and accurate. It is", ("It is fine. It is complete and accurate.", True)),
    ("[the new answer]\n[the new answer]\n[the new", ("[the new answer]", True)),
    ("Yes. Yes. Yes. No loop of three words here", ("Yes. Yes. Yes. No loop of three words here", False)),
    ("One sentence, then another one. Both differ.", ("One sentence, then another one. Both differ.", False)),
])
def test_cut_loop_ends_a_block_before_its_first_repeated_sentence(text, expect):
    from reflect_tune.local_teacher import cut_loop

    assert cut_loop(text) == expect
