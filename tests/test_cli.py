"""The command line surface: version, help with examples, provenance without secrets."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from reflect_tune import __version__
from reflect_tune.artifacts import provenance, redact
from reflect_tune.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"reflect-tune {__version__}"
    assert __version__ == "0.1.0"


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"reflect-tune {command}" in result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 2  # click's usage-error code, with the help text
    assert "inspect" in result.output and "convert" in result.output


def test_inspect_table_on_success(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob!"}] * 1
                      + [{"instruction": "Count to 3", "input": "", "output": ""}])
    result = runner.invoke(app, ["inspect", str(src)])
    assert result.exit_code == 0
    assert "format alpaca in jsonl, 2 records (1 with input, 0 with a system prompt)" in result.output
    assert "empty instructions: 0, empty outputs: 1, duplicate ids: 0" in result.output
    assert "length in chars" in result.output and "instruction" in result.output


def test_provenance_drops_secrets(tmp_path, monkeypatch):
    config = {"model": "gpt-4o-mini", "api_key": "sk-secret", "nested": {"hf_token": "hf_x", "ok": 1}}
    assert redact(config) == {"model": "gpt-4o-mini", "nested": {"ok": 1}}
    monkeypatch.setattr("sys.argv", ["reflect-tune", "reflect", "--api-key", "sk-secret", "--token=abc", "--model", "m"])
    meta = provenance("reflect", config)
    text = json.dumps(meta)
    assert "sk-secret" not in text and "abc" not in text and "hf_x" not in text
    assert meta["argv"] == ["reflect-tune", "reflect", "--api-key", "***", "--token=***", "--model", "m"]
    assert meta["versions"]["reflect_tune"] == __version__


def test_convert_writes_provenance_sidecar(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "input": "", "output": "b"}])
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out.parquet"), "--to", "messages"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out.parquet.meta.json").read_text())
    assert meta["config"]["src"] == str(src) and meta["config"]["format"] == "alpaca"
    assert len(meta["inputs"][0]["sha256"]) == 64
