"""The prompt sets: `paper` (the default, the paper's criteria) and `conservative` (keeps the task).

reflect_tune/prompts/README.md says what each set asks for and how `--prompts` picks one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_jsonl
from fakes.openai_server import FakeOpenAI
from reflect_tune.errors import ReflectTuneError
from reflect_tune.layout import PROMPT_SETS, load_prompts
from reflect_tune.pipeline import load_pipeline, plan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "alpaca_small.jsonl"
REFLECTION = ("instruction", "response", "response_input")

# sha256 of the prompt files as they were before the paper set became the default (commit fa12f75):
# the conservative set is exactly those texts (schemas: the digest of their canonical JSON)
CONSERVATIVE_SHA256 = {
    "system": "990c41cc44a2e76f8da974d37e4f1a12c10a7748007162317005c4d19439b8c0",
    "instruction": "ed0d828c0df5a449fea09cbcee07c1f6d2e608697478d2879b3638c1da6d5e36",
    "response": "2908b1b783ab693069adf5829318f137b4b30d13595e3e9bfa9ccdea11efe157",
    "response_input": "5abc2e4f494b155e0e8d95eecafb0a2f6fe5ca717dd4fa07558813ba1704ad51",
    "reask": "d7a7e4fc23fd3de370c3d78fa789c3ff367d9da6b4d7fafe5910d4ef02fe7cd0",
    "json": "984297ed0850deb209ae70ccd4419c620cb92d08cc1c83bdd92b72a655b5bd28",
    "instruction.schema": "fbcbe7994526a1a006a80a9940397338afbb88aef3466daa47352c95085d9d24",
    "response.schema": "0fb11cf2bc8d32339de18a9e943c1457e59ce89c176d308a75ee5d87e888af6b",
}
CONSERVATIVE_TEXT = "keeps the task and intent of the original"  # in today's instruction.txt only


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower())


def test_default_set_asks_for_the_papers_criteria():
    default, paper = load_prompts(), load_prompts("paper")
    assert default.texts == paper.texts and default.set_name == paper.set_name == "paper"
    ins = flat(paper.texts["instruction"])
    # the why-it-failed analysis, a harder new instruction that may leave the task, and its answer
    for phrase in ("why it falls short", "weaknesses of the instruction", "led to a weak answer",
                   "more complex and more difficult", "related but independent task", "write a new answer"):
        assert phrase in ins, phrase
    for word in ("complexity", "detail", "knowledge", "ambiguity", "reasoning", "helpfulness", "relevance", "accuracy"):
        assert word in ins, word
    for name in ("response", "response_input"):
        res = flat(paper.texts[name])
        for phrase in ("why this answer is not good enough", "helpfulness", "relevance", "accuracy",
                       "level of detail", "as detailed as possible"):
            assert phrase in res, (name, phrase)
    for name in REFLECTION:  # not the conservative asks
        text = flat(paper.texts[name])
        assert "keeps the task and intent" not in text and "as the instruction calls for" not in text, name


def test_conservative_set_is_the_prompts_of_before():
    cons, paper = load_prompts("conservative"), load_prompts("paper")
    assert cons.sha256 == CONSERVATIVE_SHA256 and cons.set_name == "conservative" and cons.folder is None
    assert CONSERVATIVE_TEXT in flat(cons.texts["instruction"])
    for name in ("response", "response_input"):
        assert "as detailed as the instruction calls for" in flat(cons.texts[name])
    # it ships as its own files in the package, and differs from the default in the three reflection prompts
    for name in REFLECTION:
        assert Path(cons.sources[name]).parent.name == "conservative" and Path(cons.sources[name]).is_file()
        assert cons.texts[name] != paper.texts[name]
    assert {k: v for k, v in cons.texts.items() if k not in REFLECTION} == \
        {k: v for k, v in paper.texts.items() if k not in REFLECTION}
    assert cons.placeholders == paper.placeholders  # the same layout filler: replies parse alike
    assert set(PROMPT_SETS) == {"paper", "conservative"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"prompts/conservative/*.txt"' in pyproject  # package data: a wheel and an sdist carry the set


def test_a_set_name_wins_over_a_folder_of_that_name_unless_given_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "conservative"
    mine.mkdir()
    (mine / "response.txt").write_text("Mine: {instruction} -> {output}\n\n[[BETTER ANSWER]]\n...\n[[END]]\n")
    assert load_prompts("conservative").sha256 == CONSERVATIVE_SHA256  # the name: the built-in set
    for given in ("./conservative", str(mine)):  # a path: the folder, over the default set
        folder = load_prompts(given)
        assert folder.texts["response"].startswith("Mine:") and folder.folder == given
        assert folder.set_name == "paper" and folder.texts["instruction"] == load_prompts().texts["instruction"]


@pytest.mark.parametrize("value", ["conservatve", "Paper", "no/such/folder"])
def test_unknown_set_name_is_one_line_listing_the_sets(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReflectTuneError) as e:
        load_prompts(value)
    assert str(e.value).startswith(f"{value}: ") and "paper, conservative" in str(e.value) and "\n" not in str(e.value)


def _user_texts(srv: FakeOpenAI) -> list[str]:
    return [m["content"] for e in srv.stats()["log"] for m in e["body"]["messages"] if m["role"] == "user"]


def test_cli_prompts_conservative_sends_the_conservative_text(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [json.loads(x) for x in EXAMPLES.read_text().splitlines()[:2]])
    cons, paper = load_prompts("conservative"), load_prompts("paper")
    seen = {}
    for name in ("conservative", "paper", None):
        out = tmp_path / f"{name}.jsonl"
        with FakeOpenAI(record_bodies=True) as srv:
            args = ["reflect", str(data), "-o", str(out), "--model", "fake-model", "--base-url", srv.base_url,
                    "--cache-dir", str(tmp_path / f"cache-{name}"), "--no-progress"]
            run = run_cli(*args, *(["--prompts", name] if name else []), env={"OPENAI_API_KEY": "k"})
            assert run.returncode == 0, run.stderr
            seen[name] = texts = _user_texts(srv)
        assert len(texts) == 2 * 3  # ins, res, res_ins per record
        ins = [t for t in texts if "### What to do" in t and "[[NEW INSTRUCTION " in t]
        assert ins and all(flat(t).count(CONSERVATIVE_TEXT) == (name == "conservative") for t in ins)
        want = cons if name == "conservative" else paper
        for t in texts:  # each request's task text is the chosen set's (up to the filled-in record)
            head = t.split("### What to do", 1)[1].split("\n\n")[1]
            assert any(head in want.texts[k] for k in REFLECTION), head
        info = json.loads(out.with_name(out.name + ".meta.json").read_text())
        assert info["prompt_set"] == {"name": name or "paper", "folder": None}
        assert info["prompts"]["instruction"]["sha256"] == want.sha256["instruction"]
    assert seen["paper"] == seen[None] and not set(seen["paper"]) & set(seen["conservative"])


def test_cli_unknown_prompt_set_is_one_line_exit_2(tmp_path):
    with FakeOpenAI() as srv:
        run = run_cli("reflect", str(EXAMPLES), "-o", str(tmp_path / "o.jsonl"), "--model", "fake-model",
                      "--base-url", srv.base_url, "--cache-dir", str(tmp_path / "c"), "--prompts", "conservatve",
                      env={"OPENAI_API_KEY": "k"})
        assert srv.stats()["chat_requests"] == 0
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "conservatve" in run.stderr and "paper, conservative" in run.stderr


def _pipeline(folder: Path, prompts: str | None) -> dict[str, object]:
    reflect = {"model": "fake-model", "base_url": "http://127.0.0.1:9/v1", "max_tokens": 64}
    if prompts is not None:
        reflect["prompts"] = prompts
    config = {"name": "t", "data": "data.jsonl", "reflect": reflect, "select": {"top_k": 3, "model": "m"}}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    stage = next(s for s in plan(load_pipeline(path)) if s.name == "reflect")
    return {"key": stage.key, "prompts": stage.config.prompts}


def test_pipeline_prompt_set_changes_the_reflect_key_and_a_path_means_the_folder(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [json.loads(x) for x in EXAMPLES.read_text().splitlines()[:3]])
    default, paper, cons = (_pipeline(tmp_path, p) for p in (None, "paper", "conservative"))
    assert cons["prompts"] == "conservative" and cons["key"] != default["key"] and cons["key"] != paper["key"]
    # a folder named like the set, next to the YAML file: the bare name still means the set
    shutil.copytree(ROOT / "reflect_tune" / "prompts" / "conservative", tmp_path / "conservative")
    with open(tmp_path / "conservative" / "response.txt", "a") as fh:
        fh.write("\nBe brief.\n")
    assert _pipeline(tmp_path, "conservative") == cons
    folder = _pipeline(tmp_path, "./conservative")  # a path: the folder, relative to the YAML file
    assert folder["prompts"] == str(tmp_path / "conservative") and folder["key"] not in (cons["key"], default["key"])
    with pytest.raises(ReflectTuneError, match="paper, conservative"):
        _pipeline(tmp_path, "conservatve")
