"""The sweep's comparison report (reflect_tune.compare): every number equals the arm's own files,
the best arm per metric, one plot line per finished arm, unfinished arms and arms without eval.

Two real train runs on tiny random Llamas (KD from a tiny teacher, held-out data, a few steps),
fabricated eval folders in the exact shape evaluate.py writes, and hand-made folders where the
best arm must be known in advance. The expected values are read here with csv/json directly."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_jsonl

from reflect_tune.compare import write_compare
from reflect_tune.config import TrainConfig, from_values
from reflect_tune.train import run as run_train
from reflect_tune.train import validate

ROOT = Path(__file__).resolve().parents[1]
ROWS = [json.loads(x) for x in (ROOT / "examples" / "alpaca_small.jsonl").read_text().splitlines()]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval_folder(path: Path, rows: list[tuple], higher_is_better: dict | None = None) -> Path:
    """An eval stage folder: after/eval.json as evaluate.run writes it (rows: task, metric, filter,
    value, stderr), before/eval.json with other values (the starting point, not compared), and, when
    given, after/results.json with lm-eval's `higher_is_better`."""
    after = path / "after"
    for side, shift in ((after, 0.0), (path / "before", -0.125)):
        side.mkdir(parents=True)
        out = {"model": "m", "adapter": None, "base_model": None, "tasks": sorted({r[0] for r in rows}),
               "config_hash": "0123456789ab", "lm_eval_version": "0.4.9", "items": 8, "seconds": 1.0,
               "rows": [{"task": t, "metric": m, "filter": f, "value": v if v is None else v + shift, "stderr": s,
                         "samples": 8, "model": "m", "config_hash": "0123456789ab"} for t, m, f, v, s in rows]}
        (side / "eval.json").write_text(json.dumps(out))
    if higher_is_better is not None:
        (after / "results.json").write_text(json.dumps({"results": {}, "higher_is_better": higher_is_better}))
    return path


def _log_rows(train: Path) -> list[dict]:
    with open(train / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, bundled_dir, tmp_path_factory):
    """Arms: two real train runs (kd_ratio 0.5, 0.9) with eval folders; the first again without
    eval; an unfinished arm (a log, no meta.json)."""
    from fakes.tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("compare")
    teacher = make_tiny_llama(d / "teacher", bundled_dir, hidden=96, heads=4, seed=1)
    train_data, heldout = write_jsonl(d / "train.jsonl", ROWS[:12]), write_jsonl(d / "heldout.jsonl", ROWS[20:24])
    folders = {}
    for ratio in (0.5, 0.9):
        out = d / f"train-{ratio}"
        cfg = from_values(TrainConfig, {"method": "full", "batch_size": 4, "grad_accum": 1, "max_length": 64, "lr": 1e-3,
                                        "train_ce_samples": 4, "save_every": 0, "progress": False, "max_steps": 3,
                                        "eval_every": 2, "data": str(train_data), "eval_data": str(heldout),
                                        "output": str(out), "model": str(tiny_model_dir), "teacher": str(teacher),
                                        "kd_ratio": ratio, "kd_temperature": 2.0})
        validate(cfg)
        run_train(cfg)
        folders[ratio] = out
    unfinished = d / "train-unfinished"
    unfinished.mkdir()
    shutil.copy(folders[0.5] / "train_log.csv", unfinished / "train_log.csv")  # a log, but no meta.json
    hib = {"tiny_qa": {"acc": True, "brier": False}}
    ev_a = _eval_folder(d / "eval-a", [("tiny_qa", "acc", "none", 0.25, 0.05), ("tiny_qa", "brier", "none", 0.4, 0.02),
                                       ("tiny_qa", "exact_match", "strict-match", 0.5, None),
                                       ("tiny_qa", "mystery", "none", 3.0, 0.1)], hib)
    ev_b = _eval_folder(d / "eval-b", [("tiny_qa", "acc", "none", 0.5, 0.06), ("tiny_qa", "brier", "none", 0.3, 0.03),
                                       ("tiny_qa", "exact_match", "strict-match", None, None),
                                       ("tiny_qa", "mystery", "none", 1.0, 0.2)], hib)
    arms = [{"name": "kd_ratio=0.5", "settings": {"kd_ratio": 0.5}, "train": str(folders[0.5]), "eval": str(ev_a), "wall_s": 12.5},
            {"name": "kd_ratio=0.9", "settings": {"kd_ratio": 0.9}, "train": str(folders[0.9]), "eval": str(ev_b), "wall_s": 10.0},
            {"name": "kd_ratio=0.5 no eval", "settings": {"kd_ratio": 0.5, "lr": 0.001}, "train": str(folders[0.5]),
             "eval": None, "wall_s": 11.0},
            {"name": "kd_ratio=0.7", "settings": {"kd_ratio": 0.7}, "train": str(unfinished), "eval": str(d / "eval-missing"),
             "wall_s": 3.0}]
    return d, arms


