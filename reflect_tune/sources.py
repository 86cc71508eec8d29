"""Sources: the rows of instruction data in any container, each with where it came from.

`iter_raw(path)` yields (location, row) pairs from `.jsonl`, `.json` (a list, one object, or
JSON Lines by mistake), `.parquet`, a `datasets.save_to_disk` folder, or a hub dataset name.
A location is `LINE` for text files and `row N` for tables, so every error upstream can name
FILE:LINE. Integers of any size survive (`loads`). What the rows mean is records.py's business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from reflect_tune.artifacts import special_kind
from reflect_tune.errors import DataError

CONTAINERS = (".jsonl", ".json", ".parquet")


def detect_format(row: Any) -> str | None:
    """The shape of one raw record, or None if it is none of the four."""
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca" if "input" in row else "wizardlm"
    return None


class _LongInt(str):
    """A JSON integer literal too long for Python's int parser (over 4,300 digits), kept as its digits."""


def _parse_int(digits: str) -> int | str:
    return int(digits) if len(digits) <= 4000 else _LongInt(digits)


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def loads(text: str) -> Any:
    """`json.loads` that never fails on a huge integer literal (anywhere in a record, even an ignored field)."""
    return _DECODER.decode(text)


def _kind(value: Any) -> str:
    if isinstance(value, _LongInt):
        return "int"
    return "null" if value is None else type(value).__name__


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4]:
        raise DataError(f"{path}: not UTF-8 (looks like UTF-16); save it as UTF-8")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
    if not raw.strip():
        raise DataError(f"{path}: empty file (no records)")
    # Undecodable bytes become lone surrogates, so the record and field holding them can be
    # named later, instead of failing here with only a byte offset.
    return raw.decode("utf-8", errors="surrogateescape")


def _json_error(path: Path, line: int, e: json.JSONDecodeError) -> DataError:
    msg = e.msg.removesuffix(" at")  # e.g. "Invalid control character at"
    return DataError(f"{path}:{line}: bad JSON at column {e.colno}: {msg}")


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    # split on "\n" only: str.splitlines() would also split on U+2028 and friends, which JSON
    # strings may contain raw
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(path, n, e) from None
        except RecursionError:
            raise DataError(f"{path}:{n}: bad JSON: nested too deeply") from None
        yield str(n), row


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Walk a JSON list element by element, so each record knows the line it starts on."""
    decoder = _DECODER
    counted = [0, 1]  # (position, line there): lines are counted forward once, not from 0 each time

    def line_of(pos: int) -> int:
        if pos < counted[0]:
            counted[:] = [0, 1]
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, msg: str) -> DataError:
        return DataError(f"{path}:{line_of(i)}: bad JSON: {msg}")

    i = skip_ws(0)
    if text[i] != "[":
        raise fail(i, f"expected a list of records, found {text[i]!r}")
    i = skip_ws(i + 1)
    closed = i < len(text) and text[i] == "]"
    i += closed
    while not closed:
        i = skip_ws(i)
        try:
            obj, i_end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise _json_error(path, e.lineno, e) from None
        except RecursionError:
            raise fail(i, "nested too deeply") from None
        yield str(line_of(i)), obj
        i = skip_ws(i_end)
        if i >= len(text):
            raise fail(i, "the list is not closed with ']'")
        if text[i] not in ",]":
            raise fail(i, "expected ',' or ']' after a record")
        closed = text[i] == "]"
        i += 1
    i = skip_ws(i)
    if i < len(text):
        raise fail(i, "extra data after the list")


def _json_object_file(path: Path, text: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    """A `.json` that starts with `{`: usually JSON Lines under the wrong name, else one object."""
    try:
        whole = loads(text)
    except (json.JSONDecodeError, RecursionError):
        return "jsonl", _iter_jsonl(path, text)
    if detect_format(whole) is None:
        keys = sorted(whole)[:8]
        raise DataError(f"{path}:1: a JSON object with keys {keys}, not a list of records or JSON Lines")
    return "json", iter([("1", whole)])


def _iter_table_rows(rows: Iterator[dict]) -> Iterator[tuple[str, Any]]:
    for n, row in enumerate(rows, start=1):
        yield f"row {n}", row


def _iter_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file: {str(e).splitlines()[0]}") from None
    done = 0
    batches = pf.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{path}:row {done + 1}: cannot read Parquet data: {str(e).splitlines()[0]}") from None
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            raise _parquet_utf8_error(path, batch, done) from None
        yield from rows
        done += len(rows)


def _parquet_utf8_error(path: Path, batch, done: int) -> DataError:
    """Find the row and column holding bytes that are not UTF-8 (only on the error path)."""
    for name in batch.schema.names:
        column = batch.column(name)
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError:
                return DataError(f"{path}:row {done + i + 1}: field '{name}': not valid UTF-8")
    return DataError(f"{path}:row {done + 1}: not valid UTF-8")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _load_datasets_object(path: str, split: str | None, from_disk: bool):
    import datasets

    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # keep our output clean (`inspect --json`)
    try:
        if from_disk:
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as e:
        kind = "saved dataset folder" if from_disk else "hub dataset"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot load as a {kind}: {msg}") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if split is None:
            if len(splits) == 1:
                split = splits[0]
            elif "train" in splits:
                split = "train"
            else:
                raise DataError(f"{path}: several splits {splits}; choose one with --split")
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; available: {splits}")
        ds = ds[split]
    return ds


def iter_raw(path: str | os.PathLike, split: str | None = None) -> tuple[str, Iterator[tuple[str, Any]]]:
    """Open any supported container. Returns (container, iterator of (location, raw row))."""
    p = Path(path)
    kind = special_kind(p)
    if kind:  # never opened: reading a FIFO would block, /dev/zero would never end
        raise DataError(f"{p}: {kind}, not a data file")
    if p.is_symlink() and not p.exists():
        raise DataError(f"{p}: a symlink to {os.readlink(p)}, which does not exist")
    if p.is_dir():
        if _is_saved_dataset(p):
            ds = _load_datasets_object(str(p), split, from_disk=True)
            return "saved_dataset", _iter_table_rows(iter(ds))
        raise DataError(f"{p}: a folder, but not one written by datasets.save_to_disk; give a data file")
    if p.is_file():
        if split is not None:
            raise DataError(f"{p}: --split applies only to dataset folders and hub datasets")
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            return "parquet", _iter_table_rows(_iter_parquet(p))
        if suffix == ".jsonl":
            return "jsonl", _iter_jsonl(p, _read_text(p))
        if suffix == ".json":
            text = _read_text(p)
            if text.lstrip().startswith("{"):
                return _json_object_file(p, text)
            return "json", _iter_json_array(p, text)
        raise DataError(
            f"{p}: unsupported file type {suffix or '(none)'!r}; use .json, .jsonl, .parquet "
            "or a datasets.save_to_disk folder"
        )
    looks_like_path = str(path).startswith((".", "/", "~")) or Path(str(path)).suffix.lower() in (*CONTAINERS, ".gz")
    if looks_like_path:
        raise DataError(f"{path}: no such file or folder")
    ds = _load_datasets_object(str(path), split or "train", from_disk=False)
    return "hub", _iter_table_rows(iter(ds))
