"""The `reflect-tune` command line. Thin: each command builds its arguments and calls a module.

Errors a user can cause (`ReflectTuneError`) print one line, `error: ...`, and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from reflect_tune import __version__
from reflect_tune.cli_common import NO_PROGRESS_HELP, TURNS_HELP, TurnsPolicy, json_object, user_errors, warn
from reflect_tune.cli_eval import eval_command
from reflect_tune.cli_judge import judge_command
from reflect_tune.cli_teacher_logits import teacher_logits_command
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


class ResponseFormat(str, Enum):
    markers = "markers"
    json = "json"
    auto = "auto"


class Backend(str, Enum):
    http = "http"
    transformers = "transformers"


class TokenParam(str, Enum):
    auto = "auto"
    max_tokens = "max_tokens"
    max_completion_tokens = "max_completion_tokens"


class OutFormat(str, Enum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    messages = "messages"


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
    Evaluation: [cyan]eval[/cyan] (lm-eval benchmarks), [cyan]judge[/cyan] (win rate against a baseline).
    Data tools: [cyan]inspect[/cyan], [cyan]convert[/cyan].
    """
    # Our own progress notes (e.g. a one-time model conversion) go to stderr, never stdout,
    # so `--json` output stays machine-readable.
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("reflect_tune")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    from reflect_tune.progress import interval_from_env

    with user_errors():
        interval_from_env()  # a bad REFLECT_TUNE_PROGRESS_INTERVAL fails now, not once a stage has started


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever sys.stderr is at the time (a test runner swaps it between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


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
    turns: Annotated[TurnsPolicy, typer.Option("--turns", help=TURNS_HELP)] = TurnsPolicy.first,
) -> None:
    """Show the detected format, record count, empty and duplicate counts, and length statistics.

    [bold]Example[/bold]: reflect-tune inspect examples/alpaca_small.jsonl --model bundled:smollm2-135m-instruct
    """
    from reflect_tune.convert import inspect_records

    with user_errors():
        info = inspect_records(
            file, format=format.value if format else None, model=model, split=split, trust_remote_code=trust_remote_code,
            turns=turns.value,
        )
    warn(info["warnings"])
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
        f"{info['records']} records ({info['with_input']} with input, {info['with_system']} with a system prompt"
        + (f", {info['multi_turn']} with more than one exchange" if info["multi_turn"] else "") + ")"
        + (f"; --turns {info['turns']}: {info['pairs']} pairs" if info["pairs"] != info["records"] else ""),
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
    to: Annotated[OutFormat, typer.Option("--to", help="Record shape to write.")] = OutFormat.alpaca,
    format: Annotated[Optional[InFormat], typer.Option("--format", "-f", help="Input record shape; detected when omitted.")] = None,
    dedupe: Annotated[bool, typer.Option("--dedupe", help="Drop records whose id was already seen (counted), instead of failing.")] = False,
    drop_empty: Annotated[bool, typer.Option("--drop-empty", help="Drop records with an empty instruction or output (counted).")] = False,
    turns: Annotated[Optional[TurnsPolicy], typer.Option("--turns", help="Make multi-turn conversations pairs: first, last or each (see inspect). Default: write them whole (messages, sharegpt; alpaca refuses them).")] = None,
    first_turn: Annotated[bool, typer.Option("--first-turn", hidden=True, help="The same as --turns first.")] = False,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
) -> None:
    """Convert instruction data between shapes and containers; every record keeps a stable id.

    Multi-turn conversations keep every turn as messages or sharegpt; --turns first|last|each makes
    them pairs. Replacing the input itself (`convert X X`) is refused when the new shape would lose anything.

    [bold]Example[/bold]: reflect-tune convert data/alpaca.json data/train.parquet --to messages
    """
    import dataclasses

    from reflect_tune.artifacts import check_output_file, provenance, same_path, write_meta
    from reflect_tune.convert import conversion_loss, write_records
    from reflect_tune.records import load_records

    with user_errors():
        if first_turn and turns not in (None, TurnsPolicy.first):
            raise ReflectTuneError(f"--first-turn is --turns first; it cannot go with --turns {turns.value}")
        policy = "first" if first_turn else turns.value if turns else None
        check_output_file(dst, flag="the output")
        records, report = load_records(
            src,
            format=format.value if format else None,
            on_duplicate="drop" if dedupe else "error",
            on_empty="drop" if drop_empty else "keep",
            split=split,
            turns=policy or "first",
        )
        if policy == "first":  # the first pair only, in any shape; the other turns are counted in the warning
            records = [dataclasses.replace(r, turns=None) for r in records]
        warn(report.warnings(multi_turn=policy is not None))  # without a policy every turn is written
        if Path(src).exists() and dst.exists() and same_path(src, dst):
            loss = conversion_loss(records, report, to.value, turns=policy)
            if loss:
                raise ReflectTuneError(f"{dst}: convert would replace its own input and lose information ({loss}); "
                                       "write to another file")
        elif report.extra_fields:
            warn([f"{src}: the field(s) {', '.join(report.extra_fields[:5])} are not written (convert keeps id, "
                   "system, instruction, input, output and conversation turns)"])
        config = {"src": src, "dst": str(dst), "to": to.value, "format": report.format, "dedupe": dedupe,
                  "drop_empty": drop_empty, "turns": policy, "split": split}
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
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight at once.")] = 16,
    rpm: Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute, never exceeded.")] = None,
    tpm: Annotated[Optional[int], typer.Option("--tpm", min=1, help="Tokens per minute (prompt + max completion), never exceeded.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Completion token cap per request.")] = 2048,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="The teacher's sampling temperature (the reference uses 0).")] = 0.0,
    token_param: Annotated[TokenParam, typer.Option("--token-param", help="How --max-tokens is sent: max_tokens (with temperature and top_p), or max_completion_tokens (without them: OpenAI's reasoning models o1, o3, o4-mini, gpt-5 refuse them). auto: the second for those models on the OpenAI API.")] = TokenParam.auto,
    extra_body: Annotated[Optional[str], typer.Option("--extra-body", help='A JSON object of server-specific fields added to every request, e.g. \'{"reasoning_effort": "low"}\' or vLLM\'s \'{"chat_template_kwargs": {"enable_thinking": false}}\'. Part of the cache key.')] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N records.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count requests, tokens and cost; send nothing.")] = False,
    batch_api: Annotated[bool, typer.Option("--batch-api", help="Use the OpenAI Batch API (half price, up to 24 h).")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="With --batch-api: submit and exit; rerun to poll and collect.")] = False,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.0, help="With --batch-api: seconds between status polls.")] = 30.0,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="The prompt set: paper (the default: the paper's criteria, a more complex and difficult new instruction that may move to a related but independent task, answers as detailed as possible) or conservative (keeps the task and intent), or a folder of prompt files overriding the default set's. A set name wins over a folder of that name: write ./conservative for the folder. See prompts/README.md.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Request cache folder. Default: $REFLECT_TUNE_CACHE/reflect.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds before one request counts as timed out.")] = 120.0,
    max_retries: Annotated[int, typer.Option("--max-retries", min=0, help="Retries per request for 408/409/429/5xx, timeouts and dropped connections.")] = 6,
    backoff: Annotated[float, typer.Option("--backoff", min=0.0, help="Backoff scale in seconds: retry n waits a random time up to backoff*2^n (max 60 s), unless the server sends Retry-After.")] = 1.0,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="With --batch-api: resubmit requests a batch reported as failed.")] = False,
    no_reask: Annotated[bool, typer.Option("--no-reask", help="Record an unparsable reply as parse_failed at once instead of re-asking once (weak local teachers).")] = False,
    price_in: Annotated[Optional[float], typer.Option("--price-in", min=0.0, help="USD per 1M prompt tokens (overrides the built-in table).")] = None,
    price_out: Annotated[Optional[float], typer.Option("--price-out", min=0.0, help="USD per 1M completion tokens (overrides the built-in table).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="For --dry-run on a non-OpenAI model: a model spec whose tokenizer counts tokens.")] = None,
    format: Annotated[Optional[InFormat], typer.Option("--format", "-f", help="Input record shape; detected when omitted.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
    dedupe: Annotated[bool, typer.Option("--dedupe", help="Drop records whose id was already seen (counted), instead of failing.")] = False,
    turns: Annotated[TurnsPolicy, typer.Option("--turns", help=TURNS_HELP)] = TurnsPolicy.first,
    response_format: Annotated[ResponseFormat, typer.Option("--response-format", help="How the teacher lays out its reply: markers (tagged blocks in free text), json (a JSON object following prompts/*.schema.json, asked for with response_format json_schema: OpenAI, vLLM, SGLang, llama.cpp, Ollama), or auto (json where the server accepts it: one probe, remembered per base URL and model).")] = ResponseFormat.markers,
    backend: Annotated[Backend, typer.Option("--backend", help="http: an OpenAI-compatible server. transformers: load --model (a model spec, e.g. bundled:smollm2-135m-instruct) in this process; the layout's markers are written for it, so even a small model keeps to it.")] = Backend.http,
    critique_tokens: Annotated[int, typer.Option("--critique-tokens", min=0, help="With --backend transformers: let the teacher write up to N tokens of critique before the text (0: straight to the text).")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="With --backend transformers: prompts per generate call. Default: 8 on the CPU, 64 on a GPU (halved on out-of-memory).")] = None,
    device: Annotated[str, typer.Option("--device", help="With --backend transformers: auto, cpu, cuda, cuda:1, mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="With --backend transformers: auto (bf16 on a GPU that has it, else fp32), float32, bfloat16, float16.")] = "auto",
    no_progress: Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)] = False,
) -> None:
    """A teacher LLM rewrites each pair: instruction reflection (x_ins, y_ins), response reflection (y_res), and
    response reflection of the new pair (y_res_ins). Cached per request; a rerun resumes.

    [bold]Example[/bold]: reflect-tune reflect data.jsonl -o reflected.jsonl --model gpt-4o-mini --rpm 500 --dry-run
    """
    from reflect_tune import reflect as stage
    from reflect_tune.config import ReflectConfig

    with user_errors():
        config = ReflectConfig(
            token_param=token_param.value, extra_body=json_object(extra_body, "--extra-body"),
            input=input, output=str(output), model=model, base_url=base_url, api_key_env=api_key_env,
            stages=tuple(s.strip() for s in stages.split(",") if s.strip()), concurrency=concurrency, rpm=rpm, tpm=tpm,
            max_tokens=max_tokens, temperature=temperature, limit=limit, dry_run=dry_run, batch_api=batch_api,
            no_wait=no_wait, poll_interval=poll_interval, prompts=prompts or None,
            cache_dir=str(cache_dir) if cache_dir else None, timeout=timeout, max_retries=max_retries, backoff=backoff,
            retry_failed=retry_failed, reask=not no_reask,
            price_in=price_in, price_out=price_out, tokenizer=tokenizer, format=format.value if format else None,
            split=split, dedupe=dedupe, progress=not no_progress, turns=turns.value,
            response_format=response_format.value, backend=backend.value, critique_tokens=critique_tokens,
            batch_size=batch_size, device=device, dtype=dtype,
        )
        result = stage.run(config)
    _print_reflect(result, config)


def _print_reflect(result, config) -> None:
    """The dry-run plan, or the run's summary (stderr) and the line naming the output (stdout)."""
    from rich.console import Console

    console = Console(stderr=True)
    s = result.summary
    if result.status == "planned":
        cost = "unknown (pass --price-in/--price-out)" if s["est_cost_usd"] is None else f"${s['est_cost_usd']:.4f}"
        typer.echo(f"dry run: {s['records']} records -> {s['requests']} requests to send ({s['instruction_requests']} "
                   f"instruction, {s['response_requests']} response reflections; {s['cached_requests']} already cached)\n"
                   f"  prompt tokens: {s['prompt_tokens']} ({s['token_counting']})\n"
                   f"  completion tokens (estimate, capped at --max-tokens {config.max_tokens}): {s['est_completion_tokens']}\n"
                   f"  estimated cost: {cost} [{s['price_source']}]\n"
                   f"  not included: re-asks of unusable replies (one per parse failure)"
                   + ("; the model's reasoning tokens (billed as completion tokens, often more than the answer)"
                      if s.get("token_param") == "max_completion_tokens" else ""))
        return
    if result.status == "submitted":
        typer.echo("Batch API: submitted; run the same command again to collect the results", err=True)
        return
    cost_text = "unknown" if s["cost_usd"] is None else f"${s['cost_usd']:.4f}"
    fails = ", ".join(f"{k} {v}" for k, v in sorted(s["failures_by_kind"].items())) or "none"
    console.print(
        f"[bold]reflect[/bold]: {s['records']} records -> {result.output}\n"
        f"  requests: {s['requests_answered']} answered, {s['requests_cached']} from cache, "
        f"{s['requests_sent']} sent, {s['retries']} retries\n"
        f"  failures: {fails}\n"
        f"  tokens: {s['prompt_tokens']} prompt + {s['completion_tokens']} completion"
        + (f", of which {s['reasoning_tokens']} reasoning" if s.get("reasoning_tokens") else "")
        + f" (cost {cost_text}; {s['price_source']})\n"
        + _batch_rounds_line(s)
        + f"  wall time: {s['wall_s']:.1f} s",
        soft_wrap=True, highlight=False,
    )
    for line in result.refused[:5]:
        console.print(f"  refused: {line}", soft_wrap=True, highlight=False, markup=False)
    if len(result.refused) > 5:
        console.print(f"  refused: {len(result.refused) - 5} more (see the reasons in {result.output})",
                      highlight=False, markup=False)
    typer.echo(f"wrote {s['records']} records to {result.output}")


def _batch_rounds_line(s: dict) -> str:
    """With --batch-api: the rounds of the job the summary adds up (requests and cost of each)."""
    rounds = s.get("batch_rounds") or []
    if not rounds:
        return ""
    money = lambda r: "unknown" if r["cost_usd"] is None else f"${r['cost_usd']:.4f}"  # noqa: E731
    return (f"  Batch API: {len(rounds)} round{'s' if len(rounds) != 1 else ''}: "
            + " + ".join(str(r["requests"]) for r in rounds) + " requests, "
            + " + ".join(money(r) for r in rounds) + "\n")


class ScoreTemplate(str, Enum):
    auto = "auto"
    chat = "chat"
    alpaca = "alpaca"
    vicuna = "vicuna"
    none = "none"


class ScoreDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class ScoreDirection(str, Enum):
    ifd = "ifd"
    rifd = "rifd"


class SelectMethod(str, Enum):
    srt = "srt"
    ifd = "ifd"
    rifd = "rifd"
    superfilter = "superfilter"


_TEMPLATE_HELP = "Prompt template: chat (the model's own; the default when it has one), alpaca (default otherwise), vicuna, none."
_DTYPE_HELP = "auto: bfloat16 on a GPU that supports it, float32 otherwise. bfloat16 on CPU is faster, slightly less exact."
_BATCH_HELP = "Token budget per batch (rows x longest row). Default: 4096 on CPU, 16384 on GPU."
_REVERSE_HELP = "The r-IFD 'guess the instruction' wording; must contain {answer}."

# Options that `score` and `select` share, declared once.
DtypeOpt = Annotated[ScoreDtype, typer.Option("--dtype", help=_DTYPE_HELP)]
BatchTokensOpt = Annotated[Optional[int], typer.Option("--batch-tokens", min=1, help=_BATCH_HELP)]
MaxLengthOpt = Annotated[int, typer.Option("--max-length", min=2, help="Tokens beyond this are cut from the right.")]
ReverseOpt = Annotated[Optional[str], typer.Option("--reverse", help=_REVERSE_HELP)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")]
NoResumeOpt = Annotated[bool, typer.Option("--no-resume", help="Ignore shards left by an interrupted run; start over.")]
PlainFormatOpt = Annotated[Optional[InFormat], typer.Option("--format", "-f", help="Record shape of plain data; detected when omitted.")]
TrustCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model that needs its repository's own code.")]
TurnsOpt = Annotated[TurnsPolicy, typer.Option("--turns", help=TURNS_HELP + " Plain data only.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)]
# The released code's conventions (reflect_tune/conventions.py, docs/FORMATS.md §8.2a); unset: the paper's way,
# or what --match-reference sets.
_REF = " Default: {0}; --match-reference srt: {1}."
MatchReferenceOpt = Annotated[Optional[str], typer.Option("--match-reference", help="srt or cherry: every convention as the released Reflection_Tuning / Cherry_LLM selection code has it (docs/FORMATS.md §8.2a); each flag below overrides one.", rich_help_panel="Reproducing the released code")]
InputJoinOpt = Annotated[Optional[str], typer.Option("--input-join", help="newline or labelled: how an input joins the instruction in the vicuna, none and chat prompts (labelled: '\\nInput:\\n')." + _REF.format("newline", "labelled"), rich_help_panel="Reproducing the released code")]
AloneCutOpt = Annotated[Optional[str], typer.Option("--alone-cut", help="full or matched: the answer-alone and instruction-alone passes cut at --max-length, or at --max-length minus the prompt's tokens plus 1, covering the tokens of their conditioned pass." + _REF.format("full", "matched"), rich_help_panel="Reproducing the released code")]
RifdTextOpt = Annotated[Optional[str], typer.Option("--rifd-text", help="newline or concat: r-IFD's instruction text is instruction + newline + input, or the two with no separator." + _REF.format("newline", "concat"), rich_help_panel="Reproducing the released code")]
SpanOpt = Annotated[Optional[str], typer.Option("--span", help="exact or rfind: a conditioned pass is scored from the prompt's end, or from text.rfind(target) (moves when the input repeats the instruction; text templates only)." + _REF.format("exact", "rfind"), rich_help_panel="Reproducing the released code")]
AnswerAloneOpt = Annotated[Optional[str], typer.Option("--answer-alone", help="bare or header: s(A) of the bare answer, or of the answer after '### Response:' (--match-reference cherry).", rich_help_panel="Reproducing the released code")]


@app.command()
def score(
    input: Annotated[str, typer.Argument(help="Reflect output JSONL (every ok variant is scored) or plain instruction data.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="scores.parquet: one row per (record, variant) (docs/FORMATS.md §8.2).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The student that scores: bundled name, .gguf, HF folder or hub id.")],
    template: Annotated[ScoreTemplate, typer.Option("--template", help=_TEMPLATE_HELP)] = ScoreTemplate.auto,
    dtype: DtypeOpt = ScoreDtype.auto,
    batch_tokens: BatchTokensOpt = None,
    max_length: MaxLengthOpt = 2048,
    only: Annotated[Optional[ScoreDirection], typer.Option("--only", help="Score one direction only: ifd or rifd.")] = None,
    reverse: ReverseOpt = None,
    device: DeviceOpt = "auto",
    no_resume: NoResumeOpt = False,
    format: PlainFormatOpt = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
    trust_remote_code: TrustCodeOpt = False,
    turns: TurnsOpt = TurnsPolicy.first,
    no_progress: NoProgressOpt = False,
    match_reference: MatchReferenceOpt = None,
    input_join: InputJoinOpt = None,
    alone_cut: AloneCutOpt = None,
    rifd_text: RifdTextOpt = None,
    span: SpanOpt = None,
    answer_alone: AnswerAloneOpt = None,
) -> None:
    """Score every candidate pair with the student: IFD and r-IFD (perplexity and loss ratios), batched and resumable.
    Data parallel under `accelerate launch` or `torchrun`.

    [bold]Example[/bold]: reflect-tune score reflected.jsonl -o scores.parquet --model bundled:smollm2-135m-instruct --dtype bfloat16
    """
    from reflect_tune import score as stage
    from reflect_tune.config import ScoreConfig
    from reflect_tune.templates import REVERSE_DEFAULT

    with user_errors():
        config = ScoreConfig(
            input=input, output=str(output), model=model, template=template.value, dtype=dtype.value,
            batch_tokens=batch_tokens, max_length=max_length, only=only.value if only else None,
            reverse=reverse if reverse is not None else REVERSE_DEFAULT, device=device,
            format=format.value if format else None, split=split, trust_remote_code=trust_remote_code,
            resume=not no_resume, turns=turns.value, progress=not no_progress, match_reference=match_reference,
            input_join=input_join, alone_cut=alone_cut, rifd_text=rifd_text, span=span, answer_alone=answer_alone,
        )
        result = stage.run(config)
    if result.rows and _is_main_process():
        undefined = sum(1 for r in result.rows if r["reason"])
        typer.echo(
            f"wrote {len(result.rows)} rows ({result.records} records, template {result.template}, {result.dtype}; "
            f"{result.stats.units} distinct passes of {result.stats.passes}, {undefined} rows with NaN) to {output}"
        )


class MissingResponse(str, Enum):
    drop = "drop"
    keep = "keep"


@app.command()
def select(
    input: Annotated[str, typer.Argument(help="Reflect output JSONL (method srt) or plain instruction data (method ifd).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="selected.jsonl; also writes selected.scores.parquet and selected.report/.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The student that scores (not needed by --method superfilter).")] = None,
    top: Annotated[Optional[float], typer.Option("--top", help="Keep this fraction of the input records, best first (e.g. 0.1). Default: all that pass.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep this many, best first. Excludes --top.")] = None,
    method: Annotated[Optional[SelectMethod], typer.Option("--method", help="srt (default on reflect output), ifd (default on plain data), rifd, superfilter.")] = None,
    proxy_model: Annotated[Optional[str], typer.Option("--proxy-model", help="With --method superfilter: the small model that scores IFD.")] = None,
    missing_response: Annotated[MissingResponse, typer.Option("--missing-response", help="srt: a pair whose response reflection is not ok is dropped (the reference) or kept with its own answer.")] = MissingResponse.drop,
    template: Annotated[ScoreTemplate, typer.Option("--template", help=_TEMPLATE_HELP + " superfilter: none.")] = ScoreTemplate.auto,
    dtype: DtypeOpt = ScoreDtype.auto,
    batch_tokens: BatchTokensOpt = None,
    max_length: MaxLengthOpt = 2048,
    reverse: ReverseOpt = None,
    device: DeviceOpt = "auto",
    no_resume: NoResumeOpt = False,
    format: PlainFormatOpt = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
    trust_remote_code: TrustCodeOpt = False,
    turns: TurnsOpt = TurnsPolicy.first,
    no_progress: NoProgressOpt = False,
    scores: Annotated[Optional[Path], typer.Option("--scores", help="A scores.parquet from reflect-tune score of this input: apply the rule to its rows; no model is loaded.")] = None,
    match_reference: MatchReferenceOpt = None,
    input_join: InputJoinOpt = None,
    alone_cut: AloneCutOpt = None,
    rifd_text: RifdTextOpt = None,
    span: SpanOpt = None,
    answer_alone: AnswerAloneOpt = None,
    rewrite_loses: Annotated[Optional[str], typer.Option("--rewrite-loses", help="keep or drop: srt phase 2, when the teacher's answer does not have the lower r-IFD, keep the phase-1 winner, or drop the record (the released code)." + _REF.format("keep", "drop"), rich_help_panel="Reproducing the released code")] = None,
    phase_nan: Annotated[Optional[str], typer.Option("--phase-nan", help="loses or plain: a NaN score loses a phase comparison, or compares false as in Python." + _REF.format("loses", "plain"), rich_help_panel="Reproducing the released code")] = None,
    ratio: Annotated[Optional[str], typer.Option("--ratio", help="ppl or loss: filter and rank by perplexity ratios (IFD, r-IFD) or loss ratios (--match-reference cherry).", rich_help_panel="Reproducing the released code")] = None,
    top_of: Annotated[Optional[str], typer.Option("--top-of", help="records or survivors: --top is a fraction of the input records, or of the pairs that pass the < 1 filters. Default: records; --match-reference srt or cherry: survivors.", rich_help_panel="Reproducing the released code")] = None,
    truncated: Annotated[Optional[str], typer.Option("--truncated", help="keep or skip: a pair whose passes were cut at the max length is kept, or skipped (--match-reference cherry).", rich_help_panel="Reproducing the released code")] = None,
) -> None:
    """The student keeps the pairs it learns most from (Selective Reflection-Tuning's two-phase rule, or Cherry's IFD).

    [bold]Example[/bold]: reflect-tune select reflected.jsonl -o selected.jsonl --model bundled:smollm2-135m-instruct --top 0.1
    """
    from reflect_tune import selection as stage
    from reflect_tune.config import SelectConfig
    from reflect_tune.templates import REVERSE_DEFAULT

    with user_errors():
        if top is not None and top_k is not None:
            raise ReflectTuneError("--top and --top-k are mutually exclusive; give one")
        config = SelectConfig(
            input=input, output=str(output), model=model, top=top, top_k=top_k,
            method=method.value if method else None, proxy_model=proxy_model, template=template.value,
            missing_response=missing_response.value,
            dtype=dtype.value, batch_tokens=batch_tokens, max_length=max_length,
            reverse=reverse if reverse is not None else REVERSE_DEFAULT, device=device,
            format=format.value if format else None, split=split, trust_remote_code=trust_remote_code,
            resume=not no_resume, turns=turns.value, progress=not no_progress, scores=str(scores) if scores else None,
            match_reference=match_reference, input_join=input_join, alone_cut=alone_cut, rifd_text=rifd_text, span=span,
            answer_alone=answer_alone, rewrite_loses=rewrite_loses, phase_nan=phase_nan, ratio=ratio, top_of=top_of,
            truncated=truncated,
        )
        result = stage.run(config)
    if _is_main_process():
        s = result.summary
        typer.echo(
            f"selected {s['selected']} of {s['records']} records (method {s['method']}, {s['candidates']} candidates) "
            f"to {output}; report in {output.with_suffix('.report') if output.suffix else output}"
        )


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


class KdLoss(str, Enum):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_kl = "skew_kl"
    skew_rkl = "skew_rkl"


class ReportTo(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    trackio = "trackio"
    wandb = "wandb"


class Template(str, Enum):
    chat = "chat"
    alpaca = "alpaca"


@app.command()
def train(
    data: Annotated[Optional[str], typer.Argument(help="Training data: select's selected.jsonl or any supported data file.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", "--output-dir", help="Output folder (docs/FORMATS.md §8.4).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The student: bundled:NAME, an HF folder, a .gguf or a hub id.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with the same keys as these flags (kd_ratio or kd-ratio; Hugging Face names too); flags override it.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (the default).")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="LoRA on a 4-bit base (needs CUDA and bitsandbytes).")] = False,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tune of every weight.")] = False,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "--num-train-epochs", min=1, help="Passes over the data. Default: 1.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", "--learning-rate", min=0.0, help="Peak learning rate. Default: 2e-4 LoRA, 2e-5 full.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "--per-device-train-batch-size", min=1, help="Sequences (or packed rows) per micro-batch. Default: 4.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", "--gradient-accumulation-steps", min=1, help="Micro-batches per optimizer step, per process. Default: 4.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Tokens per sequence (packed row); longer examples are cut. Default: 1024.")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Pack several examples per row, attention kept within each. Default: no.")] = None,
    template: Annotated[Optional[Template], typer.Option("--template", help="Prompt format; loss on the response only. Default: chat.")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Teacher model for logit distillation; must share the student's tokenizer.")] = None,
    teacher_logits: Annotated[Optional[str], typer.Option("--teacher-logits", help="Distil from a cache made by reflect-tune teacher-logits "
                                                          "(the teacher's top-k per response token) instead of a live --teacher.")] = None,
    kd_ratio: Annotated[Optional[float], typer.Option("--kd-ratio", min=0.0, max=1.0, help="Weight of the KD term: (1-r)·CE + r·T²·D. Default: 0.5.")] = None,
    kd_loss: Annotated[Optional[KdLoss], typer.Option("--kd-loss", help="Divergence D(teacher‖student). Default: forward_kl.")] = None,
    kd_temperature: Annotated[Optional[float], typer.Option("--kd-temperature", min=0.0, help="Softmax temperature T of both models in the KD term. Default: 1.0.")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", min=0.0, max=1.0, help="JSD β (0: forward KL, 1: reverse KL). Default: 0.5.")] = None,
    skew_alpha: Annotated[Optional[float], typer.Option("--skew-alpha", min=0.0, max=1.0, help="Skew α of skew_kl / skew_rkl (DistiLLM). Default: 0.1.")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the latest checkpoint in the output folder.")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", "--save-steps", min=0, help="Checkpoint every N optimizer steps; 0: never. Default: 500.")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option("--keep-checkpoints", "--save-total-limit", min=1, help="Checkpoints kept, newest first. Default: 2.")] = None,
    merge: Annotated[Optional[bool], typer.Option("--merge", help="With LoRA/QLoRA: also write OUTDIR/merged, a full model.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after N optimizer steps.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of data order and initialization. Default: 42.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace an output folder this command wrote before (only its own files).")] = None,
    turns: Annotated[Optional[TurnsPolicy], typer.Option("--turns", help=TURNS_HELP + " Default: first.")] = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out records (any data file), never trained on: their response-token CE (and KD term) is logged.")] = None,
    eval_split: Annotated[Optional[float], typer.Option("--eval-split", min=0.0, max=0.5, help="Or hold out this fraction of the training data (seeded, stable per record id).")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", "--eval-steps", min=0, help="Held-out loss every N optimizer steps; 0: before training and at the end only. Default: 0.")] = None,
    report_to: Annotated[Optional[ReportTo], typer.Option("--report-to", help="Also log to a tracker (train_log.csv and loss.png are always written). Default: none.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)] = False,
) -> None:
    """Instruction-tune a student (LoRA, QLoRA or full), optionally distilling a teacher's token distributions.

    More settings (LoRA rank, warmup, weight decay, precision, ...) go in the --config YAML; see docs/FORMATS.md §8.4.
    The Hugging Face names are accepted too: --learning-rate, --num-train-epochs, --per-device-train-batch-size,
    --gradient-accumulation-steps, --output-dir, --save-steps, --save-total-limit.
    Runs under [cyan]accelerate launch[/cyan] or [cyan]torchrun[/cyan] for data parallelism.

    [bold]Example[/bold]: reflect-tune train selected.jsonl -o out/student --model bundled:smollm2-135m-instruct --full --teacher big-teacher/ --kd-ratio 0.5
    """
    from reflect_tune import train as stage
    from reflect_tune.config import TrainConfig, from_values, train_config_file

    with user_errors():
        methods = [name for name, on in (("lora", lora), ("qlora", qlora), ("full", full)) if on]
        if len(methods) > 1:
            raise ReflectTuneError(f"choose one of --lora, --qlora, --full (got {', '.join('--' + m for m in methods)})")
        flags = {"data": data, "output": str(output) if output else None, "model": model,
                 "method": methods[0] if methods else None, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                 "grad_accum": grad_accum, "max_length": max_length, "packing": packing,
                 "template": template.value if template else None, "teacher": teacher, "teacher_logits": teacher_logits,
                 "kd_ratio": kd_ratio, "kd_loss": kd_loss.value if kd_loss else None, "kd_temperature": kd_temperature, "beta": beta,
                 "skew_alpha": skew_alpha, "resume": resume, "save_every": save_every,
                 "keep_checkpoints": keep_checkpoints, "merge": merge, "max_steps": max_steps, "seed": seed,
                 "overwrite": overwrite, "turns": turns.value if turns else None,
                 "eval_data": eval_data, "eval_split": eval_split, "eval_every": eval_every,
                 "report_to": report_to.value if report_to else None,
                 "progress": False if no_progress else None}
        file_values = train_config_file(config) if config else {}
        cfg = from_values(TrainConfig, {**file_values, **{k: v for k, v in flags.items() if v is not None}})
        summary = stage.run(cfg)
    if summary.get("is_main", True):
        typer.echo(f"trained {summary['steps']} steps on {summary['tokens_seen']} target tokens "
                   f"(final loss {summary['final_loss']}); wrote {cfg.output}")
        held = summary.get("heldout")
        if held:
            num = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
            kd = f"; KD term {num(held['kd_before'])} -> {num(held['kd_after'])}" if held.get("kd_loss") else ""
            typer.echo(f"held-out ({held['examples']} examples): CE {num(held['ce_before'])} -> {num(held['ce_after'])}{kd}")


@app.command("make-student")
def make_student(
    teacher: Annotated[str, typer.Option("--teacher", help="The model to cut down: bundled:NAME, an HF folder, a .gguf or a hub id.")],
    layers: Annotated[int, typer.Option("--layers", min=1, help="Decoder layers the student keeps (every k-th of the teacher's).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: an HF model folder with the teacher's tokenizer.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output folder make-student wrote before.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder.")] = False,
) -> None:
    """Make a smaller student from a teacher, DistilBERT-style: keep every k-th decoder layer, with the
    teacher's embeddings, final norm, output layer and tokenizer, so the two share a vocabulary for KD.

    [bold]Example[/bold]: reflect-tune make-student --teacher bundled:smollm2-135m-instruct --layers 10 -o models/student-10l
    """
    from reflect_tune import student as stage
    from reflect_tune.config import StudentConfig

    with user_errors():
        summary = stage.run(StudentConfig(teacher=teacher, layers=layers, output=str(output), overwrite=overwrite,
                                          trust_remote_code=trust_remote_code))
    typer.echo(f"kept layers {summary['kept_layers']} of {summary['teacher_layers']} "
               f"({summary['parameters']:,} parameters); wrote {output}")


class StageName(str, Enum):
    student = "student"
    reflect = "reflect"
    select = "select"
    teacher_sft = "teacher_sft"
    student_sft = "student_sft"
    teacher_logits = "teacher_logits"
    train = "train"
    eval = "eval"
    judge = "judge"


@app.command("run")
def run(
    pipeline: Annotated[Path, typer.Argument(help="The pipeline YAML: `name`, `data` and a section per stage (see examples/pipeline.yaml).")],
    start: Annotated[Optional[StageName], typer.Option("--from", help="Start at this stage; the earlier ones must be finished.")] = None,
    until: Annotated[Optional[StageName], typer.Option("--until", help="Stop after this stage.")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option("--runs-dir", help="Parent of the run folder. Default: the file's `runs_dir`, else ./runs.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)] = False,
    show_plan: Annotated[bool, typer.Option("--plan", help="Print the stages and sweep arms, which are done, and the steps and time each arm will take; run nothing.")] = False,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="Run N arms of the sweep at once, each in its own process on its own GPU (CUDA_VISIBLE_DEVICES); needs N GPUs. Default: one after another.")] = 1,
    arm: Annotated[Optional[str], typer.Option("--arm", hidden=True, help="Run only the arm with this train key (a --parallel child).")] = None,
) -> None:
    """Run every stage of a pipeline file: make-student, reflect, select, teacher_sft, train (each arm of a `sweep:`), eval, judge.

    Each stage writes to RUNS/NAME/STAGE-KEY, where KEY hashes the stage's settings and inputs.
    A rerun skips finished stages and resumes an interrupted one; a changed setting makes a new
    folder for that stage and the ones after it. RUNS/NAME/summary.md sums up the run.

    [bold]Example[/bold]: reflect-tune run examples/pipeline.yaml --until select
    """
    from reflect_tune.pipeline import run_pipeline
    from reflect_tune.sweep_run import plan_text, run_arm, run_parallel

    where = str(runs_dir) if runs_dir else None
    with user_errors():
        if show_plan:
            typer.echo(plan_text(pipeline, runs_dir=where))
            return
        if arm:
            run_arm(pipeline, arm, runs_dir=where, progress=not no_progress)
            return
        if parallel > 1:
            if start or until:
                raise ReflectTuneError("--parallel runs every stage; it does not take --from or --until")
            record = run_parallel(pipeline, parallel, runs_dir=where, progress=not no_progress)
        else:
            record = run_pipeline(pipeline, start=start.value if start else None, until=until.value if until else None,
                                  runs_dir=where, progress=not no_progress)
    folder = Path(record["folder"])
    for st in record["stages"]:
        note = "" if not st.get("skipped") else "(skipped: finished earlier)" if st["status"] == "done" else "(not run: outside --from/--until)"
        typer.echo(f"{st['name']:11} {st['status']:12} {note}".rstrip())
    if (folder / "compare" / "compare.md").is_file():
        typer.echo(f"comparison: {folder / 'compare' / 'compare.md'}")
    typer.echo(f"run folder: {folder}")
    typer.echo(f"summary: {folder / 'summary.md'}")


# The evaluation commands live in their own files (cli_eval.py, cli_judge.py); same conventions.
app.command("eval")(eval_command)
app.command("teacher-logits")(teacher_logits_command)
app.command("judge")(judge_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
