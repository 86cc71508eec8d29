"""Held-out loss during and after training (eval_data / eval_split / eval_every), the train CE
rename, and experiment tracking (report_to) — on tiny random Llamas with the SmolLM2 tokenizer."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, run_cli, write_jsonl

from reflect_tune.config import TrainConfig, from_values, train_config_file
from reflect_tune.errors import ReflectTuneError
from reflect_tune.records import Record, load_records, split_holdout
from reflect_tune.train import render, validate
from reflect_tune.train import run as run_train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "alpaca_small.jsonl"
ROWS = [json.loads(x) for x in DATA.read_text().splitlines()]


def _cfg(**values) -> TrainConfig:
    cfg = from_values(TrainConfig, {"method": "full", "batch_size": 4, "grad_accum": 1, "max_length": 96, "lr": 1e-3,
                                    "train_ce_samples": 0, "save_every": 0, "progress": False, **values})
    validate(cfg)
    return cfg


def _log(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 training records and 5 held-out ones (ids distinct), as files."""
    d = tmp_path_factory.mktemp("heldout-data")
    return write_jsonl(d / "train.jsonl", ROWS[:20]), write_jsonl(d / "heldout.jsonl", ROWS[20:25])


@pytest.fixture(scope="module")
def teacher_dir(bundled_dir, tmp_path_factory) -> Path:
    from fakes.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("heldout-teacher"), bundled_dir, hidden=96, heads=4, seed=1)


