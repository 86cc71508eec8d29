"""The fault matrix: every stage under kill -9 at a random point, a full disk, a read-only output,
and a second run of the same command at the same time.

What each fault must leave behind:
- kill -9, then the same command again: the result equals an uninterrupted run's, and reflect pays
  for at most the requests that were on the wire when it died;
- a full disk (a small tmpfs): one `error:` line and a non-zero exit, no half-written file and no
  temporary left over; once there is room, the same command finishes, and reflect never pays
  twice for a request;
- a read-only output: one line before any model loads or request goes out, nothing written;
- two at once: both succeed with the same result, or the second says at once that the output is
  in use (train, a pipeline's run folder); reflect pays once.

The tmpfs cases need to mount (root, as in CI); elsewhere they are skipped and say why. The kill
points are drawn from a seeded generator (REFLECT_TUNE_FAULT_SEED, default 11) and printed, so a
failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import Tmpfs, mount_reason, one_error_line, write_jsonl

from fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROWS = [json.loads(x) for x in (EXAMPLES / "alpaca_small.jsonl").read_text().splitlines()]
KEY = "sk-faults-0123456789abcdef"
SEED = int(os.environ.get("REFLECT_TUNE_FAULT_SEED", "11"))
EXE = Path(sys.executable).with_name("reflect-tune")
CAN_MOUNT = mount_reason()
needs_mount = pytest.mark.skipif(CAN_MOUNT is not None, reason=f"tmpfs faults need a mount: {CAN_MOUNT}")


def cmd(*args: str) -> list[str]:
    return [str(EXE), *args] if EXE.exists() else [sys.executable, "-m", "reflect_tune.cli", *args]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OPENAI_API_KEY": KEY})


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENAI_API_KEY": KEY})


def kill_at_random(args: list[str], span: float, rng: random.Random) -> float:
    """Start the command, SIGKILL it after a random time within `span` seconds (if it still runs)."""
    delay = rng.uniform(0.3 * span, span)
    proc = start(*args)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    print(f"kill point: {delay:.2f} s (seed {SEED}); exit {proc.returncode}")
    return delay


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files a stage must never leave behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or ".tmp-" in p.name or ".tmp." in p.name or p.name.startswith(".final"))


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def scores(path: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [(r["id"], r["variant"], round(r["ifd"], 5) if r["ifd"] == r["ifd"] else None) for r in rows]


def assert_whole(folder: Path) -> None:
    """Every output under `folder` reads back: no cut file, no folder output missing its last file."""
    import pyarrow.parquet as pq

    for f in folder.rglob("*"):
        if f.is_dir() and (f.suffix == ".report" or f.name == OUT_NAME["make-student"]):  # folders swapped in whole
            assert (f / "meta.json").is_file(), f"{f}: a folder output without its meta.json (written last)"
        if f.suffix == ".parquet":
            pq.read_table(f)
        elif f.suffix == ".jsonl":
            [json.loads(line) for line in f.read_text().splitlines()]
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            weights(f)
        elif f.suffix == ".png":
            assert f.read_bytes().endswith(b"IEND\xaeB`\x82"), f"{f}: a cut PNG"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", ROWS[:12])


def stage_args(stage: str, data: Path, out: Path, model: Path) -> list[str]:
    """The command of each stage, writing to `out` (a file or a folder, as the stage writes)."""
    common = ["--model", str(model)]
    return {
        "score": ["score", str(data), "-o", str(out), *common, "--batch-tokens", "256"],
        "select": ["select", str(data), "-o", str(out), *common, "--top-k", "4", "--batch-tokens", "256"],
        "train": ["train", str(data), "-o", str(out), *common, "--full", "--batch-size", "2", "--grad-accum", "1",
                  "--max-length", "96", "--epochs", "2", "--save-every", "2", "--lr", "0.001", "--no-progress"],
        "make-student": ["make-student", "--teacher", str(model), "--layers", "1", "-o", str(out)],
    }[stage]


OUT_NAME = {"score": "s.parquet", "select": "selected.jsonl", "train": "out", "make-student": "student"}


def result_of(stage: str, out: Path):
    """What must equal between two runs of a stage: scores, the selection, or the weights written."""
    if stage == "score":
        return scores(out)
    if stage == "select":
        return out.read_text()
    return out / "model.safetensors"


def assert_same(stage: str, a, b) -> None:
    if isinstance(a, Path):
        same_weights(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, tiny_model_dir) -> dict:
    """One uninterrupted run of each model stage: its result and how long it took."""
    ref = {}
    for stage in OUT_NAME:
        out = tmp_path_factory.mktemp(f"ref-{stage}") / OUT_NAME[stage]
        t0 = time.time()
        r = run(*stage_args(stage, data, out, tiny_model_dir))
        assert r.returncode == 0, r.stderr
        ref[stage] = {"out": out, "seconds": time.time() - t0}
    return ref


# ----------------------------------------------------------------------------- kill -9 at a random point


@pytest.mark.parametrize("stage", list(OUT_NAME))
def test_kill_at_a_random_point_then_rerun_equals_an_uninterrupted_run(stage, tmp_path, data, tiny_model_dir, reference):
    rng = random.Random(f"{SEED}-{stage}")
    out = tmp_path / OUT_NAME[stage]
    args = stage_args(stage, data, out, tiny_model_dir)
    kill_at_random(args, reference[stage]["seconds"], rng)
    if stage == "make-student":  # built aside and renamed: there is all of it or none
        assert not out.exists() or (out / "meta.json").is_file()
        again = args + (["--overwrite"] if out.exists() else [])
    elif stage == "train":
        again = args + (["--resume"] if out.exists() and any(out.iterdir()) else [])
    else:
        again = args
    r = run(*again)
    assert r.returncode == 0, r.stderr
    assert_same(stage, result_of(stage, reference[stage]["out"]), result_of(stage, out))
    assert leftovers(out.parent) == []


def test_reflect_killed_at_a_random_point_pays_at_most_what_was_on_the_wire(tmp_path):
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with FakeOpenAI(latency=0.05) as srv:
        ref = tmp_path / "ref.jsonl"
        t0 = time.time()
        assert run("reflect", str(data), "-o", str(ref), "--model", "m", "--base-url", srv.base_url,
                   "--cache-dir", str(tmp_path / "ref-cache"), "--no-progress").returncode == 0
        span, needed = time.time() - t0, srv.stats()["chat_requests"]
        args = ["reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--base-url", srv.base_url,
                "--cache-dir", str(tmp_path / "cache"), "--concurrency", "4", "--no-progress"]
        kill_at_random(args, span, random.Random(f"{SEED}-reflect"))
        assert run(*args).returncode == 0
        paid = srv.stats()["chat_requests"] - needed
    assert needed <= paid <= needed + 4  # at most the 4 requests in flight at the kill were paid twice
    assert (tmp_path / "o.jsonl").read_bytes() == ref.read_bytes()


# ----------------------------------------------------------------------------- a full disk


@needs_mount
def test_reflect_on_a_full_disk_keeps_every_paid_reply_and_never_pays_twice(tmp_path):
    from reflect_tune.cache import RequestCache

    long = "x" * 3000  # replies echo the prompt, so the cache fills quickly
    rows = [{"instruction": f"Echo this {i}: {long}", "input": "", "output": "y"} for i in range(80)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    disk = tmp_path / "disk"
    reserve = RequestCache.RESERVE_BYTES
    with FakeOpenAI(latency=0.02) as srv, Tmpfs(disk, f"{reserve // 1024 + 200}k") as fs:
        args = ["reflect", str(data), "-o", str(tmp_path / "o.jsonl"), "--model", "m", "--base-url", srv.base_url,
                "--cache-dir", str(disk / "cache"), "--concurrency", "8", "--no-progress", "--stages", "response"]
        r = run(*args)
        assert r.returncode == 2, r.stderr
        assert "the disk holding the request cache is full; stopped before sending more" in one_error_line(r.stderr)
        assert 0 < srv.stats()["chat_requests"] < 80 and not (tmp_path / "o.jsonl").exists()

        def saved() -> int:
            cache = RequestCache(disk / "cache")
            try:
                return len(cache)
            finally:
                cache.close()

        assert saved() == srv.stats()["chat_requests"]  # every paid reply, those in flight at the failure too
        r = run(*args)  # still nearly full: refuses before sending, or gets a little further and stops again
        assert r.returncode == 2
        line = one_error_line(r.stderr)
        assert "cannot set aside 4 MiB" in line or "stopped before sending more" in line, line
        assert saved() == srv.stats()["chat_requests"] < 80
        fs.resize("64m")
        r = run(*args)
        assert r.returncode == 0, r.stderr
        assert srv.stats()["chat_requests"] == 80  # each request paid exactly once
        assert leftovers(disk) == []


@needs_mount
@pytest.mark.parametrize("stage, size", [("score", "12k"), ("select", "40k"), ("train", "16m"), ("make-student", "4m")])
def test_a_full_disk_stops_a_stage_with_one_line_and_no_half_written_file(stage, size, tmp_path, data, tiny_model_dir, reference):
    disk = tmp_path / "disk"
    with Tmpfs(disk, size) as fs:
        out = disk / OUT_NAME[stage]
        args = stage_args(stage, data, out, tiny_model_dir)
        r = run(*args)
        assert r.returncode != 0, f"{stage} fitted in {size}: make the tmpfs smaller"
        line = one_error_line(r.stderr)
        assert "No space left on device" in line or "cannot write" in line, line
        assert leftovers(disk) == []
        assert_whole(disk)
        fs.resize("256m")
        again = args + (["--resume"] if stage == "train" and out.exists() else [])
        again += ["--overwrite"] if stage == "make-student" and out.exists() else []
        r = run(*again)
        assert r.returncode == 0, r.stderr
        assert_same(stage, result_of(stage, reference[stage]["out"]), result_of(stage, out))


# ----------------------------------------------------------------------------- a read-only output


@pytest.mark.parametrize("stage", ["reflect", *OUT_NAME, "run"])
def test_a_read_only_output_fails_at_once_and_writes_nothing(stage, tmp_path, readonly_dir, data, tiny_model_dir):
    out = readonly_dir / OUT_NAME.get(stage, "o.jsonl")
    if stage == "reflect":
        with FakeOpenAI() as srv:
            r = run("reflect", str(data), "-o", str(out), "--model", "m", "--base-url", srv.base_url,
                    "--cache-dir", str(tmp_path / "c"))
            assert srv.stats()["chat_requests"] == 0
    elif stage == "run":
        pipe = tmp_path / "p.yaml"
        pipe.write_text(yaml.safe_dump({"name": "t", "data": str(data), "select": {"model": "/nonexistent", "top_k": 2}}))
        r = run("run", str(pipe), "--runs-dir", str(readonly_dir / "runs"))
    else:  # a model path that does not exist: the output must be checked before any model is looked at
        r = run(*stage_args(stage, data, out, Path("/nonexistent/model")))
    assert r.returncode != 0
    line = one_error_line(r.stderr)
    assert ("Read-only file system" in line or "Permission denied" in line) and "/nonexistent" not in line, line
    assert list(readonly_dir.iterdir()) == []


# ----------------------------------------------------------------------------- two at once


@pytest.mark.parametrize("stage", list(OUT_NAME))
def test_two_runs_at_once_agree_or_the_second_is_refused(stage, tmp_path, data, tiny_model_dir, reference):
    out = tmp_path / OUT_NAME[stage]
    args = stage_args(stage, data, out, tiny_model_dir)
    procs = [start(*args), start(*args)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    if stage == "train":  # one folder cannot take two trainings: the later one says so at once
        assert sorted(codes) == [0, 2], results
        refused = results[codes.index(2)][1]
        assert "is in use by another reflect-tune process" in one_error_line(refused)
    else:
        assert codes == [0, 0] or (stage == "make-student" and sorted(codes) == [0, 2]), results
    assert_same(stage, result_of(stage, reference[stage]["out"]), result_of(stage, out))
    assert leftovers(tmp_path) == []


def test_two_pipeline_runs_at_once_the_second_is_refused(tmp_path, data):
    pipe = tmp_path / "p.yaml"
    with FakeOpenAI(latency=0.3) as srv:
        pipe.write_text(yaml.safe_dump({"name": "t", "data": str(data),
                                        "reflect": {"model": "m", "base_url": srv.base_url, "concurrency": 2}}))
        first = start("run", str(pipe), "--runs-dir", str(tmp_path / "runs"), "--no-progress")
        deadline = time.time() + 60
        while not (tmp_path / "runs" / "t" / "run.json").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = run("run", str(pipe), "--runs-dir", str(tmp_path / "runs"))
        assert first.wait(timeout=120) == 0
        needed = srv.stats()["chat_requests"]
    assert second.returncode == 2
    assert f"the run folder {tmp_path / 'runs' / 't'} is in use by another reflect-tune process" in one_error_line(second.stderr)
    assert needed == 12 * 3