@pytest.fixture(scope="module")
def report(sweep):
    d, arms = sweep
    return write_compare(d / "compare", arms)


def test_numbers_equal_each_arms_own_files(sweep, report):
    """Each row's every number is the arm's meta.json result, last train row of train_log.csv,
    after/eval.json row, or the given wall time; compare.json and compare.csv hold the same rows."""
    d, arms = sweep
    data = json.loads((d / "compare" / "compare.json").read_text())
    assert data["rows"] == report["rows"] and data["columns"] == report["columns"]
    bench = ["tiny_qa/acc", "tiny_qa/acc_stderr", "tiny_qa/brier", "tiny_qa/brier_stderr",
             "tiny_qa/exact_match,strict-match", "tiny_qa/exact_match,strict-match_stderr",
             "tiny_qa/mystery", "tiny_qa/mystery_stderr"]
    assert data["columns"] == ["name", "kd_ratio", "lr", "status", "steps", "train_loss", "train_ce", "train_kd",
                               "train_ce_after", "heldout_ce_before", "heldout_ce_after", "heldout_kd_before",
                               "heldout_kd_after", *bench, "wall_s", "peak_rss_mib", "peak_gpu_mib"]
    for arm, row in zip(arms[:3], data["rows"]):
        meta = json.loads((Path(arm["train"]) / "meta.json").read_text())
        result, held = meta["result"], meta["result"]["heldout"]
        last = [r for r in _log_rows(Path(arm["train"])) if r["kind"] == "train"][-1]
        assert int(last["step"]) == result["steps"] == 3
        expected = {"name": arm["name"], "kd_ratio": arm["settings"]["kd_ratio"], "lr": arm["settings"].get("lr"),
                    "status": "done", "steps": result["steps"], "train_loss": result["final_loss"],
                    "train_ce": float(last["ce_loss"]), "train_kd": float(last["kd_loss"]),
                    "train_ce_after": result["loss_after"], "heldout_ce_before": held["ce_before"],
                    "heldout_ce_after": held["ce_after"], "heldout_kd_before": held["kd_before"],
                    "heldout_kd_after": held["kd_after"], "wall_s": arm["wall_s"],
                    "peak_rss_mib": result.get("peak_rss_mib"), "peak_gpu_mib": result.get("peak_gpu_mib")}
        if arm["eval"]:
            for r in json.loads((Path(arm["eval"]) / "after" / "eval.json").read_text())["rows"]:
                col = f"{r['task']}/{r['metric']}" + ("" if r["filter"] == "none" else f",{r['filter']}")
                expected[col], expected[col + "_stderr"] = r["value"], r["stderr"]
        else:
            expected.update({c: None for c in bench})
        assert row == expected, arm["name"]
        assert all(row[c] is not None for c in ("train_kd", "heldout_kd_before", "heldout_kd_after", "train_ce_after"))
    assert data["rows"][0]["heldout_ce_before"] == data["rows"][1]["heldout_ce_before"]  # same starting point
    assert data["rows"][0]["heldout_ce_after"] != data["rows"][1]["heldout_ce_after"]  # different kd_ratio
    with open(d / "compare" / "compare.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert list(csv_rows[0]) == data["columns"]
    for got, row in zip(csv_rows, data["rows"]):
        for c in data["columns"]:
            v = row[c]
            assert (got[c] == "") if v is None else (got[c] == v if isinstance(v, str) else float(got[c]) == v), (row["name"], c)


def test_best_arm_in_the_real_sweep(sweep, report):
    """The best arm of each column, found here from the arms' own files: the lowest loss, wall time
    and memory (first arm on a tie); no mark for train_loss, whose kd_ratio weighting differs between arms."""
    d, arms = sweep
    done = arms[:3]
    metas = [json.loads((Path(a["train"]) / "meta.json").read_text())["result"] for a in done]
    lasts = [[r for r in _log_rows(Path(a["train"])) if r["kind"] == "train"][-1] for a in done]
    values = {"train_ce": [float(r["ce_loss"]) for r in lasts], "train_kd": [float(r["kd_loss"]) for r in lasts],
              "train_ce_after": [m["loss_after"] for m in metas],
              "heldout_ce_after": [m["heldout"]["ce_after"] for m in metas],
              "heldout_kd_after": [m["heldout"]["kd_after"] for m in metas], "wall_s": [a["wall_s"] for a in done]}
    if all(m.get("peak_rss_mib") is not None for m in metas):
        values["peak_rss_mib"] = [m["peak_rss_mib"] for m in metas]
    expected = {c: done[v.index(min(v))]["name"] for c, v in values.items()}
    expected.update({"tiny_qa/acc": "kd_ratio=0.9", "tiny_qa/brier": "kd_ratio=0.9",
                     "tiny_qa/exact_match,strict-match": "kd_ratio=0.5"})
    assert report["best"] == expected
    assert json.loads((d / "compare" / "compare.json").read_text())["best"] == expected
    assert report["direction"]["tiny_qa/brier"] == "lower" and "tiny_qa/mystery" not in report["direction"]


def test_unfinished_arm_and_arm_without_eval(sweep, report):
    d, arms = sweep
    rows = {r["name"]: r for r in report["rows"]}
    gone = rows["kd_ratio=0.7"]
    assert gone["status"] == "not finished" and gone["kd_ratio"] == 0.7
    assert all(gone[c] is None for c in report["columns"] if c not in ("name", "kd_ratio", "status")), gone
    assert all(rows["kd_ratio=0.5 no eval"][c] is None for c in report["columns"] if c.startswith("tiny_qa/"))
    assert rows["kd_ratio=0.5 no eval"]["status"] == "done"
    assert all("kd_ratio=0.7" not in lines for lines in report["series"].values())
    assert "kd_ratio=0.7" not in report["best"].values()
    md = (d / "compare" / "compare.md").read_text()
    assert "| kd_ratio=0.7 | 0.7 | – | not finished | – |" in md


def test_plots_one_line_per_finished_arm(sweep, report, monkeypatch):
    """Each PNG is valid and holds one line per finished arm, labelled by its name, with the log's
    values of that arm (checked on the lines matplotlib is asked to draw)."""
    import matplotlib.axes

    d, arms = sweep
    assert report["plots"] == ["heldout_ce.png", "heldout_kd.png", "train_loss.png"]
    for png in report["plots"]:
        raw = (d / "compare" / png).read_bytes()
        assert raw.startswith(PNG_MAGIC) and len(raw) > 5000
    finished = [a["name"] for a in arms[:3]]
    for stem, kind, key in (("heldout_ce", "eval", "eval_ce"), ("heldout_kd", "eval", "eval_kd"), ("train_loss", "train", "loss")):
        assert list(report["series"][stem]) == finished
        for arm in arms[:3]:
            expected = [[int(r["step"]), float(r[key])] for r in _log_rows(Path(arm["train"])) if r["kind"] == kind]
            assert report["series"][stem][arm["name"]] == expected
    assert [p[0] for p in report["series"]["heldout_ce"]["kd_ratio=0.5"]] == [0, 2, 3]
    # what the figures hold: one plot call per finished arm, labelled, with that arm's points
    drawn = []
    real = matplotlib.axes.Axes.plot

    def spy(self, x, y, *args, **kwargs):
        drawn.append((self, kwargs.get("label"), list(zip(x, y))))  # the title is set after the lines
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    again = write_compare(d / "compare-again", arms)
    for stem in ("heldout_ce", "heldout_kd", "train_loss"):
        lines = [(label, pts) for ax, label, pts in drawn if ax.get_title().split(":")[0] == stem]
        assert [label for label, _ in lines] == finished
        assert [[list(p) for p in pts] for _, pts in lines] == [again["series"][stem][n] for n in finished]
    md = (d / "compare" / "compare.md").read_text()
    assert all(f"![{Path(p).stem}]({p})" in md for p in report["plots"])


def _fake_train(path: Path, *, ce_after: float, kd_after: float | None, final_loss: float, ce: float, kd: float | None,
                ce_before: float = 3.0, kd_before: float | None = 2.0, peak: float | None = None,
                config: dict | None = None) -> Path:
    """A finished train folder by hand: meta.json's result and a train_log.csv (two train rows, two eval rows)."""
    path.mkdir(parents=True)
    result = {"steps": 2, "final_loss": final_loss, "loss_after": ce + 0.1, "wall_s": 1.0,
              "heldout": {"source": "h.jsonl", "examples": 4, "tokens": 40, "ce_before": ce_before, "ce_after": ce_after,
                          "kd_before": kd_before, "kd_after": kd_after, "kd_loss": "forward_kl" if kd_after is not None else None}}
    if peak is not None:
        result["peak_rss_mib"] = peak
    (path / "meta.json").write_text(json.dumps({"stage": "train", "config": config or {}, "result": result}))
    fields = ["step", "epoch", "tokens", "loss", "ce_loss", "kd_loss", "lr", "grad_norm", "tokens_per_s", "wall_s",
              "kind", "eval_ce", "eval_kd"]
    kd_cell = lambda v: "" if v is None else str(v)  # noqa: E731
    rows = [{"step": 0, "kind": "eval", "eval_ce": ce_before, "eval_kd": kd_cell(kd_before)},
            {"step": 1, "kind": "train", "loss": final_loss + 1, "ce_loss": ce + 1, "kd_loss": kd_cell(kd and kd + 1)},
            {"step": 2, "kind": "train", "loss": final_loss, "ce_loss": ce, "kd_loss": kd_cell(kd)},
            {"step": 2, "kind": "eval", "eval_ce": ce_after, "eval_kd": kd_cell(kd_after)}]
    with open(path / "train_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _md_cells(md: str) -> dict[str, dict[str, str]]:
    """compare.md's table as {arm name: {column: cell text}}."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    split = lambda line: [c.strip() for c in line.strip("|").split(" | ")]  # noqa: E731
    head = split(lines[0])
    return {cells[0]: dict(zip(head, cells)) for cells in map(split, lines[2:])}


def test_best_arm_per_metric_and_bold_cells(tmp_path):
    """Values built so the answer is known: lower wins for losses, wall time and memory; lm-eval's
    higher_is_better decides a task metric (else the known names); unknown direction, stderr and
    *_before get no mark; a tie goes to the first arm; compare.md bolds the best cells."""
    a = _fake_train(tmp_path / "a", ce_after=1.0, kd_after=0.9, final_loss=2.0, ce=2.5, kd=0.4, ce_before=3.0, peak=900.0)
    b = _fake_train(tmp_path / "b", ce_after=1.5, kd_after=0.5, final_loss=1.0, ce=2.0, kd=0.6, ce_before=2.0, peak=800.0)
    c = _fake_train(tmp_path / "c", ce_after=1.0, kd_after=0.7, final_loss=3.0, ce=3.5, kd=0.2, ce_before=4.0)
    ev_a = _eval_folder(tmp_path / "ea", [("t", "acc", "none", 0.3, 0.1), ("t", "nll", "none", 5.0, 0.1),
                                          ("t", "word_perplexity", "none", 20.0, None), ("t", "odd", "none", 1.0, None)],
                        {"t": {"acc": True, "nll": False}})
    ev_b = _eval_folder(tmp_path / "eb", [("t", "acc", "none", 0.6, 0.2), ("t", "nll", "none", 7.0, 0.05),
                                          ("t", "word_perplexity", "none", 10.0, None), ("t", "odd", "none", 2.0, None)])
    arms = [{"name": "A", "settings": {"lr": 1e-5}, "train": str(a), "eval": str(ev_a), "wall_s": 30.0},
            {"name": "B", "settings": {"lr": 3e-4}, "train": str(b), "eval": str(ev_b), "wall_s": 20.0},
            {"name": "C", "settings": {"lr": 1e-3}, "train": str(c), "eval": None, "wall_s": 40.0},
            {"name": "D", "settings": {"lr": 1e-2}, "train": str(tmp_path / "never"), "eval": None, "wall_s": 1.0}]
    rep = write_compare(tmp_path / "cmp", arms)
    assert rep["best"] == {"train_loss": "B", "train_ce": "B", "train_kd": "C", "train_ce_after": "B",
                           "heldout_ce_after": "A", "heldout_kd_after": "B", "wall_s": "B", "peak_rss_mib": "B",
                           "t/acc": "B", "t/nll": "A", "t/word_perplexity": "B"}
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["best"] == rep["best"]
    assert rep["direction"]["t/acc"] == "higher" and rep["direction"]["t/nll"] == "lower"
    assert "t/odd" not in rep["direction"] and "heldout_ce_before" not in rep["best"]
    cells = _md_cells((tmp_path / "cmp" / "compare.md").read_text())
    bold = {(name, c) for name, row in cells.items() for c, text in row.items() if text.startswith("**")}
    # every best arm's cell is bold, plus C's heldout_ce_after (tied with A at 1.0); nothing else
    assert bold == {(arm, c) for c, arm in rep["best"].items()} | {("C", "heldout_ce_after")}
    assert cells["A"]["heldout_ce_after"] == cells["C"]["heldout_ce_after"] == "**1.0000**"
    assert cells["B"]["t/acc"] == "**0.6000**" and cells["A"]["t/nll"] == "**5.0000**" and cells["B"]["wall_s"] == "**20.0**"
    assert cells["D"]["status"] == "not finished" and cells["D"]["wall_s"] == "–" and cells["A"]["lr"] == "1e-05"
    assert rep["plots"] == ["heldout_ce.png", "heldout_kd.png", "train_loss.png"]
    # no arm with a KD term: heldout_kd.png is not written, and an old one is removed
    for name in "abc":
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        meta["result"]["heldout"].update(kd_before=None, kd_after=None)
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
        rows = _log_rows(tmp_path / name)
        with open(tmp_path / name / "train_log.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({**r, "eval_kd": "", "kd_loss": ""} for r in rows)
    rep = write_compare(tmp_path / "cmp", arms)
    assert rep["plots"] == ["heldout_ce.png", "train_loss.png"] and not (tmp_path / "cmp" / "heldout_kd.png").exists()
    assert "heldout_kd_after" not in rep["best"] and all(r["heldout_kd_after"] is None for r in rep["rows"])


def test_mixed_loss_and_kd_term_compared_only_under_equal_settings(tmp_path):
    """train_loss weighs CE and KD by kd_ratio, the KD term depends on kd_loss and the temperature:
    arms that differ there get no best mark for those columns (CE still has one)."""
    def arms(configs):
        out = []
        for i, cfg in enumerate(configs):
            t = _fake_train(tmp_path / f"{len(list(tmp_path.iterdir()))}", ce_after=1.0 + i, kd_after=0.5 - 0.1 * i,
                            final_loss=2.0 - i, ce=2.0 + i, kd=0.5 - 0.1 * i, config=cfg)
            out.append({"name": f"arm{i}", "settings": {}, "train": str(t), "eval": None, "wall_s": None})
        return out

    same = {"kd_ratio": 0.5, "kd_loss": "forward_kl", "kd_temperature": 2.0}
    rep = write_compare(tmp_path / "c1", arms([same, dict(same)]))
    assert {k: rep["best"].get(k) for k in ("train_loss", "train_kd", "heldout_kd_after", "heldout_ce_after")} == \
        {"train_loss": "arm1", "train_kd": "arm1", "heldout_kd_after": "arm1", "heldout_ce_after": "arm0"}
    rep = write_compare(tmp_path / "c2", arms([same, {**same, "kd_ratio": 0.9}]))
    assert "train_loss" not in rep["best"] and rep["best"]["train_kd"] == "arm1" and rep["best"]["heldout_ce_after"] == "arm0"
    rep = write_compare(tmp_path / "c3", arms([same, {**same, "kd_temperature": 1.0}]))
    assert not {"train_loss", "train_kd", "heldout_kd_after"} & set(rep["best"]) and rep["best"]["train_ce"] == "arm0"


def test_bad_arms_are_refused(tmp_path):
    arm = {"name": "x", "settings": {}, "train": str(tmp_path / "t"), "eval": None, "wall_s": None}
    with pytest.raises(ValueError, match="unique"):
        write_compare(tmp_path / "c", [arm, dict(arm)])
    with pytest.raises(ValueError, match="status"):
        write_compare(tmp_path / "c", [{**arm, "settings": {"status": 1}}])


def test_non_finite_numbers_are_null(tmp_path):
    """A diverged arm (NaN loss in the log and meta.json) has null cells; compare.json stays valid JSON."""
    t = _fake_train(tmp_path / "t", ce_after=1.0, kd_after=None, final_loss=1.0, ce=1.0, kd=None, kd_before=None)
    meta = json.loads((t / "meta.json").read_text())
    meta["result"]["final_loss"] = float("nan")
    (t / "meta.json").write_text(json.dumps(meta))
    rows = _log_rows(t)
    rows[2]["ce_loss"] = "nan"
    with open(t / "train_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    rep = write_compare(tmp_path / "c", [{"name": "x", "settings": {}, "train": str(t), "eval": None, "wall_s": None}])
    assert rep["rows"][0]["train_loss"] is None and rep["rows"][0]["train_ce"] is None
    json.loads((tmp_path / "c" / "compare.json").read_text())
