"""Progress in batch jobs (reflect_tune/progress.py): without a terminal every long stage prints a plain
line every REFLECT_TUNE_PROGRESS_INTERVAL seconds and a final line; on a terminal, the rich bar.

The stages run as child processes with stderr captured (not a TTY), as under Docker, CI or nohup:
reflect against the fake OpenAI server (with latency, so the run outlasts the interval), the Batch
API polling, and score on the tiny model. The line format is checked against hand-computed values.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl

from fakes.openai_server import FakeOpenAI
from reflect_tune.errors import ReflectTuneError
from reflect_tune.progress import ENV, Progress, duration, final_line, interval_from_env, progress_line, rate

KEY = "sk-progress-0123456789abcdef"


# ----------------------------------------------------------------------------- the line, by hand


def test_line_rate_and_eta_against_hand_computed_values():
    # 120 of 480 records in 2322 s: 120/2322 = 0.05168 rec/s = 3.1008 rec/min; the 360 left take
    # 360 / 0.05168 = 6966 s = 1 h 56 min 6 s
    assert progress_line("reflect", 120, 480, 2322.0, unit="records", rate_unit="rec", failed=2) == \
        "reflect: 120/480 records (25%), 3.1 rec/min, ETA 1h56m, failed 2"
    # a resumed run: 50 of the 60 steps were done before it started; 10 in 20 s = 0.5/s = 30/min;
    # the 40 left take 80 s
    assert progress_line("train", 60, 100, 20.0, unit="steps", rate_unit="steps", counted=10, note="loss 1.2345") == \
        "train: 60/100 steps (60%), 30.0 steps/min, ETA 1m20s, loss 1.2345"
    # 50 in 10 s = 5/s; 150 left: 30 s. Nothing counted yet: no ETA.
    assert progress_line("score", 50, 200, 10.0, unit="units", rate_unit="units") == \
        "score: 50/200 units (25%), 5.0 units/s, ETA 30s"
    assert progress_line("train", 7, 10, 5.0, unit="steps", rate_unit="steps", counted=0) == \
        "train: 7/10 steps (70%), 0.0 steps/h, ETA ?"
    # 480 in 9300 s (2 h 35 min): 3.0968/min
    assert final_line("reflect", 480, 480, 9300.0, unit="records", rate_unit="rec", failed=2) == \
        "reflect: done, 480/480 records in 2h35m, 3.1 rec/min, failed 2"
    assert final_line("reflect", 120, 480, 300.0, unit="records", rate_unit="rec") == \
        "reflect: ended at 120/480 records (25%) after 5m00s, 24.0 rec/min"
    assert rate(1, 7200.0, "req") == "0.5 req/h"
    assert [duration(x) for x in (0, 42.4, 59.6, 185, 3599, 3600, 90061)] == \
        ["0s", "42s", "1m00s", "3m05s", "59m59s", "1h00m", "1d01h"]


def test_interval_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    assert interval_from_env() == 30.0
    monkeypatch.setenv(ENV, "0.5")
    assert interval_from_env() == 0.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ReflectTuneError, match=f"{ENV}="):
            interval_from_env()
    # the CLI says so before any work, in one line
    r = run_cli("inspect", str(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])),
                env={ENV: "soon"})
    assert r.returncode == 2 and r.stderr.strip() == f"error: {ENV}='soon': expected the seconds between progress lines, a number >= 0"


def test_plain_lines_at_the_interval_then_a_final_line(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "0.02")
    done = threading.Event()
    bar = Progress("work", 10, unit="items", tty=False)
    bar.update(done=3, failed=1, note="x 1")
    threading.Timer(0.2, done.set).start()
    done.wait()
    bar.close()
    bar.close()  # twice is harmless
    lines = capsys.readouterr().err.splitlines()
    periodic = [x for x in lines if not x.startswith("work: ended")]
    assert len(periodic) >= 3, lines
    assert all(re.fullmatch(r"work: 3/10 items \(30%\), [\d.]+ items/(s|min), ETA \S+, failed 1, x 1", x) for x in periodic), lines
    assert re.fullmatch(r"work: ended at 3/10 items \(30%\) after 0s, [\d.]+ items/(s|min), failed 1, x 1", lines[-1]), lines
    # off: nothing at all
    Progress("quiet", 5, enabled=False, tty=False).close()
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- the stages, captured


PLAIN = re.compile(r"^(?P<label>[a-z (),A-Z-]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                   r"[\d.]+ \S+/(s|min|h), ETA [^,\s]+(?P<rest>.*)$")


def plain_lines(stderr: str, label: str) -> list[re.Match]:
    return [m for m in map(PLAIN.match, stderr.splitlines()) if m and m["label"] == label]


def test_reflect_prints_plain_progress_lines_and_a_final_line(tmp_path):
    rows = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(8)]
    rows[5]["instruction"] += " FAULT:503:99"  # ins and res fail: 2 failed variants (res_ins is skipped)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with FakeOpenAI(api_key=KEY, latency=0.15) as srv:
        r = run_cli("reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "fake-model", "--base-url",
                    srv.base_url, "--cache-dir", str(tmp_path / "c"), "--concurrency", "2", "--max-retries", "1",
                    "--backoff", "0.01", env={"OPENAI_API_KEY": KEY, ENV: "0.2"})
    assert r.returncode == 0, r.stderr
    assert "━" not in r.stderr  # no bar without a terminal
    lines = plain_lines(r.stderr, "reflect")
    assert len(lines) >= 2, r.stderr
    assert {m["total"] for m in lines} == {"8"} and {m["unit"] for m in lines} == {"records"}
    done = [int(m["done"]) for m in lines]
    assert done == sorted(done) and done[-1] <= 8 and all(int(m["pct"]) == 100 * int(m["done"]) // 8 for m in lines)
    assert [m[0] for m in lines if not re.fullmatch(r", failed [0-2], [\d.]+ req/s, \d+ tok/s", m["rest"])] == []
    final = [x for x in r.stderr.splitlines() if x.startswith("reflect: done,")]
    assert len(final) == 1 and re.fullmatch(r"reflect: done, 8/8 records in \d+s, [\d.]+ rec/(s|min), failed 2, "
                                            r"[\d.]+ req/s, \d+ tok/s", final[0]), r.stderr
    # --no-progress: neither lines nor the final line
    with FakeOpenAI(api_key=KEY, latency=0.15) as srv:
        quiet = run_cli("reflect", str(data), "-o", str(tmp_path / "o2.jsonl"), "--model", "fake-model", "--base-url",
                        srv.base_url, "--cache-dir", str(tmp_path / "c2"), "--concurrency", "2", "--max-retries", "1",
                        "--backoff", "0.01", "--no-progress", env={"OPENAI_API_KEY": KEY, ENV: "0.2"})
    assert quiet.returncode == 0, quiet.stderr
    assert not plain_lines(quiet.stderr, "reflect") and "reflect: done," not in quiet.stderr, quiet.stderr


def test_batch_api_polling_prints_progress_lines(tmp_path):
    rows = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(4)]
    rows[2]["instruction"] += " FAULT:500:99"  # both first-round requests of this record fail in the batch
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with FakeOpenAI(api_key=KEY, batch_polls=3) as srv:
        r = run_cli("reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "fake-model", "--base-url",
                    srv.base_url, "--cache-dir", str(tmp_path / "c"), "--batch-api", "--poll-interval", "0.2",
                    env={"OPENAI_API_KEY": KEY, ENV: "0.1"})
    assert r.returncode == 0, r.stderr
    lines = plain_lines(r.stderr, "reflect (Batch API)")
    assert lines and lines[0]["total"] == "8" and lines[0]["unit"] == "requests", r.stderr  # round 1: ins + res of 4
    final = [x for x in r.stderr.splitlines() if x.startswith("reflect (Batch API): done,")]
    # round 1: 8 requests, 2 failed; round 2: res_ins of the 3 records whose ins is ok
    assert len(final) == 2 and final[0].startswith("reflect (Batch API): done, 8/8 requests in ") and \
        final[0].endswith(", failed 2"), r.stderr
    assert final[1].startswith("reflect (Batch API): done, 3/3 requests in ") and final[1].endswith(", failed 0")


def test_score_prints_plain_progress_lines_and_a_final_line(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"Write sentence number {i} about the sea.", "input": "",
             "output": f"The sea is wide, says sentence {i}, and the waves are loud."} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "s.parquet"
    r = run_cli("score", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--dtype", "float32",
                "--batch-tokens", "48", env={ENV: "0.005"})
    assert r.returncode == 0, r.stderr
    units = int(re.search(r"(\d+) distinct passes of", r.stdout).group(1))
    lines = plain_lines(r.stderr, "score")
    assert lines, r.stderr
    assert {m["total"] for m in lines} == {str(units)} and {m["unit"] for m in lines} == {"units"}
    done = [int(m["done"]) for m in lines]
    assert done == sorted(done) and done[-1] <= units
    assert all(re.fullmatch(r", ([\d,]+ tok/s)?", m["rest"]) or m["rest"] == "" for m in lines), r.stderr
    final = [x for x in r.stderr.splitlines() if x.startswith("score: done,")]
    assert len(final) == 1 and re.fullmatch(rf"score: done, {units}/{units} units in \d+s, [\d.]+ units/(s|min), "
                                            r"[\d,]+ tok/s", final[0]), r.stderr
    quiet = run_cli("score", str(write_jsonl(tmp_path / "q.jsonl", rows[:2])), "-o", str(tmp_path / "q.parquet"),
                    "--model", str(tiny_model_dir),
                    "--dtype", "float32", "--batch-tokens", "48", "--no-progress", env={ENV: "0.005"})
    assert quiet.returncode == 0 and not plain_lines(quiet.stderr, "score") and "score: done" not in quiet.stderr


def test_a_terminal_gets_the_rich_bar_not_plain_lines(tmp_path):
    """stderr on a pseudo-terminal: the bar is drawn (and the plain lines are not)."""
    rows = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    master, slave = os.openpty()
    got: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            got.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    exe = Path(sys.executable).with_name("reflect-tune")
    with FakeOpenAI(api_key=KEY, latency=0.05) as srv:
        proc = subprocess.run([str(exe), "reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "fake-model",
                               "--base-url", srv.base_url, "--cache-dir", str(tmp_path / "c")],
                              stdout=subprocess.PIPE, stderr=slave, timeout=120,
                              env={**os.environ, "OPENAI_API_KEY": KEY, ENV: "0.01", "TERM": "xterm", "COLUMNS": "120"})
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(got).decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "━" in text and "3/3" in text, text
    assert "reflect: done," not in text and not re.search(r"reflect: \d+/3 records \(", text), text


def test_train_prints_plain_progress_lines_and_a_final_line(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} is said."} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = run_cli("train", str(data), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--full",
                "--batch-size", "1", "--grad-accum", "1", "--max-steps", "6", "--max-length", "64", "--lr", "1e-3",
                env={ENV: "0.005"})
    assert r.returncode == 0, r.stderr
    lines = plain_lines(r.stderr, "train")
    assert lines and {m["total"] for m in lines} == {"6"} and {m["unit"] for m in lines} == {"steps"}, r.stderr
    assert all(re.fullmatch(r"(, loss [\d.]+, [\d,]+ tok/s)?", m["rest"]) for m in lines), r.stderr
    final = [x for x in r.stderr.splitlines() if x.startswith("train: done,")]
    assert len(final) == 1 and re.fullmatch(r"train: done, 6/6 steps in \d+s, [\d.]+ steps/(s|min), loss [\d.]+, "
                                            r"[\d,]+ tok/s", final[0]), r.stderr
