"""The train stage on tiny random Llamas that share the real SmolLM2 tokenizer (and one slow run
with the bundled 135M model as the teacher)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_jsonl

from reflect_tune.errors import ModelError, ReflectTuneError
from reflect_tune.losses import IGNORE_INDEX
from reflect_tune.config import SettingError, TrainConfig, from_values, train_config_file
from reflect_tune.train import StudentLM, build_examples, collate, validate
from reflect_tune.train import run as run_train


def build_config(file_values: dict, flags: dict) -> TrainConfig:
    """As the CLI builds it: the file's values, then the flags given (None: not given), then checked."""
    cfg = from_values(TrainConfig, {**file_values, **{k: v for k, v in flags.items() if v is not None}})
    validate(cfg)
    return cfg

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "alpaca_small.jsonl"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from reflect_tune.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def padded_teacher_dir(bundled_dir, tmp_path_factory) -> Path:
    """A different tiny Llama (wider, seed 1) whose output vocabulary is padded by 128 rows."""
    from fakes.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), bundled_dir, hidden=96, heads=4, seed=1,
                           vocab_size=49152 + 128, tie_word_embeddings=False)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _records(n=None):
    from reflect_tune.records import load_records

    return load_records(DATA, limit=n)[0]


# ----------------------------------------------------------------------------- data


def test_targets_cover_only_the_response_under_chat_and_alpaca(tok):
    rec = _records(1)[0]
    for template, prompt_marker in (("chat", "<|im_start|>assistant\n"), ("alpaca", "### Response:\n")):
        cfg = TrainConfig(data="d", output="o", model="m", template=template, max_length=4096)
        (ex,), stats = build_examples([rec], tok, cfg)
        assert len(ex.input_ids) == len(ex.targets)
        first = next(i for i, t in enumerate(ex.targets) if t != IGNORE_INDEX)
        # position `first` predicts the first response token: everything up to it is prompt
        assert tok.decode(ex.input_ids[: first + 1]).endswith(prompt_marker)
        answer = tok.decode([t for t in ex.targets if t != IGNORE_INDEX])
        assert answer == rec.output + ("<|im_end|>\n" if template == "chat" else tok.eos_token)
        assert ex.targets[first:-1] == ex.input_ids[first + 1 :]  # aligned: the next token
        assert stats == {"examples": 1, "truncated": 0, "skipped_no_response": 0, "target_tokens": len(tok(answer, add_special_tokens=False).input_ids)}


def test_truncation_counts_and_skips_examples_without_response(tok):
    recs = _records(4)
    cfg = TrainConfig(data="d", output="o", model="m", max_length=40)
    examples, stats = build_examples(recs, tok, cfg)
    assert all(len(e.input_ids) <= 40 for e in examples)
    assert stats["truncated"] == 4 and stats["skipped_no_response"] == 4 - len(examples)
    with pytest.raises(ReflectTuneError, match="no example keeps a response token"):
        build_examples(recs, tok, TrainConfig(data="d", output="o", model="m", max_length=10))


