"""The comparison report of a sweep (`runs/NAME/compare/`): one row per ablation arm, the best arm
per metric marked, and overlaid curves with one line per arm.

Every number is read from the arm's own files, never from memory, so a rerun writes the same report:

    column                     source
    name                       the arm's label (given)
    <setting>                  the arm's swept settings (given), one column per setting (union over arms)
    status                     "done" when the train folder has meta.json, else "not finished"
    steps                      train meta.json result.steps
    train_loss                 train meta.json result.final_loss (the last optimizer step's mixed loss)
    train_ce, train_kd         train_log.csv, the train row of the highest step: ce_loss, kd_loss (kd: null without a teacher)
    train_ce_after             train meta.json result.loss_after (CE on the first train_ce_samples training examples, after training)
    heldout_ce_before/_after   train meta.json result.heldout.ce_before / ce_after
    heldout_kd_before/_after   train meta.json result.heldout.kd_before / kd_after
    TASK/METRIC, ..._stderr    the eval stage's after/eval.json rows: value, stderr (a filter other than
                               "none" is named too: TASK/METRIC,FILTER)
    wall_s                     the arm's train stage time (given)
    peak_rss_mib, peak_gpu_mib train meta.json result.peak_rss_mib / peak_gpu_mib (null when train did not record them)

An unfinished arm has null numbers and no plot line; an arm without `after/eval.json` has null
benchmark columns. Non-finite numbers (a diverged loss) are null too.

Best arm per metric: lower is better for the losses, the wall time and the memory; for a benchmark
metric the direction is lm-eval's own (`higher_is_better` in after/results.json), else a short list
of known names; a metric whose direction is unknown, the stderr columns, the settings and the
`*_before` columns (the starting point, not an outcome of the arm) get none. train_loss, the mixed
`(1 − kd_ratio)·CE + kd_ratio·KD`, gets one only when every finished arm has the same kd_ratio and KD
settings (kd_loss, kd_temperature, beta, skew_alpha, from meta.json `config`); train_kd and
heldout_kd_after only when the KD settings agree. Ties go to the first arm in the given order
(compare.md bolds every cell equal to the best value).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from reflect_tune.artifacts import atomic_path, atomic_write_text, read_json_object
from reflect_tune.train_log import read_log

DONE, NOT_FINISHED = "done", "not finished"
LOSS_COLUMNS = ["steps", "train_loss", "train_ce", "train_kd", "train_ce_after",
                "heldout_ce_before", "heldout_ce_after", "heldout_kd_before", "heldout_kd_after"]
COST_COLUMNS = ["wall_s", "peak_rss_mib", "peak_gpu_mib"]
LOWER_IS_BETTER = {"train_loss", "train_ce", "train_kd", "train_ce_after", "heldout_ce_after", "heldout_kd_after",
                   "wall_s", "peak_rss_mib", "peak_gpu_mib"}
# a column whose value depends on these train settings is compared (best arm) only among equal ones
MIXED_BY = {"train_loss": ("kd_ratio", "kd_loss", "kd_temperature", "beta", "skew_alpha"),
            **{c: ("kd_loss", "kd_temperature", "beta", "skew_alpha") for c in ("train_kd", "heldout_kd_after")}}
# lm-eval metric names whose direction is known when results.json does not say it
HIGHER_METRICS = {"acc", "acc_norm", "mc1", "mc2", "exact_match", "em", "f1", "bleu", "rouge1", "rouge2", "rougeL",
                  "mcc", "accuracy"}
LOWER_METRICS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter", "brier_score"}
# plot file -> (log kind, log column, y label)
PLOTS = {"heldout_ce.png": ("eval", "eval_ce", "held-out CE per response token"),
         "heldout_kd.png": ("eval", "eval_kd", "held-out KD term (T²·D) per response token"),
         "train_loss.png": ("train", "loss", "training loss per target token")}


def write_compare(folder: str | Path, arms: list[dict]) -> dict:
    """Write compare.csv, compare.json, compare.md and the overlaid PNGs into `folder`.

    `arms`: in order, {"name", "settings": {setting: value}, "train": train folder, "eval": eval stage
    folder or None, "wall_s": seconds or None}. Returns {"rows", "columns", "best", "direction",
    "plots" (file names written), "series" ({plot stem: {arm name: [[step, value], ...]}}), "table"
    (the Markdown table alone, to embed), "csv", "json", "md" (paths)}.
    """
    folder = Path(folder)
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: arm names must be unique: {names}")
    settings = _union(k for a in arms for k in (a.get("settings") or {}))
    clash = [k for k in settings if k in ("name", "status", *LOSS_COLUMNS, *COST_COLUMNS) or "/" in k]
    if clash:
        raise ValueError(f"compare: swept setting(s) {clash} would overwrite a column of the report")
    rows, configs, directions, bench = [], [], {}, []
    for arm in arms:
        row, found, config = _arm_row(arm, settings)
        rows.append(row)
        configs.append(config)
        for col, direction in found.items():
            if col not in bench:
                bench.append(col)
            if directions.get(col) is None:  # an arm whose results.json says it wins over one that does not
                directions[col] = direction
    for row in rows:
        for col in bench:
            row.setdefault(col, None)
    columns = ["name", *settings, "status", *LOSS_COLUMNS, *bench, *COST_COLUMNS]
    direction = {c: "lower" for c in LOSS_COLUMNS + COST_COLUMNS if c in LOWER_IS_BETTER}
    direction.update({c: d for c, d in directions.items() if d})
    best = {c: arm for c, d in direction.items() if _comparable(rows, configs, c) and (arm := _best(rows, c, d)) is not None}
    series = {Path(png).stem: _series(arms, rows, kind, key) for png, (kind, key, _) in PLOTS.items()}

    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    for png, (_, key, ylabel) in PLOTS.items():
        lines = series[Path(png).stem]
        if any(lines.values()):
            _plot(folder / png, lines, ylabel)
            plots.append(png)
        else:
            (folder / png).unlink(missing_ok=True)  # no stale curve from an earlier report
    table = _markdown(rows, columns, settings, best)
    csv_path, json_path, md_path = folder / "compare.csv", folder / "compare.json", folder / "compare.md"
    atomic_write_text(csv_path, _csv(rows, columns))
    atomic_write_text(json_path, json.dumps({"columns": columns, "rows": rows, "best": best, "direction": direction,
                                             "plots": plots}, indent=2, ensure_ascii=False, allow_nan=False,
                                            default=str) + "\n")
    md = ["# Sweep comparison", "", table, "",
          "Bold: the best arm of each column (lower is better for the losses, the wall time and the memory; "
          "lm-eval's direction for the task metrics). `*_before` is the starting point, not an outcome of the arm. "
          "train_loss (the mixed loss) is marked only when the arms share kd_ratio and the KD settings, "
          "the KD columns only when they share the KD settings.", ""]
    md += [f"![{Path(p).stem}]({p})" for p in plots]
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return {"rows": rows, "columns": columns, "best": best, "direction": direction, "plots": plots, "series": series,
            "table": table, "csv": str(csv_path), "json": str(json_path), "md": str(md_path)}


# ----------------------------------------------------------------------------- reading one arm


def _arm_row(arm: dict, settings: list[str]) -> tuple[dict, dict[str, Optional[str]], dict]:
    """The arm's row, its benchmark columns with their direction ("higher", "lower" or None), and
    its train config (meta.json `config`; {} when unfinished)."""
    row: dict[str, Any] = {"name": arm["name"], **{k: (arm.get("settings") or {}).get(k) for k in settings}}
    train = Path(arm["train"])
    meta = read_json_object(train / "meta.json")
    row["status"] = DONE if meta is not None else NOT_FINISHED
    row.update({c: None for c in LOSS_COLUMNS + COST_COLUMNS})
    if meta is None:
        return row, {}, {}
    result = meta.get("result") or {}
    held = result.get("heldout") or {}
    last = max(read_log(train / "train_log.csv", "train"), key=lambda r: int(r["step"]), default={})
    row.update(steps=_num(result.get("steps")), train_loss=_num(result.get("final_loss")), train_ce=_num(last.get("ce_loss")),
               train_kd=_num(last.get("kd_loss")), train_ce_after=_num(result.get("loss_after")),
               heldout_ce_before=_num(held.get("ce_before")), heldout_ce_after=_num(held.get("ce_after")),
               heldout_kd_before=_num(held.get("kd_before")), heldout_kd_after=_num(held.get("kd_after")),
               wall_s=_num(arm.get("wall_s")), peak_rss_mib=_num(result.get("peak_rss_mib")),
               peak_gpu_mib=_num(result.get("peak_gpu_mib")))
    found: dict[str, Optional[str]] = {}
    after = Path(arm["eval"]) / "after" if arm.get("eval") else None
    evaluated = read_json_object(after / "eval.json") if after else None
    if evaluated:
        hib = (read_json_object(after / "results.json") or {}).get("higher_is_better") or {}
        for r in evaluated.get("rows") or []:
            col = f"{r['task']}/{r['metric']}" + ("" if r.get("filter") in (None, "none") else f",{r['filter']}")
            row[col], row[f"{col}_stderr"] = _num(r.get("value")), _num(r.get("stderr"))
            found[col], found[f"{col}_stderr"] = _direction(hib.get(r["task"]) or {}, r["metric"]), None
    return row, found, meta.get("config") or {}


def _direction(task_hib: dict, metric: str) -> Optional[str]:
    if isinstance(task_hib.get(metric), bool):
        return "higher" if task_hib[metric] else "lower"
    return "higher" if metric in HIGHER_METRICS else "lower" if metric in LOWER_METRICS else None


def _series(arms: list[dict], rows: list[dict], kind: str, key: str) -> dict[str, list[list[float]]]:
    """{arm name: [[step, value], ...]} of one log column, finished arms only (an arm without the column: none)."""
    out = {}
    for arm, row in zip(arms, rows):
        if row["status"] != DONE:
            continue
        pts = [[int(r["step"]), v] for r in read_log(Path(arm["train"]) / "train_log.csv", kind)
               if (v := _num(r.get(key))) is not None]
        if pts:
            out[arm["name"]] = sorted(pts)
    return out


def _comparable(rows: list[dict], configs: list[dict], col: str) -> bool:
    """Whether the finished arms' values of `col` measure the same thing: the mixed train loss only
    under one kd_ratio, a KD term only under one kd_loss, temperature, beta and skew_alpha."""
    keys = MIXED_BY.get(col)
    if keys is None:
        return True
    seen = {tuple(json.dumps(cfg.get(k), sort_keys=True) for k in keys)
            for row, cfg in zip(rows, configs) if row["status"] == DONE and row.get(col) is not None}
    return len(seen) <= 1


def _best(rows: list[dict], col: str, direction: str) -> Optional[str]:
    vals = [(r[col], r["name"]) for r in rows if r["status"] == DONE and isinstance(r.get(col), (int, float))]
    if not vals:
        return None
    pick = min if direction == "lower" else max
    target = pick(v for v, _ in vals)
    return next(name for v, name in vals if v == target)


# ----------------------------------------------------------------------------- writing


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows({c: "" if r.get(c) is None else r[c] for c in columns} for r in rows)
    return buf.getvalue()


def _markdown(rows: list[dict], columns: list[str], settings: list[str], best: dict) -> str:
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "| " + " | ".join("---" if c == "name" or c == "status" or c in settings else "---:" for c in columns) + " |"]
    best_value = {c: next(r[c] for r in rows if r["name"] == name) for c, name in best.items()}
    for r in rows:
        out = []
        for c in columns:
            v = r.get(c)
            text = "–" if v is None else _fmt(c, v)
            if c in best_value and v is not None and r["status"] == DONE and v == best_value[c]:
                text = f"**{text}**"
            out.append(cell(text))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def _fmt(col: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if col in COST_COLUMNS:
        return f"{v:.1f}"
    if col in LOSS_COLUMNS or "/" in col:
        return f"{v:.4f}"
    return f"{v:g}"  # a swept setting: 0.0003, 1e-05


def _plot(png: Path, lines: dict[str, list[list[float]]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) <= 20 else None, markersize=3,
                label=name)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=f"{png.stem}: one line per arm")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- small helpers


def _union(keys) -> list[str]:
    out: list[str] = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


def _num(x: Any) -> Optional[float | int]:
    """A finite number from JSON or a CSV cell; None for null, empty, non-numeric or non-finite."""
    if isinstance(x, bool) or x is None or x == "":
        return None
    if isinstance(x, int):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


