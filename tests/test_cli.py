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


COMMANDS = ["inspect", "convert", "reflect", "score", "select", "train", "make-student", "run"]


@pytest.mark.parametrize("command", COMMANDS)
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


def _options() -> dict[str, list[tuple[str, list[str]]]]:
    """command -> [(its first long option name, every name of that option)]"""
    import typer

    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        out[name] = [(next(o for o in p.opts if o.startswith("--")), [*p.opts, *p.secondary_opts])
                     for p in command.params if p.param_type_name == "option"]
    return out


def test_one_meaning_per_flag_across_commands():
    """A short flag means the same option in every command that has it; names that meant two
    things (-c, -t, --from, --temperature) mean one."""
    meaning: dict[str, set[str]] = {}
    for command, options in _options().items():
        for long, names in options:
            for n in names:
                if not n.startswith("--"):
                    meaning.setdefault(n, set()).add(long)
    assert {flag: longs for flag, longs in meaning.items() if len(longs) > 1} == {}
    assert set(meaning) <= {"-o", "-m", "-f", "-h", "-V"}, meaning
    by_command = {c: {n for _, names in opts for n in names} for c, opts in _options().items()}
    assert "--from" in by_command["run"] and not any("--from" in names for c, names in by_command.items() if c != "run")
    assert "--temperature" in by_command["reflect"] and "--temperature" not in by_command["train"]
    assert "--kd-temperature" in by_command["train"] and "--teacher" in by_command["make-student"]
    for alias in ("--learning-rate", "--num-train-epochs", "--per-device-train-batch-size", "--gradient-accumulation-steps",
                  "--output-dir", "--save-steps", "--save-total-limit"):
        assert alias in by_command["train"], alias


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_value_placeholder(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "<bool>" not in result.output
