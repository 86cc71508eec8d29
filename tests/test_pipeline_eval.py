"""`reflect-tune run` with a held-out split and the eval and judge stages.

One pipeline over 16 plain pairs (no reflect: `select` scores them with IFD): select holds out a
quarter by record id, train logs the held-out loss, eval runs a tiny local lm-eval task on the
starting and the trained student, judge asks the fake OpenAI server (a deterministic "longer
answer wins" judge) about the held-out prompts. The checks are on what reaches the files: the
held-out records never reach scoring or training, the before/after table quotes the numbers the
stages wrote, and a rerun redoes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from fakes.openai_server import FakeOpenAI
from reflect_tune.errors import ReflectTuneError
from reflect_tune.pipeline import load_pipeline, plan, run_pipeline
from reflect_tune.records import load_records, split_holdout

ROOT = Path(__file__).resolve().parent.parent
ROWS = [json.loads(x) for x in (ROOT / "examples" / "alpaca_small.jsonl").read_text().splitlines()]
TASK = ROOT / "tests" / "data" / "lm_eval_tasks" / "reflect_tiny_mc.yaml"


def config(tiny: Path, **judge) -> dict:
    c = {"name": "ev", "data": "data.jsonl",
         "select": {"method": "ifd", "model": str(tiny), "top": 0.5, "holdout": 0.25, "holdout_seed": 7},
         "train": {"model": str(tiny), "method": "full", "max_steps": 2, "batch_size": 2, "grad_accum": 1,
                   "max_length": 128, "lr": 1.0e-3, "train_ce_samples": 2, "eval_every": 1},
         "eval": {"tasks": [str(TASK)], "limit": 4, "batch_size": 4}}
    if judge:
        c["judge"] = judge
    return c


def write(folder: Path, c: dict) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(c, sort_keys=False), encoding="utf-8")
    return path


def test_holdout_and_eval_settings_are_checked_with_file_and_line(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    for section, key, value, message in [
        ("select", "holdout", 1.5, "setting 'holdout': a fraction between 0 and 1"),
        ("select", "holdout_seed", "x", "setting 'holdout_seed': an integer"),
        ("eval", "taskz", ["a"], "eval: setting 'taskz': unknown"),
        ("judge", "max_new_tokens", "many", "judge: setting 'max_new_tokens': expected an int"),
    ]:
        c = config(Path("m"), judge="j", base_url="http://127.0.0.1:9/v1")
        c[section][key] = value
        path = write(tmp_path, c)
        line = 1 + next(i for i, t in enumerate(path.read_text().splitlines()) if t.strip().startswith(f"{key}:"))
        with pytest.raises(ReflectTuneError) as err:
            load_pipeline(path)
        assert f"{path}:{line}: " in str(err.value) and message in str(err.value), str(err.value)
    c = config(Path("m"))
    del c["train"]
    with pytest.raises(ReflectTuneError, match="eval: compares the trained student with its starting point; it needs a train"):
        plan(load_pipeline(write(tmp_path, c)))
    c = config(Path("m"), judge="j")
    del c["select"]["holdout"], c["select"]["holdout_seed"]
    with pytest.raises(ReflectTuneError, match="judge: setting 'data': required without a select 'holdout'"):
        plan(load_pipeline(write(tmp_path, c)))


def test_keys_of_eval_and_judge_follow_their_settings_only(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:8])
    keys = lambda c: {s.name: s.key for s in plan(load_pipeline(write(tmp_path, c)))}  # noqa: E731
    k0 = keys(config(Path("m"), judge="j"))
    c = config(Path("m"), judge="j")
    c["eval"]["batch_size"] = 1  # speed only
    c["train"]["eval_every"] = 3  # the trained weights are the same
    assert keys(c) == k0
    c["eval"]["limit"] = 2
    assert [n for n in k0 if keys(c)[n] != k0[n]] == ["eval"]
    c = config(Path("m"), judge="j")
    c["select"]["holdout"] = 0.5  # other held-out records: every later stage
    assert [n for n in k0 if keys(c)[n] != k0[n]] == ["select", "train", "eval", "judge"]


@pytest.mark.slow
def test_heldout_eval_and_judge_stages_end_to_end(tmp_path, tiny_model_dir):
    rows = ROWS[:16]
    write_jsonl(tmp_path / "data.jsonl", rows)
    with FakeOpenAI(judge="longer") as fake:
        c = config(tiny_model_dir, judge="fake-model", base_url=fake.base_url, max_new_tokens=6, batch_size=4)
        path = write(tmp_path, c)
        record = run_pipeline(path, runs_dir=str(tmp_path / "runs"), progress=False)
        calls = fake.stats()["chat_requests"]
        dirs = {s["name"]: tmp_path / "runs" / "ev" / s["folder"] for s in record["stages"]}
        assert [s["status"] for s in record["stages"]] == ["done"] * 4
        (hold_dir,) = (tmp_path / "runs" / "ev").glob("holdout-*")

        # the held-out records: the id-stable split of the data, never scored, never trained on
        records, _ = load_records(tmp_path / "data.jsonl")
        _, expected = split_holdout(records, 0.25, 7)
        held = [json.loads(x) for x in (hold_dir / "heldout.jsonl").read_text().splitlines()]
        assert [h["id"] for h in held] == [r.id for r in expected] and 0 < len(held) < len(rows)
        assert held[0]["output"] == next(r.output for r in records if r.id == held[0]["id"])  # the pair as it was
        held_ids = {h["id"] for h in held}
        candidates = [json.loads(x)["id"] for x in (hold_dir / "candidates.jsonl").read_text().splitlines()]
        assert len(candidates) == len(rows) - len(held) and not held_ids & set(candidates)
        selected = [json.loads(x)["id"] for x in (dirs["select"] / "selected.jsonl").read_text().splitlines()]
        assert selected and not held_ids & set(selected)
        select_meta = json.loads((dirs["select"] / "meta.json").read_text())
        assert select_meta["summary"]["heldout"] == len(held) and select_meta["summary"]["records"] == len(candidates)

        # train measured its held-out loss on exactly those records
        train_meta = json.loads((dirs["train"] / "meta.json").read_text())
        assert train_meta["config"]["eval_data"] == str(hold_dir / "heldout.jsonl")
        h = train_meta["result"]["heldout"]
        assert h["examples"] == len(held) and h["ce_before"] != h["ce_after"]

        # eval: lm-eval on the starting point and on the trained student; the table quotes both
        before = json.loads((dirs["eval"] / "before" / "eval.json").read_text())
        after = json.loads((dirs["eval"] / "after" / "eval.json").read_text())
        assert before["model"] == str(tiny_model_dir) and after["model"] == str(dirs["train"])
        acc = lambda e: next(r for r in e["rows"] if r["metric"] == "acc")  # noqa: E731
        assert acc(before)["samples"] == 4 == acc(after)["samples"]
        summary = (tmp_path / "runs" / "ev" / "summary.md").read_text()
        assert "## Evaluation: before and after training" in summary
        assert f"**{len(held)} of {len(rows)} records**, never reflected, scored, selected or trained on" in summary
        ce_row = next(line for line in summary.splitlines() if line.startswith("| held-out response-token CE"))
        assert f"{h['ce_before']:.4g}" in ce_row and f"{h['ce_after']:.4g}" in ce_row
        mc_row = next(line for line in summary.splitlines() if line.startswith("| reflect_tiny_mc acc ("))
        assert f"{acc(before)['value']:.4g}" in mc_row and f"{acc(after)['value']:.4g}" in mc_row

        # judge: the trained student against its starting point, on the held-out prompts, both orders
        judge = json.loads((dirs["judge"] / "judge.json").read_text())
        assert judge["prompts"] == len(held) and calls == 2 * len(held)
        assert judge["model"] == str(dirs["train"]) and judge["baseline"] == str(tiny_model_dir)
        assert judge["wins"] + judge["ties"] + judge["losses"] == judge["judged"] == len(held)
        assert f"{judge['wins']} wins, {judge['ties']} ties, {judge['losses']} losses" in summary

        # a rerun: every stage skipped, no request, nothing rewritten
        stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "ev").rglob("*")
                  if p.is_file() and p.name not in ("run.json", "summary.md")}
        again = run_pipeline(path, runs_dir=str(tmp_path / "runs"), progress=False)
        assert all(s["skipped"] for s in again["stages"]) and fake.stats()["chat_requests"] == calls
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_holdout_is_set_aside_before_reflect_so_no_teacher_call_is_spent_on_it(tmp_path, tiny_model_dir):
    rows = ROWS[:12]
    write_jsonl(tmp_path / "data.jsonl", rows)
    with FakeOpenAI(record_bodies=True) as fake:
        c = {"name": "rf", "data": "data.jsonl",
             "reflect": {"model": "fake-model", "base_url": fake.base_url, "max_tokens": 32},
             "select": {"model": str(tiny_model_dir), "top": 0.5, "holdout": 0.3}}
        run_pipeline(write(tmp_path, c), runs_dir=str(tmp_path / "runs"), progress=False)
        records, _ = load_records(tmp_path / "data.jsonl")
        keep, held = split_holdout(records, 0.3, 42)
        assert held and keep
        (reflected_file,) = (tmp_path / "runs" / "rf").glob("reflect-*/reflected.jsonl")
        reflected = [json.loads(x)["id"] for x in reflected_file.read_text().splitlines()]
        assert reflected == [r.id for r in keep]  # the held-out records never reached the teacher
        assert fake.stats()["chat_requests"] <= 3 * len(keep)
        sent = " ".join(json.dumps(e["body"]) for e in fake.stats()["log"])
        assert all(json.dumps(r.instruction)[1:-1] not in sent for r in held)
        assert all(json.dumps(r.instruction)[1:-1] in sent for r in keep)
        (select_dir,) = (tmp_path / "runs" / "rf").glob("select-*")
        assert json.loads((select_dir / "meta.json").read_text())["summary"]["heldout"] == len(held)


def test_a_task_that_cannot_load_stops_the_run_before_any_training(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:8])
    c = config(tiny_model_dir)
    c["eval"]["tasks"] = ["no_such_task_rt"]
    with pytest.raises(ReflectTuneError, match="no_such_task_rt") as err:
        run_pipeline(write(tmp_path, c), runs_dir=str(tmp_path / "runs"), progress=False)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "runs").glob("ev/select-*")) and not list((tmp_path / "runs").glob("ev/train-*"))
