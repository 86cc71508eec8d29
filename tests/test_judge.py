"""`reflect-tune judge`: answers from two local models, a pairwise judge asked in both orders.

The judge is the fake OpenAI server with a deterministic verdict rule (`FakeOpenAI(judge=...)`);
the models are tiny random Llamas. The slow test uses `transformers serve` with the bundled model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_error_line, write_jsonl
from fakes.openai_server import FakeOpenAI

from reflect_tune import judge
from reflect_tune.config import JudgeConfig

PROMPTS = [{"id": f"p{i}", "instruction": text} for i, text in enumerate(
    ["Name a colour.", "Write a haiku about rain.", "What is 2 + 2?", "Give one tip for sleeping well.",
     "Translate 'hello' into French.", "List three fruits."])]


def _talking_tiny_llama(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A seeded tiny random Llama whose greedy text is visible: it never picks a special token
    or a blank one (a random model's argmax often does, and those decode to nothing)."""
    from fakes.tiny import make_tiny_llama
    from transformers import AutoTokenizer, GenerationConfig

    out = make_tiny_llama(folder, tokenizer_dir, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    GenerationConfig(suppress_tokens=blank, eos_token_id=tok.eos_token_id).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(bundled_dir, tmp_path_factory) -> tuple[str, str]:
    """(model A: a tiny Llama folder, baseline: a LoRA train output on a second, differently seeded one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = _talking_tiny_llama(tmp_path_factory.mktemp("tiny-a"), bundled_dir, seed=2)
    base = _talking_tiny_llama(tmp_path_factory.mktemp("tiny-b"), bundled_dir, seed=3)
    lora = tmp_path_factory.mktemp("lora-b")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(lora, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(lora)
    (lora / "meta.json").write_text(json.dumps({"stage": "train", "config": {"model": str(base), "method": "lora"}}))
    return str(a), str(lora)


def config(tmp_path: Path, fake: FakeOpenAI, models, data: Path | None = None, **kw) -> JudgeConfig:
    data = data or write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    values = dict(model=models[0], baseline=models[1], data=str(data), judge="judge-model", output=str(tmp_path / "out"),
                  base_url=fake.base_url, api_key_env="RT_TEST_NO_KEY", cache_dir=str(tmp_path / "cache"),
                  max_new_tokens=12, batch_size=4, progress=False, backoff=0.01, timeout=5.0)
    return JudgeConfig(**{**values, **kw})


def answers(out: Path, side: str) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / f"answers_{side}.jsonl").read_text().splitlines())}


def verdicts(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]


def test_longer_answer_rule_gives_exact_counts_and_a_rerun_is_free(tmp_path, models):
    with FakeOpenAI(judge="longer") as fake:
        cfg = config(tmp_path, fake, models)
        plan = judge.run(JudgeConfig(**{**cfg.__dict__, "dry_run": True}))
        assert plan["status"] == "planned" and plan["summary"]["requests"] == 2 * len(PROMPTS)
        assert fake.stats()["chat_requests"] == 0

        s = judge.run(cfg)["summary"]
        out = Path(cfg.output)
        a, b = answers(out, "model"), answers(out, "baseline")
        assert len(a) == len(b) == len(PROMPTS)  # the dry run's answers were reused, none written twice
        assert s["answers_generated"] == {"model": 0, "baseline": 0}
        expect = {"win": 0, "tie": 0, "loss": 0}
        for p in PROMPTS:
            ca, cb = a[p["id"]]["chars"], b[p["id"]]["chars"]
            expect["win" if ca > cb else "loss" if cb > ca else "tie"] += 1
        assert (s["wins"], s["ties"], s["losses"]) == (expect["win"], expect["tie"], expect["loss"])
        assert s["judged"] == len(PROMPTS) and s["failures"] == {"parse_failed": 0, "api_failed": 0}
        assert s["win_rate"] == round((expect["win"] + expect["tie"] / 2) / len(PROMPTS), 4)
        assert s["lengths"]["longer_answer_won"] in (None, 1.0)
        rows = verdicts(out)
        assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
        for r in rows:
            longer = "1" if r["model_chars"] > r["baseline_chars"] else "2" if r["baseline_chars"] > r["model_chars"] else "tie"
            assert r["verdict_model_first"] == longer
            assert r["verdict_baseline_first"] == {"1": "2", "2": "1", "tie": "tie"}[longer]
        assert fake.stats()["chat_requests"] == 2 * len(PROMPTS)
        assert (out / "judge.md").read_text().startswith("# Judged win rate")
        assert json.loads((out / "meta.json").read_text())["summary"]["wins"] == s["wins"]

        again = judge.run(cfg)["summary"]  # resumes: nothing generated, nothing sent
        assert fake.stats()["chat_requests"] == 2 * len(PROMPTS)
        assert again["answers_generated"] == {"model": 0, "baseline": 0} and again["requests_cached"] == 2 * len(PROMPTS)
        assert (again["wins"], again["ties"], again["losses"]) == (s["wins"], s["ties"], s["losses"])
        assert len(answers(out, "model")) == len(PROMPTS) and len((out / "answers_model.jsonl").read_text().splitlines()) == len(PROMPTS)

        fresh = judge.run(JudgeConfig(**{**cfg.__dict__, "overwrite": True}))["summary"]
        assert fresh["answers_generated"] == {"model": len(PROMPTS), "baseline": len(PROMPTS)}


def test_a_judge_that_always_picks_the_first_answer_gives_only_ties(tmp_path, models):
    with FakeOpenAI(judge="first") as fake:
        s = judge.run(config(tmp_path, fake, models, max_new_tokens=4))["summary"]
    assert (s["wins"], s["ties"], s["losses"]) == (0, len(PROMPTS), 0)
    assert s["win_rate"] == 0.5


def test_faults_lose_nothing_and_count_failures_apart(tmp_path, models):
    rows = [{"id": "ok", "instruction": "Say yes."},
            {"id": "e500", "instruction": "FAULT:500 Say no."},
            {"id": "e429", "instruction": "FAULT:429:2 Say maybe."},
            {"id": "slow", "instruction": "FAULT:stall Say later."},
            {"id": "junk", "instruction": "FAULT:garbage Say what."},
            {"id": "junk1", "instruction": "FAULT:garbage-once Say again."},
            {"id": "dead", "instruction": "FAULT:503:9 Say never."}]
    data = write_jsonl(tmp_path / "faults.jsonl", rows)
    with FakeOpenAI(judge="second", stall_seconds=3) as fake:
        cfg = config(tmp_path, fake, models, data=data, max_new_tokens=4, timeout=1.0, max_retries=2)
        s = judge.run(cfg)["summary"]
        status = {r["id"]: r for r in verdicts(Path(cfg.output))}
        assert list(status) == [r["id"] for r in rows]  # one row per prompt, in order
        for rid in ("ok", "e500", "e429", "slow", "junk1"):
            assert status[rid]["status"] == "judged" and status[rid]["verdict"] == "tie", status[rid]
        assert status["junk"]["status"] == "parse_failed" and status["junk"]["verdict"] is None
        assert status["dead"]["status"] == "api_failed" and status["dead"]["verdict"] is None
        assert (s["wins"], s["ties"], s["losses"], s["judged"]) == (0, 5, 0, 5)
        assert s["failures"] == {"parse_failed": 1, "api_failed": 1}
        assert s["api_failures_by_kind"] == {"http_503": 2} and s["win_rate"] == 0.5
        by_key = fake.stats()["by_key"]
        assert max(by_key.values()) == 3  # no request sent more than its retries allow
        sent = fake.stats()["chat_requests"]
        judge.run(cfg)  # the rerun asks again only what failed: the two orders of "dead"
        assert fake.stats()["chat_requests"] - sent == 2 * 3
        # the garbage prompt was asked twice per order (the re-ask), and both are cached now
        assert status["junk"]["usage"]["requests"] == 4


def test_verdict_parsing_and_the_combination_rule():
    assert judge.parse_verdict("It is better.\nVerdict: [[1]]") == ("1", None)
    assert judge.parse_verdict("Answer [[2]] quotes [[1]].\nVerdict: [[ TIE ]]")[0] == "tie"
    assert judge.parse_verdict("Verdict: [[1]] or [[2]]")[0] is None
    assert judge.parse_verdict("Verdict: [[1]]\nVerdict: [[2]]\nVerdict: [[tie]]")[0] is None
    assert "max-tokens" in judge.parse_verdict("I think", "length")[1]
    table = {(x, y): judge.combine(x, y) for x in ("1", "2", "tie") for y in ("1", "2", "tie")}
    assert table == {("1", "2"): "win", ("2", "1"): "loss", ("1", "1"): "tie", ("2", "2"): "tie",
                     ("1", "tie"): "tie", ("tie", "2"): "tie", ("tie", "tie"): "tie", ("2", "tie"): "tie", ("tie", "1"): "tie"}
    text = judge.fill("{instruction}|{answer_1}|{answer_2}", "q", "has {answer_2} inside", "b")
    assert text == "q|has {answer_2} inside|b"


@pytest.mark.parametrize("wins,ties,n", [(7, 2, 10), (0, 0, 5), (5, 0, 5), (30, 10, 100), (1, 1, 3)])
def test_wilson_interval_matches_the_textbook_formula(wins, ties, n):
    p, z = (wins + ties / 2) / n, 1.96
    # the interval's ends are the roots of (p - q)^2 = z^2 q (1 - q) / n, a quadratic in q
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    low, high = judge.wilson(p, n)
    assert low == pytest.approx(roots[0], abs=1e-4) and high == pytest.approx(roots[1], abs=1e-4)
    assert judge.wilson(0.5, 0) == (None, None)


def test_bad_input_is_one_line_before_any_model_or_request(tmp_path, models, monkeypatch):
    from reflect_tune import models as model_module
    from reflect_tune.cli import app

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model_module, "load_model", no_load)
    monkeypatch.delenv("RT_TEST_NO_KEY", raising=False)
    good = write_jsonl(tmp_path / "good.jsonl", PROMPTS[:2])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "fine"}\n{"instruction": 5}\n')
    (tmp_path / "torn.jsonl").write_text('{"instruction": "fine"}\n{"instruction": \n')
    (tmp_path / "prompt.txt").write_text("Compare {answer_1} with {answer_2}.\n")
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text("{}")
    cases = {
        "empty": (["--data", str(tmp_path / "empty.jsonl")], "empty.jsonl"),
        "field": (["--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2"),
        "json": (["--data", str(tmp_path / "torn.jsonl")], "torn.jsonl:2"),
        "model": (["--model", str(tmp_path / "nowhere")], "not found"),
        "tokenizer": (["--baseline", str(tmp_path / "notok")], "no tokenizer"),
        "key": (["--base-url", None], "RT_TEST_NO_KEY is not set"),
        "prompt": (["--prompt", str(tmp_path / "prompt.txt")], "{instruction}"),
    }
    with FakeOpenAI(judge="longer") as fake:
        for name, (change, expect) in cases.items():
            args = {"--model": models[0], "--baseline": models[1], "--data": str(good), "--judge": "j",
                    "-o": str(tmp_path / f"out-{name}"), "--base-url": fake.base_url, "--api-key-env": "RT_TEST_NO_KEY",
                    "--cache-dir": str(tmp_path / "cache"), "--no-progress": None}
            args.update(dict(zip(change[::2], change[1::2])))
            argv = ["judge"] + [x for k, v in args.items() if not (k == "--base-url" and v is None)
                                for x in ((k,) if v is None else (k, v))]
            result = CliRunner().invoke(app, argv)
            assert result.exit_code == 2, (name, result.output)
            assert expect in one_error_line(result.stderr), (name, result.stderr)
            assert not (tmp_path / f"out-{name}" / "answers_model.jsonl").exists(), name
        assert fake.stats()["chat_requests"] == 0
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["judge", "--model", models[0], "--baseline", models[1], "--data", str(good), "--judge",
                                      "j", "-o", str(tmp_path / "foreign"), "--base-url", "http://127.0.0.1:9/v1", "--overwrite"])
    assert result.exit_code == 2 and "reflect-tune judge wrote" in one_error_line(result.stderr), result.stderr
    assert (tmp_path / "foreign" / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_judge_through_transformers_serve(tmp_path, models, served_teacher):
    from conftest import run_cli

    base_url, name = served_teacher
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    args = ["judge", "--model", models[0], "--baseline", models[1], "--data", str(data), "--judge", name,
            "-o", str(tmp_path / "out"), "--base-url", base_url, "--cache-dir", str(tmp_path / "cache"),
            "--max-new-tokens", "8", "--max-tokens", "24", "--concurrency", "4", "--timeout", "300", "--no-progress"]
    run = run_cli(*args, env={"OPENAI_API_KEY": ""}, timeout=600)
    assert run.returncode == 0, run.stderr
    s = json.loads((tmp_path / "out" / "judge.json").read_text())
    # a 135M judge rarely keeps to the verdict line: every prompt must be accounted for, none lost
    assert s["judged"] + s["failures"]["parse_failed"] + s["failures"]["api_failed"] == 2
    assert s["failures"]["api_failed"] == 0 and s["wins"] + s["ties"] + s["losses"] == s["judged"]
    assert s["requests_answered"] >= 4
    again = run_cli(*args, env={"OPENAI_API_KEY": ""}, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "out" / "judge.json").read_text())["requests_sent"] == 0

