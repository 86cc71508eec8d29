"""The two ablation examples of issue 16 load and plan offline, with the arms and stages they promise.

examples/ablation.yaml is the study's shape at demo scale (the bundled 135M model as teacher, its
15-layer cut as student); examples/ablation-llama.yaml is the real 8B -> 1B study for a GPU box,
which must plan here without its models or data (nothing is downloaded: the network is refused).
Nothing trains: bench/bench_ablation.py runs the demo-scale file for real.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from reflect_tune.cli import app
from reflect_tune.errors import ReflectTuneError
from reflect_tune.pipeline import load_pipeline, plan, stages_between
from reflect_tune.sweep import arm_name

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "ablation.yaml"
LLAMA = ROOT / "examples" / "ablation-llama.yaml"
BUNDLED = "bundled:smollm2-135m-instruct"

# the arms each file must plan, in order (grid: the last setting varies fastest)
DEMO_ARMS = [{"teacher": t, "kd_ratio": r} for t in ("base", "finetuned") for r in (0.5, 0.9)]
LLAMA_ARMS = [{"teacher": t, "lr": lr, "kd_ratio": r}
              for t in ("base", "finetuned") for lr in (1e-5, 3e-4, 1e-3) for r in (0.5, 0.9)]


@pytest.fixture
def no_network(monkeypatch):
    """Planning must not reach a hub: every connection attempt is refused and recorded (a caller
    that swallows the error still fails the test at teardown)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if len(args) > 1 else args)
        raise OSError("network refused by test_examples_ablation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"planning tried to open connections: {attempts[:3]}"


def stages_of(path: Path, runs: Path):
    return plan(load_pipeline(path, runs_dir=str(runs)))


def check_arms_and_evals(stages, expected_arms):
    """Every arm is a train stage with its own folder, followed (in order) by an eval stage that reads it."""
    trains = [s for s in stages if s.name == "train"]
    evals = [s for s in stages if s.name == "eval"]
    assert [s.extra["arm"] for s in trains] == expected_arms
    assert len({s.key for s in trains}) == len(expected_arms)  # one folder per arm
    assert all(s.folder.name == f"train-{s.key}" for s in trains)
    assert [e.upstream["train"] for e in evals] == [t.key for t in trains]
    assert [e.config.model for e in evals] == [str(t.folder) for t in trains]
    return trains, evals


def check_teacher_choice(stages, trains, base_teacher):
    """`teacher: base` is train's own teacher; `teacher: finetuned` is teacher_sft's merged model."""
    (sft,) = [s for s in stages if s.name == "teacher_sft"]
    assert sft.config.model == base_teacher and sft.config.method == "lora" and sft.config.merge
    for t in trains:
        want = str(sft.folder / "merged") if t.extra["arm"]["teacher"] == "finetuned" else base_teacher
        assert t.config.teacher == want
        assert (t.upstream["teacher"] == sft.key) == (t.extra["arm"]["teacher"] == "finetuned")
        for key, value in t.extra["arm"].items():
            if key != "teacher":
                assert getattr(t.config, key) == value
    return sft


def test_demo_ablation_plans_offline(tmp_path, no_network):
    stages = stages_of(DEMO, tmp_path)
    names = [s.name for s in stages]
    n = len(DEMO_ARMS)
    assert names == ["student", "select", "teacher_sft", *["train", "eval"] * n]  # each arm evaluated right after it
    student, select = stages[0], stages[1]
    assert student.config.teacher == BUNDLED and student.config.layers == 15
    # plain data, no reflect: IFD selection by the student, with a holdout for held-out CE and KD
    assert "reflect" not in names and select.config.method == "ifd" and "holdout" in select.extra
    assert select.config.model == str(student.folder) and select.config.input.endswith("candidates.jsonl")
    trains, evals = check_arms_and_evals(stages, DEMO_ARMS)
    sft = check_teacher_choice(stages, trains, BUNDLED)
    assert sft.config.data == select.config.output  # the teacher is fine-tuned on what select kept
    for t in trains:
        assert t.config.model == str(student.folder) and t.config.data == select.config.output
        assert t.config.eval_data == select.extra["holdout"]["heldout"] and t.config.eval_every >= 1
        assert t.config.epochs >= 1 and t.config.kd_loss == "forward_kl"
    for e in evals:
        (task,) = e.config.tasks
        assert Path(task).is_file() and task.endswith("lm_eval_tasks/reflect_tiny_mc.yaml")
        assert e.extra["before"].model == str(student.folder)  # the starting point: the cut student


def test_from_until_pick_every_arm_of_a_kind(tmp_path, no_network):
    """The arms interleave train and eval; --until train is every train arm, --from eval every eval."""
    pipe = load_pipeline(DEMO, runs_dir=str(tmp_path))
    stages = plan(pipe)
    kinds = lambda chosen: sorted({stages[i].name for i in chosen})  # noqa: E731
    until_train = stages_between(pipe, stages, None, "train")
    assert kinds(until_train) == ["select", "student", "teacher_sft", "train"]
    assert sum(stages[i].name == "train" for i in until_train) == len(DEMO_ARMS)
    assert stages_between(pipe, stages, None, None) == set(range(len(stages)))
    assert kinds(stages_between(pipe, stages, None, "select")) == ["select", "student"]
    with pytest.raises(ReflectTuneError, match="--from eval: the earlier stage student is not finished"):
        stages_between(pipe, stages, "eval", None)


def test_llama_ablation_plans_without_its_models(tmp_path, no_network):
    pipe = load_pipeline(LLAMA, runs_dir=str(tmp_path))
    assert pipe.data == "yahma/alpaca-cleaned" and pipe.split == "train"
    assert pipe.sweep["mode"] == "grid"
    stages = plan(pipe)
    n = len(LLAMA_ARMS)
    assert [s.name for s in stages] == ["teacher_sft", *["train", "eval"] * n]
    trains, evals = check_arms_and_evals(stages, LLAMA_ARMS)
    teacher = "meta-llama/Llama-3.1-8B-Instruct"
    sft = check_teacher_choice(stages, trains, teacher)
    assert sft.upstream["model"] == teacher  # a hub name, identified by its name (nothing fetched)
    for t in trains:
        c = t.config
        assert c.model == "meta-llama/Llama-3.2-1B-Instruct" and c.method == "lora"
        assert c.mixed_precision == "bf16" and c.data == "yahma/alpaca-cleaned" and c.split == "train"
        # the fine-tuned teacher holds out the very records the arms are measured on (same fraction, same seed)
        assert c.eval_split > 0 and (c.eval_split, c.seed) == (sft.config.eval_split, sft.config.seed)
    assert sft.config.mixed_precision == "bf16"
    for e in evals:
        assert e.config.tasks == ("truthfulqa_mc2", "hellaswag", "commonsense_qa")
        assert e.extra["before"].model == "meta-llama/Llama-3.2-1B-Instruct"
    # the sweep block names only settings train has (check_sweep would have refused others)
    raw = yaml.safe_load(LLAMA.read_text())
    assert set(raw["sweep"]) - {"mode"} == {"teacher", "lr", "kd_ratio"}


def test_run_plan_prints_every_arm_of_the_demo_ablation(tmp_path, no_network):
    result = CliRunner().invoke(app, ["run", str(DEMO), "--plan", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{len(DEMO_ARMS)} train arms (grid)" in out
    for arm in DEMO_ARMS:
        label = " ".join(f"{k}={v}" for k, v in arm.items())
        assert sum(f"[{label}]" in line for line in out.splitlines()) == 1, (label, out)
    lines = out.splitlines()
    for stage in ("student", "select", "teacher_sft"):
        assert any(line.startswith(stage + " ") for line in lines), out
    assert sum(line.startswith("eval ") for line in lines) == len(DEMO_ARMS)
    assert "to run" in out and not (tmp_path / "ablation").exists()  # --plan runs nothing


def test_run_plan_of_the_llama_ablation_downloads_nothing(tmp_path, no_network):
    """Its data is a hub dataset: the plan says the steps are not known instead of fetching it."""
    result = CliRunner().invoke(app, ["run", str(LLAMA), "--plan", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    arms = [line for line in lines if line.startswith("train ")]
    assert len(arms) == len(LLAMA_ARMS) and all(" ? steps" in line for line in arms), result.output
    assert sum(line.startswith("teacher_sft ") and " ? steps" in line for line in lines) == 1
    assert f"{len(LLAMA_ARMS) + 1} train stages show ? steps" in result.output
    # every line's columns line up: the folder names are padded to the longest
    status = {line.index(" to run") for line in lines if " to run" in line}
    assert len(status) == 1, result.output


def test_arm_names_are_the_compare_rows():
    """compare.md's rows are named by arm_name: one distinct name per arm of each file."""
    for arms in (DEMO_ARMS, LLAMA_ARMS):
        assert len({arm_name(a) for a in arms}) == len(arms)
