"""A sweep's arms around pipeline.py (issue 16): `run --plan` and `run --parallel N`.

`plan_text`: every stage and arm, which are done, and the steps and time each train stage will
take, before anything runs. `run_parallel`: the stages before the arms as `run` does, then the
arms N at a time, each arm (its train, eval and judge stages) in its own process on its own GPU
(`CUDA_VISIBLE_DEVICES`), then the comparison. `run_arm` is what such a process runs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import exclusive
from reflect_tune.errors import ReflectTuneError
from reflect_tune.pipeline import (
    TRAINS,
    Pipeline,
    Stage,
    _check_before_running,
    _count_lines,
    _data_id,
    _load_record,
    _run_stage,
    _run_stages,
    _save_record,
    holdout_plan,
    load_pipeline,
    plan,
    write_comparison,
)
from reflect_tune.summary import read_json, write_summary

ARM_STAGES = ("train", "eval", "judge")


def _groups(stages: list[Stage]) -> list[list[Stage]]:
    """Each arm's stages: its train stage, then the eval and judge stages that read it."""
    return [[tr, *[st for st in stages if st.upstream.get("train") == tr.key]] for tr in stages if tr.name == "train"]


def run_arm(path: str | Path, key: str, runs_dir: str | None = None, progress: bool = False) -> None:
    """One arm (the train stage with this key, then its eval and judge), as a child of `run_parallel`."""
    pipe = load_pipeline(path, runs_dir)
    group = next((g for g in _groups(plan(pipe)) if g[0].key == key), None)
    if group is None:
        raise ReflectTuneError(f"--arm {key}: no train stage of {pipe.path} has this key")
    for st in group:
        if not st.done:
            _run_stage(st, progress)


