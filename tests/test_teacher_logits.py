"""`teacher-logits`: the cache against a direct computation, train's tokenization, 2 processes vs 1,
the reader's refusals, resume after SIGKILL, the server producer (fake vLLM) and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Tmpfs, free_port, mount_reason, one_error_line, run_cli, write_jsonl
from fakes.openai_server import FakeOpenAI
from safetensors import safe_open

from reflect_tune.config import TeacherLogitsConfig, TrainConfig
from reflect_tune.errors import DataError, ReflectTuneError
from reflect_tune.models import load_model, load_tokenizer
from reflect_tune.records import load_records
from reflect_tune.teacher_logits import check_cache, open_cache, run
from reflect_tune.train import build_examples
from reflect_tune.train_log import heldout_records

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "alpaca_small.jsonl"
K = 8


def key_of(input_ids, targets) -> str:
    """The documented key, computed here on its own: sha256 of (length, input_ids, targets) as int64."""
    h = hashlib.sha256(struct.pack("<q", len(input_ids)))
    h.update(np.asarray(input_ids, dtype="<i8").tobytes())
    h.update(np.asarray(targets, dtype="<i8").tobytes())
    return h.hexdigest()


def train_examples(data, tok, **settings) -> list:
    """The examples train.run makes (training, then held-out), by train's own functions."""
    cfg = TrainConfig(data=str(data), output="unused", model="unused", **settings)
    records, _ = load_records(cfg.data, format=cfg.format, split=cfg.split, on_duplicate="keep", on_empty="drop", turns=cfg.turns)
    records, held = heldout_records(cfg, records)
    return build_examples(records, tok, cfg)[0] + (build_examples(held, tok, cfg)[0] if held else [])


def stored(cache: Path) -> dict[str, tuple]:
    """Every entry of a finished cache, read straight from its shards: key -> (ids, logprobs, tail)."""
    index = json.loads((cache / "index.json").read_text())["entries"]
    out = {}
    for key, (name, start, rows) in index.items():
        with safe_open(str(cache / "shards" / name), framework="pt") as fh:
            out[key] = tuple(fh.get_tensor(t)[start : start + rows] for t in ("ids", "logprobs", "tail"))
    return out