def _reference(student_dir: Path, teacher_dir: Path, records: list[Record], temperature: float) -> tuple[float, float]:
    """Plain held-out CE and forward-KL term: each record rendered as train does, full logits,
    −log p of each response token, T²·KL(p_teacher^T ‖ q_student^T); token-weighted over examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student_dir))
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float64).eval()
    ce_sum = kd_sum = n = 0.0
    for rec in records:
        prompt, completion = render(rec, tok, "chat")
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = (p_ids + tok(completion, add_special_tokens=False)["input_ids"])[:96]
        x = torch.tensor([ids])
        with torch.no_grad():
            s, t = student(x).logits[0], teacher(x).logits[0]
        for pos in range(len(p_ids) - 1, len(ids) - 1):  # the logits that predict response tokens
            ce_sum -= float(torch.log_softmax(s[pos], -1)[ids[pos + 1]])
            log_q, log_p = torch.log_softmax(s[pos] / temperature, -1), torch.log_softmax(t[pos] / temperature, -1)
            kd_sum += temperature**2 * float((log_p.exp() * (log_p - log_q)).sum())
            n += 1
    return ce_sum / n, kd_sum / n


def test_heldout_ce_and_kd_at_step_0_equal_a_plain_reference(tiny_model_dir, teacher_dir, data, tmp_path):
    train, heldout = data
    summary = run_train(_cfg(data=str(train), eval_data=str(heldout), output=str(tmp_path / "o"), model=str(tiny_model_dir),
                             teacher=str(teacher_dir), kd_loss="forward_kl", kd_temperature=2.0, kd_ratio=0.5, max_steps=1))
    h = summary["heldout"]
    ce, kd = _reference(tiny_model_dir, teacher_dir, load_records(heldout)[0], 2.0)
    assert h["examples"] == 5 and h["source"] == str(heldout)
    assert h["ce_before"] == pytest.approx(ce, abs=1e-5) and h["kd_before"] == pytest.approx(kd, abs=1e-5)
    assert h["ce_after"] != h["ce_before"] and h["kd_after"] > 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["result"]["heldout"] == h and meta["data"]["heldout"]["examples"] == 5


def test_eval_split_is_id_stable_seeded_and_never_trained_on(tiny_model_dir, tmp_path):
    recs = [Record(id=f"r{i}", instruction="q", output="a") for i in range(2000)]
    train, held = split_holdout(recs, 0.2, seed=7)
    assert 300 < len(held) < 500 and {r.id for r in train}.isdisjoint(r.id for r in held)
    assert len(train) + len(held) == 2000 and [r.id for r in train + held] != []
    more = recs + [Record(id=f"new{i}", instruction="q", output="a") for i in range(500)]
    held_more = {r.id for r in split_holdout(more[::-1], 0.2, seed=7)[1]}  # more records, other order
    assert {r.id for r in held} == {i for i in held_more if i.startswith("r")}  # existing ones never move
    assert {r.id for r in split_holdout(recs, 0.2, seed=8)[1]} != {r.id for r in held}  # the seed matters
    assert split_holdout([Record(id="c#t1", instruction="q"), Record(id="c#t2", instruction="q")], 0.5, 3)[0] in (
        [], [Record(id="c#t1", instruction="q"), Record(id="c#t2", instruction="q")])  # a conversation stays together
    # train: exactly the held-out records leave the training data
    records = load_records(DATA)[0]
    _, expected = split_holdout(records, 0.25, seed=42)
    assert 0 < len(expected) < len(records)
    s = run_train(_cfg(data=str(DATA), eval_split=0.25, output=str(tmp_path / "o"), model=str(tiny_model_dir),
                       batch_size=8, max_length=512))
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["data"]["examples"] == len(records) - len(expected) == s["samples_seen"]  # one epoch: each once
    assert s["heldout"]["examples"] == meta["data"]["heldout"]["records"] == len(expected)
    assert s["heldout"]["source"] == "eval_split"


def test_eval_every_rows_plot_and_resume_without_duplicates(tiny_model_dir, data, tmp_path):
    train, heldout = data
    out = tmp_path / "o"
    cfg = _cfg(data=str(train), eval_data=str(heldout), eval_every=2, output=str(out), model=str(tiny_model_dir),
               max_steps=5, save_every=2, keep_checkpoints=3)
    first = run_train(cfg)
    rows = _log(out)
    assert {"kind", "eval_ce", "eval_kd"} <= set(rows[0])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [int(r["step"]) for r in evals] == [0, 2, 4, 5]  # the start, every 2 steps, the end
    assert [int(r["step"]) for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert all(r["eval_ce"] and not r["loss"] for r in evals) and all(r["loss"] and not r["eval_ce"] for r in rows if r["kind"] == "train")
    assert float(evals[-1]["eval_ce"]) == pytest.approx(first["heldout"]["ce_after"], abs=1e-6)
    assert float(evals[0]["eval_ce"]) == pytest.approx(first["heldout"]["ce_before"], abs=1e-6)
    assert (out / "loss.png").stat().st_size > 0
    # a resume from step 4 redoes step 5 and the final evaluation; no row twice, none lost
    second = run_train(dataclasses_replace(cfg, resume=True))
    assert second["resumed_from"].endswith("step-4")
    again = _log(out)
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in rows]
    assert second["heldout"]["ce_before"] == first["heldout"]["ce_before"]
    assert second["heldout"]["ce_after"] == pytest.approx(first["heldout"]["ce_after"], abs=1e-6)
    assert (out / "train_ce_before.json").is_file() and not (out / "eval_before.json").exists()


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_heldout_evaluation_does_not_change_training(tiny_model_dir, data, tmp_path):
    """LoRA with dropout, so any RNG draw by the evaluation would change the weights."""
    from safetensors.torch import load_file

    train, heldout = data
    common = dict(data=str(train), model=str(tiny_model_dir), method="lora", lora_dropout=0.3, lr=5e-3, max_steps=4, batch_size=2)
    run_train(_cfg(output=str(tmp_path / "plain"), **common))
    run_train(_cfg(output=str(tmp_path / "evals"), eval_data=str(heldout), eval_every=1, eval_batch_size=3, **common))
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "evals" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=0, rtol=0)
    assert [r["loss"] for r in _log(tmp_path / "plain")] == [r["loss"] for r in _log(tmp_path / "evals") if r["kind"] == "train"]


def test_tensorboard_and_trackio_get_the_logged_values(tiny_model_dir, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reflect_tune.tracking import read_trackio

    train, heldout = data
    for kind in ("tensorboard", "trackio"):
        out = tmp_path / kind
        run_train(_cfg(data=str(train), eval_data=str(heldout), eval_every=1, output=str(out), model=str(tiny_model_dir),
                       max_steps=2, report_to=kind, run_name="heldout-test"))
        rows = _log(out)
        want = {("train/loss", int(r["step"])): float(r["loss"]) for r in rows if r["kind"] == "train"}
        want.update({("train/lr", int(r["step"])): float(r["lr"]) for r in rows if r["kind"] == "train"})
        want.update({("eval/ce", int(r["step"])): float(r["eval_ce"]) for r in rows if r["kind"] == "eval"})
        assert {s for _, s in want if _ == "eval/ce"} == {0, 1, 2}
        if kind == "tensorboard":
            acc = EventAccumulator(str(out / "tensorboard"))
            acc.Reload()
            assert {"train/loss", "train/ce", "train/lr", "eval/ce"} <= set(acc.Tags()["scalars"])
            got = {(tag, e.step): e.value for tag in ("train/loss", "train/lr", "eval/ce") for e in acc.Scalars(tag)}
        else:
            assert "trackio" not in sys.modules and "TRACKIO_DIR" not in os.environ  # ran in its own process
            logged = read_trackio(out)
            assert {r["run"] for r in logged} == {"heldout-test"}
            got = {(k, r["step"]): v for r in logged for k, v in r.items() if k in ("train/loss", "train/lr", "eval/ce")}
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_setting_errors_are_one_line_before_any_model_loads(tmp_path):
    (tmp_path / "old.yaml").write_text("eval_samples: 8\n")
    with pytest.raises(ReflectTuneError, match=r"old.yaml:1: setting 'eval_samples' is now 'train_ce_samples'"):
        train_config_file(tmp_path / "old.yaml")
    base = {"data": str(DATA), "output": str(tmp_path / "o"), "model": "m"}
    with pytest.raises(ReflectTuneError, match=r"^setting 'eval_split': give eval_data or eval_split, not both$"):
        _cfg(**base, eval_data=str(DATA), eval_split=0.1)
    with pytest.raises(ReflectTuneError, match=r"^setting 'eval_every': needs held-out data"):
        _cfg(**base, eval_every=5)
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    # a model that does not exist: the wandb line comes first, so nothing was loaded before it
    r = run_cli("train", str(DATA), "-o", str(tmp_path / "w"), "--model", str(tmp_path / "no-model"), "--report-to", "wandb")
    assert r.returncode == 2
    assert one_error_line(r.stderr) == "error: report_to wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "w").exists()
