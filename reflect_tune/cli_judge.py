"""`reflect-tune judge`: the judged win rate of a model against a baseline (judge.py). Thin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from reflect_tune.cli_common import NO_PROGRESS_HELP, TURNS_HELP, TurnsPolicy, json_object, user_errors

_SPEC = "Any model spec: bundled:NAME, an HF folder, a .gguf, a train output folder (LoRA: base + adapter)."


def judge_command(
    model: Annotated[str, typer.Option("--model", "-m", help="The model under test. " + _SPEC)],
    baseline: Annotated[str, typer.Option("--baseline", help="The model it is compared with. " + _SPEC)],
    data: Annotated[str, typer.Option("--data", help="Prompts: any supported data file (instruction and input are the prompt; output is optional).")],
    judge: Annotated[str, typer.Option("--judge", help="The judge model's name, as the server knows it.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: verdicts.jsonl, judge.json, judge.md, the answers.")],
    base_url: Annotated[Optional[str], typer.Option("--base-url", envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint of the judge. Default: OpenAI.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Name of the environment variable that holds the API key.")] = "OPENAI_API_KEY",
    prompt: Annotated[Optional[Path], typer.Option("--prompt", help="Judge prompt file with {instruction}, {answer_1}, {answer_2} (default: prompts/judge.txt).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length cap of both local models (greedy).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per generate call.")] = 8,
    template: Annotated[str, typer.Option("--template", help="How the local models see a prompt: chat (their chat template) or alpaca.")] = "chat",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on a GPU that has it, else fp32), float32, bfloat16, float16.")] = "auto",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N prompts.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight at once.")] = 16,
    rpm: Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute, never exceeded.")] = None,
    tpm: Annotated[Optional[int], typer.Option("--tpm", min=1, help="Tokens per minute (prompt + max completion), never exceeded.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Completion token cap of each judge reply.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="The judge's sampling temperature.")] = 0.0,
    token_param: Annotated[str, typer.Option("--token-param", help="How --max-tokens is sent: auto, max_tokens or max_completion_tokens (see reflect --help).")] = "auto",
    extra_body: Annotated[Optional[str], typer.Option("--extra-body", help="A JSON object of server-specific fields added to every judge request. Part of the cache key.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds before one request counts as timed out.")] = 120.0,
    max_retries: Annotated[int, typer.Option("--max-retries", min=0, help="Retries per request for 408/409/429/5xx, timeouts and dropped connections.")] = 6,
    backoff: Annotated[float, typer.Option("--backoff", min=0.0, help="Backoff scale in seconds for retries.")] = 1.0,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Request cache folder. Default: $REFLECT_TUNE_CACHE/judge.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Generate the answers, then count judge requests, tokens and cost; send nothing.")] = False,
    batch_api: Annotated[bool, typer.Option("--batch-api", help="Ask the judge through the OpenAI Batch API (half price, up to 24 h).")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="With --batch-api: submit and exit; rerun to poll and collect.")] = False,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.0, help="With --batch-api: seconds between status polls.")] = 30.0,
    price_in: Annotated[Optional[float], typer.Option("--price-in", min=0.0, help="USD per 1M prompt tokens (overrides the built-in table).")] = None,
    price_out: Annotated[Optional[float], typer.Option("--price-out", min=0.0, help="USD per 1M completion tokens (overrides the built-in table).")] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="Record shape: alpaca, wizardlm, sharegpt, messages; detected when omitted.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset folder or hub dataset.")] = None,
    turns: Annotated[TurnsPolicy, typer.Option("--turns", help=TURNS_HELP)] = TurnsPolicy.first,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model that needs its repository's own code.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an output folder judge wrote before (only its own files); without it a rerun resumes.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)] = False,
) -> None:
    """Win rate of a model against a baseline, as a judge LLM sees it: both answer every prompt (greedy), the
    judge compares each pair in both orders; wins + ties/2 over the judged prompts, with a 95% Wilson interval.

    [bold]Example[/bold]: reflect-tune judge --model out/train --baseline bundled:smollm2-135m-instruct --data prompts.jsonl --judge gpt-4o-mini -o out/judge
    """
    from reflect_tune import judge as stage
    from reflect_tune.config import JudgeConfig, field_types, from_values

    with user_errors():
        values = {k: v for k, v in locals().items() if k in field_types(JudgeConfig)}
        values.update(output=str(output), prompt=str(prompt) if prompt else None, turns=turns.value,
                      cache_dir=str(cache_dir) if cache_dir else None, progress=not no_progress,
                      extra_body=json_object(extra_body, "--extra-body"))
        result = stage.run(from_values(JudgeConfig, values))
    _print(result)


def _print(result: dict) -> None:
    s = result["summary"]
    if result["status"] == "planned":
        cost = "unknown (pass --price-in/--price-out)" if s["est_cost_usd"] is None else f"${s['est_cost_usd']:.4f}"
        typer.echo(f"dry run: {s['prompts']} prompts -> {s['requests']} judge requests to send "
                   f"({s['cached_requests']} already cached)\n  prompt tokens: {s['prompt_tokens']} ({s['token_counting']})\n"
                   f"  completion tokens (estimate): {s['est_completion_tokens']}\n  estimated cost: {cost} [{s['price_source']}]\n"
                   f"  not included: {s['not_included']}")
        return
    if result["status"] == "submitted":
        typer.echo("Batch API: submitted; run the same command again to collect the verdicts", err=True)
        return
    rate = "n/a" if s["win_rate"] is None else f"{100 * s['win_rate']:.1f}%"
    ci = "" if s["win_rate"] is None else f" (95% Wilson {100 * s['win_rate_ci95'][0]:.1f}–{100 * s['win_rate_ci95'][1]:.1f}%)"
    cost = "unknown" if s["cost_usd"] is None else f"${s['cost_usd']:.4f}"
    typer.echo(f"judge: {s['wins']} wins, {s['ties']} ties, {s['losses']} losses of {s['judged']} judged; "
               f"win rate {rate}{ci}\n  not judged: parse_failed {s['failures']['parse_failed']}, "
               f"api_failed {s['failures']['api_failed']}\n  mean answer length (chars): model {s['lengths']['model_chars']}, "
               f"baseline {s['lengths']['baseline_chars']}; the longer answer won {s['lengths']['longer_answer_won']}\n"
               f"  requests: {s['requests_answered']} answered, {s['requests_cached']} from cache; cost {cost}", err=True)
    typer.echo(f"wrote {result['output']}/judge.json")
