"""summary.md of a pipeline run: one section per finished stage, read from what the stage folders hold.

Kept apart from pipeline.py (which runs the stages) so that each stays readable; the text is built
only from the stage folders' meta.json and report files, never from memory, so a rerun that skips
every stage writes the same summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import atomic_write_text



def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_summary(pipe, stages, hold: dict | None = None) -> Path:
    """summary.md from what the stage folders hold (finished stages only); `hold`: the holdout's plan."""
    out = [f"# reflect-tune run `{pipe.name}`", "",
           f"Config: `pipeline.yaml` (copied from `{pipe.path}`). Data: `{pipe.data}`.", "",
           "| stage | folder | status |", "| --- | --- | --- |"]
    out += [f"| {s.name} | `{s.folder.name}/` | {'done' if s.done else 'not finished'} |" for s in stages]
    meta = read_json(Path(hold["folder"]) / "meta.json") if hold else None
    if meta:
        out += ["", f"Held out before any stage read the data (select's `holdout` {hold['fraction']}, seed {hold['seed']}): "
                    f"**{meta.get('heldout')} of {meta.get('records')} records**, never reflected, scored, selected or "
                    f"trained on (`{Path(hold['folder']).name}/heldout.jsonl`)."]
    for st in stages:
        meta = read_json(st.folder / "meta.json") if st.done else None
        if meta is None or st.extra.get("arm"):  # the arms of a sweep: in the comparison below
            continue
        out += ["", *{"student": _student_md, "reflect": _reflect_md, "select": _select_md, "train": _train_md,
                     "teacher_sft": _sft_md, "student_sft": _sft_md, "teacher_logits": _logits_md, "eval": _eval_md, "judge": _judge_md}[st.name](st, meta)]
    out += _compare_md(pipe.folder / "compare")
    path = pipe.folder / "summary.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path


def _sft_md(st, meta: dict) -> list[str]:
    lines = _train_md(st, meta)
    what = "the KD teacher fine-tuned on the target data" if st.name == "teacher_sft" else "the student fine-tuned first"
    return [f"## {st.name}: {what} (`{st.folder.name}/`)", *lines[1:]]


def _logits_md(st, meta: dict) -> list[str]:
    s = meta.get("summary") or {}
    size = f"{s['bytes'] / 2**20:.1f} MiB ({s.get('bytes_per_token')} bytes/token)" if s.get("bytes") is not None else "?"
    return [f"## teacher_logits: the teacher's top-{st.config.top_k} log-probabilities, computed once (`{st.folder.name}/cache/`)", "",
            f"Teacher `{st.config.teacher}` on {s.get('examples')} examples ({s.get('heldout_examples')} held out): "
            f"{s.get('tokens', 0):,} response tokens, {size}, {s.get('seconds')} s. The train arms that use this teacher "
            "distil from it without loading the teacher."]


def _compare_md(folder: Path) -> list[str]:
    """The sweep's comparison (compare.py): its table and its plots, one line per arm."""
    table = folder / "compare.md"
    if not table.is_file():
        return []
    plots = sorted(p.name for p in folder.glob("*.png"))
    return ["", "## Comparison of the arms", "", table.read_text(encoding="utf-8").strip(), "",
            *[f"![{p[:-4]}](compare/{p})" for p in plots]]


def _student_md(st, meta: dict) -> list[str]:
    return ["## Student (make-student)", "",
            f"`{meta.get('teacher', st.config.teacher)}` cut to {len(meta.get('kept_layers', []))} of "
            f"{meta.get('teacher_layers')} layers (kept {meta.get('kept_layers')}): {meta.get('parameters', 0):,} parameters "
            f"against the teacher's {meta.get('teacher_parameters', 0):,}."]


