"""`reflect` against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1, offline,
with the bundled SmolLM2-135M-Instruct as the teacher, through the real openai client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "alpaca_small.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_teacher(bundled_dir, tmp_path_factory):
    """`transformers serve` with the bundled model; yields (base_url, model name); always stopped."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.fail("the `transformers` CLI is missing: install the [serve] extra (make install does)")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(exe), "serve", str(bundled_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--continuous-batching",
             # a small paged KV cache (8192 tokens, ~0.4 GB); by default it takes a share of all memory
             "--cb-block-size", "128", "--cb-num-blocks", "64"],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # bounded wait for the port to answer
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # it answers HTTP: it is up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
        yield base + "/v1", str(bundled_dir)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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
