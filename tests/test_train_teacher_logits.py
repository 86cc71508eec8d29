"""`train --teacher-logits`: distilling from a teacher-logits cache instead of a live teacher (issue 17).

With k = V and float32 log-probs the cache holds the teacher's whole distribution, so training from
it must equal training beside the live teacher: the same loss, CE and KD at every step and the same
held-out KD term, for every divergence. A cache that does not fit the run is refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import one_error_line, run_cli, write_jsonl
from fakes.tiny import make_tiny_llama

from reflect_tune import train
from reflect_tune.config import TeacherLogitsConfig, TrainConfig
from reflect_tune.errors import DataError, ReflectTuneError
from reflect_tune.models import load_tokenizer
from reflect_tune import teacher_logits

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "alpaca_small.jsonl"
DATA = dict(template="alpaca", max_length=96, eval_split=0.25, seed=3)  # the settings both stages get


@pytest.fixture(scope="module")
def models(tiny_model_dir, bundled_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(student, teacher): two tiny Llamas with the SmolLM2 tokenizer, different seeds."""
    teacher = make_tiny_llama(tmp_path_factory.mktemp("teacher"), bundled_dir, seed=7, layers=3)
    return tiny_model_dir, teacher


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()[:8]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", rows)


@pytest.fixture(scope="module")
def full_cache(models, data, tmp_path_factory) -> Path:
    """The teacher's whole distribution (k = V) in float32, on the training and held-out examples."""
    student, teacher = models
    out = tmp_path_factory.mktemp("tl") / "cache"
    teacher_logits.run(TeacherLogitsConfig(data=str(data), output=str(out), teacher=str(teacher), model=str(student),
                                           top_k=len(load_tokenizer(str(student))), logprob_dtype="float32",
                                           batch_tokens=256, progress=False, **DATA))
    return out


def train_run(out: Path, data: Path, student: Path, **kd) -> tuple[list[dict], dict]:
    result = train.run(TrainConfig(data=str(data), output=str(out), model=str(student), method="full", lr=1e-3, batch_size=2,
                                   grad_accum=1, epochs=2, max_steps=4, warmup_ratio=0.0, save_every=0, progress=False, **DATA, **kd))
    with open(out / "train_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, result


@pytest.mark.parametrize("kd_loss,temperature", [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 2.0), ("jsd", 2.0),
                                                 ("skew_kl", 2.0), ("skew_rkl", 2.0)])
def test_full_cache_trains_as_the_live_teacher(kd_loss, temperature, models, data, full_cache, tmp_path):
    student, teacher = models
    kd = dict(kd_ratio=0.5, kd_loss=kd_loss, kd_temperature=temperature)
    live, live_res = train_run(tmp_path / "live", data, student, teacher=str(teacher), **kd)
    cached, cached_res = train_run(tmp_path / "cached", data, student, teacher_logits=str(full_cache), **kd)
    assert len(live) == len(cached) and len([r for r in live if r["kind"] == "train"]) == 4
    for a, b in zip(live, cached):
        assert (a["kind"], a["step"]) == (b["kind"], b["step"])
        for col in ("loss", "ce_loss", "kd_loss", "eval_ce", "eval_kd"):
            if a.get(col) not in ("", None):
                assert float(b[col]) == pytest.approx(float(a[col]), rel=1e-5, abs=1e-5), (a["kind"], a["step"], col)
    assert float(next(r for r in live if r["kind"] == "train")["kd_loss"]) > 0.01  # the two models differ: the KD term is not trivially 0 on both sides
    for res in (live_res, cached_res):
        assert res["heldout"]["kd_loss"] == kd_loss and res["heldout"]["kd_after"] is not None
    assert cached_res["heldout"]["kd_after"] == pytest.approx(live_res["heldout"]["kd_after"], rel=1e-5, abs=1e-5)
    meta = json.loads((tmp_path / "cached" / "meta.json").read_text())
    assert meta["teacher_logits"]["settings"]["top_k"] == meta["result"]["vocab_size"]
    assert meta["config"]["teacher"] is None and meta["config"]["teacher_logits"] == str(full_cache)


def test_top_k_cache_trains_near_the_live_teacher(models, data, tmp_path):
    """k = 64 of 49,152, forward KL at T = 1: on the first step (the same weights on both sides) the
    bucketed term never exceeds the full one (KL splits into the buckets' KL plus the tail's inner
    KL); the run from the cache still lowers held-out CE and KD. (The measured k = 64 bound on a
    real model's distribution is tests/test_sparse_kd.py's bundled-model test: these tiny random
    teachers are nearly uniform, so the top 64 hold little of their mass.)"""
    student, teacher = models
    cache = tmp_path / "cache64"
    teacher_logits.run(TeacherLogitsConfig(data=str(data), output=str(cache), teacher=str(teacher), model=str(student), top_k=64,
                                           progress=False, **DATA))
    live, live_res = train_run(tmp_path / "live", data, student, teacher=str(teacher))
    cached, cached_res = train_run(tmp_path / "cached", data, student, teacher_logits=str(cache))
    first_live, first_cached = (next(r for r in rows if r["kind"] == "train") for rows in (live, cached))
    assert float(first_cached["ce_loss"]) == pytest.approx(float(first_live["ce_loss"]), rel=1e-5)  # CE does not see the cache
    full, sparse = float(first_live["kd_loss"]), float(first_cached["kd_loss"])
    assert 0 < sparse <= full * (1 + 1e-5)
    held = cached_res["heldout"]
    assert held["kd_after"] < held["kd_before"] and held["ce_after"] < held["ce_before"]


