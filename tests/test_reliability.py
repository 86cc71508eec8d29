"""Never lose data, never pay twice, never crash with a traceback: one test per fault case of issue 11.

Each test is named after its item. The disk-full cases (items 4 and 13) need a small tmpfs and
live in tests/test_faults.py with the rest of the fault matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import one_error_line, run_cli, write_jsonl
from typer.testing import CliRunner

from reflect_tune.cli import app
from fakes.openai_server import FakeOpenAI

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROWS = [json.loads(x) for x in (EXAMPLES / "alpaca_small.jsonl").read_text().splitlines()]
KEY = "sk-proj-reliability0123456789abcdef"
NO_MODEL = "/nonexistent/model"  # were it loaded before the output check, the error would name it
runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    result = runner.invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def reflect(*args: str, key: str = KEY, timeout: float = 120):
    return run_cli("reflect", *args, env={"OPENAI_API_KEY": key}, timeout=timeout)


def fake_args(srv: FakeOpenAI, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["-o", str(out), "--model", "fake-model", "--base-url", srv.base_url, "--cache-dir", str(cache),
            "--no-progress", *extra]


def tiny_train(tiny_model_dir, data: Path, out: Path, **overrides):
    from reflect_tune.config import TrainConfig, from_values
    from reflect_tune.train import run

    settings = {"data": str(data), "output": str(out), "model": str(tiny_model_dir), "method": "full", "batch_size": 2,
                "grad_accum": 1, "max_length": 96, "train_ce_samples": 0, "progress": False, "lr": 1e-3, **overrides}
    return run(from_values(TrainConfig, settings))


def all_text_under(folder: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- data lost or overwritten


def test_01_no_stage_writes_over_its_own_input(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    before = data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(data)
    for out in (data, tmp_path / "link.jsonl"):  # the file itself, and the same file through a symlink
        r = invoke("select", str(data), "-o", str(out), "--model", NO_MODEL, "--top-k", "1")
        assert r.exit_code == 2 and "would overwrite the input" in r.output, r.output
    # select writes three outputs; its scores file may not be the input either
    table = tmp_path / "s.scores.parquet"
    from reflect_tune.convert import write_records
    from reflect_tune.records import load_records

    write_records(load_records(data)[0], table)
    r = invoke("select", str(table), "-o", str(tmp_path / "s.jsonl"), "--model", NO_MODEL)
    assert r.exit_code == 2 and f"{table}: --output would overwrite the input" in r.output, r.output
    r = invoke("score", str(table), "-o", str(table), "--model", NO_MODEL)
    assert r.exit_code == 2 and "would overwrite the input" in r.output
    folder = tmp_path / "datadir"
    folder.mkdir()
    inner = write_jsonl(folder / "data.jsonl", ROWS[:4])
    for extra in ([], ["--overwrite"], ["--resume"]):
        r = invoke("train", str(inner), "-o", str(folder), "--model", NO_MODEL, *extra)
        assert r.exit_code == 2 and f"{folder}: --output contains the input {inner}" in r.output, r.output
    assert data.read_bytes() == before and inner.is_file()


def test_02_overwrite_removes_only_what_the_stage_wrote(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    r = invoke("make-student", "--teacher", str(teacher), "--layers", "1", "-o", str(teacher), "--overwrite")
    assert r.exit_code == 2 and f"{teacher}: --output is the input" in r.output, r.output
    assert (teacher / "model.safetensors").is_file()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = invoke("train", str(data), "-o", str(foreign), "--model", str(tiny_model_dir), "--overwrite")
    assert r.exit_code == 2 and "only replaces a folder that reflect-tune train wrote" in r.output, r.output
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "out"
    tiny_train(tiny_model_dir, data, out, max_steps=1)
    marker = json.loads((out / ".reflect-tune.json").read_text())
    assert marker["stage"] == "train" and "model.safetensors" in marker["written"]
    (out / "notes.txt").write_text("mine, not train's")
    r = invoke("train", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--full", "--overwrite")
    assert r.exit_code == 2 and "holds 'notes.txt', which reflect-tune train did not write" in r.output, r.output
    assert (out / "notes.txt").is_file() and (out / "model.safetensors").is_file()
    (out / "notes.txt").unlink()
    (out / "model.safetensors").write_bytes(b"stale")  # a fresh run must replace this
    tiny_train(tiny_model_dir, data, out, max_steps=1, overwrite=True)
    assert (out / "model.safetensors").stat().st_size > 1000

    student = tmp_path / "student"
    assert invoke("make-student", "--teacher", str(teacher), "--layers", "1", "-o", str(student)).exit_code == 0
    (student / "mine.txt").write_text("x")
    r = invoke("make-student", "--teacher", str(teacher), "--layers", "1", "-o", str(student), "--overwrite")
    assert r.exit_code == 2 and "'mine.txt'" in r.output
    (student / "mine.txt").unlink()
    assert invoke("make-student", "--teacher", str(teacher), "--layers", "2", "-o", str(student), "--overwrite").exit_code == 0
    assert json.loads((student / "meta.json").read_text())["kept_layers"] == [0, 1]


def test_03_two_reflect_runs_on_one_cache_pay_once_and_agree(tmp_path):
    from reflect_tune.cache import Reply, RequestCache

    # the cache: a claimed request makes the other process wait; the first committed reply is final
    a, b = RequestCache(tmp_path / "c"), RequestCache(tmp_path / "c")
    assert a.claim("k") == "mine" and b.claim("k") == "wait"
    assert a.put("k", "m", Reply(text="first", finish_reason="stop", prompt_tokens=1, completion_tokens=2)).text == "first"
    assert b.claim("k") == "done"
    assert b.put("k", "m", Reply(text="second", finish_reason="stop", prompt_tokens=1, completion_tokens=2)).text == "first" and a.get("k").text == "first"
    # a claim by a process that no longer runs is void at once (no lease wait after kill -9)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    a.db.execute("INSERT INTO claims VALUES ('j', ?, ?)", (f"{a.owner.split(':')[0]}:{dead.stdout.strip()}:x", time.time() + 60))
    assert b.claim("j") == "mine"
    a.close(), b.close()

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:20])
    cache = tmp_path / "cache"
    with FakeOpenAI(latency=0.3) as srv:
        procs = [subprocess.Popen([str(Path(sys.executable).with_name("reflect-tune")), "reflect", str(data),
                                   *fake_args(srv, tmp_path / f"out{i}.jsonl", cache, "--concurrency", "8")],
                                  env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in (1, 2)]
        results = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        assert srv.stats()["chat_requests"] == 20 * 3  # every request paid once, not 120
        again = reflect(str(data), *fake_args(srv, tmp_path / "out3.jsonl", cache))
        assert again.returncode == 0 and srv.stats()["chat_requests"] == 60
    one, two, three = ((tmp_path / f"out{i}.jsonl").read_bytes() for i in (1, 2, 3))
    assert one == two == three
    waited = sum(json.loads((tmp_path / f"out{i}.jsonl.meta.json").read_text())["summary"]["requests_from_other_process"]
                 for i in (1, 2))
    assert waited > 0  # the runs really overlapped


def test_05_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model_dir, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:8])
    out = tmp_path / "out"
    tiny_train(tiny_model_dir, data, out, epochs=2, save_every=2, keep_checkpoints=2)  # 8 steps: step-4, step-6 kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    for name in ("meta.json", "model.safetensors"):  # as if it was killed before the end
        (out / name).unlink()
    weights = out / "checkpoints" / "step-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    caplog.set_level("WARNING", logger="reflect_tune")
    summary = tiny_train(tiny_model_dir, data, out, epochs=2, save_every=2, keep_checkpoints=2, resume=True)
    assert summary["resumed_from"].endswith("step-4") and summary["steps"] == 8
    assert "step-6 cannot be read back" in caplog.text and "resuming from" in caplog.text
    assert (out / "checkpoints" / "corrupt-step-6").is_dir() and (out / "model.safetensors").is_file()
    for f in (out / "checkpoints").glob("step-*/optimizer.pt"):  # nothing is resumed from twice
        f.write_bytes(b"garbage")
    (out / "meta.json").unlink()
    r = invoke("train", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--full", "--resume",
               "--epochs", "2", "--save-every", "2", "--batch-size", "2", "--grad-accum", "1", "--max-length", "96",
               "--lr", "0.001")
    assert r.exit_code == 2 and "no checkpoint loads" in r.output and "--overwrite" in r.output, r.output


def test_06_multi_turn_conversations_keep_every_turn(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And again?"},
             {"role": "assistant", "content": "Hello again.", "name": "bot"}]
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "messages": turns}, {"id": "b", "messages": turns[:3]}])
    assert invoke("convert", str(msgs), str(tmp_path / "m2.jsonl"), "--to", "messages").exit_code == 0
    assert json.loads((tmp_path / "m2.jsonl").read_text().splitlines()[0])["messages"] == turns
    share = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"}]}])
    assert invoke("convert", str(share), str(tmp_path / "s2.jsonl"), "--to", "messages").exit_code == 0
    got = json.loads((tmp_path / "s2.jsonl").read_text())["messages"]
    assert [(m["role"], m["content"]) for m in got] == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    # a shape that holds one exchange is refused, unless the caller asks for the first one
    r = invoke("convert", str(msgs), str(tmp_path / "a.jsonl"), "--to", "alpaca")
    assert r.exit_code == 2 and f"{msgs}:1: a conversation of 5 turns cannot be written as alpaca" in r.output, r.output
    assert invoke("convert", str(msgs), str(tmp_path / "a.jsonl"), "--to", "alpaca", "--first-turn").exit_code == 0
    # in place: nothing the new shape cannot hold is ever destroyed
    before = msgs.read_bytes()
    r = invoke("convert", str(msgs), str(msgs), "--to", "alpaca", "--first-turn")
    assert r.exit_code == 2 and "replace its own input and lose information" in r.output and msgs.read_bytes() == before
    alpaca = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "Translate", "input": "Hallo", "output": "Hello"}])
    r = invoke("convert", str(alpaca), str(alpaca), "--to", "messages")
    assert r.exit_code == 2 and "field 'instruction' does not survive" in r.output
    extra = write_jsonl(tmp_path / "y.jsonl", [{"instruction": "a", "input": "", "output": "b", "category": "qa"}])
    r = invoke("convert", str(extra), str(extra), "--to", "alpaca")
    assert r.exit_code == 2 and "category" in r.output
    assert invoke("convert", str(msgs), str(msgs), "--to", "sharegpt").exit_code == 0  # lossless: allowed
    assert invoke("convert", str(msgs), str(tmp_path / "back.jsonl"), "--to", "messages").exit_code == 0
    assert json.loads((tmp_path / "back.jsonl").read_text().splitlines()[0])["messages"] == turns
    info = json.loads(invoke("inspect", str(msgs), "--json").stdout)
    assert info["multi_turn"] == 1


# ----------------------------------------------------------------------------- stuck or paying for nothing


def test_07_a_request_the_server_refuses_fails_its_record_not_the_run(tmp_path):
    rows = [{"instruction": f"row {i}", "input": "", "output": "x"} for i in range(6)]
    rows[0]["instruction"] += " FAULT:context_length:99"  # first in line: no success has come yet
    rows[3]["instruction"] += " FAULT:400:99"  # an unexplained 400, after successes
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out, cache = tmp_path / "o.jsonl", tmp_path / "c"
    with FakeOpenAI() as srv:
        r = reflect(str(data), *fake_args(srv, out, cache, "--concurrency", "1"))
        assert r.returncode == 0, r.stderr
        got = [json.loads(x) for x in out.read_text().splitlines()]
        assert [g["variants"]["res"]["status"] for g in got] == ["api_failed", "ok", "ok", "api_failed", "ok", "ok"]
        assert "maximum context length" in got[0]["variants"]["ins"]["reason"]
        assert got[0]["variants"]["res_ins"]["status"] == "skipped"
        assert f"record '{got[0]['id']}' ({data}:1) ins: rejected by the teacher" in r.stderr
        assert f"({data}:4)" in r.stderr
        sent = srv.stats()["chat_requests"]
        again = reflect(str(data), *fake_args(srv, out, cache))  # a rerun retries only the refused requests
        assert again.returncode == 0 and srv.stats()["chat_requests"] - sent == 4
        # a 400 about a setting every request shares stops at its first answer
        bad = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"q{i} FAULT:bad_param:99", "input": "", "output": "x"}
                                                  for i in range(5)])
        sent = srv.stats()["chat_requests"]
        r = reflect(str(bad), *fake_args(srv, tmp_path / "b.out.jsonl", cache, "--concurrency", "1"))
        assert r.returncode == 2 and srv.stats()["chat_requests"] - sent == 1
        line = one_error_line(r.stderr)
        assert f"({bad}:1)" in line and "max_completion_tokens" in line and "HTTP 400" in line


def test_08_a_fatal_answer_stops_sending_at_once(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i} FAULT:401:99", "input": "", "output": "x"}
                                              for i in range(60)])
    with FakeOpenAI(latency=0.2) as srv:  # no key check on GET /models: the first 401 comes from chat
        r = reflect(str(data), *fake_args(srv, tmp_path / "o.jsonl", tmp_path / "c", "--concurrency", "16"))
        assert r.returncode == 2 and "HTTP 401" in one_error_line(r.stderr)
        assert srv.stats()["chat_requests"] <= 16  # those already on the wire, nothing after


def test_09_reflect_checks_its_output_before_the_first_request(tmp_path, readonly_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:6])
    (tmp_path / "taken.jsonl").mkdir()
    with FakeOpenAI() as srv:
        r = reflect(str(data), *fake_args(srv, tmp_path / "taken.jsonl", tmp_path / "c"))
        assert r.returncode == 2 and "is a folder" in one_error_line(r.stderr)
        r = reflect(str(data), *fake_args(srv, readonly_dir / "o.jsonl", tmp_path / "c"))
        assert r.returncode == 2 and "cannot write in" in one_error_line(r.stderr)
        assert srv.stats()["chat_requests"] == 0


# ----------------------------------------------------------------------------- tracebacks


def test_10_a_huge_integer_anywhere_is_no_crash(tmp_path):
    big = "9" * 5000
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b", "score": ' + big + '}\n{"id": ' + big + ', "instruction": "c", "output": "d"}\n')
    r = invoke("inspect", str(data), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["records"] == 2
    assert invoke("convert", str(data), str(tmp_path / "o.jsonl")).exit_code == 0
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[1])["id"] == big
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"instruction": ' + big + ', "output": "b"}\n')
    r = invoke("inspect", str(bad))
    assert r.exit_code == 2 and r.output == f"error: {bad}:1: field 'instruction': expected a string, got int\n"
    r = invoke("select", str(bad), "-o", str(tmp_path / "s.jsonl"), "--model", NO_MODEL)
    assert r.exit_code == 2 and "expected a string, got int" in r.output
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"name: t\ndata: {data}\nreflect:\n  model: m\n  max_tokens: {big}\n")
    r = invoke("run", str(pipe))
    assert r.exit_code == 2 and f"{pipe}:5: a number of 5000 digits" in r.output and len(r.output) < 300


def test_11_a_failed_credential_check_prints_one_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:8])
    with FakeOpenAI(api_key="the-right-key") as srv:
        r = reflect(str(data), *fake_args(srv, tmp_path / "o.jsonl", tmp_path / "c", "--concurrency", "4"))
    assert r.returncode == 2
    assert one_error_line(r.stderr).startswith("error: teacher credential check (GET /models) failed: HTTP 401")
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_12_read_only_outputs_fail_before_any_model_loads(tmp_path, readonly_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    for args in (["score", str(data), "-o", str(readonly_dir / "s.parquet")],
                 ["select", str(data), "-o", str(readonly_dir / "s.jsonl")],
                 ["train", str(data), "-o", str(readonly_dir / "out")]):
        r = invoke(*args, "--model", NO_MODEL)
        assert r.exit_code == 2 and ("Read-only file system" in r.output or "Permission denied" in r.output), r.output
        assert NO_MODEL not in r.output
    r = invoke("make-student", "--teacher", NO_MODEL, "--layers", "1", "-o", str(readonly_dir / "st"))
    assert r.exit_code == 2 and "cannot write in" in r.output and NO_MODEL not in r.output


def test_14_to_17_pipeline_files_are_checked_whole_before_any_stage(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])

    def run(text: str) -> str:
        path = tmp_path / "p.yaml"
        path.write_text(text)
        t0 = time.time()
        r = invoke("run", str(path), "--runs-dir", str(tmp_path / "runs"))
        assert r.exit_code == 2 and time.time() - t0 < 20, r.output
        assert r.output.count("\n") == 1 and len(r.output) < 800, r.output  # one line, values cut short
        return r.output

    head = f"name: t\ndata: {data}\n"
    select = "select:\n  model: m\n  top_k: 2\n"
    # 14: a list where a folder name belongs
    assert "p.yaml:3: key 'runs_dir': expected a non-empty string, got ['a']" in run(head + "runs_dir: [a]\n" + select)
    assert not (tmp_path / "['a']").exists()
    # 15: a "billion laughs" file of a few hundred bytes
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    assert "aliases expand to over 10,000 values" in run(bomb + head + select)
    # 16: a key given twice, or a section given twice
    assert "key 'top_k' is given twice (lines 5 and 6)" in run(head + select + "  top_k: 3\n")
    assert "key 'select' is given twice (lines 3 and 6)" in run(head + select + select)
    # 17: what a stage reads is checked before the first stage starts
    assert "p.yaml:3: key 'format': 'csv' is not one of alpaca" in run(head + "format: csv\n" + select)
    assert "p.yaml:3: key 'split': expected a non-empty string, got {'a': 1}" in run(head + "split: {a: 1}\n" + select)
    missing = run(f"name: t\ndata: {tmp_path / 'nope.jsonl'}\n" + select)
    assert f"p.yaml:2: data: {tmp_path / 'nope.jsonl'}: no such file or folder" in missing
    assert not (tmp_path / "runs").exists()  # no run folder was started
    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 0.001\nepochs: 2\nlr: 0.01\n")
    r = invoke("train", str(data), "-o", str(tmp_path / "o"), "--model", NO_MODEL, "--config", str(cfg))
    assert r.exit_code == 2 and f"{cfg}:3: key 'lr' is given twice (lines 1 and 3)" in r.output


# ----------------------------------------------------------------------------- small but wrong


def test_18_reflect_has_the_dedupe_its_hint_names(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", **ROWS[0]}, {"id": "x", **ROWS[1]}, {"id": "y", **ROWS[2]}])
    r = invoke("reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "gpt-4o-mini", "--dry-run")
    assert r.exit_code == 2 and "pass --dedupe" in r.output
    r = invoke("reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "gpt-4o-mini", "--dry-run", "--dedupe")
    assert r.exit_code == 0 and "dry run: 2 records" in r.output, r.output


def test_19_devices_fifos_and_symlink_loops_are_named(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    cases = {"/dev/null": "a character device", "/dev/zero": "a character device", str(fifo): "a FIFO (named pipe)",
             str(loop): "a symlink loop"}
    for path, what in cases.items():
        r = run_cli("inspect", path, timeout=60)  # a blocking open would hang here
        assert r.returncode == 2 and one_error_line(r.stderr) == f"error: {path}: {what}, not a data file", r.stderr
    r = run_cli("inspect", str(EXAMPLES / "alpaca_small.jsonl"), "--model", str(fifo), timeout=60)
    assert r.returncode == 2 and one_error_line(r.stderr) == f"error: {fifo}: a FIFO (named pipe), not a model file or folder"
    r = invoke("convert", str(EXAMPLES / "alpaca_small.jsonl"), "/dev/null")
    assert r.exit_code == 2 and "/dev/null: the output is a character device, not a regular file" in r.output
    pipe = tmp_path / "p.yaml"
    os.mkfifo(pipe)
    r = run_cli("run", str(pipe), timeout=60)
    assert r.returncode == 2 and f"{pipe}: a FIFO (named pipe), not a config file" in one_error_line(r.stderr)


def test_20_a_key_where_its_variable_name_belongs_is_refused_and_never_written(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    token = "tok9f8e7d6c5b4a3210xyzQ"  # not shaped like an OpenAI key: only the secret registry can hide it
    env = {"OPENAI_API_KEY": KEY, "MY_SERVICE_TOKEN": token}
    with FakeOpenAI() as srv:
        r = reflect(str(data), *fake_args(srv, tmp_path / "o.jsonl", tmp_path / "c", "--api-key-env", KEY))
        assert r.returncode == 2 and "expected the NAME of an environment variable" in one_error_line(r.stderr)
        assert KEY not in r.stderr + r.stdout and srv.stats()["chat_requests"] == 0
        base = {"name": "t", "data": str(data), "reflect": {"model": "fake-model", "base_url": srv.base_url},
                "select": {"model": NO_MODEL, "top_k": 1}}
        expect = {"api_key_env": "expected the NAME of an environment variable",
                  "concurrency": "reflect: setting 'concurrency': expected an int, got '***'",
                  "model": NO_MODEL}  # the teacher's name is a secret: reflect runs, select then stops
        for key, message in expect.items():
            value = "${MY_SERVICE_TOKEN}" if key == "model" else "${OPENAI_API_KEY}"
            path = tmp_path / "p.yaml"
            path.write_text(yaml.safe_dump({**base, "reflect": {**base["reflect"], key: value}}))
            r = run_cli("run", str(path), "--runs-dir", str(tmp_path / "runs"), env=env, timeout=120)
            assert r.returncode == 2 and message in one_error_line(r.stderr), r.stderr
            assert KEY not in r.stderr + r.stdout and token not in r.stderr + r.stdout
        assert srv.stats()["chat_requests"] == 9  # the model case reflected for real
    written = all_text_under(tmp_path / "runs")
    assert "reflected.jsonl" in "".join(str(p) for p in (tmp_path / "runs").rglob("*"))
    assert KEY not in written and token not in written and '"model": "***"' in written


def test_21_trained_weights_get_the_usual_file_mode(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    old = os.umask(0o022)
    try:
        tiny_train(tiny_model_dir, data, tmp_path / "out", max_steps=2, save_every=1)
        assert invoke("make-student", "--teacher", str(tiny_model_dir), "--layers", "1", "-o", str(tmp_path / "st")).exit_code == 0
    finally:
        os.umask(old)
    files = [tmp_path / "out" / "model.safetensors", tmp_path / "out" / "train_log.csv",
             tmp_path / "out" / "checkpoints" / "step-1" / "model.safetensors", tmp_path / "st" / "model.safetensors"]
    assert [(str(f), oct(stat.S_IMODE(f.stat().st_mode))) for f in files] == [(str(f), "0o644") for f in files]


def test_22_no_progress_for_reflect_and_an_empty_selection_explained(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    with FakeOpenAI() as srv:
        r = reflect(str(data), *fake_args(srv, tmp_path / "o.jsonl", tmp_path / "c"))
    assert r.returncode == 0 and "━" not in r.stderr and "reflect ━" not in r.stderr
    selected = tmp_path / "selected.jsonl"
    selected.write_text("")
    summary = {"records": 24, "decisions": {"dropped_ifd_ge_1": 12, "dropped_rifd_ge_1": 8, "dropped_variant_not_ok": 4,
                                            "phase1_original": 24}}
    (tmp_path / "selected.jsonl.meta.json").write_text(json.dumps({"stage": "select", "summary": summary}))
    r = invoke("train", str(selected), "-o", str(tmp_path / "out"), "--model", NO_MODEL)
    assert r.exit_code == 2
    assert ("select kept 0 of 24 records (dropped: ifd_ge_1 12, rifd_ge_1 8, variant_not_ok 4), so there is "
            "nothing to train on") in r.output, r.output
