"""`sweep:` and `teacher_sft` in `reflect-tune run`: the distillation study in one command (issue 16).

Tiny random Llamas (the SmolLM2 tokenizer): a teacher and a student built with different seeds.
The data is a pattern the base teacher cannot know (every answer is the same word, repeated), so
a teacher fine-tuned on it (teacher_sft) must agree with a student trained on it far better than
the base teacher does: the held-out KD term after training is lower. The checks read the files
the stages wrote: each arm's meta.json, train_log.csv, and the compare folder.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from reflect_tune.errors import ReflectTuneError
from reflect_tune.pipeline import load_pipeline, plan, run_pipeline

PATTERN = " ".join(["zebra"] * 12)
ROWS = [{"instruction": f"Give the code word for item {i}.", "input": "", "output": PATTERN} for i in range(16)]


def config(teacher: str, student: str, sweep: dict | None = None) -> dict:
    return {"name": "ab", "data": "data.jsonl",
            # a full fine-tune: a 2-layer random model learns the pattern in a few steps that way
            # (LoRA, the default, is tested on its own below)
            "teacher_sft": {"method": "full", "epochs": 6, "batch_size": 4, "grad_accum": 1, "lr": 3.0e-3,
                            "max_length": 64, "train_ce_samples": 2},
            "train": {"model": student, "teacher": teacher, "method": "full", "epochs": 4, "batch_size": 4,
                      "grad_accum": 1, "max_length": 64, "lr": 1.0e-2, "kd_ratio": 0.5, "train_ce_samples": 2,
                      "eval_split": 0.25, "eval_every": 4},
            "sweep": sweep or {"teacher": ["base", "finetuned"], "kd_ratio": [0.5, 0.9]}}


def write(folder: Path, c: dict) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(bundled_dir, tmp_path_factory):
    from fakes.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("sweep-models")
    return (str(make_tiny_llama(root / "teacher", bundled_dir, seed=1)),
            str(make_tiny_llama(root / "student", bundled_dir, seed=2)))


def line_of(path: Path, key: str, after: str = "sweep:") -> int:
    lines = path.read_text().splitlines()
    start = next(i for i, t in enumerate(lines) if t.startswith(after))
    return 1 + next(i for i, t in enumerate(lines) if i > start and t.strip().startswith(f"{key}:"))


def test_sweep_block_errors_name_the_line(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    cases = [
        ({"kd_ratio": [0.5], "lerning_rate": [1e-3]}, "lerning_rate", "sweep: setting 'lerning_rate': train has no such setting"),
        ({"kd_ratio": 0.5}, "kd_ratio", "sweep: setting 'kd_ratio': expected a non-empty list"),
        ({"kd_ratio": [0.5, "high"]}, "kd_ratio", "sweep: setting 'kd_ratio': expected a float, got 'high'"),
        ({"teacher": ["base", "tuned"]}, "teacher", "sweep: setting 'teacher': 'tuned' is not one of base, finetuned"),
        ({"mode": "zip", "kd_ratio": [0.1, 0.2], "lr": [1e-3]}, "mode", "sweep: mode zip needs lists of one length"),
        ({"output": ["a", "b"]}, "output", "sweep: setting 'output': train has no such setting to sweep"),
        ({"lr": [1e-3, 1e-3]}, "lr", "sweep: setting 'lr': a value is listed twice"),
        ({"mode": "zip", "lr": [1e-3, 1e-4, 1e-3], "kd_ratio": [0.5, 0.9, 0.5]}, "mode",
         "sweep: arm 3 (lr=0.001, kd_ratio=0.5) is listed twice"),
    ]
    for sweep, key, message in cases:
        path = write(tmp_path, config("t", "s", sweep))
        with pytest.raises(ReflectTuneError) as err:
            load_pipeline(path)
        assert f"{path}:{line_of(path, key)}: " in str(err.value) and message in str(err.value), str(err.value)
    c = config("t", "s")
    del c["teacher_sft"]
    with pytest.raises(ReflectTuneError, match="teacher: finetuned needs a teacher_sft section"):
        load_pipeline(write(tmp_path, c))


def test_arms_are_keyed_by_their_own_settings(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    arms = lambda c: {json.dumps(s.extra["arm"], sort_keys=True): s.key  # noqa: E731
                      for s in plan(load_pipeline(write(tmp_path, c))) if s.name == "train"}
    two = arms(config("t", "s", {"kd_ratio": [0.5, 0.9], "lr": [1e-3, 1e-4]}))
    assert len(two) == 4 and len(set(two.values())) == 4
    three = arms(config("t", "s", {"kd_ratio": [0.5, 0.9, 0.2], "lr": [1e-3, 1e-4]}))
    assert len(three) == 6 and all(three[k] == v for k, v in two.items())  # adding a value keeps the others
    zipped = arms(config("t", "s", {"mode": "zip", "kd_ratio": [0.5, 0.9], "lr": [1e-3, 1e-4]}))
    assert sorted(json.loads(k)["lr"] for k in zipped) == [1e-4, 1e-3] and len(zipped) == 2
    # zip: a value may repeat down one list, as long as every arm differs
    repeat = arms(config("t", "s", {"mode": "zip", "lr": [1e-3, 1e-3, 1e-4], "kd_ratio": [0.5, 0.9, 0.9]}))
    assert sorted((json.loads(k)["lr"], json.loads(k)["kd_ratio"]) for k in repeat) == [(1e-4, 0.9), (1e-3, 0.5), (1e-3, 0.9)]
    # an arm's key is the key the same settings get without a sweep
    c = config("t", "s", {"kd_ratio": [0.9]})
    swept = next(iter(arms(c).values()))
    del c["sweep"], c["teacher_sft"]
    c["train"]["kd_ratio"] = 0.9
    assert [s.key for s in plan(load_pipeline(write(tmp_path, c))) if s.name == "train"] == [swept]


def arm_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


@pytest.mark.slow
def test_sweep_with_teacher_sft_end_to_end(tmp_path, models):
    teacher, student = models
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    runs = str(tmp_path / "runs")
    path = write(tmp_path, config(teacher, student))
    record = run_pipeline(path, runs_dir=runs, progress=False)
    names = [s["name"] for s in record["stages"]]
    assert names == ["teacher_sft", "train", "train", "train", "train"]
    assert all(s["status"] == "done" for s in record["stages"])
    run_dir = tmp_path / "runs" / "ab"
    stages = {s.key: s for s in plan(load_pipeline(path, runs))}

    # teacher_sft: a plain HF model folder, not the base teacher
    from transformers import AutoModelForCausalLM

    sft = next(s for s in stages.values() if s.name == "teacher_sft")
    tuned = AutoModelForCausalLM.from_pretrained(sft.folder)
    base = AutoModelForCausalLM.from_pretrained(teacher)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(tuned.parameters(), base.parameters()))

    # KD from the fine-tuned teacher ends lower than from the base teacher, at each kd_ratio
    arms = {(s.extra["arm"]["teacher"], s.extra["arm"]["kd_ratio"]): s for s in stages.values() if s.name == "train"}
    kd = {k: arm_meta(s.folder)["result"]["heldout"]["kd_after"] for k, s in arms.items()}
    for ratio in (0.5, 0.9):
        assert kd[("finetuned", ratio)] < kd[("base", ratio)], kd
    assert arm_meta(arms[("finetuned", 0.5)].folder)["config"]["teacher"] == str(sft.folder)
    assert arm_meta(arms[("base", 0.5)].folder)["config"]["teacher"] == teacher

    # the comparison: every number is the arm's own
    comp = json.loads((run_dir / "compare" / "compare.json").read_text())
    assert len(comp["rows"]) == 4
    for row in comp["rows"]:
        st = next(s for s in arms.values() if row["name"] == " ".join(f"{k}={v}" for k, v in s.extra["arm"].items()))
        held = arm_meta(st.folder)["result"]["heldout"]
        assert row["heldout_kd_after"] == held["kd_after"] and row["heldout_ce_after"] == held["ce_after"]
    best = comp["best"]["heldout_kd_after"]
    assert best.startswith("teacher=finetuned")
    assert (run_dir / "compare" / "heldout_kd.png").is_file()
    summary = (run_dir / "summary.md").read_text()
    assert "compare/heldout_kd.png" in summary

    # a rerun trains nothing; a third kd_ratio trains only its two arms
    again = run_pipeline(path, runs_dir=runs, progress=False)
    assert all(s["skipped"] for s in again["stages"])
    path = write(tmp_path, config(teacher, student, {"teacher": ["base", "finetuned"], "kd_ratio": [0.5, 0.9, 0.2]}))
    more = run_pipeline(path, runs_dir=runs, progress=False)
    ran = [s for s in more["stages"] if not s["skipped"]]
    assert len(more["stages"]) == 7 and [s["name"] for s in ran] == ["train", "train"]
    assert len(json.loads((run_dir / "compare" / "compare.json").read_text())["rows"]) == 6


def test_teacher_sft_defaults_to_lora_merged_into_a_plain_model(tmp_path, models):
    """`teacher_sft: {}`: LoRA on train's teacher, merged: a folder transformers loads with no peft."""
    from transformers import AutoModelForCausalLM

    teacher, student = models
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    c = config(teacher, student)
    c["teacher_sft"] = {"epochs": 2, "batch_size": 4, "lr": 1.0e-2, "max_length": 64, "train_ce_samples": 2}
    path = write(tmp_path, c)
    record = run_pipeline(path, runs_dir=str(tmp_path / "runs"), until="teacher_sft", progress=False)
    assert [s["status"] for s in record["stages"]][:2] == ["done", "pending"]
    (sft,) = [s for s in plan(load_pipeline(path, str(tmp_path / "runs"))) if s.name == "teacher_sft"]
    assert sft.config.method == "lora" and sft.config.merge and sft.config.model == teacher
    merged = sft.folder / "merged"
    assert not (merged / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(teacher)
    assert type(tuned) is type(base)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(tuned.parameters(), base.parameters()))
    arm = next(s for s in plan(load_pipeline(path, str(tmp_path / "runs"))) if s.extra.get("arm", {}).get("teacher") == "finetuned")
    assert arm.config.teacher == str(merged)


