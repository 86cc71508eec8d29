"""`reflect-tune eval`: the real lm-evaluation-harness, offline, on our own tiny tasks.

lm-eval's numbers are checked against a plain log-likelihood computation of the same items (our
own few lines, fp32): per item and choice, and the aggregated acc / acc_norm / acc_bytes / perplexity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BUNDLED, one_error_line

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
MC, CONT, FILL = (TASKS / f"reflect_tiny_{n}.yaml" for n in ("mc", "cont", "fill"))
EXAMPLE = Path(__file__).parents[1] / "examples" / "lm_eval_tasks" / "reflect_tiny_mc.yaml"
runner = CliRunner()


# ----------------------------------------------------------------------------- the reference


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As lm-eval does for a causal model: trailing spaces of the context go to the continuation; the
    continuation's tokens are those of context+continuation after the context's own tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def reference_ll(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of the continuation tokens' log-probabilities, and whether each is the argmax."""
    import torch

    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0, len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def docs(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    return rows[:limit]


def reference_task(task: str, model, tok, limit: int | None = None) -> dict:
    """Per-item log-likelihoods and the task's aggregated metrics, computed here."""
    import numpy as np

    if task == "reflect_tiny_cont":
        items = [reference_ll(model, tok, d["context"], " " + d["continuation"]) for d in docs(CONT, limit)]
        lls = [ll for ll, _ in items]
        return {"lls": [[ll] for ll in lls], "acc": float(np.mean([g for _, g in items])),
                "perplexity": math.exp(-float(np.mean(lls)))}
    path, text, choices, gold, delim = {
        "reflect_tiny_mc": (MC, lambda d: f"Question: {d['question']}\nAnswer:", "choices", "label", " "),
        "reflect_tiny_fill": (FILL, lambda d: d["stem"], "options", "answer", ""),
    }[task]
    lls, acc, acc_norm, acc_bytes = [], [], [], []
    for d in docs(path, limit):
        row = np.array([reference_ll(model, tok, text(d), delim + c)[0] for c in d[choices]])
        chars = np.array([len(c) for c in d[choices]], dtype=float)
        nbytes = np.array([len(c.encode()) for c in d[choices]], dtype=float)
        lls.append(row.tolist())
        acc.append(row.argmax() == d[gold])
        acc_norm.append((row / chars).argmax() == d[gold])
        acc_bytes.append((row / nbytes).argmax() == d[gold])
    return {"lls": lls, "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "acc_bytes": float(np.mean(acc_bytes))}


def lm_eval_lls(out: Path, task: str) -> list[list[float]]:
    rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
    return [[r[0] for r in s["filtered_resps"]] for s in sorted(rows, key=lambda s: s["doc_id"])]


def assert_matches(out: Path, task: str, ref: dict) -> None:
    results = json.loads((out / "results.json").read_text())["results"][task]
    got = lm_eval_lls(out, task)
    assert len(got) == len(ref["lls"])
    for g, r in zip(got, ref["lls"]):
        assert g == pytest.approx(r, abs=1e-4)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        if f"{metric},none" in results:
            assert results[f"{metric},none"] == pytest.approx(ref[metric], abs=1e-4), metric
    if "perplexity" in ref:
        assert results["perplexity,none"] == pytest.approx(ref["perplexity"], rel=1e-4)


def load_fp32(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


def eval_cfg(model, tasks, out, **kw):
    from reflect_tune.config import EvalConfig

    return EvalConfig(model=str(model), tasks=tuple(str(t) for t in tasks), output=str(out),
                      batch_size=kw.pop("batch_size", 4), dtype="float32", device="cpu", progress=False, **kw)


# ----------------------------------------------------------------------------- the tiny model, three tasks


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One run of the stage on the three tiny tasks, from another cwd (relative data_files)."""
    from reflect_tune.evaluate import run

    out = tmp_path_factory.mktemp("eval") / "out"
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        summary = run(eval_cfg(tiny_model_dir, [MC, CONT, FILL], out, batch_size=3))
    finally:
        os.chdir(cwd)
    return out, summary


def test_tiny_tasks_match_a_plain_loglikelihood_computation(tiny_run, tiny_model_dir):
    out, summary = tiny_run
    model, tok = load_fp32(tiny_model_dir)
    for task in ("reflect_tiny_mc", "reflect_tiny_cont", "reflect_tiny_fill"):
        assert_matches(out, task, reference_task(task, model, tok))
    assert summary["tasks"] == ["reflect_tiny_mc", "reflect_tiny_cont", "reflect_tiny_fill"]
    assert summary["items"] == 12 + 10 + 8


def test_output_files(tiny_run, tiny_model_dir):
    from lm_eval.utils import handle_non_serializable

    out, summary = tiny_run
    results = json.loads((out / "results.json").read_text())
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "date", "lm_eval_version"):
        assert key in results, key
    assert "samples" not in results  # in samples_TASK.jsonl, as lm-eval's --log_samples writes them
    assert json.loads(json.dumps(results, default=handle_non_serializable)) == results
    assert results["n-samples"]["reflect_tiny_mc"] == {"original": 12, "effective": 12}
    assert results["configs"]["reflect_tiny_mc"]["dataset_kwargs"]["data_files"]["test"] == str(MC.with_suffix(".jsonl"))

    ev = json.loads((out / "eval.json").read_text())
    assert ev["rows"] == summary["rows"] and ev["config_hash"] == summary["config_hash"]
    expected = {(t, k.split(",")[0]): (v, r.get(k.replace(",", "_stderr,")))
                for t, r in results["results"].items() for k, v in r.items() if "," in k and "_stderr," not in k}
    assert {(r["task"], r["metric"]) for r in ev["rows"]} == set(expected)
    md = (out / "eval.md").read_text().splitlines()
    table = [line.split(" | ") for line in md if line.startswith("| reflect_tiny")]
    assert len(table) == len(ev["rows"]) == 7
    for r, cells in zip(ev["rows"], table):
        value, stderr = expected[(r["task"], r["metric"])]
        assert r["value"] == value and r["stderr"] == stderr
        assert r["samples"] == results["n-samples"][r["task"]]["effective"]
        assert r["model"] == str(tiny_model_dir) and len(r["config_hash"]) == 12
        assert cells[0] == f"| {r['task']}" and cells[1] == r["metric"]
        assert float(cells[3]) == pytest.approx(value, abs=5e-5) and int(cells[5]) == r["samples"]
        assert cells[6] == str(tiny_model_dir) and cells[7].rstrip(" |") == r["config_hash"]
    marker = json.loads((out / ".reflect-tune.json").read_text())
    assert marker["stage"] == "eval" and {"results.json", "eval.json", "eval.md", "meta.json"} <= set(marker["written"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "eval" and meta["result"]["config_hash"] == summary["config_hash"]


def test_rerun_needs_overwrite_and_passes_settings_on(tiny_model_dir, tmp_path):
    """The CLI: a second run into the same folder needs --overwrite; a folder eval did not write is
    refused; --num-fewshot and --limit reach lm-eval; --report-to tensorboard writes event files."""
    from reflect_tune.cli import app

    out = tmp_path / "out"
    base = ["eval", str(tiny_model_dir), "--tasks", str(EXAMPLE), "-o", str(out), "--limit", "3", "--batch-size", "2", "--no-progress",
            "--dtype", "float32", "--device", "cpu"]
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert "reflect_tiny_mc" in first.stdout and "acc_norm" in first.stdout
    again = runner.invoke(app, base)
    assert again.exit_code == 2 and "--overwrite" in one_error_line(again.stderr)
    second = runner.invoke(app, [*base, "--overwrite", "--num-fewshot", "1", "--report-to", "tensorboard"])
    assert second.exit_code == 0, second.output
    results = json.loads((out / "results.json").read_text())
    assert results["n-shot"]["reflect_tiny_mc"] == 1 and results["n-samples"]["reflect_tiny_mc"]["effective"] == 3
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = runner.invoke(app, [*base[:4], "-o", str(foreign), "--overwrite"])
    assert refused.exit_code == 2 and "reflect-tune eval" in one_error_line(refused.stderr)
    assert (foreign / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- a LoRA train output


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA output folder as train writes it: the PEFT adapter, the tokenizer, meta.json naming
    the base model, the marker. Its B matrices are made non-zero, so it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from reflect_tune.artifacts import claim_folder, write_meta

    out = tmp_path_factory.mktemp("lora") / "train-out"
    base, _ = load_fp32(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    claim_folder(out, "train", [f.name for f in out.iterdir()] + ["meta.json"])
    write_meta(out, {"stage": "train", "config": {"model": str(tiny_model_dir), "method": "lora"}})
    return out


def test_lora_output_is_evaluated_as_base_plus_adapter(lora_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from reflect_tune.evaluate import run

    out = tmp_path / "out"
    summary = run(eval_cfg(lora_dir, [MC], out, limit=6))
    assert summary["adapter"] == str(lora_dir) and summary["base_model"] == str(tiny_model_dir)
    base, tok = load_fp32(tiny_model_dir)
    base_ref = reference_task("reflect_tiny_mc", base, tok, limit=6)
    merged = PeftModel.from_pretrained(load_fp32(tiny_model_dir)[0], str(lora_dir)).merge_and_unload().eval()
    assert_matches(out, "reflect_tiny_mc", reference_task("reflect_tiny_mc", merged, tok, limit=6))
    got = lm_eval_lls(out, "reflect_tiny_mc")
    assert max(abs(g - b) for gs, bs in zip(got, base_ref["lls"]) for g, b in zip(gs, bs)) > 1e-2  # not the base


# ----------------------------------------------------------------------------- bad input: one line, before any model loads


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the stage gets as far as loading weights."""
    from reflect_tune import evaluate

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluate, "load_lm", refuse)


@pytest.fixture
def bad_weights(tiny_model_dir, tmp_path) -> Path:
    """A model folder with a valid config and tokenizer and unreadable weights: loading it would fail
    with a model error, so a task error for it shows the weights were never read."""
    folder = tmp_path / "bad-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    return folder


def _broken_yaml(tmp_path) -> Path:
    p = tmp_path / "broken.yaml"
    p.write_text("task: reflect_broken\ndataset_path: json\ndoc_to_text: [unclosed\n")
    return p


def _hub_yaml(tmp_path) -> Path:
    p = tmp_path / "hub_task.yaml"
    p.write_text(MC.read_text().replace("dataset_path: json", "dataset_path: reflect-tune-tests/no-such-dataset")
                 .replace("task: reflect_tiny_mc", "task: reflect_hub_mc"))
    return p


def _no_tokenizer(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "no-tok"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, folder / f)
    return folder


@pytest.mark.parametrize("case, expected", [
    ("unknown_task", "unknown task 'no_such_task_xyz'"),
    ("broken_yaml", "broken.yaml: cannot be loaded"),
    ("hub_dataset", "cannot be fetched from the Hugging Face hub"),
    ("missing_yaml", "task YAML file not found"),
    ("no_tokenizer", "has no tokenizer"),
    ("missing_model", "not found"),
    ("empty_model_folder", "not a model folder"),
])
def test_bad_input_is_one_line_before_any_model_loads(case, expected, bad_weights, tiny_model_dir, tmp_path, no_model_load):
    from reflect_tune.cli import app

    model, task = str(bad_weights), str(MC)
    if case == "unknown_task":
        task = "no_such_task_xyz"
    elif case == "broken_yaml":
        task = str(_broken_yaml(tmp_path))
    elif case == "hub_dataset":
        task = str(_hub_yaml(tmp_path))
    elif case == "missing_yaml":
        task = str(tmp_path / "nope.yaml")
    elif case == "no_tokenizer":
        model = str(_no_tokenizer(tiny_model_dir, tmp_path))
    elif case == "missing_model":
        model = str(tmp_path / "no-such-model")
    elif case == "empty_model_folder":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    result = runner.invoke(app, ["eval", model, "--tasks", task, "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert expected in line, line
    if case == "hub_dataset":
        assert "reflect_hub_mc" in line and "--tasks" in line and "local task YAML" in line
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the bundled model (slow)


@pytest.mark.slow
def test_bundled_135m_matches_the_reference(bundled_dir, tmp_path):
    from reflect_tune.evaluate import run

    out = tmp_path / "out"
    run(eval_cfg(BUNDLED, [MC, CONT], out, limit=6))
    model, tok = load_fp32(bundled_dir)
    assert_matches(out, "reflect_tiny_mc", reference_task("reflect_tiny_mc", model, tok, limit=6))
    assert_matches(out, "reflect_tiny_cont", reference_task("reflect_tiny_cont", model, tok, limit=6))


@pytest.mark.slow
def test_a_real_task_name_without_a_hub_says_what_to_do(tmp_path, no_model_load, bad_weights):
    from reflect_tune.cli import app

    result = runner.invoke(app, ["eval", str(bad_weights), "--tasks", "hellaswag", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert "task 'hellaswag'" in line and "Hugging Face hub" in line and "--tasks" in line