def _reflect_md(st, meta: dict) -> list[str]:
    s = meta["summary"]
    cost = "unknown" if s.get("cost_usd") is None else f"${s['cost_usd']:.4f}"
    where = ("in this process (backend transformers)" if meta["config"].get("backend") == "transformers"
             else f"at `{meta['config'].get('base_url') or 'api.openai.com'}`")
    total = sum(sum(counts.values()) for counts in s["variants"].values())
    ok = sum(counts.get("ok", 0) for counts in s["variants"].values())
    lines = ["## Teacher usage (reflect)", "",
             f"Teacher `{meta['config'].get('model')}` {where}, reply layout `{s.get('response_format', 'markers')}`, "
             f"{s['records']} records: **{ok} of {total} variants ok ({100 * ok / max(total, 1):.0f}%)**.", "",
             "| requests answered | from cache | sent | retries | prompt tokens | completion tokens | cost | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {s['requests_answered']} | {s['requests_cached']} | {s['requests_sent']} | {s['retries']} | "
             f"{s['prompt_tokens']} | {s['completion_tokens']} | {cost} ({s.get('price_source', '')}) | {s['wall_s']:.0f} s |",
             "", "| variant | " + " | ".join(_statuses(s)) + " |", "| --- |" + " --- |" * len(_statuses(s))]
    for variant, counts in s["variants"].items():
        lines.append(f"| {variant} | " + " | ".join(str(counts.get(k, 0)) for k in _statuses(s)) + " |")
    return lines


def _statuses(s: dict) -> list[str]:
    return sorted({k for counts in s["variants"].values() for k in counts}) or ["ok"]