def assert_same_entries(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


def assert_top_k(ids, lp, tail, logits, k: int) -> int:
    """The stored top-k of each row against log_softmax of the full logits (float64). Ids must equal
    torch.topk's exactly wherever the direct values leave no near-tie (returns that row count); the
    log-probs within fp16 rounding; the tail equal to log(1 - Σ exp(top-k lp)) computed in float64."""
    direct = torch.log_softmax(logits.double(), dim=-1)
    assert ids.dtype == torch.int32 and lp.dtype == torch.float16 and tail.dtype == torch.float32
    assert ids.shape == lp.shape == (logits.shape[0], k)
    torch.testing.assert_close(lp.double(), direct.gather(1, ids.long()), rtol=1e-3, atol=1e-3)
    values, want = direct.topk(min(k + 1, direct.shape[1]), dim=-1)
    clear = (values[:, :-1] - values[:, 1:]).min(dim=1).values > 1e-5  # no two of the top k + 1 within 1e-5
    assert torch.equal(ids[clear].long(), want[clear, :k])
    if k < direct.shape[1]:  # log(1 - Σ p) in float64: log1p, or (where that cancels) the logsumexp of the others
        mass = direct.gather(1, ids.long()).exp().sum(-1)
        rest = torch.where(mass < 0.5, torch.log1p(-mass.clamp(max=0.5)),
                           torch.logsumexp(direct.scatter(1, ids.long(), -torch.inf), dim=-1))
        torch.testing.assert_close(tail.double(), rest, rtol=1e-4, atol=1e-6)
    return int(clear.sum())


@pytest.fixture(scope="module")
def cache8(tiny_model_dir, tmp_path_factory) -> Path:
    """examples/alpaca_small.jsonl through the tiny teacher, k = 8, alpaca template, max_length 96 (some cut)."""
    out = tmp_path_factory.mktemp("tl") / "cache"
    run(TeacherLogitsConfig(data=str(EXAMPLES), output=str(out), teacher=str(tiny_model_dir), top_k=K, template="alpaca",
                            max_length=96, batch_tokens=512, progress=False))
    return out


def test_entries_equal_a_direct_computation(cache8, tiny_model_dir):
    """Every response token: the teacher's own forward on the example alone, log_softmax, topk."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    examples = train_examples(EXAMPLES, tok, template="alpaca", max_length=96)
    assert any(len(e.input_ids) == 96 for e in examples)  # truncation is covered
    cache, entries = open_cache(cache8), stored(cache8)
    clear = total = 0
    for e in examples:
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0]
        positions = [t for t, y in enumerate(e.targets) if y != -100]
        ids, lp, tail = entries[key_of(e.input_ids, e.targets)]
        clear += assert_top_k(ids, lp, tail, logits[positions], K)
        total += len(positions)
        got = cache.lookup(e)  # the reader gives the same rows, ready for a loss
        assert torch.equal(got[0], ids.long()) and torch.equal(got[1], lp.float()) and torch.equal(got[2], tail)
    assert total == sum(e[2].numel() for e in entries.values()) and clear >= 0.9 * total
    manifest = json.loads((cache8 / "manifest.json").read_text())
    assert manifest["settings"]["top_k"] == K and manifest["settings"]["vocab_size"] == len(tok)
    assert manifest["stats"]["tokens"] == total and manifest["stats"]["bytes"] > 0


def test_a_peaked_teacher(tiny_model_dir, tmp_path):
    """A teacher whose top k hold most of the mass (the tail's other formula): the same checks."""
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)  # logits 40x larger: a few tokens take nearly all the mass
    model.save_pretrained(tmp_path / "peaked")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "peaked")
    data = write_jsonl(tmp_path / "d.jsonl", [json.loads(line) for line in EXAMPLES.read_text().splitlines()[:6]])
    run(TeacherLogitsConfig(data=str(data), output=str(tmp_path / "cache"), teacher=str(tmp_path / "peaked"), top_k=K,
                            template="alpaca", progress=False))
    entries, peaked = stored(tmp_path / "cache"), 0
    for e in train_examples(data, load_tokenizer(str(tiny_model_dir)), template="alpaca"):
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0][[t for t, y in enumerate(e.targets) if y != -100]]
        ids, lp, tail = entries[key_of(e.input_ids, e.targets)]
        assert_top_k(ids, lp, tail, logits, K)
        peaked += int((tail.exp() < 0.5).sum())
    assert peaked > 0.5 * sum(v[2].numel() for v in entries.values())


def test_k_equal_to_the_vocabulary(tiny_model_dir, tmp_path):
    """k = V: every id, log-probs summing to 1, and a tail of -inf."""
    tok = load_tokenizer(str(tiny_model_dir))
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello there, friend."},
                                              {"instruction": "Add", "input": "2+2", "output": "4"}])
    out = tmp_path / "cache"
    run(TeacherLogitsConfig(data=str(data), output=str(out), teacher=str(tiny_model_dir), top_k=len(tok), template="alpaca",
                            max_length=48, progress=False))
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    cache = open_cache(out)
    for e in train_examples(data, tok, template="alpaca", max_length=48):
        ids, lp, tail = cache.lookup(e)
        assert torch.equal(ids.sort(dim=1).values, torch.arange(len(tok)).expand_as(ids))
        assert torch.isneginf(tail).all()
        torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(len(tail), dtype=torch.float64), rtol=0, atol=2e-3)
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0]
        assert_top_k(*stored(out)[key_of(e.input_ids, e.targets)], logits[[t for t, y in enumerate(e.targets) if y != -100]], len(tok))


