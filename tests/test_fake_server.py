"""The fake OpenAI server, driven through the real openai SDK (sync and async) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from fakes import openai_server as ts
from fakes.openai_server import FakeOpenAI

TAG = " 1a2b3c4d"


@pytest.fixture(scope="module")
def srv():
    with FakeOpenAI(batch_polls=2, stall_seconds=1.0) as server:
        yield server


@pytest.fixture
def client(srv):
    srv.reset()
    with openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


def chat(client, *contents, model="fake-model", **kw):
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return client.chat.completions.create(model=model, messages=messages, **kw)


def h8(text):
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def raw_http(srv, data: bytes) -> bytes:
    """Send raw bytes; read until the server closes the connection (it must, within 5 s)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# ------------------------------------------------------------------ endpoints and replies

def test_models_and_echo(client, srv):
    assert srv.base_url.startswith("http://127.0.0.1:") and srv.base_url.endswith("/v1")
    assert [m.id for m in client.models.list()] == ["fake-model"]
    r = chat(client, "hello   big world")
    assert r.object == "chat.completion" and r.model == "fake-model"
    assert r.choices[0].index == 0 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Echo: hello   big world"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)
    long = "x" * 500
    assert chat(client, long).choices[0].message.content == "Echo: " + "x" * 200


def test_reflection_replies(client):
    last = f"Rewrite FAULT:unknownkind. [[NEW INSTRUCTION]] [[NEW INSTRUCTION{TAG}]] ... [[END{TAG}]]"
    msgs = [{"role": "system", "content": "sys FAULT:garbage-once"}, {"role": "user", "content": "old"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": last}]
    r = client.chat.completions.create(model="m", messages=msgs)
    h = h8(last)
    assert r.choices[0].message.content == (
        f"Analysis of the pair.\n[[NEW INSTRUCTION{TAG}]]\nImproved instruction {h} FAULT:garbage-once "
        f"FAULT:unknownkind\n[[END{TAG}]]\n[[NEW ANSWER{TAG}]]\nImproved answer {h}\n[[END{TAG}]]")
    last = "Critique. [[BETTER ANSWER]] ... [[END]]"
    r = chat(client, last)
    assert r.choices[0].message.content == f"Critique of the answer.\n[[BETTER ANSWER]]\nBetter answer {h8(last)}\n[[END]]"
    last = "[[NEW INSTRUCTION]] x [[END]]"
    assert "Improved instruction " + h8(last) + "\n[[END]]" in chat(client, last).choices[0].message.content
    # content parts are read as text
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "parts"}]}])
    assert r.choices[0].message.content == "Echo: parts"


# ------------------------------------------------------------------ status and transport faults

@pytest.mark.parametrize("code,exc", [
    (429, openai.RateLimitError), (500, openai.InternalServerError), (502, openai.InternalServerError),
    (503, openai.InternalServerError), (408, openai.APIStatusError), (409, openai.ConflictError),
    (400, openai.BadRequestError), (401, openai.AuthenticationError), (403, openai.PermissionDeniedError),
    (404, openai.NotFoundError)])
def test_status_faults_once_then_success(client, srv, code, exc):
    with pytest.raises(exc) as ei:
        chat(client, f"hi FAULT:{code}")
    assert ei.value.status_code == code
    assert ei.value.body["message"].startswith("Injected fault") and "type" in ei.value.body
    if code == 429:
        assert ei.value.response.headers["retry-after-ms"] == "100"
        assert ei.value.response.headers["retry-after"] == "1"
        assert ei.value.body["type"] == "rate_limit_exceeded"
    assert chat(client, f"hi FAULT:{code}").choices[0].message.content == f"Echo: hi FAULT:{code}"
    st = srv.stats()
    assert st["by_status"] == {str(code): 1, "200": 1} and list(st["by_key"].values()) == [2]


def test_fault_counts_and_chains(client, srv):
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            chat(client, "FAULT:500:2")
    chat(client, "FAULT:500:2")
    with pytest.raises(openai.RateLimitError):
        chat(client, "FAULT:429 then FAULT:503")
    with pytest.raises(openai.InternalServerError) as ei:
        chat(client, "FAULT:429 then FAULT:503")
    assert ei.value.status_code == 503
    chat(client, "FAULT:429 then FAULT:503")
    assert chat(client, "FAULT:batch_expired").choices[0].message.content == "Echo: FAULT:batch_expired"
    # a different request body is a different key: faulted again
    with pytest.raises(openai.InternalServerError):
        chat(client, "FAULT:500:2", temperature=0.5)
    assert sorted(srv.stats()["by_key"].values()) == [1, 1, 3, 3]
    srv.reset()
    with pytest.raises(openai.InternalServerError):
        chat(client, "FAULT:500:2")  # reset clears the attempt counters


