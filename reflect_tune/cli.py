"""The `reflect-tune` command line. Thin: each command builds its arguments and calls a module.

Errors a user can cause (`ReflectTuneError`) print one line, `error: ...`, and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from reflect_tune import __version__
from reflect_tune.errors import ReflectTuneError

app = typer.Typer(
    name="reflect-tune",
    help="Selective Reflection-Tuning: teacher reflection, student-selected data, instruction tuning.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
    context_settings={"help_option_names": ["-h", "--help"]},
)


class InFormat(str, Enum):
    alpaca = "alpaca"
    wizardlm = "wizardlm"
    sharegpt = "sharegpt"
    messages = "messages"


class OutFormat(str, Enum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    messages = "messages"


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake into one line on stderr and exit code 2; no traceback."""
    try:
        yield
    except ReflectTuneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"reflect-tune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_version_callback, is_eager=True)
    ] = False,
) -> None:
    """[bold]reflect-tune[/bold]: turn raw instruction data into a better small model.

    Stages: [cyan]reflect[/cyan] (a teacher rewrites pairs), [cyan]select[/cyan] (the student scores and
    keeps the best), [cyan]train[/cyan] (instruction tuning, optional logit distillation).
    Data tools: [cyan]inspect[/cyan], [cyan]convert[/cyan].
    """
    import logging

    # Our own progress notes (e.g. a one-time model conversion) go to stderr, never stdout,
    # so `--json` output stays machine-readable.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("reflect_tune")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _warn(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"warning: {line}", err=True)


@app.command()
def inspect(
    file: Annotated[str, typer.Argument(help="A .json, .jsonl, .parquet file, a save_to_disk folder, or a hub dataset name.")],
    format: Annotated[Optional[InFormat], typer.Option("--format", "-f", help="Record shape; detected when omitted.")] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Also count tokens with this model's tokenizer (e.g. bundled:smollm2-135m-instruct).")
    ] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a tokenizer that needs the model repository's own code.")] = False,
) -> None:
    """Show the detected format, record count, empty and duplicate counts, and length statistics.

    [bold]Example[/bold]: reflect-tune inspect examples/alpaca_small.jsonl --model bundled:smollm2-135m-instruct
    """
    from reflect_tune.data import inspect_records

    with user_errors():
        info = inspect_records(
            file, format=format.value if format else None, model=model, split=split, trust_remote_code=trust_remote_code
        )
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False))
        return
    _print_inspect(info)


def _print_inspect(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{info['file']}[/bold]: format [cyan]{info['format']}[/cyan] in {info['container']}, "
        f"{info['records']} records ({info['with_input']} with input, {info['with_system']} with a system prompt)",
        soft_wrap=True,
    )
    console.print(
        f"empty instructions: {info['empty_instruction']}, empty outputs: {info['empty_output']}, "
        f"duplicate ids: {info['duplicate_ids']}",
        soft_wrap=True,
    )
    for unit in ("chars", "tokens"):
        if unit not in info:
            continue
        table = Table(title=f"length in {unit}" + (f" ({info['tokenizer']})" if unit == "tokens" else ""))
        table.add_column("field")
        for stat in ("min", "mean", "p50", "p95", "max"):
            table.add_column(stat, justify="right")
        for field_name, stats in info[unit].items():
            if not stats["count"]:
                continue
            table.add_row(field_name, *(f"{stats[s]:.1f}" if s == "mean" else str(stats[s]) for s in ("min", "mean", "p50", "p95", "max")))
        console.print(table)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Input data, in any supported shape and container.")],
    dst: Annotated[Path, typer.Argument(help="Output file: .jsonl, .json or .parquet.")],
    to: Annotated[OutFormat, typer.Option("--to", "-t", help="Record shape to write.")] = OutFormat.alpaca,
    format: Annotated[Optional[InFormat], typer.Option("--format", "-f", help="Input record shape; detected when omitted.")] = None,
    dedupe: Annotated[bool, typer.Option("--dedupe", help="Drop records whose id was already seen (counted), instead of failing.")] = False,
    drop_empty: Annotated[bool, typer.Option("--drop-empty", help="Drop records with an empty instruction or output (counted).")] = False,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
) -> None:
    """Convert instruction data between shapes and containers; every record keeps a stable id.

    [bold]Example[/bold]: reflect-tune convert data/alpaca.json data/train.parquet --to messages
    """
    from reflect_tune.artifacts import provenance, write_meta
    from reflect_tune.data import load_records, write_records

    with user_errors():
        records, report = load_records(
            src,
            format=format.value if format else None,
            on_duplicate="drop" if dedupe else "error",
            on_empty="drop" if drop_empty else "keep",
            split=split,
        )
        _warn(report.warnings())
        config = {"src": src, "dst": str(dst), "to": to.value, "format": report.format, "dedupe": dedupe,
                  "drop_empty": drop_empty, "split": split}
        # fingerprint the input before writing: the output may replace it
        meta = provenance("convert", config, inputs=[src] if Path(src).exists() else [])
        meta["report"] = report.__dict__
        write_records(records, dst, to=to.value)
        write_meta(dst, meta)
    typer.echo(f"wrote {len(records)} records ({report.format} -> {to.value}) to {dst}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