@pytest.mark.slow
def test_a_killed_arm_resumes(tmp_path, models):
    teacher, student = models
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    c = config(teacher, student, {"kd_ratio": [0.5, 0.9]})
    del c["teacher_sft"]
    c["train"].update(epochs=8, save_every=2, batch_size=2)
    path = write(tmp_path, c)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "reflect_tune.cli", "run", str(path), "--runs-dir", str(runs), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            trains = sorted((runs / "ab").glob("train-*"), key=lambda p: p.stat().st_mtime)
            done = [t for t in trains if (t / "meta.json").is_file()]
            busy = [t for t in trains if not (t / "meta.json").is_file() and list(t.glob("checkpoints/step-*"))]
            if done and busy:
                second = busy[0]
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert second is not None, "the second arm never saved a checkpoint"
    record = run_pipeline(path, runs_dir=str(runs), progress=False)
    by_folder = {s["folder"]: s for s in record["stages"]}
    assert by_folder[second.name]["skipped"] is False and sum(s["skipped"] for s in record["stages"]) == 1
    result = arm_meta(second)["result"]
    assert result["resumed_from"] is not None and result["steps"] == result["total_steps"] > 2
    rows = list(csv.DictReader((second / "train_log.csv").open()))
    train_steps = [int(r["step"]) for r in rows if r.get("kind", "train") == "train"]
    assert train_steps == sorted(set(train_steps))  # no step logged twice after the resume


