"""`reflect-tune reflect` end to end, through the real openai SDK, against real local HTTP servers.

The fault-injecting server is `tests/fakes/openai_server.py`'s `FakeOpenAI` (HTTP level: 429 with
Retry-After, 5xx, stalls past the timeout, dropped connections, garbage and marker-injected
text, the Files and Batches APIs). The command runs as a child process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from conftest import run_cli, write_jsonl
from fakes.openai_server import FakeOpenAI
from reflect_tune.prices import PRICES_DATE

KEY = "sk-leakcheck-9f8e7d6c5b4a3210"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "alpaca_small.jsonl"


def reflect(*args: str, key: str | None = KEY, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {"OPENAI_API_KEY": key} if key else {"OPENAI_API_KEY": ""}
    return run_cli("reflect", *args, env=env, timeout=timeout)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def meta(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


def common(srv: FakeOpenAI, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["-o", str(out), "--model", "fake-model", "--base-url", srv.base_url, "--cache-dir", str(cache), *extra]


def test_reflect_end_to_end_then_rerun_makes_zero_calls(tmp_path):
    out, cache = tmp_path / "reflected.jsonl", tmp_path / "cache"
    with FakeOpenAI(api_key=KEY) as srv:
        first = reflect(str(EXAMPLES), *common(srv, out, cache, "--concurrency", "8"))
        assert first.returncode == 0, first.stderr
        calls = srv.stats()["chat_requests"]
        assert calls == 32 * 3  # three variants per record, each answered first time
        text, first_meta = out.read_bytes(), meta(out)
        second = reflect(str(EXAMPLES), *common(srv, out, cache))
        assert second.returncode == 0, second.stderr
        assert srv.stats()["chat_requests"] == calls  # 0 API calls on a finished job
        assert out.read_bytes() == text  # and the same output
    rows = lines(out)
    source = [json.loads(x) for x in EXAMPLES.read_text().splitlines()]
    assert len(rows) == 32 and [r["original"]["instruction"] for r in rows] == [s["instruction"] for s in source]
    for row in rows:
        assert set(row) == {"id", "original", "variants", "usage"}
        v = row["variants"]
        assert {k: v[k]["status"] for k in v} == {"ins": "ok", "res": "ok", "res_ins": "ok"}
        assert v["ins"]["instruction"].startswith("Improved instruction") and v["ins"]["input"] == ""
        assert v["ins"]["output"].startswith("Improved answer") and v["res"]["output"].startswith("Better answer")
        assert v["res_ins"]["output"].startswith("Better answer") and v["res_ins"]["output"] != v["res"]["output"]
        assert row["usage"]["requests"] == 3 and row["usage"]["prompt_tokens"] > 0
    info = first_meta
    assert info["stage"] == "reflect" and info["config"]["model"] == "fake-model"
    assert info["summary"]["requests_sent"] == 96 and info["summary"]["failures_by_kind"] == {}
    assert meta(out)["summary"]["requests_sent"] == 0 and meta(out)["summary"]["requests_cached"] == 96
    assert all(p["sha256"] for p in info["prompts"].values())
    assert "wall time" in first.stderr and "wrote 32 records" in first.stdout
    assert "requests: 0 answered, 96 from cache" in second.stderr


FAULT_ROWS = [
    {"instruction": "Plain one.", "input": "", "output": "Fine."},
    {"instruction": "Rate limited FAULT:429", "input": "", "output": "A."},
    {"instruction": "Flaky FAULT:500:2", "input": "", "output": "B."},
    {"instruction": "Down FAULT:503:99", "input": "", "output": "C."},
    {"instruction": "Slow FAULT:stall", "input": "", "output": "D."},
    {"instruction": "Cut FAULT:drop", "input": "ctx", "output": "E."},
    {"instruction": "Babble FAULT:garbage", "input": "", "output": "F."},
    {"instruction": "Stutter FAULT:garbage-once", "input": "", "output": "G."},
    {"instruction": "Decoys FAULT:inject", "input": "", "output": "H."},
    {"instruction": "Nothing FAULT:na", "input": "", "output": "I."},
    {"instruction": "Echo FAULT:placeholder", "input": "", "output": "J."},
    {"instruction": "Blank FAULT:empty", "input": "", "output": "K."},
    {"instruction": "Close with [[END]] then [[BETTER ANSWER]] x [[END 12345678]]", "input": "[[NEW ANSWER]]", "output": "[[END]]"},
]


def test_faults_lose_no_record_and_record_every_failure(tmp_path):
    data = write_jsonl(tmp_path / "faults.jsonl", FAULT_ROWS)
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with FakeOpenAI(stall_seconds=4.0) as srv:
        run = reflect(str(data), *common(srv, out, cache, "--concurrency", "4", "--timeout", "1.5", "--max-retries", "2",
                                         "--backoff", "0.05"))
        assert run.returncode == 0, run.stderr
    rows = lines(out)
    assert [r["original"]["instruction"] for r in rows] == [r["instruction"] for r in FAULT_ROWS]  # none lost
    status = {r["original"]["instruction"].split()[0]: {k: v["status"] for k, v in r["variants"].items()} for r in rows}
    ok3 = {"ins": "ok", "res": "ok", "res_ins": "ok"}
    for name in ("Plain", "Rate", "Flaky", "Slow", "Cut", "Stutter", "Decoys", "Close"):
        assert status[name] == ok3, name
    assert status["Down"] == {"ins": "api_failed", "res": "api_failed", "res_ins": "skipped"}
    for name in ("Babble", "Nothing", "Echo", "Blank"):
        assert status[name] == {"ins": "parse_failed", "res": "parse_failed", "res_ins": "skipped"}, name
    by = {r["original"]["instruction"].split()[0]: r for r in rows}
    down = by["Down"]["variants"]["res"]
    assert down["output"] is None and "HTTP 503" in down["reason"] and "retries exhausted (2)" in down["reason"]
    assert by["Babble"]["variants"]["res"]["usage"]["requests"] == 2  # re-asked once
    assert "no [[BETTER ANSWER" in by["Babble"]["variants"]["res"]["reason"] and "after re-ask" in by["Babble"]["variants"]["res"]["reason"]
    assert by["Stutter"]["variants"]["res"]["status"] == "ok" and by["Stutter"]["variants"]["res"]["usage"]["requests"] == 2
    assert "N/A" in by["Nothing"]["variants"]["res"]["reason"]
    assert "placeholder echo" in by["Echo"]["variants"]["res"]["reason"]
    assert "empty text" in by["Blank"]["variants"]["res"]["reason"]
    assert by["Babble"]["variants"]["res_ins"]["reason"] == "ins not ok"
    # decoy markers in the reply and marker strings in the data do not move the parsed text
    assert by["Decoys"]["variants"]["res"]["output"].startswith("Better answer ")
    assert "decoy" not in json.dumps(by["Decoys"]["variants"])
    assert by["Close"]["variants"]["res"]["output"].startswith("Better answer ")
    summary = meta(out)["summary"]
    assert summary["failures_by_kind"]["http_503"] == 2 and summary["failures_by_kind"]["parse_failed"] == 8
    assert {"http_429", "http_500", "timeout", "connection"} <= set(summary["retries_by_kind"])
    assert "failures: http_503 2, parse_failed 8" in run.stderr


def test_fatal_errors_stop_the_run_with_one_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", FAULT_ROWS[:1])
    out, cache = tmp_path / "o.jsonl", tmp_path / "cache"
    with FakeOpenAI(api_key="the-right-key", models=["fake-model"]) as srv:
        bad_key = reflect(str(data), *common(srv, out, cache))
        assert bad_key.returncode == 2 and not out.exists()
        last = bad_key.stderr.strip().splitlines()[-1]  # one line, after the progress bar
        assert last.startswith("error: teacher credential check (GET /models) failed: HTTP 401"), bad_key.stderr
        assert KEY not in bad_key.stderr + bad_key.stdout
        assert srv.stats()["chat_requests"] == 0  # stopped before the bulk
        wrong_model = reflect(str(data), *common(srv, out, cache)[:-6], "--model", "no-such-model", "--base-url",
                              srv.base_url, "--cache-dir", str(cache), key="the-right-key")
        assert wrong_model.returncode == 2 and "HTTP 404" in wrong_model.stderr and "check --model" in wrong_model.stderr
    with FakeOpenAI() as srv:  # a 400 on every request: a shared setting is wrong, so the run stops at once
        rows = [{"instruction": f"row {i} FAULT:400:99", "input": "", "output": "x"} for i in range(20)]
        data = write_jsonl(tmp_path / "e.jsonl", rows)
        stop = reflect(str(data), *common(srv, out, cache, "--concurrency", "1"))
        assert stop.returncode == 2 and "HTTP 400" in stop.stderr and "rerun the same command to resume" in stop.stderr
        last = stop.stderr.strip().splitlines()[-1]
        assert last.startswith("error: record ") and f"({data}:" in last and "teacher request" in last, last
        assert not out.exists()
        assert srv.stats()["chat_requests"] == 3  # FIRST_400_LIMIT answers, then nothing more


def test_input_is_validated_before_any_request(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": 3, "output": "e"}\n')
    with FakeOpenAI() as srv:
        run = reflect(str(bad), *common(srv, tmp_path / "o.jsonl", tmp_path / "c"))
        assert run.returncode == 2 and f"{bad}:3: field 'instruction'" in run.stderr
        assert srv.stats()["chat_requests"] == 0
        prompts = tmp_path / "prompts"
        prompts.mkdir()
        (prompts / "response.txt").write_text("{instruction}\n[[BETTER ANSWER]] x [[END]]")
        run = reflect(str(EXAMPLES), *common(srv, tmp_path / "o.jsonl", tmp_path / "c"), "--prompts", str(prompts))
        assert run.returncode == 2 and "response.txt: prompt lacks the placeholder {output}" in run.stderr
        run = reflect(str(EXAMPLES), *common(srv, tmp_path / "o.json", tmp_path / "c"))
        assert run.returncode == 2 and "name it *.jsonl" in run.stderr
        assert srv.stats()["chat_requests"] == 0
    # the OpenAI default needs a key: say so without touching the network
    run = reflect(str(EXAMPLES), "-o", str(tmp_path / "o.jsonl"), "--model", "gpt-4o-mini", key=None)
    assert run.returncode == 2 and "OPENAI_API_KEY is not set" in run.stderr


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_sigkill_resume_resends_at_most_the_in_flight_requests(tmp_path):
    concurrency = 4
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with FakeOpenAI(latency=0.15) as srv:
        exe = Path(sys.executable).with_name("reflect-tune")
        cmd = [str(exe), "reflect", str(EXAMPLES), *common(srv, out, cache, "--concurrency", str(concurrency))]
        child = subprocess.Popen(cmd, env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            assert _wait_for(lambda: srv.stats()["chat_requests"] >= 40), "the run did not get going"
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
        assert not out.exists()
        time.sleep(0.3)  # let the server finish the requests the dead client left behind
        before = {e["key"] for e in srv.stats()["log"]}
        srv.reset()
        again = reflect(str(EXAMPLES), *common(srv, out, cache, "--concurrency", str(concurrency)))
        assert again.returncode == 0, again.stderr
        after = {e["key"] for e in srv.stats()["log"]}
        resent = before & after
        assert len(resent) <= concurrency, f"re-sent {len(resent)} requests, more than the {concurrency} in flight"
        assert len(before | after) == 96
        # the resumed output equals an uninterrupted run's
        fresh = tmp_path / "fresh.jsonl"
        clean = reflect(str(EXAMPLES), *common(srv, fresh, tmp_path / "fresh-cache", "--concurrency", "16"))
        assert clean.returncode == 0, clean.stderr
    assert out.read_bytes() == fresh.read_bytes()


def test_batch_api_round_trip_and_rerun_collects_without_paying(tmp_path):
    rows = [{"instruction": f"Task {i}", "input": "ctx" if i % 3 == 0 else "", "output": f"Answer {i}"} for i in range(10)]
    rows[4]["instruction"] += " FAULT:500:99"
    rows[7]["instruction"] += " FAULT:batch_expired"
    rows[8]["instruction"] += " FAULT:garbage-once"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with FakeOpenAI(api_key=KEY, batch_polls=1) as srv:
        args = [str(data), *common(srv, out, cache, "--batch-api", "--poll-interval", "0")]
        # --no-wait: submit and leave; each rerun polls the same job, collects, and submits the next round
        runs = 0
        while not out.exists() and runs < 10:
            run = reflect(*args, "--no-wait")
            assert run.returncode == 0, run.stderr
            runs += 1
        # Rounds: (1) ins + res; (2) res_ins and the re-asks of Task 8's garbage; (3) Task 8's res_ins, whose
        # prompt carries the propagated fault; (4) its re-ask. Each round: one run submits, the next collects.
        assert out.exists() and runs == 5
        stats = srv.stats()
        assert stats["chat_requests"] == 0  # everything went through batches
        jobs = list((cache / "batches").iterdir())
        assert stats["batches_created"] == len(jobs) == 4  # one batch per round: nothing submitted twice
        text = out.read_bytes()
        # a rerun (waiting this time) finds everything cached or recorded: no new batch, same output
        again = reflect(*args)
        assert again.returncode == 0, again.stderr
        assert srv.stats()["batches_created"] == 4 and srv.stats()["files"] == stats["files"]
        assert out.read_bytes() == text
        state = json.loads((jobs[0] / "batches.json").read_text())
        assert {"file", "input_file_id", "batch_id", "status", "output_file_id", "error_file_id"} <= set(state[0])
        first_line = json.loads((jobs[0] / "input-000.jsonl").read_text().splitlines()[0])
        assert first_line["method"] == "POST" and first_line["url"] == "/v1/chat/completions"
        assert first_line["body"]["model"] == "fake-model" and len(first_line["custom_id"]) == 64
    got = {r["original"]["instruction"].split(" FAULT")[0]: r["variants"] for r in lines(out)}
    assert got["Task 0"]["ins"]["status"] == got["Task 0"]["res_ins"]["status"] == "ok"
    assert got["Task 4"]["res"]["status"] == "api_failed" and "HTTP 500" in got["Task 4"]["res"]["reason"]
    assert got["Task 7"]["res"]["status"] == "api_failed" and "batch_expired" in got["Task 7"]["res"]["reason"]
    assert got["Task 8"]["res"]["status"] == "ok" and got["Task 8"]["res"]["usage"]["requests"] == 2


def test_api_key_never_leaks(tmp_path):
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    data = write_jsonl(tmp_path / "d.jsonl", FAULT_ROWS[:4] + [{"instruction": "x FAULT:401", "input": "", "output": "y"}])
    texts = []
    with FakeOpenAI(api_key=KEY) as srv:
        for name, extra in (("live", ()), ("batch", ("--batch-api", "--poll-interval", "0")), ("dry", ("--dry-run",))):
            run = reflect(str(EXAMPLES), *common(srv, out, tmp_path / name, "--backoff", "0.05", *extra))
            assert run.returncode == 0, run.stderr
            texts += [run.stdout, run.stderr]
        run = reflect(str(data), *common(srv, tmp_path / "fatal.jsonl", cache, "--backoff", "0.05"),
                      "--api-key-env", "OPENAI_API_KEY")
        assert run.returncode == 2 and "HTTP 401" in run.stderr
        texts += [run.stdout, run.stderr]
        assert all(KEY not in json.dumps(e) for e in srv.stats()["log"])
    for t in texts:
        assert KEY not in t
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "requests.sqlite" for p in files) and any(p.name == "batches.json" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p


def test_dry_run_counts_requests_tokens_and_cost(tmp_path, bundled_dir):
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    run = reflect(str(EXAMPLES), "-o", str(out), "--model", "my-local-teacher", "--tokenizer", str(bundled_dir),
                  "--cache-dir", str(cache), "--dry-run", "--price-in", "1", "--price-out", "2", key=None)
    assert run.returncode == 0, run.stderr
    assert "32 records -> 96 requests to send (32 instruction, 64 response reflections; 0 already cached)" in run.stdout
    assert f"tokenizer of {bundled_dir}" in run.stdout and not out.exists()
    prompt = int(run.stdout.split("prompt tokens: ")[1].split()[0])
    completion = int(run.stdout.split("--max-tokens 2048): ")[1].split()[0])
    assert 96 * 150 < prompt < 96 * 1000 and completion >= 96 * 150
    assert f"${(prompt * 1 + completion * 2) / 1e6:.4f}" in run.stdout
    # OpenAI names: the built-in price table, which says its date; tokens by tiktoken or an estimate
    run = reflect(str(EXAMPLES), "-o", str(out), "--model", "gpt-4o-mini", "--cache-dir", str(cache), "--dry-run",
                  "--limit", "4", key=None)
    assert run.returncode == 0, run.stderr
    assert "4 records -> 12 requests" in run.stdout and f"built-in table ({PRICES_DATE}, gpt-4o-mini)" in run.stdout
    # after a real run, the dry run sees everything cached
    with FakeOpenAI() as srv:
        assert reflect(str(EXAMPLES), *common(srv, out, cache, "--limit", "5")).returncode == 0
        run = reflect(str(EXAMPLES), *common(srv, out, cache, "--limit", "5", "--dry-run"))
    assert "5 records -> 0 requests to send" in run.stdout and "15 already cached" in run.stdout


def test_stages_option_selects_variants(tmp_path):
    out, cache = tmp_path / "o.jsonl", tmp_path / "c"
    with FakeOpenAI() as srv:
        run = reflect(str(EXAMPLES), *common(srv, out, cache, "--stages", "response", "--limit", "3"))
        assert run.returncode == 0, run.stderr
        assert srv.stats()["chat_requests"] == 3
        bad = reflect(str(EXAMPLES), *common(srv, out, cache, "--stages", "answer"))
        assert bad.returncode == 2 and "--stages" in bad.stderr
    v = lines(out)[0]["variants"]
    assert v["res"]["status"] == "ok" and v["ins"]["status"] == "skipped" and v["res_ins"]["status"] == "skipped"
    assert v["ins"]["reason"] == "stage 'instruction' not requested"


def test_no_reask_records_an_unparsable_reply_at_once(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Nothing FAULT:na", "input": "", "output": "I."}])
    with FakeOpenAI() as srv:
        for flags, calls in (((), 2), (("--no-reask",), 1)):
            out = tmp_path / f"o{calls}.jsonl"
            run = reflect(str(data), *common(srv, out, tmp_path / f"c{calls}", "--stages", "response", *flags))
            assert run.returncode == 0, run.stderr
            v = lines(out)[0]["variants"]["res"]
            assert v["status"] == "parse_failed" and v["usage"]["requests"] == calls
            assert ("after re-ask" in v["reason"]) == (calls == 2)
        assert srv.stats()["chat_requests"] == 3


def test_base_url_from_environment_and_limit_checks(tmp_path):
    out, cache = tmp_path / "o.jsonl", tmp_path / "c"
    with FakeOpenAI() as srv:
        run = run_cli("reflect", str(EXAMPLES), "-o", str(out), "--model", "fake-model", "--cache-dir", str(cache),
                      "--limit", "2", "--rpm", "6000", "--tpm", "1000000",
                      env={"OPENAI_BASE_URL": srv.base_url, "OPENAI_API_KEY": ""})
        assert run.returncode == 0, run.stderr
        assert srv.stats()["chat_requests"] == 6
        small = reflect(str(EXAMPLES), *common(srv, out, cache, "--tpm", "500"))
        assert small.returncode == 2 and "--tpm 500 is below a single request's budget" in small.stderr
        assert srv.stats()["chat_requests"] == 6
        nowait = reflect(str(EXAMPLES), *common(srv, out, cache, "--no-wait"))
        assert nowait.returncode == 2 and "--no-wait only applies with --batch-api" in nowait.stderr
