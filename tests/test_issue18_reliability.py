"""Issue 18, reliability items: (2) a wrong API key is one line, (10) the Batch API summary after
`--no-wait` reruns is the whole job's, (6) `accelerate launch --num_processes N` that starts one
process says so. Commands run as child processes, against real local HTTP servers."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import one_error_line, run_cli, write_jsonl
from fakes.openai_server import FakeOpenAI

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "alpaca_small.jsonl"
ROWS = [json.loads(x) for x in EXAMPLES.read_text().splitlines()]
KEY = "wrongkey-issue18-0123456789abcdef"  # not shaped like an OpenAI key: only our scrubbing hides it


class Refusing401:
    """A server that answers with HTTP 401 and, as a careless proxy might, the key it was sent in the
    message: what reaches the terminal must still not show it. `models_ok`: GET /models answers (a
    key that may list models but not chat), so the 401s come from requests already on the wire."""

    def __init__(self, models_ok: bool = False):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _refuse(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if models_ok and self.path.endswith("/models"):
                    body, status = b'{"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}', 200
                else:
                    sent = self.headers.get("authorization", "").removeprefix("Bearer ")
                    body = json.dumps({"error": {"message": f"Incorrect API key provided: {sent}",
                                                 "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
                    status = 401
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _refuse

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def reflect(*args: str, key: str = KEY, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("reflect", *args, env={"OPENAI_API_KEY": key}, timeout=timeout)


def only_line(r: subprocess.CompletedProcess) -> str:
    """stderr is the error line and nothing else; the key is nowhere; the exit code says failure."""
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert r.stderr.splitlines() == [line], r.stderr
    assert KEY not in r.stderr + r.stdout
    return line


# ----------------------------------------------------------------------------- (2) a wrong key


@pytest.mark.slow
def test_wrong_key_is_one_line_for_reflect(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:20])
    with Refusing401() as srv:
        args = [str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "gpt-4o-mini", "--base-url", srv.base_url,
                "--cache-dir", str(tmp_path / "c")]
        line = only_line(reflect(*args, "--no-progress"))
        assert line.startswith("error: teacher credential check (GET /models) failed: HTTP 401") and "--api-key-env" in line
        for extra in (["--concurrency", "1"], ["--response-format", "auto"], ["--batch-api", "--no-wait"]):
            assert "HTTP 401" in only_line(reflect(*args, "--no-progress", *extra)), extra
        # with progress on (no terminal: plain lines), the only other line is the stage's final progress line
        r = reflect(*args)
        assert r.returncode == 2 and KEY not in r.stderr
        line = one_error_line(r.stderr)
        assert [x for x in r.stderr.splitlines() if x != line] == [x for x in r.stderr.splitlines()
                                                                    if x.startswith("reflect: ended at 0/20 records")]
    # the 401s arrive on chat requests already on the wire: each worker's error is collected, none left to asyncio
    with Refusing401(models_ok=True) as srv:
        args[args.index("--base-url") + 1] = srv.base_url
        line = only_line(reflect(*args, "--no-progress", "--concurrency", "8"))
        assert line.startswith("error: teacher request failed: HTTP 401")


@pytest.mark.slow
def test_wrong_key_is_one_line_for_judge(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"Name a colour ({i})."} for i in range(6)])
    with Refusing401() as srv:
        args = ["judge", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--data", str(data),
                "--judge", "gpt-4o-mini", "-o", str(tmp_path / "j"), "--base-url", srv.base_url, "--cache-dir",
                str(tmp_path / "c"), "--max-new-tokens", "4", "--no-progress"]
        first = run_cli(*args, env={"OPENAI_API_KEY": KEY})  # generates the answers (model loading notes), then asks
        assert first.returncode == 2 and KEY not in first.stderr and "HTTP 401" in one_error_line(first.stderr)
        again = run_cli(*args, env={"OPENAI_API_KEY": KEY})  # the answers are kept: only the judge is asked
        assert "HTTP 401" in only_line(again)


def _stage_workers(tmp_path, interrupt: bool) -> None:
    """wait_workers over one worker that fails at once and one whose cancellation fails (a cleanup
    that raises): stopped by the first error, or interrupted (Ctrl-C cancels the stage mid-wait)."""
    import asyncio

    from reflect_tune.cache import RequestCache
    from reflect_tune.teacher import FatalApiError, TeacherClient, wait_workers

    async def fails():
        if interrupt:
            await asyncio.sleep(10)
        raise FatalApiError("teacher request failed: HTTP 401")

    async def fails_when_cancelled():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    async def stage():
        cache = RequestCache(tmp_path / "c")
        client = TeacherClient(model="m", base_url=None, api_key=None, params={}, cache=cache)
        workers = [asyncio.create_task(fails()), asyncio.create_task(fails_when_cancelled())]
        try:
            if interrupt:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(wait_workers(client, workers), 0.2)
            else:
                with pytest.raises(FatalApiError):
                    await wait_workers(client, workers)
            assert all(t.done() for t in workers)  # none outlives the stage
        finally:
            cache.close()

    asyncio.run(stage())


@pytest.mark.parametrize("interrupt", [False, True], ids=["stopped", "interrupted"])
def test_no_worker_exception_is_left_for_asyncio_to_report(tmp_path, caplog, interrupt):
    import gc

    _stage_workers(tmp_path, interrupt)
    gc.collect()  # a task whose exception nobody retrieved reports it when it is collected
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_key_an_http_header_cannot_carry_is_one_line(tmp_path):
    from reflect_tune.errors import ReflectTuneError
    from reflect_tune.cache import RequestCache
    from reflect_tune.teacher import TeacherClient

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    with FakeOpenAI() as srv:
        for key, kind in (("sk-‘quoted’-0123456789", "a non-ASCII character at position 4"),
                          ("sk-pasted-0123456789\n", "a newline at position 21")):
            for extra in ([], ["--batch-api"]):
                r = reflect(str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--base-url", srv.base_url,
                            "--cache-dir", str(tmp_path / "c"), "--no-progress", *extra, key=key)
                assert r.returncode == 2 and r.stderr.splitlines() == [one_error_line(r.stderr)], r.stderr
                assert f"the environment variable OPENAI_API_KEY holds {kind}" in r.stderr
                assert key.strip() not in r.stderr
        assert srv.stats()["chat_requests"] == 0
    cache = RequestCache(tmp_path / "c2")  # the client refuses it too (judge builds one with its own key)
    with pytest.raises(ReflectTuneError, match="the API key holds a control character at position 3"):
        TeacherClient(model="m", base_url=None, api_key="sk\x01x", params={}, cache=cache)
    cache.close()


# ----------------------------------------------------------------------------- (10) the Batch API summary


def _batch_results(srv: FakeOpenAI) -> tuple[int, int, int, int]:
    """(answered, failed, prompt tokens, completion tokens) of every batch the server ran, from its own files."""
    import openai

    sdk = openai.OpenAI(api_key="k", base_url=srv.base_url)
    answered = failed = prompt = completion = 0
    for f in sdk.files.list().data:
        if f.purpose != "batch_output":
            continue
        for text in sdk.files.content(f.id).content.decode().splitlines():
            line = json.loads(text)
            response = line.get("response") or {}
            if response.get("status_code") == 200:
                answered += 1
                prompt += response["body"]["usage"]["prompt_tokens"]
                completion += response["body"]["usage"]["completion_tokens"]
            else:
                failed += 1
    return answered, failed, prompt, completion


def test_batch_api_no_wait_summary_is_the_whole_job(tmp_path):
    rows = [dict(r) for r in ROWS[:8]]
    rows[5]["instruction"] += " FAULT:500:99"  # its ins and res fail in the batch; its res_ins is skipped
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    common = [str(data), "-o", str(out), "--model", "fake-model", "--cache-dir", str(cache), "--no-progress",
              "--price-in", "1.5", "--price-out", "6"]
    with FakeOpenAI(api_key="k", batch_polls=1) as srv:
        common += ["--base-url", srv.base_url]
        # two records are cached before the job: live, 3 requests each
        warm = reflect(*common, "-o", str(tmp_path / "warm.jsonl"), "--limit", "2", key="k")
        assert warm.returncode == 0 and srv.stats()["chat_requests"] == 6, warm.stderr
        runs = []
        while not out.exists() and len(runs) < 8:
            runs.append(reflect(*common, "--batch-api", "--no-wait", "--poll-interval", "0", key="k"))
            assert runs[-1].returncode == 0, runs[-1].stderr
        assert out.exists() and len(runs) == 3  # submit round 1; collect it, submit round 2; collect round 2
        answered, failed, prompt, completion = _batch_results(srv)
        # round 1: ins and res of the 6 records not cached (2 fail); round 2: res_ins of the 5 whose ins is ok
        assert srv.stats()["batches_created"] == 2 and (answered, failed) == (15, 2)
    s = json.loads(out.with_name(out.name + ".meta.json").read_text())["summary"]
    cost = (prompt * 1.5 + completion * 6) / 1e6
    assert (s["requests_answered"], s["requests_cached"], s["requests_sent"]) == (answered, 6, answered + failed)
    assert (s["prompt_tokens"], s["completion_tokens"]) == (prompt, completion)
    assert s["cost_usd"] == pytest.approx(cost) and s["failures_by_kind"] == {"batch": failed}
    rounds = s["batch_rounds"]
    assert [r["requests"] for r in rounds] == [12, 5] and [r["failed"] for r in rounds] == [2, 0]
    assert sum(r["answered"] for r in rounds) == answered and sum(r["prompt_tokens"] for r in rounds) == prompt
    assert sum(r["cost_usd"] for r in rounds) == pytest.approx(cost)
    # the printed summary says the same
    last = runs[-1].stderr
    assert f"requests: {answered} answered, 6 from cache, {answered + failed} sent" in last
    assert f"tokens: {prompt} prompt + {completion} completion (cost ${cost:.4f};" in last
    assert f"Batch API: 2 rounds: 12 + 5 requests, ${rounds[0]['cost_usd']:.4f} + ${rounds[1]['cost_usd']:.4f}" in last
    # a rerun of the finished job pays nothing and says so: everything from the cache
    with FakeOpenAI(api_key="k") as srv:
        again = reflect(*[a if a != common[-1] else srv.base_url for a in common], "--batch-api", key="k")
    assert again.returncode == 0, again.stderr
    s = json.loads(out.with_name(out.name + ".meta.json").read_text())["summary"]
    assert (s["requests_answered"], s["requests_cached"], s["cost_usd"], s["batch_rounds"]) == (0, answered + 6, 0.0, [])


# ----------------------------------------------------------------------------- (6) accelerate launch, one process


@pytest.mark.slow
def test_accelerate_launch_of_two_processes_that_runs_one_warns(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    accelerate = Path(sys.executable).with_name("accelerate")
    score = ["-m", "reflect_tune.cli", "score", str(data), "--model", str(tiny_model_dir), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run([str(accelerate), "launch", "--num_processes", "2", *score, "-o", str(tmp_path / "a.parquet")],
                              capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr
    warning = [x for x in launched.stderr.splitlines() if x.startswith("warning: accelerate launch")]
    assert warning == ["warning: accelerate launch was asked for 2 processes, but one process runs: without two or more "
                       "GPUs, accelerate launch starts a single process unless --multi_gpu is given; for data parallelism "
                       "on CPUs use `torchrun --nproc_per_node N -m reflect_tune.cli ...` (or `accelerate launch "
                       "--multi_gpu --num_processes N`)"]
    assert json.loads((tmp_path / "a.parquet.meta.json").read_text())["scoring"]["processes"] == 1
    train = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "-m", "reflect_tune.cli", "train", str(data),
                            "-o", str(tmp_path / "t"), "--model", str(tiny_model_dir), "--full", "--batch-size", "1",
                            "--max-length", "64", "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert train.returncode == 0, train.stderr
    assert [x for x in train.stderr.splitlines() if x.startswith("warning: accelerate launch")] == warning
    plain = run_cli(*score[2:], "-o", str(tmp_path / "p.parquet"), env={"HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0 and "warning: accelerate" not in plain.stderr, plain.stderr


def test_one_process_warning_without_the_launchers_command_line():
    """Where the number cannot be read (another OS, an accelerate config file), the variables that
    accelerate's one-process launcher sets only for several processes decide; torchrun's WORLD_SIZE wins."""
    code = "from reflect_tune.score import one_process_warning as w; print(w())"
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")}

    def warning(**env) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env},
                              timeout=60, check=True).stdout.strip()

    several = dict(ACCELERATE_USE_CPU="False", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    assert warning(**several).startswith("warning: accelerate launch was asked for more than one process, but one process runs")
    assert warning(ACCELERATE_USE_CPU="False") == "None"  # accelerate launch of one process
    assert warning(**several, WORLD_SIZE="2") == "None"  # torchrun / accelerate launch --multi_gpu: several run
    assert warning(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500") == "None"  # not started by accelerate
