"""Model resolution and loading: bundled GGUF, .gguf paths, HF folders, hub ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED, run_cli

from reflect_tune.errors import ModelError
from reflect_tune.models import (
    bundled_gguf_path,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)


def test_bundled_model_converts_once_into_the_cache(bundled_dir, model_cache):
    assert bundled_dir.parent == model_cache / "models" == cache_dir() / "models"
    names = {p.name for p in bundled_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "reflect_tune_source.json"} <= names
    source = json.loads((bundled_dir / "reflect_tune_source.json").read_text())
    assert source["converted_from"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    config = json.loads((bundled_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152

    weights = bundled_dir / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    again = resolve_model(BUNDLED)
    assert Path(again.path) == bundled_dir and again.kind == "bundled"
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # not converted again
    assert not [p for p in bundled_dir.parent.iterdir() if ".tmp-" in p.name]


def test_gguf_path_and_folder_share_the_bundled_cache(bundled_dir, tmp_path):
    gguf = bundled_gguf_path("smollm2-135m-instruct")
    by_path = resolve_model(str(gguf))
    assert by_path.kind == "gguf" and Path(by_path.path) == bundled_dir
    assert Path(resolve_model(str(gguf.parent)).path) == bundled_dir  # a folder with one .gguf


def test_local_folder_loads_in_fp32_on_cpu_by_default(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "folder"
    model = load_model(resolved, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu").dtype == torch.bfloat16


def test_tiny_model_is_seeded_and_shares_the_tokenizer(tiny_model_dir, bundled_dir, tmp_path):
    from fakes.tiny import make_tiny_llama

    twin = make_tiny_llama(tmp_path / "twin", bundled_dir)
    a, b = load_model(str(tiny_model_dir), device="cpu"), load_model(str(twin), device="cpu")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    tok_tiny, tok_real = load_tokenizer(str(tiny_model_dir)), load_tokenizer(BUNDLED)
    text = "Selective reflection-tuning recycles data."
    assert tok_tiny(text)["input_ids"] == tok_real(text)["input_ids"]
    assert tok_tiny.pad_token is not None


def test_dtype_and_device_rules(monkeypatch):
    from reflect_tune.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")


def test_missing_model_says_what_was_tried(tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path / "nope"))
    assert "not found; tried: local path" in str(err.value) and "bundled:smollm2-135m-instruct" in str(err.value)
    with pytest.raises(ModelError) as err:
        load_tokenizer("someone/not-a-real-model")  # a hub id, with the hub switched off
    message = str(err.value)
    assert "tried: local path someone/not-a-real-model (does not exist)" in message
    assert "hub id 'someone/not-a-real-model'" in message
    with pytest.raises(ModelError, match="unknown bundled model 'nope'; available: bundled:smollm2-135m-instruct"):
        resolve_model("bundled:nope")


def test_safetensors_only(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights \(only pytorch_model\.bin\)"):
        load_model(str(folder))


def test_remote_code_is_refused_unless_asked(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"}}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="needs custom code; pass --trust-remote-code"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "not_an_architecture"}))
    with pytest.raises(ModelError, match="cannot load model: The checkpoint you are trying to load has model type"):
        load_model(str(folder))


def test_broken_folders_give_one_line_errors(tiny_model_dir, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="no-tokenizer: cannot load tokenizer: "):
        load_tokenizer(str(no_tokenizer))
    (no_tokenizer / "model.safetensors").write_bytes(b"not really safetensors")
    with pytest.raises(ModelError, match="no-tokenizer: cannot load model: "):
        load_model(str(no_tokenizer), device="cpu")
    root = Path(__file__).resolve().parents[1]
    proc = run_cli("inspect", str(root / "examples" / "alpaca_small.jsonl"), "--model", str(no_tokenizer))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_unwritable_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("REFLECT_TUNE_CACHE", "/proc/no-such-cache")
    with pytest.raises(ModelError, match="model cache /proc/no-such-cache/models is not writable .*set REFLECT_TUNE_CACHE"):
        resolve_model(BUNDLED)


def test_cache_key_follows_content_not_path(tmp_path):
    from reflect_tune.models import _gguf_cache_key

    gguf = bundled_gguf_path("smollm2-135m-instruct")
    link = tmp_path / gguf.name
    link.symlink_to(gguf)
    assert _gguf_cache_key(link) == _gguf_cache_key(gguf)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 99 + b"y")
    assert _gguf_cache_key(a) != _gguf_cache_key(b)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelError, match="a file, but not a .gguf"):
        resolve_model(str(tmp_path / "weights.txt"))


@pytest.mark.slow
def test_bundled_model_answers_paris(bundled_dir):
    tok = load_tokenizer(BUNDLED)
    model = load_model(BUNDLED)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_cli_counts_tokens_with_the_bundled_model_offline(bundled_dir, model_cache):
    root = Path(__file__).resolve().parents[1]
    proc = run_cli(
        "inspect", str(root / "examples" / "alpaca_small.jsonl"), "--json", "--model", BUNDLED,
        env={"HF_HUB_OFFLINE": "1", "REFLECT_TUNE_CACHE": str(model_cache)},
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["tokenizer"] == BUNDLED and info["records"] == 32
    # "Paris." is 3 tokens for SmolLM2; outputs of the example file are 2 to ~100 tokens
    assert 1 <= info["tokens"]["output"]["min"] < info["tokens"]["output"]["max"] < 200
    assert "converting" not in proc.stderr  # the session's conversion was reused


@pytest.mark.slow
def test_a_second_process_waits_for_the_first_conversion(bundled_dir, tmp_path):
    """Process B finds A's lock held, waits, then uses A's finished folder instead of converting."""
    import fcntl
    import os
    import shutil
    import subprocess
    import sys

    from reflect_tune.models import _gguf_cache_key

    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    key = _gguf_cache_key(bundled_gguf_path("smollm2-135m-instruct"))
    with open(models / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # we are process A, "converting"
        script = (
            "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "from reflect_tune.models import resolve_model\n"
            "print(resolve_model('bundled:smollm2-135m-instruct').path)\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "REFLECT_TUNE_CACHE": str(tmp_path / "cache")},
        )
        seen = []
        for _ in range(200):  # bounded: B logs the wait within a few lines
            line = proc.stderr.readline()
            seen.append(line)
            if not line or "waiting for another process converting" in line:
                break
        assert "waiting for another process converting SmolLM2-135M-Instruct.Q4_1.gguf" in seen[-1], seen
        # A finishes: its folder appears (links to the session's conversion), then A unlocks
        shutil.copytree(bundled_dir, models / key, copy_function=os.symlink)
        fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == str(models / key)
    assert "converting SmolLM2" not in err.replace("another process converting", "")