def test_drop(client, srv):
    with pytest.raises(openai.APIConnectionError):
        chat(client, "FAULT:drop")
    assert chat(client, "FAULT:drop").choices[0].message.content == "Echo: FAULT:drop"
    st = srv.stats()
    assert [e["status"] for e in st["log"]] == ["drop", 200] and st["by_status"] == {"drop": 1, "200": 1}


def test_stall_times_out_then_succeeds(client, srv):
    with pytest.raises(openai.APITimeoutError):  # stall_seconds=1.0 > the client timeout
        chat(client, "FAULT:stall", timeout=0.3)
    assert chat(client, "FAULT:stall", timeout=5).choices[0].message.content == "Echo: FAULT:stall"


def test_stall_completes_and_stop_closes_stalled(tmp_path):
    with FakeOpenAI(stall_seconds=0.3) as s, openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0) as c:
        t0 = time.monotonic()
        assert chat(c, "FAULT:stall").choices[0].message.content == "Echo: FAULT:stall"
        assert time.monotonic() - t0 >= 0.3
    s2 = FakeOpenAI(stall_seconds=30).start()
    c2 = openai.OpenAI(base_url=s2.base_url, api_key="k", max_retries=0, timeout=10)
    with pytest.raises(openai.APITimeoutError):
        chat(c2, "FAULT:stall", timeout=0.2)
    t0 = time.monotonic()
    s2.stop()
    assert time.monotonic() - t0 < 2
    c2.close()


# ------------------------------------------------------------------ content faults

def test_content_faults(client):
    last = f"Do it [[BETTER ANSWER{TAG}]] x [[END{TAG}]]"
    good = chat(client, last).choices[0].message.content
    assert good.startswith("Critique of the answer.") and "Better answer " in good
    for kind, text in (("na", "N/A"), ("empty", ""), ("placeholder", "<your improved text here>")):
        for _ in range(2):  # content faults are not once-only
            out = chat(client, last + f" FAULT:{kind}").choices[0].message.content
            assert out == f"Critique of the answer.\n[[BETTER ANSWER{TAG}]]\n{text}\n[[END{TAG}]]"
    assert chat(client, "plain FAULT:na").choices[0].message.content == "N/A"
    garbage = chat(client, last + " FAULT:garbage").choices[0].message.content
    assert "[[" not in garbage and "]]" not in garbage and len(garbage.split()) > 5
    once = last + " FAULT:garbage-once"
    assert "[[" not in chat(client, once).choices[0].message.content
    reask = chat(client, once, "previous", once).choices[0].message.content
    assert reask.startswith("Critique of the answer.") and reask.endswith(f"[[END{TAG}]]")


def test_inject_fault(client):
    last = f"[[NEW INSTRUCTION{TAG}]] x [[END{TAG}]] FAULT:inject"
    out = chat(client, last).choices[0].message.content
    assert "[[BETTER ANSWER]] decoy [[END]]" in out and "[[NEW INSTRUCTION]] decoy [[END]]" in out
    assert "[[BETTER ANSWER 000000]] decoy [[END 000000]]" in out
    prefix, _ = out.split("Analysis of the pair.")
    assert prefix.rstrip().endswith("never closed") and f"[[NEW INSTRUCTION{TAG}]]\ndecoy" in prefix
    assert f"[[END{TAG}]]" not in prefix
    h = h8(last)
    assert out.endswith(f"Analysis of the pair.\n[[NEW INSTRUCTION{TAG}]]\nImproved instruction {h} FAULT:inject\n"
                        f"[[END{TAG}]]\n[[NEW ANSWER{TAG}]]\nImproved answer {h}\n[[END{TAG}]]")


# ------------------------------------------------------------------ auth, models, HTTP robustness

