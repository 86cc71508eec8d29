"""What every command of the CLI shares: the one-line error handling, warnings, help texts.

(Kept apart from cli.py so the evaluation commands in cli_eval.py and cli_judge.py use the same.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import typer

from reflect_tune.errors import ReflectTuneError, clip, one_line


class TurnsPolicy(str, Enum):
    first = "first"
    last = "last"
    each = "each"


NO_PROGRESS_HELP = ("No progress: neither the bar (on a terminal) nor the plain lines printed every "
                     "REFLECT_TUNE_PROGRESS_INTERVAL seconds (default 30) elsewhere.")
TURNS_HELP = ("Multi-turn conversations: first (the first exchange; the other turns are counted and dropped), "
               "last (the last exchange, earlier turns as context in the instruction), each (one pair per exchange).")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake, or a failed write (disk full, read-only folder), into one line on
    stderr and a non-zero exit; no traceback. Secrets are scrubbed from the line."""
    import sqlite3

    try:
        yield
    except ReflectTuneError as e:
        typer.echo(f"error: {one_line(str(e))}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except OSError as e:  # the system refused: no space, read-only, permission, I/O
        where = e.filename or "a file"
        typer.echo(f"error: {one_line(f'{where}: {e.strerror or e}')}", err=True)
        raise typer.Exit(1) from None
    except sqlite3.OperationalError as e:  # the request cache: a full or read-only disk
        typer.echo(f"error: the request cache: {one_line(str(e))}", err=True)
        raise typer.Exit(1) from None


def warn(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"warning: {line}", err=True)


def json_object(text: str | None, flag: str) -> dict | None:
    """A flag's JSON object text as a dict (None when not given); anything else is one line naming the flag."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ReflectTuneError(f"{flag}: not valid JSON ({e}): {clip(text)}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "null")
        raise ReflectTuneError(f"{flag}: expected a JSON object such as '{{\"reasoning_effort\": \"low\"}}', "
                               f"got {kind}: {clip(text)}")
    return value
