"""`reflect-tune run pipeline.yaml`: config checks, stage keys, a whole run, skip and resume.

The fast run uses the fault-injecting fake OpenAI server as the teacher endpoint, the bundled
model to select, and tiny random models to train; the slow test (tests/test_demo.py) runs
the real demo script against `transformers serve`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_jsonl
from reflect_tune.errors import ReflectTuneError
from reflect_tune.pipeline import load_pipeline, plan, run_pipeline, stage_key
from fakes.openai_server import FakeOpenAI

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROWS = [json.loads(x) for x in (EXAMPLES / "alpaca_small.jsonl").read_text().splitlines()]


def write_pipeline(folder: Path, config: dict, name: str = "pipeline.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def base_config(data: str = "data.jsonl") -> dict:
    return {
        "name": "t", "data": data,
        "student": {"teacher": "teacher-model", "layers": 1},
        "reflect": {"model": "fake-model", "base_url": "${FAKE_URL:-http://127.0.0.1:9/v1}", "max_tokens": 64},
        "select": {"top_k": 3},
        "train": {"method": "full", "max_steps": 2, "batch_size": 2, "grad_accum": 1, "train_ce_samples": 3, "lr": 1.0e-3},
    }


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(colour="red"), ":{colour}: key 'colour': unknown (known: name,"),
    (lambda c: c["reflect"].update(concurency=3), ":{concurency}: reflect: setting 'concurency': unknown (known: api_key_env,"),
    (lambda c: c["select"].update(top_k="three"), "select: setting 'top_k': expected an int, got 'three'"),
    (lambda c: c["train"].update(data="x.jsonl"), "train: setting 'data': set by the pipeline"),
    (lambda c: c["reflect"].update(model="${NO_SUCH_VARIABLE_RT}"), "environment variable NO_SUCH_VARIABLE_RT is not set"),
    (lambda c: c.pop("select"), "after reflect it needs a select section"),
    (lambda c: c["reflect"].update(dry_run=True), "reflect: setting 'dry_run': not in a pipeline"),
    (lambda c: c["student"].pop("layers"), "student: setting 'layers': required"),
    (lambda c: c.update(name="a/b"), "key 'name': a folder name"),
    (lambda c: c.pop("data"), "key 'data': required"),
])
def test_bad_pipeline_files_give_one_line_with_file_and_line(tmp_path, mutate, message):
    config = base_config()
    mutate(config)
    path = write_pipeline(tmp_path, config)
    # the line an error names is where the key sits in the written file (1-based)
    lines = path.read_text().splitlines()
    where = {key: 1 + next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
             for key in ("colour", "concurency") if any(key in line for line in lines)}
    message = message.format(**where) if "{" in message and "${" not in message else message
    with pytest.raises(ReflectTuneError, match=None) as err:
        load_pipeline(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_bad_pipeline_through_the_cli_exits_2_before_any_work(tmp_path):
    config = base_config()
    config["train"]["kd_los"] = "jsd"
    path = write_pipeline(tmp_path, config)
    run = run_cli("run", str(path), "--runs-dir", str(tmp_path / "runs"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {path}:{_line_of(path, 'kd_los')}: train: setting 'kd_los': unknown "
                                              + run.stderr.split("unknown ", 1)[1].strip()]
    assert not (tmp_path / "runs").exists()
    (tmp_path / "bad.yaml").write_text("name: x\ndata: [unclosed\n")
    run = run_cli("run", str(tmp_path / "bad.yaml"))
    assert run.returncode == 2 and "bad.yaml:3: not valid YAML" in run.stderr


def test_stage_options_are_checked_before_the_first_stage_runs(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    config = base_config()
    config["select"] = {"top": 2.0}
    path = write_pipeline(tmp_path, config)
    run = run_cli("run", str(path), "--runs-dir", str(tmp_path / "runs"), env={"OPENAI_API_KEY": ""})
    assert run.returncode == 2 and "--top must be a fraction in (0, 1]" in run.stderr
    assert not list((tmp_path / "runs" / "t").glob("student-*"))  # nothing was made
    config = base_config()
    del config["reflect"]["base_url"]  # OpenAI itself: a key is needed, and there is none
    run = run_cli("run", str(write_pipeline(tmp_path, config)), "--runs-dir", str(tmp_path / "runs"),
                  env={"OPENAI_API_KEY": ""})
    assert run.returncode == 2 and "OPENAI_API_KEY is not set" in run.stderr
    assert not list((tmp_path / "runs" / "t").glob("student-*"))


def _line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(key + ":"))


def test_environment_values_take_their_yaml_type(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    config = base_config()
    config["reflect"]["max_tokens"] = "${RT_TEST_TOKENS:-77}"
    config["reflect"]["limit"] = "${RT_TEST_LIMIT:-}"
    config["reflect"]["base_url"] = "http://${RT_TEST_HOST}:8000/v1"
    monkeypatch.setenv("RT_TEST_HOST", "127.0.0.1")
    pipe = load_pipeline(write_pipeline(tmp_path, config))
    assert pipe.sections["reflect"]["max_tokens"] == 77 and pipe.sections["reflect"].get("limit") is None  # unset
    assert pipe.sections["reflect"]["base_url"] == "http://127.0.0.1:8000/v1"
    monkeypatch.setenv("RT_TEST_TOKENS", "12")
    assert load_pipeline(write_pipeline(tmp_path, config)).sections["reflect"]["max_tokens"] == 12
    assert pipe.data == str(tmp_path / "data.jsonl")  # relative to the YAML file


def test_environment_text_stays_text_and_checks_carry_file_and_line(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    config = base_config()
    config["name"] = "${RT_TEST_NAME}"
    config["data"] = "org/some-dataset"  # not next to the file: kept as given (a hub dataset name)
    monkeypatch.setenv("RT_TEST_NAME", "20240501")
    pipe = load_pipeline(write_pipeline(tmp_path, config))
    assert pipe.name == "20240501" and pipe.data == "org/some-dataset"
    monkeypatch.setenv("RT_TEST_NAME", "run #2")
    assert load_pipeline(write_pipeline(tmp_path, config)).name == "run #2"

    config = base_config()
    config["train"]["kd-ratio"] = 2.0  # written with a dash: still found on its line
    path = write_pipeline(tmp_path, config)
    with pytest.raises(ReflectTuneError) as err:  # the train stage's own check, before any stage runs
        run_pipeline(path, runs_dir=str(tmp_path / "runs"))
    assert str(err.value).startswith(f"{path}:{_line_of(path, 'kd-ratio')}: train: setting 'kd_ratio': must be between 0 and 1")
    assert not [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]  # no stage started, nothing written


@pytest.mark.slow
def test_failed_teacher_requests_leave_reflect_unfinished_until_a_rerun_succeeds(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Flaky FAULT:500:2", "input": "", "output": "B."},
                                          {"instruction": "Fine.", "input": "", "output": "C."}])
    config = {"name": "t", "data": "data.jsonl",
              "reflect": {"model": "fake-model", "base_url": "${FAKE_URL}", "max_retries": 1, "backoff": 0.01,
                          "stages": ["response"]}}
    path = write_pipeline(tmp_path, config)
    runs = tmp_path / "runs"
    with FakeOpenAI() as srv:
        first = run_pipeline_cli(path, runs, srv.base_url)
        assert first.returncode == 0, first.stderr
        assert "1 requests failed after every retry" in first.stderr
        record = json.loads((runs / "t" / "run.json").read_text())
        assert record["stages"][0]["status"] == "pending"
        assert not (runs / "t" / record["stages"][0]["folder"] / "meta.json").exists()
        calls = srv.stats()["chat_requests"]
        second = run_pipeline_cli(path, runs, srv.base_url)  # the fault's third attempt succeeds
        assert second.returncode == 0, second.stderr
        assert srv.stats()["chat_requests"] == calls + 1  # only the failed request was sent again
    record = json.loads((runs / "t" / "run.json").read_text())
    assert record["stages"][0]["status"] == "done"
    rows = [json.loads(x) for x in (runs / "t" / record["stages"][0]["folder"] / "reflected.jsonl").read_text().splitlines()]
    assert [r["variants"]["res"]["status"] for r in rows] == ["ok", "ok"]


# ----------------------------------------------------------------------------- keys


def _keys(tmp_path: Path, config: dict) -> dict[str, str]:
    return {s.name: s.key for s in plan(load_pipeline(write_pipeline(tmp_path, config)))}


def test_stage_keys_follow_their_inputs_and_settings(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", ROWS[:4])
    config = base_config()
    k0 = _keys(tmp_path, config)
    assert all(len(k) == 12 for k in k0.values()) and len(set(k0.values())) == 4

    c = base_config()
    c["train"]["max_steps"] = 3  # a train setting: only train changes
    k = _keys(tmp_path, c)
    assert [n for n in k if k[n] != k0[n]] == ["train"]

    c = base_config()
    c["reflect"]["max_tokens"] = 65  # reflect's result changes: so do the stages reading it
    k = _keys(tmp_path, c)
    assert [n for n in k if k[n] != k0[n]] == ["reflect", "select", "train"]

    c = base_config()
    c["reflect"].update(concurrency=3, timeout=5.0, base_url="http://127.0.0.1:1/v1")  # speed, endpoint: same result
    c["select"]["batch_tokens"] = 1024
    c["train"]["save_every"] = 1
    assert _keys(tmp_path, c) == k0

    c = base_config()
    c["student"]["layers"] = 2  # a new student: it scores and is trained, reflection stays
    k = _keys(tmp_path, c)
    assert [n for n in k if k[n] != k0[n]] == ["student", "select", "train"]

    import shutil
    prompts = tmp_path / "my-prompts"
    shutil.copytree(Path(__file__).resolve().parent.parent / "reflect_tune" / "prompts", prompts)
    c = base_config()
    c["reflect"]["prompts"] = "my-prompts"  # relative to the pipeline file
    k1 = _keys(tmp_path, c)
    with open(prompts / "response.txt", "a") as fh:
        fh.write("\nBe brief.\n")  # an edited prompt is a new reflection
    k2 = _keys(tmp_path, c)
    assert k1["reflect"] != k2["reflect"] and k1["student"] == k2["student"] == k0["student"]

    write_jsonl(tmp_path / "data.jsonl", ROWS[:5])  # new data: everything but the student
    k = _keys(tmp_path, base_config())
    assert [n for n in k if k[n] != k0[n]] == ["reflect", "select", "train"]
    assert stage_key("x", {"a": 1, "b": 2}, {}) == stage_key("x", {"b": 2, "a": 1}, {})  # canonical JSON


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture()
def small_run(tmp_path, tiny_model_dir, bundled_dir):
    """A pipeline over 6 pairs: tiny student made from the tiny model, fake teacher endpoint,
    the bundled model selects (a random tiny model finds every pair too hard), KD from the tiny model."""
    write_jsonl(tmp_path / "data.jsonl", ROWS[:6])
    config = base_config()
    config["student"]["teacher"] = str(tiny_model_dir)
    config["select"]["model"] = str(bundled_dir)
    config["train"]["teacher"] = str(tiny_model_dir)
    return tmp_path, write_pipeline(tmp_path, config)


def run_pipeline_cli(path: Path, runs: Path, url: str, *extra: str):
    return run_cli("run", str(path), "--runs-dir", str(runs), "--no-progress", *extra,
                   env={"FAKE_URL": url, "OPENAI_API_KEY": ""}, timeout=600)


@pytest.mark.slow
def test_whole_pipeline_then_rerun_skips_every_stage(small_run):
    tmp_path, path = small_run
    runs = tmp_path / "runs"
    with FakeOpenAI() as srv:
        first = run_pipeline_cli(path, runs, srv.base_url)
        assert first.returncode == 0, first.stderr
        calls = srv.stats()["chat_requests"]
        assert calls == 6 * 3

        folder = runs / "t"
        record = json.loads((folder / "run.json").read_text())
        assert [s["name"] for s in record["stages"]] == ["student", "reflect", "select", "train"]
        assert all(s["status"] == "done" and not s["skipped"] for s in record["stages"])
        dirs = {s["name"]: folder / s["folder"] for s in record["stages"]}
        for name, d in dirs.items():
            assert d.name == f"{name}-{next(s['key'] for s in record['stages'] if s['name'] == name)}"
            assert (d / "meta.json").is_file()
        assert (folder / "pipeline.yaml").read_text() == path.read_text()
        assert (dirs["student"] / "config.json").is_file()
        assert len((dirs["reflect"] / "reflected.jsonl").read_text().splitlines()) == 6
        assert (folder / "reflect-cache").is_dir()  # the request cache of the run
        assert len((dirs["select"] / "selected.jsonl").read_text().splitlines()) == 3
        for png in ("ifd_hist.png", "rifd_hist.png"):
            assert (dirs["select"] / "selected.report" / png).read_bytes()[:4] == b"\x89PNG"
        assert (dirs["train"] / "loss.png").read_bytes()[:4] == b"\x89PNG"
        assert (dirs["train"] / "model.safetensors").is_file()
        train_meta = json.loads((dirs["train"] / "meta.json").read_text())
        assert train_meta["config"]["model"] == str(dirs["student"])  # the student made above
        assert train_meta["config"]["data"] == str(dirs["select"] / "selected.jsonl")
        assert train_meta["result"]["steps"] == 2 and train_meta["result"]["eval_examples"] == 3
        before, after = train_meta["result"]["loss_before"], train_meta["result"]["loss_after"]
        assert 0 < after < before, (before, after)  # the train stage trained (down, not up) on what select kept
        select_meta = json.loads((dirs["select"] / "meta.json").read_text())
        assert select_meta["summary"]["selected"] == 3 and select_meta["key"] == dirs["select"].name.split("-")[1]

        summary = (folder / "summary.md").read_text()
        for text in ("## Teacher usage (reflect)", "| 18 | 0 | 18 |", "## Selection", "**3 selected**", "| final | selected | 3 |",
                     "| ifd |", "| rifd |", f"![ifd_hist.png]({dirs['select'].name}/selected.report/ifd_hist.png)",
                     "## Training", "before →", f"![loss]({dirs['train'].name}/loss.png)", "## Student (make-student)"):
            assert text in summary, text
        assert f"run folder: {folder}" in first.stdout

        started = [s["started"] for s in record["stages"]]
        stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name not in ("run.json", "summary.md")}
        again = run_pipeline_cli(path, runs, srv.base_url)
        assert again.returncode == 0, again.stderr
        assert srv.stats()["chat_requests"] == calls  # no call
    record = json.loads((folder / "run.json").read_text())
    assert all(s["status"] == "done" and s["skipped"] for s in record["stages"])
    assert [s["started"] for s in record["stages"]] == started and all(started)  # the times of the run that did the work
    assert again.stdout.count("(skipped: finished earlier)") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten


@pytest.mark.slow
def test_from_until_and_resuming_an_interrupted_stage(small_run):
    tmp_path, path = small_run
    runs = tmp_path / "runs"
    with FakeOpenAI() as srv:
        early = run_pipeline_cli(path, runs, srv.base_url, "--from", "select")
        assert early.returncode == 2 and "earlier stage student is not finished" in early.stderr

        part = run_pipeline_cli(path, runs, srv.base_url, "--until", "reflect")
        assert part.returncode == 0, part.stderr
        record = json.loads((runs / "t" / "run.json").read_text())
        assert [s["status"] for s in record["stages"]] == ["done", "done", "pending", "pending"]

        # an interrupted select: scores were written to shards, the stage's meta.json was not
        sel = runs / "t" / record["stages"][2]["folder"]
        only = run_pipeline_cli(path, runs, srv.base_url, "--from", "select", "--until", "select")
        assert only.returncode == 0, only.stderr
        (sel / "meta.json").unlink()
        (sel / "selected.jsonl").unlink()
        resumed = run_pipeline_cli(path, runs, srv.base_url, "--from", "select")
        assert resumed.returncode == 0, resumed.stderr
        calls = srv.stats()["chat_requests"]
    assert calls == 18  # reflect ran once
    record = json.loads((runs / "t" / "run.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["done"] * 4
    assert [s["skipped"] for s in record["stages"]] == [True, True, False, False]
    assert (sel / "selected.jsonl").is_file() and "resuming" in resumed.stderr
    select_meta = json.loads((sel / "meta.json").read_text())
    assert select_meta["summary"]["selected"] == 3
    with open(runs / "t" / record["stages"][3]["folder"] / "train_log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2


@pytest.mark.slow
def test_a_failing_stage_is_recorded_and_stops_the_run(small_run):
    tmp_path, path = small_run
    config = yaml.safe_load(path.read_text())
    config["train"]["teacher"] = str(tmp_path / "no-such-teacher")  # found missing when train starts
    path.write_text(yaml.safe_dump(config))
    with FakeOpenAI() as srv:
        run = run_pipeline_cli(path, tmp_path / "runs", srv.base_url)
    assert run.returncode == 2 and "no-such-teacher" in run.stderr.strip().splitlines()[-1]
    record = json.loads((tmp_path / "runs" / "t" / "run.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["done", "done", "done", "failed"]
    assert record["stages"][3]["error"]
    assert "## Selection" in (tmp_path / "runs" / "t" / "summary.md").read_text()
