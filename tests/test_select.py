"""`select`: decisions against a plain implementation of each rule on the same scores, the three
outputs, errors, the 2-process (torchrun, gloo) run, and the real bundled model."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli, write_jsonl

from reflect_tune.config import SelectConfig
from reflect_tune.selection import run as run_select

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "alpaca_small.jsonl"


def ok(**fields) -> dict:
    return {"status": "ok", "reason": None, **fields, "usage": {}}


def failed(status: str = "parse_failed", *keys: str) -> dict:
    return {"status": status, "reason": "no marker", **{k: None for k in keys}, "usage": {}}


def reflected_rows(n: int = 32) -> list[dict]:
    """The example data with made-up reflections, some failed, one empty answer."""
    src = [json.loads(line) for line in EXAMPLES.read_text().splitlines()][:n]
    rows = []
    for i, r in enumerate(src):
        ins = ok(instruction=r["instruction"] + " Explain your reasoning and give an example.", input=r["input"],
                 output=r["output"] + " For example, the same idea applies to many similar questions.")
        res = ok(output="Here is a clear answer. " + r["output"])
        res_ins = ok(output="Let me explain step by step. " + r["output"] + " That is the answer.")
        if i % 7 == 3:
            ins, res_ins = failed("parse_failed", "instruction", "input", "output"), failed("skipped", "output")
        if i % 5 == 2:
            res = failed("api_failed", "output")
        if i == 6:
            res_ins = ok(output="")  # an empty answer: NaN scores, never selected
        rows.append({"id": f"r{i}", "original": {**{k: r[k] for k in ("instruction", "input", "output")}, "system": ""},
                     "variants": {"ins": ins, "res": res, "res_ins": res_ins}, "usage": {}})
    return rows


def is_nan(x) -> bool:
    return x is None or math.isnan(x)


def plain_srt(rows: list[dict], top: float | None = None, top_k: int | None = None,
              keep_missing: bool = False) -> list[tuple[str, str]]:
    """The paper's rule, written plainly from issue 4, on the scores table."""
    table: dict[str, dict[str, dict]] = {}
    order: list[str] = []
    for r in rows:
        if r["id"] not in table:
            order.append(r["id"])
        table.setdefault(r["id"], {})[r["variant"]] = r
    kept = []
    for rid in order:
        v = table[rid]
        first = "original"
        if "ins" in v and not is_nan(v["ins"]["ifd"]) and (is_nan(v["original"]["ifd"]) or v["ins"]["ifd"] > v["original"]["ifd"]):
            first = "ins"
        response = "res" if first == "original" else "res_ins"
        if response not in v and not keep_missing:
            continue
        pair = first
        if response in v and not is_nan(v[response]["rifd"]) and (is_nan(v[first]["rifd"]) or v[response]["rifd"] < v[first]["rifd"]):
            pair = response
        ifd, rifd = v[pair]["ifd"], v[pair]["rifd"]
        if is_nan(ifd) or is_nan(rifd) or ifd >= 1 or rifd >= 1:
            continue
        kept.append((ifd, len(kept), rid, pair))
    kept.sort(key=lambda t: (-t[0], t[1]))
    k = len(kept) if top is None and top_k is None else (top_k or max(1, int(top * len(order) + 1e-9)))
    return [(rid, pair) for _, _, rid, pair in kept[:k]]


