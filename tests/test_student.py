"""`make-student`: a DistilBERT-style student keeps every k-th teacher layer, bit for bit."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from reflect_tune.errors import ReflectTuneError
from reflect_tune.config import StudentConfig
from reflect_tune.student import layer_indices, run


def make_student(teacher: str, layers: int, output: str, **kw) -> dict:
    return run(StudentConfig(teacher=teacher, layers=layers, output=output, **kw))
from fakes.tiny import make_tiny_llama

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@pytest.fixture(scope="module")
def tiny6(bundled_dir, tmp_path_factory):
    """A seeded 6-layer tiny Llama (tied embeddings) with the SmolLM2 tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny6"), bundled_dir, layers=6, hidden=32, intermediate=64)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "teacher, student, expected",
    [
        (6, 3, [0, 2, 4]),
        (6, 2, [0, 3]),
        (30, 10, list(range(0, 30, 3))),
        (30, 7, [0, 4, 8, 12, 17, 21, 25]),  # 30/7 = 4.29: gaps of 4 or 5
        (6, 4, [0, 1, 3, 4]),
        (5, 2, [0, 2]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (1, 1, [0]),
    ],
)
def test_layer_indices(teacher, student, expected):
    kept = layer_indices(teacher, student)
    assert kept == expected
    assert len(set(kept)) == student and kept == sorted(kept) and kept[0] == 0 and kept[-1] < teacher
    if teacher % student == 0:
        assert kept == list(range(0, teacher, teacher // student))


@pytest.mark.parametrize("student", [7, 99, 0, -1])
def test_layer_indices_out_of_range(student):
    with pytest.raises(ReflectTuneError, match=r"my-teacher has 6 decoder layers") as e:
        layer_indices(6, student, "my-teacher")
    assert "\n" not in str(e.value)


def test_per_layer_config_lists_are_subset():
    from transformers import Qwen2Config

    from reflect_tune.student import _student_config

    teacher = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2)
    assert teacher.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    cfg = _student_config(teacher, [0, 2])
    assert cfg.num_hidden_layers == 2 and cfg.layer_types == ["full_attention", "sliding_attention"]
    assert teacher.num_hidden_layers == 4  # the teacher's config is not touched


def test_remap_needs_layer_keys():
    from reflect_tune.errors import ModelError
    from reflect_tune.student import _remap

    t = torch.zeros(1)
    state = {"embed.weight": t, "decoder.layers.0.w": t, "decoder.layers.1.w": t + 1, "decoder.layers.2.w": t + 2}
    assert _remap(state, [0, 2], 3, "m") == {"embed.weight": t, "decoder.layers.0.w": t, "decoder.layers.1.w": state["decoder.layers.2.w"]}
    with pytest.raises(ModelError, match="cannot find its 3 decoder layers"):
        _remap({"embed.weight": t, "blocks.0.w": t}, [0], 3, "m")


def test_untied_output_layer_is_copied(bundled_dir, tmp_path):
    teacher = make_tiny_llama(tmp_path / "untied", bundled_dir, layers=4, hidden=32, intermediate=64, tie_word_embeddings=False)
    make_student(str(teacher), 2, str(tmp_path / "s"))
    teacher_w, student_w = _weights(teacher), _weights(tmp_path / "s")
    assert not torch.equal(teacher_w["lm_head.weight"], teacher_w["model.embed_tokens.weight"])
    assert torch.equal(student_w["lm_head.weight"], teacher_w["lm_head.weight"])
    assert torch.equal(student_w["model.layers.1.mlp.up_proj.weight"], teacher_w["model.layers.2.mlp.up_proj.weight"])


def test_student_copies_every_kth_layer(tiny6, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    summary = make_student(str(tiny6), 3, str(out))
    assert summary["kept_layers"] == [0, 2, 4] and summary["teacher_layers"] == 6
    assert summary["output"] == str(out) and not list(tmp_path.glob(".student*"))  # no temp folder left

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 3
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["parameters"] < summary["teacher_parameters"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    teacher_w, student_w = _weights(tiny6), _weights(out)
    teacher_names = {LAYER.sub(r"\2", k) for k in teacher_w if LAYER.match(k)}
    for j, t in enumerate([0, 2, 4]):
        for name in teacher_names:
            assert torch.equal(student_w[f"model.layers.{j}.{name}"], teacher_w[f"model.layers.{t}.{name}"]), (j, name)
    others = {k for k in teacher_w if not LAYER.match(k)}
    assert others == {k for k in student_w if not LAYER.match(k)} and "model.embed_tokens.weight" in others
    for k in others:
        assert torch.equal(student_w[k], teacher_w[k]), k
    assert len(student_w) == len(others) + 3 * len(teacher_names)

    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny6).get_vocab()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, model.config.vocab_size) and torch.isfinite(logits).all()

    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "make-student" and meta["kept_layers"] == [0, 2, 4] and meta["teacher_layers"] == 6
    assert meta["config"]["teacher"] == str(tiny6) and meta["config"]["layers"] == 3
    assert meta["teacher"] == str(tiny6) and meta["parameters"] == summary["parameters"]
    assert "transformers" in meta["versions"]


def test_full_copy_matches_teacher_logits(tiny6, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "copy"
    assert make_student(str(tiny6), 6, str(out))["kept_layers"] == list(range(6))
    teacher = AutoModelForCausalLM.from_pretrained(tiny6, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 300, 4, 4000, 2]])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-6)


def test_output_rules(tiny6, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ReflectTuneError, match="is a file"):
        make_student(str(tiny6), 2, str(afile))

    out = tmp_path / "s"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ReflectTuneError, match="--overwrite") as e:
        make_student(str(tiny6), 2, str(out))
    assert "\n" not in str(e.value) and (out / "old.txt").is_file()  # untouched
    with pytest.raises(ReflectTuneError, match="has 6 decoder layers"):
        make_student(str(tiny6), 7, str(tmp_path / "too-many"))
    assert not (tmp_path / "too-many").exists()

    with pytest.raises(ReflectTuneError, match="only replaces a folder that reflect-tune make-student wrote"):
        make_student(str(tiny6), 2, str(out), overwrite=True)  # not make-student's folder: never removed
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    make_student(str(tiny6), 2, str(out))
    make_student(str(tiny6), 3, str(out), overwrite=True)  # its own output: replaced whole
    assert json.loads((out / "meta.json").read_text())["kept_layers"] == [0, 2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "s"]  # no temp or old folders left


@pytest.mark.slow  # starts subprocesses
def test_cli(tiny6, tmp_path):
    out = str(tmp_path / "cli-student")
    r = run_cli("make-student", "--teacher", str(tiny6), "--layers", "2", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "kept layers [0, 3] of 6" in r.stdout
    assert json.loads((tmp_path / "cli-student" / "meta.json").read_text())["kept_layers"] == [0, 3]

    again = run_cli("make-student", "--teacher", str(tiny6), "--layers", "2", "-o", out)
    assert again.returncode == 2
    assert again.stderr.startswith("error:") and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    r = run_cli("make-student", "--teacher", str(tiny6), "--layers", "3", "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "cli-student" / "meta.json").read_text())["kept_layers"] == [0, 2, 4]

    bad = run_cli("make-student", "--teacher", str(tiny6), "--layers", "99", "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error:") and "6 decoder layers" in bad.stderr


@pytest.mark.slow  # the real 135M model
def test_bundled_to_ten_layers(bundled_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student-10l"
    r = run_cli("make-student", "--teacher", str(bundled_dir), "--layers", "10", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"kept layers {list(range(0, 30, 3))} of 30" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 10
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4 or gen[0, -1].item() == tok.eos_token_id
