"""The data layer: shapes x containers, normalization, ids, errors, writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl
from typer.testing import CliRunner

from reflect_tune.cli import app
from reflect_tune.convert import write_records
from reflect_tune.records import Record, content_id, load_records
from reflect_tune.errors import DataError

runner = CliRunner()

# The same three pairs in each of the four shapes.
PAIRS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red.", "system": ""},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "system": ""},
    {"instruction": "What is 2+2?", "input": "", "output": "4", "system": "Be brief."},
]


def as_shape(pair: dict, shape: str) -> dict:
    text = pair["instruction"] + ("\n" + pair["input"] if pair["input"] else "")
    if shape == "alpaca":
        row = {"instruction": pair["instruction"], "input": pair["input"], "output": pair["output"]}
        if pair["system"]:
            row["system"] = pair["system"]
        return row
    if shape == "wizardlm":
        return {"instruction": text, "output": pair["output"], **({"system": pair["system"]} if pair["system"] else {})}
    if shape == "sharegpt":
        turns = [{"from": "system", "value": pair["system"]}] if pair["system"] else []
        return {"conversations": turns + [{"from": "human", "value": text}, {"from": "gpt", "value": pair["output"]}]}
    if shape == "messages":
        msgs = [{"role": "system", "content": pair["system"]}] if pair["system"] else []
        return {"messages": msgs + [{"role": "user", "content": text}, {"role": "assistant", "content": pair["output"]}]}
    raise ValueError(shape)


def write_container(rows: list[dict], folder: Path, container: str) -> Path:
    if container in ("parquet", "saved_dataset"):  # tables need one schema: absent keys become null
        keys = dict.fromkeys(k for row in rows for k in row)
        rows = [{k: row.get(k) for k in keys} for row in rows]
    if container == "jsonl":
        return write_jsonl(folder / "data.jsonl", rows)
    if container == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return path
    if container == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if container == "saved_dataset":
        import datasets

        path = folder / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    raise ValueError(container)


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "saved_dataset"])
@pytest.mark.parametrize("shape", ["alpaca", "wizardlm", "sharegpt", "messages"])
def test_inspect_detects_every_shape_in_every_container(tmp_path, shape, container):
    path = write_container([as_shape(p, shape) for p in PAIRS], tmp_path, container)
    result = invoke("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == shape
    assert info["records"] == 3
    assert info["container"] == container
    assert info["empty_instruction"] == 0 and info["duplicate_ids"] == 0
    assert info["chars"]["output"]["max"] == len("Bonjour")


@pytest.mark.parametrize("shape", ["alpaca", "wizardlm", "sharegpt", "messages"])
def test_normalized_records_and_ids_agree_across_shapes(tmp_path, shape):
    path = write_jsonl(tmp_path / "d.jsonl", [as_shape(p, shape) for p in PAIRS])
    records, report = load_records(path)
    assert [r.instruction_text for r in records] == ["Name a primary colour.", "Translate to French.\nGood morning", "What is 2+2?"]
    assert [r.output for r in records] == ["Red.", "Bonjour", "4"]
    assert [r.system for r in records] == ["", "", "Be brief."]
    assert report.with_system == 1
    # Content ids come from the normalized content, so a pair without an input has the same id
    # in every shape (with an input, alpaca keeps it apart while chat shapes merge it).
    for r in records:
        assert r.id == content_id(r.system, r.instruction, r.input, r.output)
    alpaca = load_records(write_jsonl(tmp_path / "a.jsonl", [as_shape(p, "alpaca") for p in PAIRS]))[0]
    assert [records[i].id for i in (0, 2)] == [alpaca[i].id for i in (0, 2)]
    assert alpaca[0].id == "6f15eafa2c0d307e"  # fixed forever: ids must not change between versions


def test_content_id_is_the_same_in_every_container(tmp_path):
    ids = set()
    for container in ("jsonl", "json", "parquet", "saved_dataset"):
        folder = tmp_path / container
        folder.mkdir()
        records, _ = load_records(write_container([as_shape(p, "alpaca") for p in PAIRS], folder, container))
        ids.add(tuple(r.id for r in records))
    assert len(ids) == 1


def test_sharegpt_takes_the_first_human_gpt_pair_and_keeps_system():
    from reflect_tune.records import normalize

    row = {
        "id": 7,
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "gpt", "value": "Hello, ask me anything."},
            {"from": "human", "value": "First question"},
            {"from": "gpt", "value": "First answer"},
            {"from": "human", "value": "Follow-up"},
            {"from": "gpt", "value": "Second answer"},
        ],
    }
    rec = normalize(row, "sharegpt", "x.json:1")
    roles = ["system", "assistant", "user", "assistant", "user", "assistant"]
    whole = [{"role": r, "content": t["value"]} for r, t in zip(roles, row["conversations"])]
    assert rec == Record(id="7", instruction="First question", input="", output="First answer", system="You are terse.",
                         turns=whole)  # the pair the stages use, and every turn for convert
    assert rec.where == "x.json:1"


def test_messages_join_text_parts_and_keep_system():
    from reflect_tune.records import normalize

    row = {
        "messages": [
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hi"},
        ]
    }
    rec = normalize(row, "messages", "x.jsonl:1")
    assert (rec.system, rec.instruction, rec.output) == ("Sys", "Hello there", "Hi")


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [as_shape(p, "alpaca") for p in PAIRS])
    result = invoke("inspect", str(path), "--json", "--format", "wizardlm")
    assert json.loads(result.stdout)["format"] == "wizardlm"
    result = invoke("inspect", str(path), "--format", "sharegpt")
    assert result.exit_code == 2
    assert f"{path}:1: field 'conversations': missing" in result.output


def test_json_file_holding_json_lines_is_read(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [as_shape(p, "alpaca") for p in PAIRS])
    records, report = load_records(path)
    assert len(records) == 3 and report.container == "jsonl"


# ----------------------------------------------------------------------------- malformed input

GOOD = '{"instruction": "a", "input": "", "output": "b"}\n'

MALFORMED = [
    # (file name, bytes, expected text in the error line)
    ("bad.jsonl", (GOOD * 2 + '{"instruction": "a", "output": \n').encode(), "bad.jsonl:3: bad JSON"),
    ("bad.json", b'[\n {"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "input": ""\n  "output": "d"}\n]', "bad.json:4: bad JSON"),
    ("trailing.json", b'[\n {"instruction": "a", "input": "", "output": "b"},\n]\n', "trailing.json:3: bad JSON"),
    ("missing.jsonl", (GOOD + '{"instruction": "a", "input": ""}\n').encode(), "missing.jsonl:2: field 'output': missing"),
    ("nonstr.jsonl", (GOOD + GOOD + '{"instruction": "a", "input": "", "output": 5}\n').encode(), "nonstr.jsonl:3: field 'output': expected a string, got int"),
    ("null.json", b'[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": null, "input": "", "output": "b"}]', "null.json:2: field 'instruction': expected a string, got null"),
    ("latin1.jsonl", GOOD.encode() + b'{"instruction": "caf\xe9", "input": "", "output": "b"}\n', "latin1.jsonl:2: field 'instruction': not valid UTF-8 (byte 0xe9)"),
    ("empty.jsonl", b"\n\n", "empty.jsonl: empty file"),
    ("shape.jsonl", b'{"question": "a", "answer": "b"}\n', "shape.jsonl:1: unknown record shape with keys ['answer', 'question']"),
    ("turns.jsonl", b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}\n', "turns.jsonl:1: field 'conversations[1].from': unknown speaker 'robot'"),
    ("nopair.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "nopair.jsonl:1: field 'messages': no user turn followed by an assistant turn"),
    ("notes.txt", b"hello\n", "notes.txt: unsupported file type '.txt'"),
    ("bom.json", b"\xef\xbb\xbf \n", "bom.json: empty file"),
    ("utf16.jsonl", GOOD.encode("utf-16"), "utf16.jsonl: not UTF-8 (looks like UTF-16)"),
    ("deep.jsonl", GOOD.encode() + b"[" * 100000 + b"]" * 100000 + b"\n", "deep.jsonl:2: bad JSON: nested too deeply"),
    ("deep.json", b"[\n" + b"[" * 100000 + b"]" * 100000 + b"]", "deep.json:2: bad JSON: nested too deeply"),
    ("ctrl.jsonl", b'{"instruction": "a\x01", "input": "", "output": "b"}\n', "ctrl.jsonl:1: bad JSON at column 19: Invalid control character\n"),
    ("object.json", b'{\n  "data": [{"instruction": "a", "output": "b"}]\n}\n', "object.json:1: a JSON object with keys ['data'], not a list of records"),
    ("nullrow.jsonl", GOOD.encode() + b"null\n", "nullrow.jsonl:2: expected a JSON object, got null"),
]


@pytest.mark.parametrize("name,content,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_gives_one_line_with_file_line_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke("inspect", str(path))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert (lines[0].replace(str(tmp_path) + "/", "") + "\n").startswith("error: " + expected), lines[0]


def test_pretty_printed_single_record_json(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}, indent=2))
    records, report = load_records(path)
    assert len(records) == 1 and report.format == "alpaca"


def test_parquet_bytes_that_are_not_utf8_name_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"fine", b"caf\xe9"], pa.binary())
    output = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # skips validation
    table = pa.table({"instruction": ["a", "b"], "input": ["", ""], "output": output})
    pq.write_table(table, tmp_path / "bad.parquet")
    result = invoke("inspect", str(tmp_path / "bad.parquet"))
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path}/bad.parquet:row 2: field 'output': not valid UTF-8\n"


def test_chat_turns_after_the_first_pair_are_not_checked():
    from reflect_tune.records import normalize

    later = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, *later]}
    assert (normalize(row, "messages", "x").instruction, normalize(row, "messages", "x").output) == ("q", "a")
    # an assistant tool call answers nothing: the next plain user -> assistant pair is taken
    row = {"messages": [*later[:3], {"role": "User", "content": "q2"}, {"role": "ASSISTANT", "content": "a2"}]}
    assert normalize(row, "messages", "x").output == "a2"
    sg = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                            {"from": "function_call", "value": "{}"}, {"from": "robot", "value": None}]}
    assert normalize(sg, "sharegpt", "x").output == "a"


def test_split_only_applies_to_datasets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [as_shape(p, "alpaca") for p in PAIRS])
    result = invoke("inspect", str(path), "--split", "train")
    assert result.exit_code == 2 and "--split applies only to dataset folders and hub datasets" in result.output


def test_malformed_parquet_names_the_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]), path)
    result = invoke("inspect", str(path))
    assert result.exit_code == 2
    assert f"error: {path}:row 2: field 'output': expected a string, got null" in result.output


@pytest.mark.slow
def test_console_script_exits_2_without_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b'{"instruction": 3, "output": "x"}\n')
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {path}:2: field 'instruction': expected a string, got int\n"


def test_missing_file_and_folder_errors(tmp_path):
    result = invoke("inspect", str(tmp_path / "nope.jsonl"))
    assert result.exit_code == 2 and "nope.jsonl: no such file or folder" in result.output
    result = invoke("inspect", str(tmp_path))
    assert result.exit_code == 2 and "a folder, but not one written by datasets.save_to_disk" in result.output


def test_hub_dataset_name_fails_cleanly_offline():
    result = invoke("inspect", "someone/some-dataset-that-is-not-here")
    assert result.exit_code == 2
    assert result.output.startswith("error: someone/some-dataset-that-is-not-here: cannot load as a hub dataset")
    assert len(result.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- empties and duplicates


def test_empty_fields_are_counted_kept_or_dropped_never_silently(tmp_path):
    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "  ", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": ""},
        {"instruction": "d", "input": "", "output": "e"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    info = json.loads(invoke("inspect", str(path), "--json").stdout)
    assert (info["records"], info["empty_instruction"], info["empty_output"]) == (4, 1, 1)

    kept = invoke("convert", str(path), str(tmp_path / "kept.jsonl"))
    assert kept.exit_code == 0
    assert "1 empty instruction(s), 1 empty output(s) (kept; first at 2 (instruction), 3 (output))" in kept.output
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 4

    dropped = invoke("convert", str(path), str(tmp_path / "dropped.jsonl"), "--drop-empty")
    assert dropped.exit_code == 0 and "(dropped;" in dropped.output and "wrote 2 records" in dropped.output
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'instruction': empty"):
        load_records(path, on_empty="error")
    nothing = write_jsonl(tmp_path / "e.jsonl", rows[1:3])
    result = invoke("convert", str(nothing), str(tmp_path / "none.jsonl"), "--drop-empty")
    assert result.exit_code == 2 and "no records left after dropping 2 with empty fields" in result.output
    assert not (tmp_path / "none.jsonl").exists()


def test_duplicates_error_by_default_and_dedupe_counts(tmp_path):
    row = {"instruction": "a", "input": "", "output": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [row, {"instruction": "c", "input": "", "output": "d"}, row, row])
    result = invoke("convert", str(path), str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2 and "d.jsonl:3: field 'id': duplicate id" in result.output
    assert not (tmp_path / "out.jsonl").exists()

    result = invoke("convert", str(path), str(tmp_path / "out.jsonl"), "--dedupe")
    assert result.exit_code == 0
    assert "2 duplicate id(s) (dropped; first at 3, 4)" in result.output
    records, report = load_records(tmp_path / "out.jsonl")
    assert len(records) == 2 and report.duplicate_ids == 0
    info = json.loads(invoke("inspect", str(path), "--json").stdout)
    assert info["duplicate_ids"] == 2 and info["records"] == 4


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("to", ["alpaca", "sharegpt", "messages"])
def test_convert_round_trips_through_every_shape_and_container(tmp_path, to, suffix):
    src = write_jsonl(tmp_path / "src.jsonl", [as_shape(p, "alpaca") for p in PAIRS])
    original, _ = load_records(src)
    dst = tmp_path / f"out{suffix}"
    result = invoke("convert", str(src), str(dst), "--to", to)
    assert result.exit_code == 0, result.output
    back, report = load_records(dst)
    assert report.format == to
    assert [r.id for r in back] == [r.id for r in original]
    assert [(r.instruction_text, r.output, r.system) for r in back] == [(r.instruction_text, r.output, r.system) for r in original]
    meta = json.loads(Path(str(dst) + ".meta.json").read_text())
    assert meta["stage"] == "convert" and meta["config"]["to"] == to
    assert meta["inputs"][0]["sha256"] and meta["report"]["records"] == 3


def test_writing_is_atomic_on_failure(tmp_path):
    from reflect_tune.convert import write_rows

    dst = tmp_path / "out.jsonl"
    dst.write_text("previous\n")
    with pytest.raises(TypeError):  # the second row cannot be serialized, mid-write
        write_rows([{"a": "fine"}, {"b": {1, 2}}], dst)
    assert dst.read_text() == "previous\n"
    assert list(tmp_path.iterdir()) == [dst]  # no temporary file left behind
    with pytest.raises(DataError, match="cannot write format 'csv'"):
        write_records([Record(id="1", instruction="a", output="b")], dst, to="csv")


def test_write_failures_are_one_line_errors(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [as_shape(p, "alpaca") for p in PAIRS])
    (tmp_path / "taken.jsonl").mkdir()
    result = invoke("convert", str(src), str(tmp_path / "taken.jsonl"))
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path}/taken.jsonl: the output is a folder; give a file name\n"


def test_outputs_get_normal_file_permissions(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [as_shape(p, "alpaca") for p in PAIRS])
    old = os.umask(0o022)
    try:
        assert invoke("convert", str(src), str(tmp_path / "out.jsonl")).exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out.jsonl.meta.json").stat().st_mode & 0o777 == 0o644


def test_converting_a_file_onto_itself_records_the_input_hash(tmp_path):
    from reflect_tune.artifacts import sha256_file

    path = write_jsonl(tmp_path / "d.jsonl", [as_shape(p, "alpaca") for p in PAIRS])
    before = sha256_file(path)
    assert invoke("convert", str(path), str(path), "--to", "alpaca").exit_code == 0  # lossless: ids are added
    meta = json.loads((tmp_path / "d.jsonl.meta.json").read_text())
    assert meta["inputs"][0]["sha256"] == before != sha256_file(path)


def test_unicode_survives_a_round_trip(tmp_path):
    rec = Record(id="u", instruction="Übersetze: 你好 🌍", output="Hallo Welt — «ok»")
    for suffix in (".jsonl", ".json", ".parquet"):
        write_records([rec], tmp_path / f"u{suffix}")
        assert load_records(tmp_path / f"u{suffix}")[0] == [rec]


def test_jsonl_lines_split_only_on_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"instruction": "a\u2028b\x85c", "input": "", "output": "d"}\r\n'.encode())
    records, _ = load_records(path)
    assert records[0].instruction == "a\u2028b\x85c"


def test_examples_load():
    root = Path(__file__).resolve().parents[1] / "examples"
    records, report = load_records(root / "alpaca_small.jsonl")
    assert report.records == 32 and report.with_input == 12
    assert report.empty_instruction == report.empty_output == report.duplicate_ids == 0