def run_parallel(path: str | Path, parallel: int, runs_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The stages before the arms in order, then the arms `parallel` at a time on as many GPUs."""
    import torch

    pipe = load_pipeline(path, runs_dir)
    if not pipe.sweep:
        raise ReflectTuneError(f"--parallel {parallel}: runs the arms of a sweep; {pipe.path} has no sweep block")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < parallel:
        raise ReflectTuneError(f"--parallel {parallel}: each arm runs on its own GPU; this machine has {gpus} "
                               "(without --parallel the arms run one after another)")
    stages = plan(pipe)
    _check_before_running(pipe, stages)
    before = [i for i, st in enumerate(stages) if st.name not in ARM_STAGES]
    with exclusive(pipe.folder / ".run.lock", f"the run folder {pipe.folder}"):
        record = _run_stages(pipe, stages, set(before), progress) if before else _load_record(pipe, stages)
        if before and not all(stages[i].done for i in before):
            return record  # a stage before the arms is unfinished (a Batch API job): as `run` does
        entries = {(e["name"], e["key"]): e for e in record["stages"]}
        todo = [g for g in _groups(stages) if not all(st.done for st in g)]
        free, running, failed = list(range(parallel)), {}, []
        cmd = [sys.executable, "-m", "reflect_tune.cli", "run", str(path), "--no-progress",
               *(["--runs-dir", str(runs_dir)] if runs_dir else [])]
        while todo or running:
            while todo and free:
                group, gpu = todo.pop(0), free.pop(0)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                running[gpu] = (subprocess.Popen([*cmd, "--arm", group[0].key], env=env), group, time.time())
                for st in group:
                    entries[(st.name, st.key)].update(status="running", skipped=False,
                                                      started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                _save_record(pipe, record)
            time.sleep(1.0)
            for gpu, (proc, group, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[gpu]
                free.append(gpu)
                for st in group:
                    entries[(st.name, st.key)].update(status="done" if st.done else "failed", wall_s=round(time.time() - t0, 1),
                                                      finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                if proc.returncode:
                    failed.append(f"{group[0].folder.name} (exit {proc.returncode})")
                _save_record(pipe, record)
        write_comparison(pipe, stages, record)
        write_summary(pipe, stages, holdout_plan(pipe, _data_id(pipe)))
    if failed:
        raise ReflectTuneError(f"{len(failed)} arms failed: {', '.join(failed)}; rerun to resume them")
    return record


def plan_text(path: str | Path, runs_dir: str | None = None) -> str:
    """`run --plan`: every stage and arm, which are done, and the steps and time each arm will take,
    before anything runs. Time per step comes from arms already finished (their meta.json), when any."""
    pipe = load_pipeline(path, runs_dir)
    stages = plan(pipe)
    done_rates = []
    for st in stages:
        r = (read_json(st.folder / "meta.json") or {}).get("result") or {}
        if st.name in TRAINS and st.done and r.get("steps") and r.get("wall_s"):
            done_rates.append(r["wall_s"] / r["steps"])
    rate = sum(done_rates) / len(done_rates) if done_rates else None
    source = _count_source(pipe)
    width = max((len(st.folder.name) for st in stages), default=0)
    name_width = max((len(st.name) for st in stages), default=12)
    lines = [f"{pipe.path}: {len(stages)} stages in {pipe.folder}"
             + (f", {sum(st.name == 'train' for st in stages)} train arms ({pipe.sweep['mode']})" if pipe.sweep else ""), ""]
    total, unknown, guessed = 0.0, 0, 0
    for st in stages:
        label = f"{st.name:{name_width}} {st.folder.name:{width}} {'done' if st.done else 'to run':7}"
        if st.name in TRAINS:
            c = st.config
            records, known = _train_records(pipe, st, source)
            per_epoch = math.ceil(records / max(1, c.batch_size * c.grad_accum)) if records is not None else None
            steps = None if per_epoch is None else min(c.max_steps, per_epoch * c.epochs) if c.max_steps else per_epoch * c.epochs
            if steps is None and c.max_steps:
                steps = c.max_steps  # at most; the data is not counted
            unknown += steps is None and not st.done
            estimate = rate * steps if rate and steps and not st.done else None
            total += estimate or 0.0
            arm = " ".join(f"{k}={v}" for k, v in (st.extra.get("arm") or {}).items())
            guessed += steps is not None and not known and not st.done
            label += (f" {'?' if steps is None else ('' if known else '~') + str(steps)} steps"
                      + (f", ~{estimate / 60:.1f} min" if estimate else "") + (f"  [{arm}]" if arm else ""))
        lines.append(label.rstrip())
    lines += ["", f"estimated train time left: ~{total / 60:.1f} min (from {len(done_rates)} finished train stages, "
                  f"{rate:.2f} s/step)" if rate else
              "estimated train time: known once one train stage has finished (its s/step is used for the rest)"]
    if guessed:
        lines.append("steps marked ~ are estimated from the data size before select has run: at most that many "
                     "(select's rule may keep fewer than its --top), so the time is an upper bound too")
    if unknown:
        lines.append(f"{unknown} train stages show ? steps: their data is not a local file ({pipe.data}), so it is "
                     "not counted before the run (nothing is downloaded for a plan); the total leaves them out")
    return "\n".join(lines)


def _count_source(pipe: Pipeline) -> int | None:
    """Records the first stage reads (the held-out ones set aside), to estimate train's data size;
    None when the data is not a local file (a hub dataset): a plan downloads nothing."""
    from reflect_tune.records import load_records

    hold = holdout_plan(pipe, _data_id(pipe))
    source = hold["candidates"] if hold and Path(hold["candidates"]).exists() else pipe.data
    if not Path(source).exists():
        return None
    try:
        records, _ = load_records(source, format=pipe.format, split=pipe.split, turns=pipe.turns)
    except ReflectTuneError:
        return None
    n = len(records)
    return int(n * (1 - hold["fraction"])) if hold and not Path(hold["candidates"]).exists() else n


def _train_records(pipe: Pipeline, st: Stage, source: int | None) -> tuple[int | None, bool]:
    """(records the stage trains on, whether counted): its data file's lines once it exists, else
    the source records after reflect's limit and select's cut (an upper bound: select's filter drops more)."""
    data = Path(st.config.data)
    if data.is_file():
        return _count_lines(data), True
    if source is None:
        return None, False
    n, limit = source, (pipe.sections.get("reflect") or {}).get("limit")
    n = min(n, limit) if limit else n
    sel = pipe.sections.get("select") or {}
    if sel.get("top_k"):
        n = min(n, sel["top_k"])
    elif sel.get("top"):
        n = max(1, int(n * sel["top"]))
    return n, False
