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


@app.command()
def reflect(
    input: Annotated[str, typer.Argument(help="Instruction data in any supported shape and container.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output JSONL, one line per input record (docs/FORMATS.md §8.1).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The teacher's model name, as the server knows it.")],
    base_url: Annotated[
        Optional[str], typer.Option("--base-url", envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1. Default: OpenAI.")
    ] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Name of the environment variable that holds the API key.")] = "OPENAI_API_KEY",
    stages: Annotated[str, typer.Option("--stages", help="Comma-separated: instruction, response (both: three calls per record).")] = "instruction,response",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Requests in flight at once.")] = 16,
    rpm: Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute, never exceeded.")] = None,
    tpm: Annotated[Optional[int], typer.Option("--tpm", min=1, help="Tokens per minute (prompt + max completion), never exceeded.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Completion token cap per request.")] = 2048,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature (the reference uses 0).")] = 0.0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N records.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count requests, tokens and cost; send nothing.")] = False,
    batch_api: Annotated[bool, typer.Option("--batch-api", help="Use the OpenAI Batch API (half price, up to 24 h).")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="With --batch-api: submit and exit; rerun to poll and collect.")] = False,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.0, help="With --batch-api: seconds between status polls.")] = 30.0,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Folder of prompt files overriding the built-in ones (see prompts/README.md).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Request cache folder. Default: $REFLECT_TUNE_CACHE/reflect.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds before one request counts as timed out.")] = 120.0,
    max_retries: Annotated[int, typer.Option("--max-retries", min=0, help="Retries per request for 408/409/429/5xx, timeouts and dropped connections.")] = 6,
    price_in: Annotated[Optional[float], typer.Option("--price-in", min=0.0, help="USD per 1M prompt tokens (overrides the built-in table).")] = None,
    price_out: Annotated[Optional[float], typer.Option("--price-out", min=0.0, help="USD per 1M completion tokens (overrides the built-in table).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="For --dry-run on a non-OpenAI model: a model spec whose tokenizer counts tokens.")] = None,
    format: Annotated[Optional[InFormat], typer.Option("--format", "-f", help="Input record shape; detected when omitted.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
) -> None:
    """A teacher LLM rewrites each pair: instruction reflection (x_ins, y_ins), response reflection (y_res), and
    response reflection of the new pair (y_res_ins). Cached per request; a rerun resumes.

    [bold]Example[/bold]: reflect-tune reflect data.jsonl -o reflected.jsonl --model gpt-4o-mini --rpm 500 --dry-run
    """
    from reflect_tune.reflect import ReflectConfig, run_reflect

    with user_errors():
        config = ReflectConfig(
            input=input, output=str(output), model=model, base_url=base_url, api_key_env=api_key_env,
            stages=tuple(s.strip() for s in stages.split(",") if s.strip()), concurrency=concurrency, rpm=rpm, tpm=tpm,
            max_tokens=max_tokens, temperature=temperature, limit=limit, dry_run=dry_run, batch_api=batch_api,
            no_wait=no_wait, poll_interval=poll_interval, prompts=str(prompts) if prompts else None,
            cache_dir=str(cache_dir) if cache_dir else None, timeout=timeout, max_retries=max_retries,
            price_in=price_in, price_out=price_out, tokenizer=tokenizer, format=format.value if format else None,
            split=split,
        )
        run_reflect(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