def test_parallel_needs_a_gpu_per_arm(tmp_path):
    from conftest import one_error_line, run_cli

    write_jsonl(tmp_path / "data.jsonl", ROWS)
    path = write(tmp_path, config("t", "s", {"kd_ratio": [0.5, 0.9]}))
    run = run_cli("run", str(path), "--parallel", "2", "--runs-dir", str(tmp_path / "runs"))
    assert run.returncode == 2
    assert "--parallel 2: each arm runs on its own GPU; this machine has 0" in one_error_line(run.stderr)


@pytest.mark.slow
def test_parallel_runs_each_arm_in_its_own_process(tmp_path, models, monkeypatch):
    """Two arms at once, each `reflect-tune run --arm KEY` with its own CUDA_VISIBLE_DEVICES. This
    machine has no GPU: torch is told it has two, and the children train on the CPU."""
    import torch

    from reflect_tune.sweep_run import run_parallel

    teacher, student = models
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    c = config(teacher, student, {"kd_ratio": [0.5, 0.9]})
    del c["teacher_sft"]
    c["train"]["epochs"] = 2
    path = write(tmp_path, c)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    record = run_parallel(path, 2, runs_dir=str(tmp_path / "runs"), progress=False)
    assert [s["status"] for s in record["stages"]] == ["done", "done"]
    arms = [s for s in plan(load_pipeline(path, str(tmp_path / "runs"))) if s.name == "train"]
    assert all(s.done for s in arms)
    started = [time.strptime(e["started"], "%Y-%m-%dT%H:%M:%S%z") for e in record["stages"]]
    finished = [time.strptime(e["finished"], "%Y-%m-%dT%H:%M:%S%z") for e in record["stages"]]
    assert max(started) <= min(finished)  # the two arms ran at the same time
    comp = json.loads((tmp_path / "runs" / "ab" / "compare" / "compare.json").read_text())
    assert [r["status"] for r in comp["rows"]] == ["done", "done"]
    assert json.loads((tmp_path / "runs" / "ab" / "run.json").read_text())["stages"][0]["status"] == "done"