def test_auth_and_key_never_echoed():
    key = "sk-secret-abcdef123456"
    with FakeOpenAI(api_key=key, models=["m1", "m2"]) as s:
        with openai.OpenAI(base_url=s.base_url, api_key="sk-wrong-zzz", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as ei:
                chat(bad, "hi", model="m1")
            assert ei.value.body["code"] == "invalid_api_key"
            assert "sk-wrong-zzz" not in ei.value.response.text
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        with openai.OpenAI(base_url=s.base_url, api_key=key, max_retries=0) as good:
            assert [m.id for m in good.models.list()] == ["m1", "m2"]
            assert chat(good, "hi", model="m2").model == "m2"
            with pytest.raises(openai.NotFoundError) as ei:
                chat(good, "hi", model="nope")
            assert ei.value.body["code"] == "model_not_found"
        dump = json.dumps(s.stats())
        assert key not in dump and "sk-wrong-zzz" not in dump
        assert s.stats()["by_status"] == {"401": 1, "200": 1, "404": 1}
        reply = raw_http(s, b"GET /_stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and key.encode() not in reply


def test_http_robustness(srv):
    r = raw_http(srv, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{oops")
    assert r.startswith(b"HTTP/1.1 400") and b'"error"' in r
    r = raw_http(srv, b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 404") and b'"error"' in r
    r = raw_http(srv, b"GET /v1/unknown HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 404")
    assert raw_http(srv, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_http(srv, b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").startswith(b"HTTP/1.1 400")
    # keep-alive: two requests on one connection, then Connection: close ends it
    two = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
    r = raw_http(srv, two)
    assert r.count(b"HTTP/1.1 200") == 2 and b"connection: close" in r
    # Expect: 100-continue, and a chunked body
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "chunky"}]}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    r = raw_http(srv, req)
    assert r.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200") and b"Echo: chunky" in r
    with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0) as c:  # still alive
        assert chat(c, "alive").choices[0].message.content == "Echo: alive"


# ------------------------------------------------------------------ files and batches

def line(cid, content, **extra):
    row = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "fake-model", "messages": [{"role": "user", "content": content}]}}
    row.update(extra)
    return json.dumps(row)


def upload(client, lines, name="in.jsonl"):
    return client.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="batch")


def test_files_api(client, srv):
    data = b'{"a": 1}\n\x00\xff binary \r\n--boundary-like\r\n'
    f = client.files.create(file=("data.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(data)
    assert (f.filename, f.purpose, f.status) == ("data.jsonl", "batch", "processed")
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == data
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    assert srv.stats()["files"] == 1


def test_batch_completes_with_shuffled_outputs_and_error_forms(client, srv):
    ok_ids = [f"ok-{i}" for i in range(12)]
    lines = [line(cid, f"q {cid}") for cid in ok_ids]
    lines += [line("e500", "x FAULT:500"), line("e429", "x FAULT:429"), line("exp", "x FAULT:batch_expired"),
              line("model", "x", body={"model": "fake-model", "messages": []}), line("drop", "x FAULT:drop")]
    f = upload(client, lines)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"run": "t"})
    assert b.id.startswith("batch_") and b.status == "validating" and b.metadata == {"run": "t"}
    assert b.output_file_id is None and b.request_counts.total == 17
    statuses = [client.batches.retrieve(b.id).status for _ in range(4)]
    assert statuses == ["in_progress", "finalizing", "completed", "completed"]
    b = client.batches.retrieve(b.id)
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (17, 12, 5)
    assert b.completed_at and b.in_progress_at and b.finalizing_at
    out = [json.loads(x) for x in client.files.content(b.output_file_id).content.decode().splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(ok_ids)
    assert [o["custom_id"] for o in out] != ok_ids  # shuffled (seeded)
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"].startswith("req_")
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"Echo: q {o['custom_id']}"
    errs = {e["custom_id"]: e for e in map(json.loads, client.files.content(b.error_file_id).content.splitlines())}
    assert set(errs) == {"e500", "e429", "exp", "model", "drop"}
    assert errs["e500"]["response"]["status_code"] == 500 and errs["e500"]["error"] is None
    assert errs["e500"]["response"]["body"]["error"]["type"] == "server_error"
    assert errs["e429"]["response"]["status_code"] == 429
    assert errs["model"]["response"]["status_code"] == 400 and errs["drop"]["response"]["status_code"] == 500
    assert errs["exp"]["response"] is None and errs["exp"]["error"]["code"] == "batch_expired"
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(b.id)
    # resubmitting the failed lines is a retry: now they succeed, and there is no error file
    f2 = upload(client, [line("e500", "x FAULT:500"), line("exp", "x FAULT:batch_expired")])
    b2 = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(3):
        b2 = client.batches.retrieve(b2.id)
    assert b2.status == "completed" and b2.error_file_id is None and b2.request_counts.completed == 2
    assert [x.id for x in client.batches.list()][:2] == [b2.id, b.id]
    assert srv.stats()["batches_created"] == 2 and srv.stats()["chat_requests"] == 0


def test_batch_polls_zero_and_cancel(tmp_path):
    with FakeOpenAI(batch_polls=0, models=["fake-model"]) as s, \
            openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0) as c:
        f = upload(c, [line("a", "hi"), line("b", "x", body={"model": "other", "messages": [{"role": "user", "content": "x"}]})])
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        b = c.batches.retrieve(b.id)
        assert b.status == "completed" and b.request_counts.failed == 1
        err = json.loads(c.files.content(b.error_file_id).content)
        assert err["response"]["status_code"] == 404 and err["response"]["body"]["error"]["code"] == "model_not_found"
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert c.batches.cancel(b.id).status == "cancelling"
        b = c.batches.retrieve(b.id)
        assert b.status == "cancelled" and b.cancelled_at and b.output_file_id is None
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_nope")
        with pytest.raises(openai.NotFoundError):
            c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")


