"""`reflect` against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1, offline,
with the bundled SmolLM2-135M-Instruct as the teacher, through the real openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "alpaca_small.jsonl"


@pytest.mark.slow
def test_reflect_through_transformers_serve(served_teacher, tmp_path):
    base_url, model = served_teacher
    out, cache = tmp_path / "reflected.jsonl", tmp_path / "cache"
    args = ["reflect", str(EXAMPLES), "-o", str(out), "--model", model, "--base-url", base_url,
            "--cache-dir", str(cache), "--limit", "2", "--max-tokens", "40", "--concurrency", "6", "--timeout", "300"]
    run = run_cli(*args, env={"OPENAI_API_KEY": ""}, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for kind, v in row["variants"].items():
            # a 135M model rarely keeps to the markers: every outcome must be recorded, none lost
            assert v["status"] in ("ok", "parse_failed", "skipped"), (kind, v)
            assert (v["reason"] is None) == (v["status"] == "ok")
            if v["status"] != "skipped":
                assert v["usage"]["requests"] in (1, 2) and v["usage"]["prompt_tokens"] > 0
                assert v["usage"]["completion_tokens"] > 0
    summary = json.loads(out.with_name(out.name + ".meta.json").read_text())["summary"]
    assert summary["requests_answered"] >= 4 and summary["failures_by_kind"].get("timeout") is None
    # the finished job costs nothing to rerun
    again = run_cli(*args, env={"OPENAI_API_KEY": ""}, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["summary"]["requests_sent"] == 0