def test_srt_decisions_and_outputs(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "reflected.jsonl", reflected_rows())
    out = tmp_path / "sel" / "selected.jsonl"
    r = run_cli("select", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--top", "0.1")
    assert r.returncode == 0, r.stderr
    assert f"to {out}" in r.stdout
    scores = pq.read_table(tmp_path / "sel" / "selected.scores.parquet").to_pylist()
    # every ok candidate has a row; failed variants have none
    assert len(scores) == 32 + (32 - 5) + (32 - 6) + (32 - 5) and {s["variant"] for s in scores if s["id"] == "r3"} == {"original", "res"}
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "sel" / "selected.report" / "summary.json").read_text())
    want = plain_srt(scores, top=0.1)
    assert [(s["id"], s["variant"]) for s in selected] == want
    all_passing = plain_srt(scores)  # the rule without a cut
    assert all_passing and len(want) == min(3, len(all_passing))  # --top 0.1 of 32 records: 3
    assert summary["method"] == "srt" and summary["records"] == 32 and summary["selected"] == len(want)
    assert summary["variant_status"] == {"ins": {"ok": 27, "parse_failed": 5}, "res": {"ok": 26, "api_failed": 6},
                                         "res_ins": {"ok": 27, "skipped": 5}}
    d = summary["decisions"]
    assert d["dropped_below_cut"] == len(all_passing) - len(want)
    assert d["phase1_original"] + d["phase1_ins"] == 32
    assert sum(d[k] for k in d if k.startswith("dropped")) + summary["selected"] == 32
    assert d["dropped_variant_not_ok"] >= 1 and d["phase2_kept"] + d["phase2_res"] == 32 - d["dropped_variant_not_ok"]
    # only the passes the rule needs were run: the phase-1 loser never gets r-IFD
    by = {(s["id"], s["variant"]): s for s in scores}
    for rid in (f"r{i}" for i in range(32)):
        if (rid, "ins") in by:
            loser = "original" if by[(rid, "ins")]["ifd"] > by[(rid, "original")]["ifd"] else "ins"
            assert by[(rid, loser)]["rifd"] is None and by[(rid, loser)]["loss_q"] is None
    assert by[("r6", "res_ins")]["reason"] == "empty output" and math.isnan(by[("r6", "res_ins")]["ifd"])
    # a response reflection that lost phase 2 never needs its IFD
    for rid in (f"r{i}" for i in range(32)):
        for first, response in (("original", "res"), ("ins", "res_ins")):
            a, b = by.get((rid, first)), by.get((rid, response))
            if a and b and not b["reason"] and a["rifd"] is not None and not b["rifd"] < a["rifd"]:
                assert b["ifd"] is None and b["loss_a_given_q"] is None
    # the rows: Alpaca-shaped with the chosen variant and its scores, highest IFD first
    first = selected[0]
    assert list(first) == ["id", "instruction", "input", "output", "variant", "ifd", "rifd", "ifd_loss_ratio", "rifd_loss_ratio"]
    assert [s["ifd"] for s in selected] == sorted((s["ifd"] for s in selected), reverse=True)
    assert all(s["ifd"] < 1 and s["rifd"] < 1 for s in selected)
    assert summary["ifd_cut"] == selected[-1]["ifd"]
    for png in ("ifd_hist.png", "rifd_hist.png"):
        assert (tmp_path / "sel" / "selected.report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for sidecar in ("selected.jsonl.meta.json", "selected.scores.parquet.meta.json", "selected.report/meta.json"):
        meta = json.loads((tmp_path / "sel" / sidecar).read_text())
        assert meta["stage"] == "select" and meta["config"]["top"] == 0.1
    assert meta["scoring"]["stats"]["passes"] < 16 * 32  # far fewer than the reference's 4 passes x 4 variants
    assert not (tmp_path / "sel" / "selected.jsonl.parts").exists()


def test_srt_missing_response_keep_goes_on_with_the_winners_own_answer(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "reflected.jsonl", reflected_rows())
    out = tmp_path / "sel" / "selected.jsonl"
    r = run_cli("select", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--missing-response", "keep")
    assert r.returncode == 0, r.stderr
    scores = pq.read_table(tmp_path / "sel" / "selected.scores.parquet").to_pylist()
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["id"], s["variant"]) for s in selected] == plain_srt(scores, keep_missing=True)
    d = json.loads((tmp_path / "sel" / "selected.report" / "summary.json").read_text())["decisions"]
    by = {(s["id"], s["variant"]) for s in scores}
    no_variant = 0
    for i in range(32):
        first = "ins" if any(x["id"] == f"r{i}" and x["variant"] == "ins" and x["rifd"] is not None for x in scores) else "original"
        if (f"r{i}", "res" if first == "original" else "res_ins") not in by:
            no_variant += 1
            winner = next(x for x in scores if x["id"] == f"r{i}" and x["variant"] == first)
            assert winner["ifd"] is not None and winner["rifd"] is not None  # scored for the filter
    assert d["dropped_variant_not_ok"] == 0 and d["phase2_no_variant"] == no_variant > 0
    assert d["phase2_kept"] + d["phase2_res"] + d["phase2_no_variant"] == 32
    bad = run_cli("select", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--missing-response", "maybe")
    assert bad.returncode == 2


def test_ifd_rifd_and_superfilter_on_plain_data(tmp_path, tiny_model_dir):
    scores_of = {}
    for method in ("ifd", "rifd", "superfilter"):
        out = tmp_path / method / "selected.jsonl"
        model = {"proxy_model": str(tiny_model_dir)} if method == "superfilter" else {"model": str(tiny_model_dir)}
        default = method == "ifd"  # the default method on plain data
        run_select(SelectConfig(input=str(EXAMPLES), output=str(out), top_k=4, method=None if default else method,
                                         progress=False, **model))
        scores = pq.read_table(tmp_path / method / "selected.scores.parquet").to_pylist()
        scores_of[method] = scores
        selected = [(s["id"], s["variant"]) for s in map(json.loads, out.read_text().splitlines())]
        summary = json.loads((tmp_path / method / "selected.report" / "summary.json").read_text())
        assert summary["method"] == method and len(scores) == 32 and {s["variant"] for s in scores} == {"original"}
        by = "rifd" if method == "rifd" else "ifd"
        other = "ifd" if by == "rifd" else "rifd"
        assert all(s[other] is None for s in scores)  # the other direction is never computed
        passing = [(s[by], i, s["id"]) for i, s in enumerate(scores) if not is_nan(s[by]) and s[by] < 1]
        passing.sort(key=lambda t: ((t[0] if by == "rifd" else -t[0]), t[1]))
        assert selected == [(rid, "original") for _, _, rid in passing[:4]]
        assert summary["decisions"]["phase1_original"] == 0 and summary["selected"] == len(selected)
        assert summary["decisions"]["dropped_below_cut"] == len(passing) - len(selected)
    assert json.loads((tmp_path / "superfilter" / "selected.report" / "summary.json").read_text())["template"] == "none"
    # the proxy scored with no template, so its IFD differs from the chat-templated student's
    assert scores_of["superfilter"][0]["ifd"] != scores_of["ifd"][0]["ifd"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top", "0.1", "--top-k", "3"], "--top and --top-k are mutually exclusive; give one"),
        (["--top", "1.5"], "--top must be a fraction in (0, 1], got 1.5"),
        (["--method", "srt"], "--method srt needs reflect output"),
        (["--method", "superfilter"], "--method superfilter needs --proxy-model"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, tiny_model_dir, args, message):
    r = run_cli("select", str(EXAMPLES), "-o", str(tmp_path / "s.jsonl"), "--model", str(tiny_model_dir), *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.jsonl").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_scores_as_one(tmp_path, tiny_model_dir):
    """torchrun --nproc_per_node 2 (gloo on CPU): both phases sharded, scored, gathered."""
    src = write_jsonl(tmp_path / "reflected.jsonl", reflected_rows(16))
    one = run_select(SelectConfig(input=str(src), output=str(tmp_path / "one" / "selected.jsonl"), model=str(tiny_model_dir),
                                  top=0.25, template="alpaca", dtype="float32", batch_tokens=512, progress=False))
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "two" / "selected.jsonl"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "reflect_tune.cli", "select", str(src), "-o", str(out), "--model", str(tiny_model_dir),
           "--top", "0.25", "--template", "alpaca", "--dtype", "float32", "--batch-tokens", "512"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "two" / "selected.jsonl.meta.json").read_text())
    assert meta["scoring"]["processes"] == 2
    two = pq.read_table(tmp_path / "two" / "selected.scores.parquet").to_pylist()
    assert [(a["id"], a["variant"]) for a in two] == [(a["id"], a["variant"]) for a in one.rows]
    worst = 0.0
    for a, b in zip(one.rows, two):
        for col in ("loss_a_given_q", "loss_a", "loss_q_given_a", "loss_q", "ifd", "rifd"):
            assert (a[col] is None) == (b[col] is None) and is_nan(a[col]) == is_nan(b[col]), (a, b)
            if not is_nan(a[col]):
                worst = max(worst, abs(a[col] - b[col]))
    assert worst <= 1e-4
    assert [(s["id"], s["variant"]) for s in one.selected] == [
        (s["id"], s["variant"]) for s in map(json.loads, out.read_text().splitlines())]


@pytest.mark.slow
def test_select_top_on_the_bundled_model(tmp_path, bundled_dir):
    """The real 135M student on a reflected file: the three outputs, and IFDs a trained model gives."""
    src = write_jsonl(tmp_path / "reflected.jsonl", reflected_rows(8))
    out = tmp_path / "selected.jsonl"
    r = run_cli("select", str(src), "-o", str(out), "--model", "bundled:smollm2-135m-instruct", "--top", "0.25")
    assert r.returncode == 0, r.stderr
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "selected.report" / "summary.json").read_text())
    scores = pq.read_table(tmp_path / "selected.scores.parquet").to_pylist()
    assert summary["template"] == "chat" and summary["selected"] == len(selected) == len(plain_srt(scores, top=0.25)) == 2
    # a trained student finds the instruction helpful: most IFDs are below 1
    ifds = [s["ifd"] for s in scores if not is_nan(s["ifd"])]
    assert sum(x < 1 for x in ifds) > len(ifds) / 2
    assert [(s["id"], s["variant"]) for s in selected] == plain_srt(scores, top=0.25)


@pytest.mark.parametrize("command", ["score", "select"])
def test_help_names_every_option_with_an_example(command):
    from typer.testing import CliRunner

    from reflect_tune.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Example" in result.output and f"reflect-tune {command}" in result.output
    options = {"score": ["--template", "--dtype", "--batch-tokens", "--max-length", "--only", "--model"],
               "select": ["--top", "--top-k", "--method", "--proxy-model", "--model"]}[command]
    assert all(option in result.output for option in options)