def _select_md(st, meta: dict) -> list[str]:
    s = meta["summary"]
    cut = s.get("ifd_cut") if s.get("ifd_cut") is not None else s.get("rifd_cut")
    lines = ["## Selection", "",
             f"Method `{s['method']}` with `{Path(str(s['model'])).name}` (template {s['template']}): {s['records']} records, "
             f"{s['candidates']} candidates scored, **{s['selected']} selected** (last kept score {_fmt(cut)}).", "",
             "| step | outcome | records |", "| --- | --- | --- |"]
    phases = {"phase1": "1: instruction (original or reflected)", "phase2": "2: response (kept or reflected)"}
    for k, v in s["decisions"].items():
        step, _, outcome = k.partition("_")
        if v and step in phases:
            lines.append(f"| {phases[step]} | {outcome} | {v} |")
    lines.append(f"| final | selected | {s['selected']} |")
    lines += [f"| final | {k} | {v} |" for k, v in s["decisions"].items() if v and k.startswith("dropped")]
    lines += ["", "Score distributions over the candidates that reached the filter:", "",
              "| score | count | NaN | min | p50 | p95 | max |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("ifd", "rifd"):
        d = s.get(name) or {}
        lines.append(f"| {name} | {d.get('count', 0)} | {d.get('nan', 0)} | " + " | ".join(_fmt(d.get(q)) for q in ("min", "p50", "p95", "max")) + " |")
    report = Path(st.config.output).with_suffix(".report")
    for png in ("ifd_hist.png", "rifd_hist.png"):
        if (report / png).is_file():
            lines += ["", f"![{png}]({st.folder.name}/{report.name}/{png})"]
    return lines


def _train_md(st, meta: dict) -> list[str]:
    r, c = meta.get("result", {}), meta.get("config", {})
    kd = f", KD from `{c.get('teacher')}` ({c.get('kd_loss')}, ratio {c.get('kd_ratio')})" if c.get("teacher") else ""
    lines = ["## Training", "",
             f"`{c.get('method')}` on `{Path(str(c.get('model'))).name}`{kd}: {r.get('steps')} steps, "
             f"{r.get('samples_seen')} samples, {r.get('tokens_seen')} target tokens, {r.get('wall_s')} s.", "",
             f"Response-token cross-entropy on the first {r.get('eval_examples')} training examples (seen in training): "
             f"{_fmt(r.get('loss_before'))} before → {_fmt(r.get('loss_after'))} after. "
             f"Last step's training loss: {_fmt(r.get('final_loss'))}."]
    h = r.get("heldout")
    if h:
        lines += ["", f"Held-out response-token cross-entropy ({h.get('examples')} examples never trained on): "
                      f"**{_fmt(h.get('ce_before'))} before → {_fmt(h.get('ce_after'))} after**"
                      + (f"; held-out KD term: {_fmt(h.get('kd_before'))} → {_fmt(h.get('kd_after'))}" if h.get("kd_before") is not None else "")
                      + "."]
    if (st.folder / "loss.png").is_file():
        lines += ["", f"![loss]({st.folder.name}/loss.png)"]
    return lines


def _eval_md(st, meta: dict) -> list[str]:
    """The before/after table: the starting point of training against the trained student."""
    s = meta.get("summary", {})
    lines = ["## Evaluation: before and after training", "",
             f"Before: `{Path(str(st.extra['before'].model)).name}` (the starting point); "
             f"after: `{Path(str(st.config.model)).name}` (the trained student).", "",
             "| measure | before | after | change |", "| --- | ---: | ---: | ---: |"]
    h = s.get("heldout")
    if h:
        where = "the pipeline's held-out records" if str(h.get("source", "")).endswith("heldout.jsonl") else h.get("source")
        lines.append(f"| held-out response-token CE ({h.get('examples')} examples, {where}) | {_fmt(h.get('ce_before'))} | "
                     f"{_fmt(h.get('ce_after'))} | {_change(h.get('ce_before'), h.get('ce_after'))} |")
        if h.get("kd_before") is not None:
            lines.append(f"| held-out KD term ({h.get('kd_loss')}) | {_fmt(h.get('kd_before'))} | {_fmt(h.get('kd_after'))} | "
                         f"{_change(h.get('kd_before'), h.get('kd_after'))} |")
    before = {(r["task"], r["metric"], r.get("filter")): r for r in (s.get("before") or {}).get("rows", [])}
    for r in (s.get("after") or {}).get("rows", []):
        b = before.get((r["task"], r["metric"], r.get("filter")), {})
        lines.append(f"| {r['task']} {r['metric']} ({r.get('samples')} items, lm-eval) | {_pm(b.get('value'), b.get('stderr'))} | "
                     f"{_pm(r.get('value'), r.get('stderr'))} | {_change(b.get('value'), r.get('value'))} |")
    if len(lines) == 6:
        lines.append("| (no held-out data and no tasks configured) | | | |")
    lines += ["", "Lower is better for the losses; higher for the task scores (± is lm-eval's standard error).",
              f"Details: `{st.folder.name}/after/eval.md`, `{st.folder.name}/before/eval.md`." if s.get("after") else ""]
    return lines


def _judge_md(st, meta: dict) -> list[str]:
    s = meta.get("summary", {})
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    low, high = (s.get("win_rate_ci95") or [None, None])[:2]
    f = s.get("failures", {})
    return ["## Judged win rate: trained vs starting student", "",
            f"Judge `{s.get('judge')}`, each of {s.get('prompts')} prompts asked in both orders: "
            f"**{s.get('wins')} wins, {s.get('ties')} ties, {s.get('losses')} losses; win rate {pct(s.get('win_rate'))} "
            f"(95% interval {pct(low)} – {pct(high)})**; not judged: {f.get('parse_failed', 0)} parse failures, "
            f"{f.get('api_failed', 0)} API failures.",
            f"Mean answer length (tokens): trained {_fmt((s.get('lengths') or {}).get('model_tokens'))}, "
            f"starting {_fmt((s.get('lengths') or {}).get('baseline_tokens'))}. Details: `{st.folder.name}/judge.md`."]


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return "–"
    return f"{after - before:+.4g}"


def _pm(value: Any, stderr: Any) -> str:
    return _fmt(value) if not isinstance(stderr, (int, float)) else f"{_fmt(value)} ± {_fmt(stderr)}"
