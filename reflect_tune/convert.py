"""Records out: write them in any shape and container (`convert`), and describe a file (`inspect`).

Every shape keeps the id; a multi-turn conversation is written whole as messages or sharegpt, and
refused as alpaca unless a turns policy (`--turns first|last|each`, records.py) makes it pairs.
Writes are atomic. Reading is records.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import atomic_path
from reflect_tune.errors import DataError
from reflect_tune.records import CONTAINERS, WRITE_FORMATS, LoadReport, Record, load_records, loads, normalize


# ----------------------------------------------------------------------------- writing


_SHAREGPT_SPEAKER = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}


def record_to_row(rec: Record, to: str = "alpaca", *, with_system: bool | None = None,
                  first_turn: bool = False) -> dict[str, Any]:
    """A Record in one of the writable shapes. Every shape keeps the id; messages and sharegpt keep
    every turn of a multi-turn record, and alpaca refuses one unless `first_turn` says to keep only
    its first exchange."""
    with_system = bool(rec.system) if with_system is None else with_system
    if rec.turns is not None and to in ("sharegpt", "messages"):
        turns = rec.turns
        if rec.system and not any(t.get("role") in ("system", "developer") for t in turns):
            turns = [{"role": "system", "content": rec.system}, *turns]  # a top-level system prompt
        if to == "messages":
            return {"id": rec.id, "messages": [dict(t) for t in turns]}
        return {"id": rec.id, "conversations": [
            {"from": _SHAREGPT_SPEAKER.get(t.get("role"), t.get("role")), "value": t.get("content"),
             **{k: v for k, v in t.items() if k not in ("role", "content")}} for t in turns]}
    if rec.turns is not None and not first_turn:
        raise DataError(f"{rec.where or rec.id}: a conversation of {len(rec.turns)} turns cannot be written as {to}, "
                        "which holds one exchange; write messages or sharegpt, or choose pairs with --turns first "
                        "(the first exchange), last or each")
    if to == "alpaca":
        row: dict[str, Any] = {"id": rec.id, "instruction": rec.instruction, "input": rec.input, "output": rec.output}
        if with_system:
            row["system"] = rec.system
        return row
    if to == "sharegpt":
        turns = [{"from": "system", "value": rec.system}] if rec.system else []
        turns += [{"from": "human", "value": rec.instruction_text}, {"from": "gpt", "value": rec.output}]
        return {"id": rec.id, "conversations": turns}
    if to == "messages":
        msgs = [{"role": "system", "content": rec.system}] if rec.system else []
        msgs += [{"role": "user", "content": rec.instruction_text}, {"role": "assistant", "content": rec.output}]
        return {"id": rec.id, "messages": msgs}
    raise DataError(f"cannot write format {to!r}; choose one of {', '.join(WRITE_FORMATS)}")


def write_rows(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write plain dict rows as .jsonl, .json or .parquet (by suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONTAINERS:
        raise DataError(f"{path}: cannot write {suffix or '(no suffix)'!r}; use {', '.join(CONTAINERS)}")
    try:
        _write_rows(rows, path, suffix)
    except OSError as e:
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None
    return path


def _write_rows(rows: list[dict[str, Any]], path: Path, suffix: str) -> None:
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            keys = dict.fromkeys(k for row in rows for k in row)  # one schema: absent keys are null
            pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), tmp)
        elif suffix == ".json":
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_records(records: list[Record], path: str | os.PathLike, *, to: str = "alpaca",
                  first_turn: bool = False) -> Path:
    """Write records in shape `to`. A system column is written for all rows if any has one."""
    any_system = any(r.system for r in records)
    return write_rows([record_to_row(r, to, with_system=any_system, first_turn=first_turn) for r in records], path)


def conversion_loss(records: list[Record], report: LoadReport, to: str, turns: str | None = None) -> str | None:
    """What writing `records` as `to` would lose, in one line, or None when the output holds it all.

    Used before `convert` replaces its own input: every record is written in memory, read back and
    compared field by field, and fields of the source that no Record holds count as lost. `turns`:
    the policy convert was given, which makes conversations pairs (a loss when there are any).
    """
    if turns is not None and report.multi_turn:
        return f"{report.multi_turn} conversation(s) of more than one exchange become pairs by --turns {turns}"
    if report.extra_fields:
        return f"the field(s) {', '.join(report.extra_fields[:5])} of {report.path} are not written by convert"
    any_system = any(r.system for r in records)
    for rec in records:
        if rec.turns is not None and to not in ("sharegpt", "messages"):
            return f"{rec.where}: a conversation of {len(rec.turns)} turns, of which {to} holds only the first exchange"
        row = record_to_row(rec, to, with_system=any_system)
        back = normalize(loads(json.dumps(row, ensure_ascii=False)), to, rec.where)
        for name in ("id", "system", "instruction", "input", "output", "turns"):
            if getattr(back, name) != getattr(rec, name):
                return f"{rec.where}: field '{name}' does not survive as {to}"
    return None


# ----------------------------------------------------------------------------- inspecting


def _length_stats(lengths: list[int]) -> dict[str, float | int]:
    import numpy as np

    if not lengths:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    a = np.asarray(lengths)
    return {
        "count": int(a.size),
        "min": int(a.min()),
        "mean": round(float(a.mean()), 2),
        "p50": int(np.percentile(a, 50, method="lower")),
        "p95": int(np.percentile(a, 95, method="lower")),
        "max": int(a.max()),
    }


def inspect_records(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    model: str | None = None,
    split: str | None = None,
    trust_remote_code: bool = False,
    turns: str = "first",
) -> dict[str, Any]:
    """Everything `reflect-tune inspect` shows, as a JSON-ready dict.

    Lengths are per field, over the pairs the `turns` policy makes; `input` and `system` statistics
    cover only the records that have one. With `model`, token counts use that model's tokenizer (no
    special tokens). `warnings`: the load report's lines (multi-turn records, empties, duplicates).
    """
    records, report = load_records(path, format=format, on_duplicate="keep", on_empty="keep", split=split, turns=turns)
    fields = {
        "instruction": [r.instruction for r in records],
        "input": [r.input for r in records if r.input],
        "output": [r.output for r in records],
        "system": [r.system for r in records if r.system],
    }
    info: dict[str, Any] = {
        "file": str(path),
        "container": report.container,
        "format": report.format,
        "records": report.records,
        "with_input": report.with_input,
        "with_system": report.with_system,
        "multi_turn": report.multi_turn,
        "turns": report.turns,
        "pairs": report.pairs,
        "context_turns": report.context_turns,
        "turns_dropped": report.turns_dropped,
        "warnings": report.warnings(),
        "empty_instruction": report.empty_instruction,
        "empty_output": report.empty_output,
        "duplicate_ids": report.duplicate_ids,
        "chars": {name: _length_stats([len(t) for t in texts]) for name, texts in fields.items()},
    }
    if model:
        from reflect_tune.models import load_tokenizer

        tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
        info["tokenizer"] = model
        info["tokens"] = {
            name: _length_stats([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else [])
            for name, texts in fields.items()
        }
    return info