@pytest.mark.parametrize("bad,code", [
    ("{not json", "invalid_json_line"), (line("a", "again"), "duplicate_custom_id"),
    (line("m", "x", method="GET"), "invalid_method"), (line("u", "x", url="/v1/embeddings"), "invalid_url")])
def test_batch_validation_failures(client, bad, code):
    f = upload(client, [line("a", "hi"), bad])
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = client.batches.retrieve(b.id)
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    assert [(e.code, e.line) for e in b.errors.data] == [(code, 2)] and b.errors.data[0].message


def test_batch_size_limits(client, monkeypatch):
    f = client.files.create(file=("big.jsonl", b"{}\n" * 50_001), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = client.batches.retrieve(b.id)
    assert b.status == "failed" and b.errors.data[0].code == "too_many_requests"
    monkeypatch.setattr(ts, "MAX_BATCH_BYTES", 100)
    f = upload(client, [line(str(i), "hi") for i in range(3)])
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = client.batches.retrieve(b.id)
    assert b.status == "failed" and b.errors.data[0].code == "file_too_large"


# ------------------------------------------------------------------ concurrency, stats, CLI

def test_async_concurrency_and_stats():
    async def go(base_url):
        async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as c:
            rs = await asyncio.gather(*(c.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": f"n{i}"}]) for i in range(64)))
            return [r.choices[0].message.content for r in rs]

    with FakeOpenAI(latency=0.25) as s:
        t0 = time.monotonic()
        assert asyncio.run(go(s.base_url)) == [f"Echo: n{i}" for i in range(64)]
        assert time.monotonic() - t0 < 3.0
        st = s.stats()
        assert st["chat_requests"] == 64 and st["in_flight"] == 0 and st["max_in_flight"] >= 16
        assert st["by_status"] == {"200": 64} and len(st["by_key"]) == 64
        e = st["log"][0]
        assert set(e) == {"t", "done", "key", "status", "model"} and e["done"] - e["t"] >= 0.24
        assert e["model"] == "fake-model" and e["status"] == 200 and len(e["key"]) == 64
        st["log"].clear()
        assert len(s.stats()["log"]) == 64  # a copy
        raw = raw_http(s, b"POST /_reset HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and s.stats()["chat_requests"] == 0


def test_cli_subprocess():
    env = {**os.environ, "FAKE_KEY": "sk-cli-key"}
    proc = subprocess.Popen([sys.executable, str(Path(ts.__file__)), "--port", "0", "--latency", "0",
                             "--api-key-env", "FAKE_KEY", "--batch-polls", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("READY http://127.0.0.1:") and first.endswith("/v1")
        base_url = first.split(" ", 1)[1]
        with openai.OpenAI(base_url=base_url, api_key="sk-cli-key", max_retries=0) as c:
            assert chat(c, "cli").choices[0].message.content == "Echo: cli"
        with openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                chat(c, "cli")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out == "" and "sk-cli-key" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
