"""`reflect-tune eval`: lm-evaluation-harness benchmarks on any model spec (the stage is evaluate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from reflect_tune.cli_common import NO_PROGRESS_HELP, user_errors


def eval_command(
    model: Annotated[str, typer.Argument(help="The model: bundled:NAME, an HF folder, a .gguf, a hub id, or a train output "
                                              "folder (a LoRA one is evaluated as base + adapter).")],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval task, group or tag names, or task YAML "
                                                              "files / folders (e.g. truthfulqa_mc2,hellaswag).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: results.json (lm-eval's dict), eval.json, "
                                                                 "eval.md, samples_TASK.jsonl, meta.json.")],
    limit: Annotated[Optional[float], typer.Option("--limit", help="Per task: the first N items (N >= 1) or a fraction (< 1).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Requests per forward pass.")] = 8,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", min=0, help="Few-shot examples; default: each task's own.")] = None,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="A folder of extra task YAMLs whose task names --tasks may use.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on a CUDA GPU that has it, else fp32), float32, bfloat16, float16.")] = "auto",
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Context length in tokens; default: the model's.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of python, numpy, torch and the few-shot sampler.")] = 1234,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output folder eval wrote before.")] = False,
    report_to: Annotated[str, typer.Option("--report-to", help="Also send the metrics to: none, tensorboard, trackio, wandb.")] = "none",
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="The tracker's run name; default: eval-CONFIGHASH.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help=NO_PROGRESS_HELP)] = False,
) -> None:
    """Benchmark a model with EleutherAI's lm-evaluation-harness (its tasks, its HFLM, its scoring).

    Every input is checked before the model loads. Without a model hub, give task YAML paths
    (dataset_path: json with local data_files; relative paths are read from the YAML's folder).

    [bold]Example[/bold]: reflect-tune eval bundled:smollm2-135m-instruct --tasks examples/lm_eval_tasks/reflect_tiny_mc.yaml -o results/
    """
    from reflect_tune import evaluate as stage
    from reflect_tune.config import EvalConfig, from_values

    with user_errors():
        cfg = from_values(EvalConfig, {
            "model": model, "tasks": tuple(t.strip() for t in tasks.split(",") if t.strip()), "output": str(output),
            "limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot,
            "include_path": str(include_path) if include_path else None, "device": device, "dtype": dtype,
            "max_length": max_length, "seed": seed, "overwrite": overwrite, "report_to": report_to, "run_name": run_name,
            "trust_remote_code": trust_remote_code, "progress": not no_progress,
        })
        summary = stage.run(cfg)
    width = max([len(r["task"]) for r in summary["rows"]] + [4])
    typer.echo(f"{'task':<{width}}  {'metric':<12} {'value':>8} {'stderr':>8} {'n':>6}")
    for r in summary["rows"]:
        value, stderr = (_fmt(r["value"]), _fmt(r["stderr"]))
        typer.echo(f"{r['task']:<{width}}  {r['metric']:<12} {value:>8} {stderr:>8} {r['samples'] or '':>6}")
    typer.echo(f"config hash {summary['config_hash']}; wrote {output}")


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
