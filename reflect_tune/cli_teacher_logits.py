"""`reflect-tune teacher-logits`: the teacher's top-k log-probabilities, computed once (the stage is teacher_logits.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from reflect_tune.cli_common import NO_PROGRESS_HELP, TURNS_HELP, user_errors


def teacher_logits_command(
    data: Annotated[str, typer.Argument(help="Training data, as given to train: select's selected.jsonl or any supported data file.")],
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher: bundled:NAME, an HF folder, a .gguf or a hub id; "
                                                           "with --teacher-url, its model name on that server.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The cache folder: manifest.json, index.json, shards/.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Tokens stored per response position (their log-probs, and the rest as one tail).")] = 64,
    logprob_dtype: Annotated[Optional[str], typer.Option("--logprob-dtype", help="How the log-probs are stored: float16 "
                                                         "(default, half the bytes) or float32 (exact: --top-k of the vocabulary then equals a live teacher).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The student, as given to train: its tokenizer renders the "
                                                                       "examples. Default: the teacher's. Required with --teacher-url.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="As train: chat or alpaca. Default: chat.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="As train: tokens per example; longer ones are cut. Default: 1024.")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="Input format (default: detected): alpaca, wizardlm, sharegpt, messages.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split of a hub dataset or a DatasetDict folder.")] = None,
    turns: Annotated[Optional[str], typer.Option("--turns", help=TURNS_HELP + " Default: first.")] = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="As train: held-out records; cached too, for train's held-out KD term.")] = None,
    eval_split: Annotated[Optional[float], typer.Option("--eval-split", min=0.0, max=0.5, help="As train: the held-out fraction of the data (cached too).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="As train: the seed of the --eval-split draw. Default: 42.")] = None,
    teacher_url: Annotated[Optional[str], typer.Option("--teacher-url", "--base-url", help="Read the log-probs from this OpenAI-compatible "
                                                                                          "server's prompt_logprobs (vLLM, --max-logprobs >= k) instead of running the teacher here.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable holding the server's API key. Default: OPENAI_API_KEY.")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1, help="Requests in flight to --teacher-url. Default: 8.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="The teacher's weights: auto (bf16 on a CUDA GPU that has it, else fp32), float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1.")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", min=1, help="Padded tokens per teacher forward. Default: 4096 on CPU, 32768 on a GPU.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild a cache made with other settings (only its own files are removed).")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)] = False,
) -> None:
    """Run the teacher once over the training examples (tokenized exactly as train does) and store, for every
    response token, its top-k token ids, their log-probabilities and the tail mass, for train --teacher-logits.

    Pass the data flags given to train (--model, --template, --max-length, --turns, --eval-split, ...).
    A rerun resumes: the examples already stored are skipped. Runs under [cyan]torchrun[/cyan] for data parallelism.

    [bold]Example[/bold]: reflect-tune teacher-logits selected.jsonl --teacher big-teacher/ --model bundled:smollm2-135m-instruct -o kd-cache --top-k 64
    """
    from reflect_tune import teacher_logits as stage
    from reflect_tune.config import TeacherLogitsConfig, from_values

    with user_errors():
        flags = {"data": data, "teacher": teacher, "output": str(output), "top_k": top_k, "logprob_dtype": logprob_dtype, "model": model, "template": template,
                 "max_length": max_length, "format": format, "split": split, "turns": turns, "eval_data": eval_data,
                 "eval_split": eval_split, "seed": seed, "teacher_url": teacher_url, "api_key_env": api_key_env,
                 "concurrency": concurrency, "dtype": dtype, "device": device, "batch_tokens": batch_tokens,
                 "overwrite": overwrite, "trust_remote_code": trust_remote_code, "progress": not no_progress}
        cfg = from_values(TeacherLogitsConfig, {k: v for k, v in flags.items() if v is not None})
        summary = stage.run(cfg)
    if summary.get("is_main", True):
        skipped = f"; {summary['skipped']} already stored, skipped" if summary["skipped"] else ""
        typer.echo(f"cached {summary['examples']} examples ({summary['heldout_examples']} held out): {summary['tokens']:,} response "
                   f"tokens, {summary['bytes'] / 2**20:.1f} MiB ({summary['bytes_per_token']} bytes/token) in "
                   f"{summary['seconds']:.1f} s on {summary['world_size']} process(es){skipped}; wrote {output}")