def test_keys_are_train_examples(tiny_model_dir, tmp_path):
    """Same records and settings: the stored keys are those of train's examples, held-out ones included."""
    tok = load_tokenizer(str(tiny_model_dir))
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    data = write_jsonl(tmp_path / "d.jsonl", rows + rows[:2])  # a record given twice is one example
    out = tmp_path / "cache"
    summary = run(TeacherLogitsConfig(data=str(data), output=str(out), teacher=str(tiny_model_dir), top_k=4, template="chat",
                                      max_length=96, eval_split=0.25, seed=3, progress=False))
    examples = train_examples(data, tok, template="chat", max_length=96, eval_split=0.25, seed=3)
    keys = {key_of(e.input_ids, e.targets) for e in examples}
    assert set(json.loads((out / "index.json").read_text())["entries"]) == keys
    assert summary["examples"] == len(keys) > 20 and summary["heldout_examples"] > 0  # chat at 96 tokens leaves some out
    cache = open_cache(out)
    assert all(cache.lookup(e)[0].shape == (sum(t != -100 for t in e.targets), 4) for e in examples)


def test_reader_refuses_another_tokenization(cache8, tiny_model_dir):
    """Read for --max-length 64 (built for 96) or the chat template: one line naming the cache and the record."""
    tok = load_tokenizer(str(tiny_model_dir))
    cache = open_cache(cache8)
    check_cache(cache, TrainConfig(template="alpaca", max_length=96), tok, top_k=K)  # the settings it was built for
    for settings in ({"template": "alpaca", "max_length": 64}, {"template": "chat", "max_length": 96}):
        example = next(e for e in train_examples(EXAMPLES, tok, **settings) if len(e.input_ids) == 64 or settings["template"] == "chat")
        with pytest.raises(DataError) as err:
            cache.lookup(example, record_id="rec-7")
        text = str(err.value)
        assert "\n" not in text and str(cache8) in text and "rec-7" in text and "rebuild" in text, text
        with pytest.raises(ReflectTuneError, match="rebuild") as err:
            check_cache(cache, TrainConfig(**settings), tok)
        assert "\n" not in str(err.value)
    with pytest.raises(ReflectTuneError, match=f"top {K} tokens"):
        check_cache(cache, TrainConfig(template="alpaca", max_length=96), tok, top_k=K + 1)