def test_a_cache_that_does_not_fit_is_one_line(models, data, full_cache, tmp_path):
    student, teacher = models
    base = dict(data=str(data), model=str(student), method="full", max_steps=1, progress=False, **DATA)
    # both a teacher and a cache
    with pytest.raises(ReflectTuneError, match="give teacher or teacher_logits, not both"):
        train.run(TrainConfig(output=str(tmp_path / "a"), teacher=str(teacher), teacher_logits=str(full_cache), **base))
    # not a cache
    with pytest.raises(ReflectTuneError, match="not a teacher-logits cache"):
        train.run(TrainConfig(output=str(tmp_path / "b"), teacher_logits=str(data.parent), **base))
    # another max_length: the settings check names it
    with pytest.raises(ReflectTuneError, match="max_length 96, this run has 80"):
        train.run(TrainConfig(output=str(tmp_path / "c"), teacher_logits=str(full_cache), **{**base, "max_length": 80}))
    # other data: an example the cache never saw, named by its record id
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "new-7", "instruction": "Name a colour.", "output": "Teal."}])
    with pytest.raises(DataError, match=r"no entry for training record 'new-7' \(1 of 1 training examples missing\)"):
        train.run(TrainConfig(output=str(tmp_path / "d"), teacher_logits=str(full_cache),
                              **{**base, "data": str(other), "eval_split": 0.0}))
    # held-out examples the cache lacks (the cache was built without these --eval-data records)
    with pytest.raises(DataError, match=r"no entry for held-out record 'new-7' \(1 of 1 held-out"):
        train.run(TrainConfig(output=str(tmp_path / "e"), teacher_logits=str(full_cache),
                              **{**base, "eval_split": 0.0, "eval_data": str(other)}))
    # the CLI: one line, exit 2, before any model loads
    proc = run_cli("train", str(data), "-o", str(tmp_path / "f"), "--model", str(student), "--template", "alpaca",
                   "--max-length", "64", "--teacher-logits", str(full_cache))
    assert proc.returncode == 2
    assert "built with max_length 96, this run has 64" in one_error_line(proc.stderr)


def test_pipeline_builds_one_cache_per_teacher_and_the_arms_share_it(models, data, tmp_path):
    """`teacher_logits:` in a pipeline: the cache is a stage keyed by teacher and data settings, built
    before the arms; arms with the same teacher share it (kd_ratio swept), the fine-tuned teacher gets
    its own; no arm loads a teacher; a rerun builds and trains nothing; the summary reports the cache."""
    import shutil

    import yaml

    from reflect_tune.pipeline import plan, load_pipeline, run_pipeline

    student, teacher = models
    shutil.copy(data, tmp_path / "data.jsonl")
    c = {"name": "tl", "data": "data.jsonl",
         "teacher_sft": {"method": "full", "max_steps": 1, "batch_size": 2, "grad_accum": 1, "template": "alpaca",
                         "max_length": 96, "train_ce_samples": 0},
         "teacher_logits": {"top_k": 16},
         "train": {"model": str(student), "teacher": str(teacher), "method": "full", "max_steps": 2, "batch_size": 2,
                   "grad_accum": 1, "template": "alpaca", "max_length": 96, "eval_split": 0.25, "seed": 3,
                   "train_ce_samples": 0, "save_every": 0},
         "sweep": {"teacher": ["base", "finetuned"], "kd_ratio": [0.5, 0.9]}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
    stages = plan(load_pipeline(path, str(tmp_path / "runs")))
    names = [st.name for st in stages]
    assert names.count("teacher_logits") == 2 and names.count("train") == 4
    assert all(names.index("teacher_logits") < i for i, n in enumerate(names) if n == "train")
    record = run_pipeline(path, runs_dir=str(tmp_path / "runs"), progress=False)
    assert all(e["status"] == "done" for e in record["stages"])
    caches = {st.key: st for st in stages if st.name == "teacher_logits"}
    used = {}
    for st in (s for s in stages if s.name == "train"):
        meta = json.loads((st.folder / "meta.json").read_text())
        assert meta["config"]["teacher"] is None and meta["result"]["heldout"]["kd_after"] is not None
        assert st.upstream["teacher_logits"] in caches
        used.setdefault(st.extra["arm"]["teacher"], set()).add(st.upstream["teacher_logits"])
        assert meta["teacher_logits"]["settings"]["top_k"] == 16
    assert {k: len(v) for k, v in used.items()} == {"base": 1, "finetuned": 1} and used["base"] != used["finetuned"]
    finetuned = next(st for st in caches.values() if st.upstream["teacher"] != caches[next(iter(used["base"]))].upstream["teacher"])
    assert "teacher_sft-" in finetuned.config.teacher  # the fine-tuned teacher's merged folder (method full: the folder)
    summary = (tmp_path / "runs" / "tl" / "summary.md").read_text()
    assert summary.count("## teacher_logits: the teacher's top-16") == 2
    again = run_pipeline(path, runs_dir=str(tmp_path / "runs"), progress=False)
    assert all(e["skipped"] for e in again["stages"])
