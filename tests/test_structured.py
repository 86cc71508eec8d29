"""--response-format json|auto: replies as JSON objects that follow prompts/*.schema.json.

Through the CLI against the fake OpenAI server (which answers response_format json_schema with a
JSON object, and can refuse or ignore the field), and the parser on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl
from fakes.openai_server import FakeOpenAI
from reflect_tune.reflect import PROBE_FILE, json_prompt, load_prompts, parse_json

KEY = "sk-structured-0123456789abcdef"
NAMES_RES, NAMES_INS = ("BETTER ANSWER",), ("NEW INSTRUCTION", "NEW ANSWER")
ROWS = [
    {"instruction": "Name a prime number.", "input": "", "output": "7."},
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "output": "Cats nap."},
    {"instruction": "Say hi FAULT:json_invalid-once", "input": "", "output": "hi"},
    {"instruction": "Count to two FAULT:json_schema", "input": "", "output": "1 2"},
    {"instruction": "Quote the markers FAULT:inject", "input": "", "output": "[[END]]"},
]


def reflect(data: Path, out: Path, srv: FakeOpenAI, cache: Path, *extra: str):
    return run_cli("reflect", str(data), "-o", str(out), "--model", "fake-model", "--base-url", srv.base_url,
                   "--cache-dir", str(cache), "--no-progress", *extra, env={"OPENAI_API_KEY": KEY}, timeout=240)


def read(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()]


def bodies(srv: FakeOpenAI) -> list[dict]:
    return [e["body"] for e in srv.stats()["log"] if "body" in e]


# ----------------------------------------------------------------------------- the parser


PLACEHOLDERS = load_prompts().placeholders


@pytest.mark.parametrize("text, finish, expect", [
    ('{"critique": "c", "better_answer": "Seven is prime."}', "stop", "Seven is prime."),
    ('```json\n{"critique": "c", "better_answer": " Padded. "}\n```', "stop", "Padded."),
    ('{"critique": "c", "better_answer": "Use [[END 1234abcd]] literally"}', "stop", "Use [[END 1234abcd]] literally"),
    ('{"critique": "c", "better_answer": "cut', "length", "the JSON was cut (the reply hit --max-tokens)"),
    ('{"critique": "c", "better_answer": "cut', "stop", "not valid JSON"),
    ('["a list"]', "stop", "the JSON is list, not an object"),
    ('{"critique": "c"}', "stop", "the JSON lacks the field 'better_answer' (schema)"),
    ('{"critique": "c", "better_answer": 7}', "stop", "the JSON field 'better_answer' is int, not a string (schema)"),
    ('{"critique": "c", "better_answer": "N/A"}', "stop", "N/A in the field 'better_answer'"),
    ('{"critique": "c", "better_answer": "  "}', "stop", "empty text in the field 'better_answer'"),
    ('{"critique": "c", "better_answer": "(the better answer)"}', "stop", "placeholder echo in the field 'better_answer'"),
])
def test_parse_json(text, finish, expect):
    blocks, problem = parse_json(text, NAMES_RES, PLACEHOLDERS, finish)
    if blocks is not None:
        assert blocks == {"BETTER ANSWER": expect} and problem is None
    else:
        assert problem.startswith(expect)


def test_json_prompt_replaces_the_layout_paragraph_with_the_schema_fields():
    prompts = load_prompts()
    text = json_prompt(prompts, prompts.texts["instruction"], "instruction")
    assert "[[" not in text  # no marker is left for a JSON reply
    assert text.startswith(prompts.texts["instruction"].split("\n\n")[0])  # the task itself is kept
    for field in ("critique", "new_instruction", "new_answer"):
        assert f'"{field}"' in text
    assert text.index('"critique"') < text.index('"new_instruction"') < text.index('"new_answer"')


def test_a_schema_without_a_needed_field_is_refused_before_any_request(tmp_path):
    bad = {"type": "object", "properties": {"critique": {"type": "string"}}, "required": ["critique"]}
    (tmp_path / "response.schema.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match=r"response.schema.json: the schema needs a required string property 'better_answer'"):
        load_prompts(str(tmp_path))


# ----------------------------------------------------------------------------- against a server


def test_json_end_to_end_with_faults(tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out.jsonl"
    with FakeOpenAI(api_key=KEY, record_bodies=True) as srv:
        r = reflect(data, out, srv, tmp_path / "cache", "--response-format", "json")
        assert r.returncode == 0, r.stderr
        sent = bodies(srv)
    for body in sent:  # every request asks for JSON following the schema of its kind, and has no marker
        schema = body["response_format"]["json_schema"]["schema"]
        assert body["response_format"]["type"] == "json_schema" and body["response_format"]["json_schema"]["strict"]
        wants = {"new_instruction", "new_answer"} if "new_instruction" in schema["properties"] else {"better_answer"}
        assert wants <= set(schema["required"]) and "[[" not in body["messages"][-1]["content"].split("### What to do")[-1]
    rows = {r["original"]["instruction"]: r["variants"] for r in read(out)}
    plain = rows["Name a prime number."]
    assert {k: v["status"] for k, v in plain.items()} == {"ins": "ok", "res": "ok", "res_ins": "ok"}
    assert plain["ins"]["instruction"].startswith("Improved instruction") and plain["ins"]["output"].startswith("Improved answer")
    assert plain["res"]["output"].startswith("Better answer") and plain["res"]["usage"]["requests"] == 1
    # invalid JSON the first time: re-asked once, then ok
    once = rows["Say hi FAULT:json_invalid-once"]
    assert once["res"]["status"] == "ok" and once["res"]["usage"]["requests"] == 2
    # a reply that breaks the schema: parse_failed, naming the missing field, after the re-ask
    broken = rows["Count to two FAULT:json_schema"]
    assert broken["res"]["status"] == "parse_failed"
    assert "lacks the field 'better_answer'" in broken["res"]["reason"] and "after re-ask" in broken["res"]["reason"]
    # marker strings inside JSON strings are plain text: the whole string is taken
    injected = rows["Quote the markers FAULT:inject"]
    assert injected["res"]["status"] == "ok" and injected["res"]["output"].endswith("[[END ffffffff]] [[BETTER ANSWER 00000000]] decoy")
    summary = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["summary"]
    assert summary["response_format"] == "json"


def test_the_cache_key_covers_the_protocol(tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), tmp_path / "out.jsonl"
    with FakeOpenAI(api_key=KEY) as srv:
        assert reflect(data, out, srv, tmp_path / "cache").returncode == 0
        markers = srv.stats()["chat_requests"]
        r = reflect(data, out, srv, tmp_path / "cache", "--response-format", "json")
        assert r.returncode == 0, r.stderr
        assert srv.stats()["chat_requests"] == 2 * markers  # nothing served from the markers replies
        r = reflect(data, out, srv, tmp_path / "cache", "--response-format", "json")
        assert srv.stats()["chat_requests"] == 2 * markers  # the json replies are cached
    assert all(v["status"] == "ok" for row in read(out) for v in row["variants"].values())


@pytest.mark.parametrize("mode, used", [("accept", "json"), ("reject", "markers"), ("ignore", "markers")])
def test_auto_probes_once_per_server_and_model(tmp_path, mode, used):
    data, out, cache = write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), tmp_path / "out.jsonl", tmp_path / "cache"
    with FakeOpenAI(api_key=KEY, json_mode=mode, record_bodies=True) as srv:
        r = reflect(data, out, srv, cache, "--response-format", "auto")
        assert r.returncode == 0, r.stderr
        first = srv.stats()["chat_requests"]
        assert first == 1 + 6  # the probe, then three variants of two records
        assert all(v["status"] == "ok" for row in read(out) for v in row["variants"].values())
        summary = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["summary"]
        assert summary["response_format"] == used
        remembered = json.loads((cache / PROBE_FILE).read_text())
        assert remembered[f"{srv.base_url} fake-model"]["json"] is (used == "json")
        probe = bodies(srv)[0]
        assert probe["response_format"]["json_schema"]["name"] == "probe"
        r = reflect(data, out, srv, cache, "--response-format", "auto")
        assert r.returncode == 0 and srv.stats()["chat_requests"] == first  # no second probe, all cached


def test_json_against_a_server_that_refuses_it_stops_naming_the_parameter(tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), tmp_path / "out.jsonl"
    with FakeOpenAI(api_key=KEY, json_mode="reject") as srv:
        r = reflect(data, out, srv, tmp_path / "cache", "--response-format", "json")
    assert r.returncode != 0 and not out.exists()
    assert "response_format" in r.stderr and "Traceback" not in r.stderr


def test_settings_of_the_other_backend_are_refused_before_anything_runs(tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), tmp_path / "out.jsonl"
    r = run_cli("reflect", str(data), "-o", str(out), "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
                "--critique-tokens", "5", env={"OPENAI_API_KEY": KEY})
    assert r.returncode == 2 and "--critique-tokens only applies with --backend transformers" in r.stderr
    r = run_cli("reflect", str(data), "-o", str(out), "--model", "bundled:smollm2-135m-instruct", "--backend",
                "transformers", "--response-format", "json")
    assert r.returncode == 2 and "--response-format is for an HTTP teacher" in r.stderr


def test_json_needs_the_layout_as_the_last_paragraph_of_a_custom_prompt(tmp_path):
    from reflect_tune.layout import check_json_ready

    text = load_prompts().texts["response"]
    (tmp_path / "response.txt").write_text(text + "\n\nThank you!")  # the layout is no longer last
    prompts = load_prompts(str(tmp_path))  # fine for markers
    with pytest.raises(Exception, match=r"response.txt: with --response-format json the last paragraph must give the layout"):
        check_json_ready(prompts)
    check_json_ready(load_prompts())


def test_the_schema_sent_is_part_of_the_cache_key(tmp_path):
    """The same prompt text with another schema (here only additionalProperties differs, which the
    prompt does not show) is another request: not served from the first one's cache entry."""
    data, out, cache = write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), tmp_path / "out.jsonl", tmp_path / "cache"
    builtin = Path(load_prompts().sources["response.schema"])
    loose = json.loads(builtin.read_text())
    loose["additionalProperties"] = True
    custom = tmp_path / "prompts"
    custom.mkdir()
    (custom / "response.schema.json").write_text(json.dumps(loose))
    with FakeOpenAI(api_key=KEY) as srv:
        assert reflect(data, out, srv, cache, "--response-format", "json", "--stages", "response").returncode == 0
        assert srv.stats()["chat_requests"] == 1
        r = reflect(data, out, srv, cache, "--response-format", "json", "--stages", "response", "--prompts", str(custom))
        assert r.returncode == 0, r.stderr
        assert srv.stats()["chat_requests"] == 2