def test_packed_rows_keep_sequences_apart(tiny_model_dir, tok):
    """A packed row gives every sequence the logits it gets alone: no attention across sequences."""
    model = StudentLM(_load(tiny_model_dir)).eval()
    cfg = TrainConfig(data="d", output="o", model="m", max_length=512)
    examples, _ = build_examples(_records(3), tok, cfg)
    packed = collate([examples], tok.pad_token_id, packed=True)
    assert packed["position_ids"][0].tolist()[: len(examples[0].input_ids) + 1] == list(range(len(examples[0].input_ids))) + [0]
    with torch.no_grad():
        together = model(packed["input_ids"], position_ids=packed["position_ids"], hidden=False)[0]
        at = 0
        for ex in examples:
            alone = collate([[ex]], tok.pad_token_id, packed=False)
            single = model(alone["input_ids"], attention_mask=alone["attention_mask"], hidden=False)[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(together[at : at + n], single[:n], atol=1e-5, rtol=1e-5)
            at += n
    assert packed["tokens"] == sum(sum(t != IGNORE_INDEX for t in e.targets) for e in examples)


# ----------------------------------------------------------------------------- gradients


def test_grad_accumulation_1x8_equals_8x1_token_normalized(tiny_model_dir, padded_teacher_dir, tmp_path):
    """One optimizer step of one micro-batch of 8 and of 8 micro-batches of 1 (different token counts):
    the training loop gives the same loss and the same gradient norm, with the memory-lean KD loss and
    with the full-logit one."""
    from reflect_tune.convert import write_records
    from reflect_tune.records import load_records

    data = tmp_path / "eight.jsonl"
    write_records(load_records(DATA, limit=8)[0], data)
    logs = {}
    for impl, shape in (("chunked", (8, 1)), ("chunked", (1, 8)), ("naive", (8, 1))):
        out = tmp_path / f"{impl}-{shape[0]}x{shape[1]}"
        run_train(build_config({}, {"data": str(data), "output": str(out), "model": str(tiny_model_dir), "method": "full",
                                    "teacher": str(padded_teacher_dir), "kd_ratio": 0.4, "kd_loss": "jsd",
                                    "kd_temperature": 2.0, "kd_impl": impl, "batch_size": shape[0], "grad_accum": shape[1],
                                    "max_length": 96, "max_steps": 1, "train_ce_samples": 0, "progress": False}))
        logs[impl, shape] = next(csv.DictReader(open(out / "train_log.csv")))
    reference = logs["chunked", (8, 1)]
    assert int(reference["tokens"]) > 8  # every example has several target tokens, not the same number
    for key, row in logs.items():
        for column in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert float(row[column]) == pytest.approx(float(reference[column]), rel=1e-4), (key, column)
        assert row["tokens"] == reference["tokens"]


# ----------------------------------------------------------------------------- config


def test_yaml_config_flags_override_and_validation(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("model: tiny\nkd-ratio: 0.7\nlr: 1e-3\nfull: true\nepochs: 2\npacking: true\n")
    values = train_config_file(cfg_file)
    assert values == {"model": "tiny", "kd_ratio": 0.7, "lr": 1e-3, "method": "full", "epochs": 2, "packing": True}
    cfg = build_config(values, {"data": "d.jsonl", "output": "out", "epochs": 3, "kd_ratio": None})
    assert (cfg.epochs, cfg.kd_ratio, cfg.lr, cfg.method, cfg.packing) == (3, 0.7, 1e-3, "full", True)
    (tmp_path / "bad.yaml").write_text("model: tiny\nkd_ration: 0.5\n")
    with pytest.raises(ReflectTuneError, match=r"bad.yaml:2: setting 'kd_ration': unknown \(known: "):
        train_config_file(tmp_path / "bad.yaml")
    # the names Hugging Face users type are aliases of ours; the old KD `temperature` says where it went
    (tmp_path / "hf.yaml").write_text("learning_rate: 3.0e-4\nnum_train_epochs: 2\nper_device_train_batch_size: 8\n"
                                      "gradient_accumulation_steps: 2\noutput_dir: out\nsave_steps: 50\nsave_total_limit: 3\n")
    hf = build_config(train_config_file(tmp_path / "hf.yaml"), {"data": "d.jsonl", "model": "m"})
    assert (hf.lr, hf.epochs, hf.batch_size, hf.grad_accum, hf.output, hf.save_every, hf.keep_checkpoints) == (
        3e-4, 2, 8, 2, "out", 50, 3)
    (tmp_path / "old.yaml").write_text("temperature: 2.0\n")
    with pytest.raises(ReflectTuneError, match=r"old.yaml:1: setting 'temperature' is now 'kd_temperature'"):
        train_config_file(tmp_path / "old.yaml")
    with pytest.raises(SettingError, match=r"setting 'epochs': expected an int, got 'two'"):
        build_config({"epochs": "two"}, {"data": "d", "output": "o", "model": "m"})
    with pytest.raises(ReflectTuneError, match=r"setting 'kd_loss': 'kl' is not one of"):
        build_config({"kd_loss": "kl"}, {"data": "d", "output": "o", "model": "m"})
    with pytest.raises(ReflectTuneError, match=r"setting 'merge': only for --lora"):
        build_config({"merge": True, "method": "full"}, {"data": "d", "output": "o", "model": "m"})


# ----------------------------------------------------------------------------- whole runs


def test_train_full_with_teacher_writes_the_output_folder(tiny_model_dir, padded_teacher_dir, tmp_path):
    """The CLI, a YAML config plus flags, full fine-tune, KD from a teacher with a padded vocabulary."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("full: true\nbatch-size: 2\ngrad_accum: 2\nmax_length: 192\nlr: 1.0e-3\nkd_loss: skew_rkl\n")
    r = run_cli("train", str(DATA), "-o", str(out), "--model", str(tiny_model_dir), "--config", str(cfg_file),
                "--teacher", str(padded_teacher_dir), "--kd-ratio", "0.6", "--kd-temperature", "2", "--max-steps", "3",
                "--packing", "--save-every", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "trained 3 steps" in r.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "train_config.yaml",
                 "meta.json", "train_log.csv", "loss.png"):
        assert (out / name).is_file(), name
    import yaml

    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (resolved["method"], resolved["kd_ratio"], resolved["kd_loss"], resolved["packing"]) == ("full", 0.6, "skew_rkl", True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "train" and meta["config"]["teacher"] == str(padded_teacher_dir)
    assert meta["result"]["vocab_size"] == 49152 and meta["result"]["lean_loss"] is True
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert float(row["loss"]) == pytest.approx(0.4 * float(row["ce_loss"]) + 0.6 * float(row["kd_loss"]), rel=1e-4)
        assert float(row["kd_loss"]) > 0 and float(row["tokens_per_s"]) > 0
    before, after = _weights(tiny_model_dir / "model.safetensors"), _weights(out / "model.safetensors")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before)  # every tensor of a full fine-tune moves
    # a finished folder is never overwritten by accident (checked before anything loads)
    with pytest.raises(ReflectTuneError, match="not empty; pass --resume"):
        run_train(TrainConfig(data=str(DATA), output=str(out), model=str(tiny_model_dir)))
    # full-weight resume: redo step 3 from checkpoints/step-2 with the resolved config: same weights
    assert (out / "checkpoints" / "step-2" / "optimizer.pt").is_file()
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == {"epoch": 0, "micro_batch": 4}
    with pytest.raises(ReflectTuneError, match=r"cannot resume: setting 'kd_ratio' was 0.6, now 0.5"):
        run_train(TrainConfig(**{**resolved, "kd_ratio": 0.5, "resume": True}))
    summary = run_train(TrainConfig(**{**resolved, "resume": True}))
    assert summary["resumed_from"] == str(out / "checkpoints" / "step-2") and summary["steps"] == 3
    again = _weights(out / "model.safetensors")
    for n in after:
        torch.testing.assert_close(again[n], after[n], atol=1e-6, rtol=0, msg=lambda m: f"{n}: {m}")
    assert [r["step"] for r in csv.DictReader(open(out / "train_log.csv"))] == ["1", "2", "3"]


def test_train_lora_changes_the_adapter_and_merges(tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = build_config({}, {"data": str(DATA), "output": str(out), "model": str(tiny_model_dir), "method": "lora",
                            "batch_size": 4, "grad_accum": 1, "max_length": 128, "max_steps": 3, "lr": 1e-2,
                            "template": "alpaca", "merge": True, "progress": False})
    summary = run_train(cfg)
    assert summary["steps"] == 3 and summary["lean_loss"] is True
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "meta.json", "loss.png",
                 "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json", "merged/meta.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    adapter = _weights(out / "adapter_model.safetensors")
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: training moved it
    base, merged = _weights(tiny_model_dir / "model.safetensors"), _weights(out / "merged" / "model.safetensors")
    proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[proj], merged[proj])
    torch.testing.assert_close(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    # no checkpoint (save_every 500 > 3 steps): --resume must not silently retrain a finished run
    with pytest.raises(ReflectTuneError, match="holds a finished run and no checkpoint"):
        run_train(TrainConfig(**{**cfg.__dict__, "resume": True}))


def test_teacher_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    cfg = TrainConfig(data=str(DATA), output=str(tmp_path / "out"), model=str(tiny_model_dir), teacher=str(other))
    with pytest.raises(ModelError, match=r"^teacher .* use different tokenizers \(49152 vs 49152 tokens; token '(a|b)' is id"):
        run_train(cfg)
    assert not (tmp_path / "out").exists()  # refused before any output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = TrainConfig(data=str(DATA), output=str(tmp_path / "q"), model=str(tiny_model_dir), method="qlora")
    with pytest.raises(ReflectTuneError, match=r"--qlora needs a CUDA GPU"):
        run_train(cfg)


# ----------------------------------------------------------------------------- slow: kill, DDP, real teacher


def _cli_cmd(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("reflect-tune")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "reflect_tune.cli", *args]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_weights(tiny_model_dir, tmp_path):
    """LoRA with dropout (so the RNG state matters): killed after a checkpoint, resumed, equal."""
    data = write_jsonl(tmp_path / "data.jsonl", [json.loads(x) for x in DATA.read_text().splitlines()[:12]])
    args = ["--model", str(tiny_model_dir), "--lora", "--batch-size", "2", "--grad-accum", "1", "--max-length", "128",
            "--epochs", "2", "--lr", "5e-3", "--save-every", "2", "--no-progress"]
    straight = run_cli("train", str(data), "-o", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd("train", str(data), "-o", str(out), *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-4" / "trainer_state.json").is_file():  # in the 1st of 2 epochs
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()  # the run really was cut short

    resumed = run_cli("train", str(data), "-o", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = _weights(tmp_path / "straight" / "adapter_model.safetensors"), _weights(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=0, rtol=0, msg=lambda m: f"{n}: {m}")
    log_a = list(csv.DictReader(open(tmp_path / "straight" / "train_log.csv")))
    log_b = list(csv.DictReader(open(out / "train_log.csv")))
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a] == [str(i) for i in range(1, len(log_a) + 1)]
    assert len(log_a) > 6  # killed after step 4, so the resumed run did real work
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process_with_double_accumulation(tiny_model_dir, padded_teacher_dir, tmp_path):
    """torchrun, 2 CPU ranks on gloo, full fine-tune with KD: the same weights as one process
    accumulating the same micro-batches (token-normalized across ranks). The student's output
    layer is untied, so DDP must sync a weight used only by the chunked loss, outside forward."""
    from fakes.tiny import make_tiny_llama

    student = make_tiny_llama(tmp_path / "student", tiny_model_dir, tie_word_embeddings=False, seed=2)
    common = ["--model", str(student), "--full", "--batch-size", "2", "--max-length", "128", "--max-steps", "3",
              "--lr", "1e-3", "--teacher", str(padded_teacher_dir), "--save-every", "2", "--no-progress"]
    one = run_cli("train", str(DATA), "-o", str(tmp_path / "one"), "--grad-accum", "2", *common)
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "reflect_tune.cli", "train",
                          str(DATA), "-o", str(tmp_path / "two"), "--grad-accum", "1", *common],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 3 steps") == 1  # only the main process reports
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["result"]["world_size"] == 2
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step-2").iterdir()} >= {
        "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt", "trainer_state.json"}
    a, b = _weights(tmp_path / "one" / "model.safetensors"), _weights(tmp_path / "two" / "model.safetensors")
    assert "lm_head.weight" in a and not torch.equal(a["lm_head.weight"], _weights(student / "model.safetensors")["lm_head.weight"])
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_bundled_135m_teacher_distills_into_a_small_student(bundled_dir, tmp_path):
    from fakes.tiny import make_tiny_llama

    student = make_tiny_llama(tmp_path / "student", bundled_dir, layers=2, hidden=128, heads=4, intermediate=256)
    out = tmp_path / "out"
    r = run_cli("train", str(DATA), "-o", str(out), "--model", str(student), "--full", "--teacher",
                "bundled:smollm2-135m-instruct", "--kd-loss", "jsd", "--beta", "0.5", "--kd-ratio", "0.9",
                "--batch-size", "2", "--grad-accum", "1", "--max-length", "96", "--max-steps", "3", "--lr", "2e-3",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert len(rows) == 3 and all(float(x["kd_loss"]) > 0 for x in rows)
    before, after = _weights(student / "model.safetensors"), _weights(out / "model.safetensors")
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert json.loads((out / "meta.json").read_text())["config"]["teacher"] == "bundled:smollm2-135m-instruct"
