"""Multi-turn data: the `--turns first|last|each` policy, record by record, and its counts everywhere.

Fixtures: a messages file (system prompt, a conversation ending in a user turn, a top-level system
prompt, tool calls and a developer turn, an assistant greeting, an integer id, a record without id)
and a sharegpt file (a JSON list: system prompt, three exchanges, a dangling user turn, function
calls). The expected instruction and output texts are written out by hand from the rule in
docs/FORMATS.md ("Multi-turn conversations"): earlier turns become `User: ` / `Assistant: ` /
`Tool: ` lines, then `User: ` and the user turn being answered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_jsonl

from fakes.openai_server import FakeOpenAI
from reflect_tune.errors import DataError, ReflectTuneError
from reflect_tune.pipeline import load_pipeline, plan
from reflect_tune.records import load_candidates, load_records

KEY = "sk-turns-0123456789abcdef"


def cid(system: str, instruction: str, input: str, output: str) -> str:
    """The content id, as docs/FORMATS.md defines it."""
    return hashlib.sha256(json.dumps([system, instruction, input, output], ensure_ascii=False).encode()).hexdigest()[:16]


TUTOR = "You are a patient maths tutor."
MESSAGES = [
    {"id": "chat-1", "messages": [
        {"role": "system", "content": TUTOR},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And times "}, {"type": "text", "text": "3?"}]},
        {"role": "assistant", "content": "12."},
        {"role": "user", "content": "Thanks!"}]},  # ends in a user turn: nothing answers it
    {"id": "chat-2", "system": "Be terse.", "messages": [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [  # no id; a tool call, its result, an answer to no user turn, a developer turn
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function"}]},
        {"role": "tool", "content": "cloudy, 4°C"},
        {"role": "assistant", "content": "Cloudy and 4°C."},
        {"role": "developer", "content": "Answer in French from now on."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "Pluie."}]},
    {"id": 7, "messages": [  # an assistant greeting first
        {"role": "assistant", "content": "Hi! Ask me anything."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Of Italy?"},
        {"role": "assistant", "content": "Rome."}]},
]
FRENCH = "Answer in French from now on."
OSLO = cid(FRENCH, "And tomorrow?", "", "Pluie.")  # the id of the first pair, under every policy
OSLO_CONTEXT = "User: Weather in Oslo?\nTool: cloudy, 4°C\nAssistant: Cloudy and 4°C.\nUser: And tomorrow?"
ITALY_CONTEXT = "Assistant: Hi! Ask me anything.\nUser: Capital of France?\nAssistant: Paris.\nUser: Of Italy?"
TIMES_CONTEXT = "User: What is 2+2?\nAssistant: 4.\nUser: And times 3?"

# (id, instruction, output, system, line) per record, for each policy
EXPECTED_MESSAGES = {
    "first": [
        ("chat-1", "What is 2+2?", "4.", TUTOR, 1),
        ("chat-2", "Name a colour.", "Blue.", "Be terse.", 2),
        (OSLO, "And tomorrow?", "Pluie.", FRENCH, 3),
        ("7", "Capital of France?", "Paris.", "", 4),
    ],
    "last": [
        ("chat-1", TIMES_CONTEXT, "12.", TUTOR, 1),
        ("chat-2", "Name a colour.", "Blue.", "Be terse.", 2),
        (OSLO, OSLO_CONTEXT, "Pluie.", FRENCH, 3),
        ("7", ITALY_CONTEXT, "Rome.", "", 4),
    ],
    "each": [
        ("chat-1#t1", "What is 2+2?", "4.", TUTOR, 1),
        ("chat-1#t2", TIMES_CONTEXT, "12.", TUTOR, 1),
        ("chat-2", "Name a colour.", "Blue.", "Be terse.", 2),
        (OSLO, OSLO_CONTEXT, "Pluie.", FRENCH, 3),
        ("7#t1", "Assistant: Hi! Ask me anything.\nUser: Capital of France?", "Paris.", "", 4),
        ("7#t2", ITALY_CONTEXT, "Rome.", "", 4),
    ],
}
# (records with several exchanges, pairs, context turns, dropped turns)
COUNTS_MESSAGES = {"first": (3, 4, 0, 3 + 4 + 3), "last": (3, 4, 2 + 3 + 3, 1 + 1 + 0), "each": (3, 6, 2 + 3 + 4, 2)}

BAKER = "You are a friendly baker."
SHAREGPT = [
    {"id": "sg-1", "conversations": [
        {"from": "system", "value": BAKER},
        {"from": "human", "value": "How do I start a sourdough starter?"},
        {"from": "gpt", "value": "Mix flour and water."},
        {"from": "human", "value": "How often do I feed it?"},
        {"from": "gpt", "value": "Once a day."},
        {"from": "human", "value": "And if I go on holiday?"},
        {"from": "gpt", "value": "Keep it in the fridge."}]},
    {"id": "sg-2", "system": "Answer with one word.", "conversations": [
        {"from": "human", "value": "Translate 'cat' to German."},
        {"from": "gpt", "value": "Katze."},
        {"from": "human", "value": "Plural?"}]},
    {"id": "sg-3", "conversations": [
        {"from": "human", "value": "Search the weather"},
        {"from": "function_call", "value": "{\"q\": \"weather\"}"},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
        {"from": "human", "value": "Thanks, and humidity?"},
        {"from": "gpt", "value": "40%."}]},
]
HOLIDAY = ("User: How do I start a sourdough starter?\nAssistant: Mix flour and water.\nUser: How often do I feed it?\n"
           "Assistant: Once a day.\nUser: And if I go on holiday?")
HUMIDITY = "User: Search the weather\nTool: {\"q\": \"weather\"}\nTool: sunny\nAssistant: It is sunny.\nUser: Thanks, and humidity?"
EXPECTED_SHAREGPT = {
    "first": [
        ("sg-1", "How do I start a sourdough starter?", "Mix flour and water.", BAKER, 2),
        ("sg-2", "Translate 'cat' to German.", "Katze.", "Answer with one word.", 3),
        ("sg-3", "Thanks, and humidity?", "40%.", "", 4),
    ],
    "last": [
        ("sg-1", HOLIDAY, "Keep it in the fridge.", BAKER, 2),
        ("sg-2", "Translate 'cat' to German.", "Katze.", "Answer with one word.", 3),
        ("sg-3", HUMIDITY, "40%.", "", 4),
    ],
    "each": [
        ("sg-1#t1", "How do I start a sourdough starter?", "Mix flour and water.", BAKER, 2),
        ("sg-1#t2", "User: How do I start a sourdough starter?\nAssistant: Mix flour and water.\nUser: How often do I feed it?",
         "Once a day.", BAKER, 2),
        ("sg-1#t3", HOLIDAY, "Keep it in the fridge.", BAKER, 2),
        ("sg-2", "Translate 'cat' to German.", "Katze.", "Answer with one word.", 3),
        ("sg-3", HUMIDITY, "40%.", "", 4),
    ],
}
COUNTS_SHAREGPT = {"first": (3, 3, 0, 4 + 1 + 4), "last": (3, 3, 4 + 0 + 4, 1), "each": (3, 5, 2 + 4 + 0 + 4, 1)}


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    msgs = write_jsonl(tmp_path / "m.jsonl", MESSAGES)
    share = tmp_path / "s.json"  # a JSON list, one record per line: record i starts on line i + 2
    share.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in SHAREGPT) + "\n]\n", encoding="utf-8")
    return msgs, share


def got(records) -> list[tuple]:
    return [(r.id, r.instruction, r.output, r.system, int(r.where.rsplit(":", 1)[1])) for r in records]


# ----------------------------------------------------------------------------- the policy, record by record


@pytest.mark.parametrize("policy", ["first", "last", "each"])
def test_each_policy_record_by_record(files, policy):
    msgs, share = files
    for path, expected, counts in ((msgs, EXPECTED_MESSAGES, COUNTS_MESSAGES), (share, EXPECTED_SHAREGPT, COUNTS_SHAREGPT)):
        records, report = load_records(path, turns=policy)
        assert got(records) == expected[policy], path
        assert all(r.input == "" for r in records)
        assert (report.multi_turn, report.pairs, report.context_turns, report.turns_dropped) == counts[policy], path
        assert report.records == len({line for *_, line in expected[policy]}) and report.turns == policy
        ids = [r.id for r in records]
        assert len(set(ids)) == len(ids)
        if policy == "first":  # the first pair; the whole conversation stays in `turns` for convert
            assert records[0].turns[0] == {"role": "system", "content": records[0].system} and len(records[0].turns) >= 5
        else:  # a derived record is its pair: the earlier turns are in its instruction, not in `turns`
            assert all(r.turns is None for r in records)
    again, _ = load_records(msgs, turns=policy)
    assert got(again) == got(load_records(msgs, turns=policy)[0])  # ids are stable


def test_every_turn_is_checked_when_later_turns_are_used(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "robot", "content": "x"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    assert load_records(path)[0][0].output == "a"  # first: later turns are not read
    for policy in ("last", "each"):
        with pytest.raises(DataError, match=r"bad.jsonl:1: field 'messages\[2\].role': unknown speaker 'robot'"):
            load_records(path, turns=policy)
    with pytest.raises(DataError, match="unknown turns policy 'all'"):
        load_records(path, turns="all")


def test_the_warning_names_the_records_and_counts_the_dropped_turns(files):
    msgs, share = files
    _, report = load_records(msgs)
    assert report.warnings() == [f"{msgs}: 3 record(s) have more than one exchange (first at 1, 3, 4); --turns first "
                                 "used the first pair of each and dropped 10 other turn(s) (use --turns each or last)"]
    _, report = load_records(share, turns="each")
    assert report.warnings() == [f"{share}: 3 record(s) have more than one exchange (first at 2, 3, 4); --turns each "
                                 "made 5 pairs of 3 records, 10 turn(s) of context in all; dropped 1 turn(s) that "
                                 "answer nothing (tool calls, turns after the last answer)"]
    _, report = load_records(msgs, turns="last")
    assert report.warnings() == [f"{msgs}: 3 record(s) have more than one exchange (first at 1, 3, 4); --turns last "
                                 "used the last pair of each, 8 earlier turn(s) as context; dropped 2 turn(s) that "
                                 "answer nothing (tool calls, turns after the last answer)"]
    single = load_records(msgs, limit=1)  # limit counts pairs
    assert len(single[0]) == 1
    assert [r.id for r in load_records(msgs, turns="each", limit=2)[0]] == ["chat-1#t1", "chat-1#t2"]


# ----------------------------------------------------------------------------- inspect and convert


def test_inspect_reports_the_policy_and_its_counts(files):
    msgs, _ = files
    r = run_cli("inspect", str(msgs))
    assert r.returncode == 0, r.stderr
    assert "4 records (0 with input, 3 with a system prompt, 3 with more than one exchange)" in r.stdout
    assert r.stderr.splitlines() == [f"warning: {msgs}: 3 record(s) have more than one exchange (first at 1, 3, 4); "
                                     "--turns first used the first pair of each and dropped 10 other turn(s) "
                                     "(use --turns each or last)"]
    r = run_cli("inspect", str(msgs), "--turns", "each", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["records"], info["multi_turn"], info["turns"], info["pairs"], info["context_turns"], info["turns_dropped"]) == \
        (4, 3, "each", 6, 9, 2)
    assert info["chars"]["instruction"]["count"] == 6
    assert info["chars"]["instruction"]["max"] == len(ITALY_CONTEXT)
    assert "--turns each made 6 pairs of 4 records" in r.stderr


def test_convert_keeps_every_turn_by_default_and_makes_pairs_by_policy(files, tmp_path):
    msgs, share = files
    out = tmp_path / "whole.jsonl"
    r = run_cli("convert", str(msgs), str(out), "--to", "messages")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr  # nothing dropped: nothing to warn about
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [rows[i]["messages"] for i in (0, 2, 3)] == [MESSAGES[i]["messages"] for i in (0, 2, 3)]
    assert [row["id"] for row in rows] == ["chat-1", "chat-2", OSLO, "7"]
    r = run_cli("convert", str(share), str(out), "--to", "messages")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    roles = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "tool", "observation": "tool"}
    assert [(m["role"], m["content"]) for m in rows[0]["messages"]] == \
        [(roles[t["from"]], t["value"]) for t in SHAREGPT[0]["conversations"]]
    assert [(m["role"], m["content"]) for m in rows[1]["messages"]] == [("system", "Answer with one word.")] + \
        [(roles[t["from"]], t["value"]) for t in SHAREGPT[1]["conversations"]]
    assert [(m["role"], m["content"]) for m in rows[2]["messages"]] == \
        [(roles[t["from"]], t["value"]) for t in SHAREGPT[2]["conversations"]]
    # alpaca holds one exchange: a policy must be chosen
    r = run_cli("convert", str(msgs), str(tmp_path / "a.jsonl"), "--to", "alpaca")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {msgs}:1: a conversation of 6 turns cannot be written as alpaca, which holds one exchange; write "
        "messages or sharegpt, or choose pairs with --turns first (the first exchange), last or each")
    r = run_cli("convert", str(msgs), str(tmp_path / "a.jsonl"), "--to", "alpaca", "--turns", "each")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(x["id"], x["instruction"], x["output"], x["system"]) for x in rows] == \
        [e[:4] for e in EXPECTED_MESSAGES["each"]]
    assert "--turns each made 6 pairs of 4 records" in r.stderr
    meta = json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    assert meta["config"]["turns"] == "each" and meta["report"]["pairs"] == 6 and meta["report"]["turns_dropped"] == 2
    # an explicit --turns first: the first pair in any shape, and the dropped turns are counted
    r = run_cli("convert", str(share), str(out), "--to", "messages", "--turns", "first")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["messages"] == [{"role": "system", "content": BAKER},
                                   {"role": "user", "content": "How do I start a sourdough starter?"},
                                   {"role": "assistant", "content": "Mix flour and water."}]
    assert "--turns first used the first pair of each and dropped 9 other turn(s)" in r.stderr
    # last, as messages: the context is in the user turn
    r = run_cli("convert", str(msgs), str(out), "--to", "messages", "--turns", "last")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text().splitlines()[3])["messages"] == [
        {"role": "user", "content": ITALY_CONTEXT}, {"role": "assistant", "content": "Rome."}]
    # in place, a policy that makes pairs of conversations loses turns: refused, the file untouched
    before = msgs.read_bytes()
    r = run_cli("convert", str(msgs), str(msgs), "--to", "messages", "--turns", "each")
    assert r.returncode == 2 and "lose information (3 conversation(s) of more than one exchange become pairs" in r.stderr
    assert msgs.read_bytes() == before


# ----------------------------------------------------------------------------- the stages


def reflect(data: Path, out: Path, cache: Path, srv: FakeOpenAI, *extra: str):
    return run_cli("reflect", str(data), "-o", str(out), "--model", "fake-model", "--base-url", srv.base_url,
                   "--cache-dir", str(cache), "--no-progress", *extra, env={"OPENAI_API_KEY": KEY})


def test_reflect_takes_the_pairs_of_the_policy_and_reports_the_counts(files, tmp_path):
    msgs, _ = files
    with FakeOpenAI(api_key=KEY) as srv:
        each = reflect(msgs, tmp_path / "each.jsonl", tmp_path / "c", srv, "--turns", "each")
        first = reflect(msgs, tmp_path / "first.jsonl", tmp_path / "c", srv)
    assert each.returncode == 0 and first.returncode == 0, each.stderr + first.stderr
    rows = [json.loads(x) for x in (tmp_path / "each.jsonl").read_text().splitlines()]
    assert [(r["id"], r["original"]["instruction"], r["original"]["output"], r["original"]["system"]) for r in rows] == \
        [e[:4] for e in EXPECTED_MESSAGES["each"]]
    assert all(r["variants"]["ins"]["status"] == "ok" for r in rows)
    assert "--turns each made 6 pairs of 4 records, 9 turn(s) of context in all" in each.stderr
    report = json.loads((tmp_path / "each.jsonl.meta.json").read_text())["load_report"]
    assert (report["turns"], report["pairs"], report["context_turns"], report["turns_dropped"]) == ("each", 6, 9, 2)
    assert f"warning: {msgs}: 3 record(s) have more than one exchange (first at 1, 3, 4); --turns first used the " \
           "first pair of each and dropped 10 other turn(s) (use --turns each or last)" in first.stderr
    rows = [json.loads(x) for x in (tmp_path / "first.jsonl").read_text().splitlines()]
    assert [(r["id"], r["original"]["instruction"]) for r in rows] == [e[:2] for e in EXPECTED_MESSAGES["first"]]
    assert json.loads((tmp_path / "first.jsonl.meta.json").read_text())["load_report"]["turns_dropped"] == 10


def test_select_score_and_train_read_plain_data_by_the_policy(files, tmp_path):
    """Their load paths: load_candidates (score, select) and load_records (train) take the policy; the
    warning comes out before a model is needed (the model here does not exist)."""
    msgs, share = files
    loaded = load_candidates(share, turns="each")
    assert [(c.id, c.instruction, c.index) for c in loaded.candidates] == \
        [(e[0], e[1], i) for i, e in enumerate(EXPECTED_SHAREGPT["each"])]
    assert loaded.report.pairs == 5 and "--turns each made 5 pairs" in loaded.warnings[0]
    no_model = str(tmp_path / "no-such-model")
    for command, out in (("select", "sel.jsonl"), ("score", "s.parquet"), ("train", "out")):
        r = run_cli(command, str(msgs), "-o", str(tmp_path / out), "--model", no_model, "--turns", "last")
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert f"warning: {msgs}: 3 record(s) have more than one exchange (first at 1, 3, 4); --turns last used the " \
               "last pair of each, 8 earlier turn(s) as context" in r.stderr, (command, r.stderr)
        r = run_cli(command, str(msgs), "-o", str(tmp_path / out), "--model", no_model)
        assert "--turns first used the first pair of each and dropped 10 other turn(s)" in r.stderr, (command, r.stderr)
    # a reflect output holds pairs already: the policy is chosen when reflecting
    reflected = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "original": {"instruction": "q", "output": "a"},
                                                    "variants": {}}])
    assert load_candidates(reflected).ids == ["a"]
    with pytest.raises(DataError, match="--turns applies to plain instruction data"):
        load_candidates(reflected, turns="each")


def test_the_pipeline_key_turns(files, tmp_path):
    msgs, _ = files
    config = {"name": "t", "data": str(msgs), "reflect": {"model": "fake-model"}, "select": {"model": "m", "top_k": 2}}

    def write(c: dict, name: str) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
        return path

    plain = plan(load_pipeline(write(config, "a.yaml")))
    first = plan(load_pipeline(write({**config, "turns": "first"}, "b.yaml")))
    each = plan(load_pipeline(write({**config, "turns": "each"}, "c.yaml")))
    assert [s.config.turns for s in each] == ["each", "first"]  # reflect reads the data; select reads reflect's pairs
    assert [s.key for s in first] == [s.key for s in plain]  # the default keeps the keys of earlier runs
    assert each[0].key != plain[0].key and each[1].key != plain[1].key  # other pairs: new reflect and select
    def line_of(path: Path, key: str) -> int:  # where the key sits in the written file (1-based)
        return 1 + next(i for i, line in enumerate(path.read_text().splitlines()) if line.strip().startswith(f"{key}:"))

    bad = write({**config, "turns": "all"}, "d.yaml")
    with pytest.raises(ReflectTuneError) as err:
        load_pipeline(bad)
    assert str(err.value) == f"{bad}:{line_of(bad, 'turns')}: key 'turns': 'all' is not one of first, last, each"
    inside = write({**config, "reflect": {"model": "fake-model", "turns": "each"}}, "e.yaml")
    with pytest.raises(ReflectTuneError) as err:
        load_pipeline(inside)
    assert str(err.value) == f"{inside}:{line_of(inside, 'turns')}: reflect: setting 'turns': set by the pipeline"