def test_other_settings_refused_then_overwritten(cache8, tiny_model_dir, tmp_path):
    """A rerun with another k is refused, naming it, before the teacher loads; --overwrite rebuilds; an
    unfinished cache is not read."""
    r = run_cli("teacher-logits", str(EXAMPLES), "--teacher", str(tiny_model_dir), "--template", "alpaca", "--max-length", "96",
                "-o", str(cache8), "--top-k", "4")
    assert r.returncode == 2 and "top_k 8, now 4" in one_error_line(r.stderr) and "Loading weights" not in r.stderr
    cfg = TeacherLogitsConfig(data=str(EXAMPLES), output=str(tmp_path / "c"), teacher=str(tiny_model_dir), top_k=4,
                              template="alpaca", max_length=48, progress=False)
    run(cfg)
    with pytest.raises(ReflectTuneError, match="max_length 48, now 40"):
        run(dataclasses.replace(cfg, max_length=40))
    run(dataclasses.replace(cfg, top_k=2, overwrite=True))
    assert open_cache(cfg.output).top_k == 2 and {v[0].shape[1] for v in stored(Path(cfg.output)).values()} == {2}
    (Path(cfg.output) / "index.json").unlink()
    with pytest.raises(ReflectTuneError, match="unfinished"):
        open_cache(cfg.output)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU): the same keys and identical tensors per key."""
    args = ["teacher-logits", str(EXAMPLES), "--teacher", str(tiny_model_dir), "--top-k", str(K), "--template", "alpaca",
            "--batch-tokens", "512", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "reflect_tune.cli", *args, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "reflect_tune.cli", *args, "-o", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    assert {p.name[:4] for p in (tmp_path / "two" / "shards").iterdir()} == {"r000", "r001"}  # both wrote shards
    written = []
    for shard in (tmp_path / "two" / "shards").iterdir():
        with safe_open(str(shard), framework="pt") as fh:
            written += json.loads(fh.metadata()["keys"])
    assert len(written) == len(set(written))  # no example computed by both
    assert_same_entries(stored(tmp_path / "one"), stored(tmp_path / "two"))


@pytest.mark.slow
def test_resume_after_sigkill(tiny_model_dir, tmp_path):
    """kill -9 once the first shard exists; the rerun skips what is stored and ends with the cache of one run."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge its box".split()
    rows = [{"instruction": f"Task {i}: repeat the words", "input": "",
             "output": " ".join(words[(i + j) % len(words)] for j in range(8 + i % 40))} for i in range(240)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = [str(data), "--teacher", str(tiny_model_dir), "--top-k", "4", "--template", "alpaca", "--batch-tokens", "160",
            "--no-progress"]
    exe = Path(sys.executable).with_name("reflect-tune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reflect_tune.cli"]
    out = tmp_path / "cache"
    env = {"OMP_NUM_THREADS": "1"}  # as the torchrun test: the same arithmetic in every run, and no oversubscribed cores
    proc = subprocess.Popen([*cmd, "teacher-logits", *args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    deadline = time.monotonic() + 300
    while not list((out / "shards").glob("r*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "index.json").exists()  # it was cut short
    done = 0
    for shard in (out / "shards").glob("r*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            done += len(json.loads(fh.metadata()["keys"]))
    assert 0 < done < len(rows)
    for leftover in (".tmpXq3kZ9", ".r000-000099.safetensors.4194999-0123abcd.tmp"):  # what a write cut short leaves
        (out / "shards" / leftover).write_bytes(b"partial")                            # (safetensors' own, and ours)
    again = run_cli("teacher-logits", *[a for a in args if a != "--no-progress"], "-o", str(out), env=env)
    assert again.returncode == 0, again.stderr
    todo = len(rows) - done  # every batch is stored whole or not at all: the rerun computes exactly the rest
    assert f"teacher-logits: done, {todo}/{todo} examples" in again.stderr, again.stderr
    assert f"resuming: {done} of {len(rows)} examples already in" in again.stderr
    assert f"{done} already stored, skipped" in again.stdout
    assert all(p.name.startswith("r") and p.suffix == ".safetensors" for p in (out / "shards").iterdir())
    whole = run_cli("teacher-logits", *args, "-o", str(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr
    assert_same_entries(stored(out), stored(tmp_path / "whole"))


def test_server_producer_equals_in_process(cache8, tiny_model_dir, tmp_path):
    """vLLM's prompt_logprobs from the fake server (k + 1 entries where the prompt token is outside the top k)
    give the in-process cache; the API key, read from the environment, is written nowhere."""
    key = "sk-fake-teacher-key-0123456789"
    out = tmp_path / "served"
    with FakeOpenAI(api_key=key, logits_model=str(tiny_model_dir)) as server:
        r = run_cli("teacher-logits", str(EXAMPLES), "--teacher", "tiny", "--teacher-url", server.base_url, "--model",
                    str(tiny_model_dir), "--top-k", str(K), "--template", "alpaca", "--max-length", "96",
                    "--api-key-env", "TEACHER_KEY", "-o", str(out), "--no-progress", env={"TEACHER_KEY": key})
        assert r.returncode == 0, r.stderr
        assert server.stats()["completion_requests"] == len(stored(cache8))
    served, local = stored(out), stored(cache8)
    assert served.keys() == local.keys()
    for k in local:
        assert torch.equal(served[k][0], local[k][0]), k
        torch.testing.assert_close(served[k][1].float(), local[k][1].float(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(served[k][2], local[k][2], rtol=1e-4, atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["settings"]["teacher"]["producer"] == "server"
    assert not any(key.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", ["missing data", "unknown teacher", "unknown student", "url without model"])
def test_bad_input_is_one_line_before_anything_loads(case, tiny_model_dir, tmp_path):
    args = {"missing data": [str(tmp_path / "nope.jsonl"), "--teacher", str(tiny_model_dir)],
            "unknown teacher": [str(EXAMPLES), "--teacher", str(tmp_path / "no-such-model")],
            "unknown student": [str(EXAMPLES), "--teacher", str(tiny_model_dir), "--model", "./no/such/model"],
            "url without model": [str(EXAMPLES), "--teacher", "t", "--teacher-url", "http://127.0.0.1:9/v1"]}[case]
    r = run_cli("teacher-logits", *args, "-o", str(tmp_path / "cache"))
    line = one_error_line(r.stderr)
    assert r.returncode == 2, r.stderr
    assert {"missing data": "nope.jsonl", "unknown teacher": "no-such-model", "unknown student": "no/such/model",
            "url without model": "'model'"}[case] in line
    assert not (tmp_path / "cache").exists() and "Loading weights" not in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(mount_reason() is not None, reason=f"needs a tmpfs: {mount_reason()}")
def test_a_full_disk_leaves_whole_shards_and_a_rerun_completes(tiny_model_dir, tmp_path):
    """The disk fills mid-run: one line, only whole shards and no temporaries; with room, the rerun ends
    with the cache of one uninterrupted run."""
    args = ["teacher-logits", str(EXAMPLES), "--teacher", str(tiny_model_dir), "--top-k", "64", "--template", "alpaca",
            "--batch-tokens", "256", "--no-progress"]
    env = {"OMP_NUM_THREADS": "1"}
    whole = run_cli(*args, "-o", str(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr
    with Tmpfs(tmp_path / "disk", "128k") as fs:
        out = tmp_path / "disk" / "cache"
        r = run_cli(*args, "-o", str(out), env=env)
        assert r.returncode != 0, "it fitted: make the tmpfs smaller"
        line = one_error_line(r.stderr)
        assert "cannot write" in line or "No space left" in line, line
        shards = list((out / "shards").glob("*"))
        assert shards and all(p.name.startswith("r") and p.suffix == ".safetensors" for p in shards), shards  # no temporaries
        for shard in shards:  # each one reads back whole
            with safe_open(str(shard), framework="pt") as fh:
                assert fh.get_tensor("offsets")[-1] == fh.get_tensor("tail").shape[0] == fh.get_tensor("ids").shape[0]
        fs.resize("8m")
        r = run_cli(*args, "-o", str(out), env=env)
        assert r.returncode == 0, r.stderr
        assert "already stored, skipped" in r.stdout
        assert_same_entries(stored(out), stored(tmp_path / "whole"))


@pytest.mark.slow
def test_a_shard_is_whole_the_moment_its_name_appears(tiny_model_dir, tmp_path):
    """Read as soon as its name shows up (k = V: ~9 MB shards, one example each), every shard is whole:
    a shard is written under a temporary name and renamed into place."""
    data = write_jsonl(tmp_path / "d.jsonl", [json.loads(line) for line in EXAMPLES.read_text().splitlines()[:8]])
    tok_size = len(load_tokenizer(str(tiny_model_dir)))
    exe = Path(sys.executable).with_name("reflect-tune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reflect_tune.cli"]
    out = tmp_path / "cache"
    proc = subprocess.Popen([*cmd, "teacher-logits", str(data), "--teacher", str(tiny_model_dir), "--top-k", str(tok_size),
                             "--template", "alpaca", "--batch-tokens", "1", "--no-progress", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen: dict[str, bool] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        finished = proc.poll() is not None
        names = [e.name for e in os.scandir(out / "shards")] if (out / "shards").is_dir() else []
        for name in names:
            if name.startswith("r") and name not in seen:
                try:
                    with safe_open(str(out / "shards" / name), framework="pt") as fh:
                        seen[name] = fh.get_tensor("offsets")[-1] == fh.get_tensor("tail").shape[0]
                except Exception:
                    seen[name] = False
        if finished:
            break
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
    assert len(seen) == 8 and all(seen.values()), seen
