"""Student selection: the Selective Reflection-Tuning rule and its simpler relatives.

Methods (`--method`):
    srt          (default on reflect output) phase 1 keeps the higher-IFD pair of the original and
                 its instruction reflection; phase 2 keeps the lower-r-IFD pair of that winner and
                 its response reflection; the kept pair needs IFD < 1 and r-IFD < 1; then the top
                 fraction by IFD.
    ifd          (default on plain data) Cherry's rule: drop IFD >= 1, then the top fraction by IFD.
    rifd         drop r-IFD >= 1, then the fraction with the lowest r-IFD (the most feasible pairs).
    superfilter  `ifd`, with IFD from a small proxy model (`--proxy-model`, default template `none`).

NaN never wins a comparison and never passes a filter. Ties keep the earlier pair (original over
ins, the phase-1 winner over its response reflection). Where the paper and the released code
differ (phase 2 dropping a record whose rewritten answer loses, NaN in comparisons, loss ratio,
--top of the survivors, truncated pairs), `match_reference` and one setting each pick the way:
conventions.py. `scores` (a score table from `reflect-tune score`) replaces the model: the rule is
applied to its rows, so a selection can be re-run with other rules at no cost. Only the passes a rule needs are computed:
srt scores IFD of the original and ins, then r-IFD of the winner and its response reflection, then
IFD of the response reflections that won phase 2.

Input: reflect output JSONL (FORMATS §8.1; every `ok` variant is a candidate) or plain instruction
data (the originals), read by `load_candidates`, which `score` uses too.
Outputs (docs/FORMATS.md §8.3): `selected.jsonl`, `selected.scores.parquet` (every candidate),
`selected.report/` (summary.json and two histograms), each with a provenance sidecar.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import check_output_folder
from reflect_tune.config import SelectConfig, SettingError
from reflect_tune.conventions import scoring_conventions, selection_conventions
from reflect_tune.errors import ReflectTuneError
from reflect_tune.records import Record, is_reflected, load_candidates
from reflect_tune.score import (
    SCORE_COLUMNS,
    ScoreSession,
    ScoreStats,
    check_options,
    check_output,
    check_turns,
    nan_summary,
    open_scorer,
    scoring_meta,
    shard_folder,
    write_scores,
)

log = logging.getLogger(__name__)

METHODS = ("srt", "ifd", "rifd", "superfilter")
DECISIONS = (
    "phase1_original", "phase1_ins", "phase2_kept", "phase2_res", "phase2_no_variant", "dropped_variant_not_ok",
    "dropped_rewrite_lost", "dropped_truncated", "dropped_nan", "dropped_ifd_ge_1", "dropped_rifd_ge_1", "dropped_below_cut",
)
# decisions taken before the < 1 filter: such pairs never reach it (left out of the histograms)
UNFILTERED = ("dropped_variant_not_ok", "dropped_rewrite_lost", "dropped_truncated")
# a NaN with one of these reasons is NaN in the released code too (an empty field gives no row, no
# scored token gives a NaN loss); any other reason is where that code's try/except records 0
NAN_IN_REFERENCE = ("empty output", "empty instruction", "no scored tokens")
RESPONSE_OF = {"original": "res", "ins": "res_ins"}


# ----------------------------------------------------------------------------- the rules (pure)


def _nan(x: float | None) -> bool:
    return x is None or math.isnan(x)


def phase1(original_ifd: float | None, ins_ifd: float | None, nan: str = "loses") -> str:
    """'ins' if the instruction reflection has the strictly higher IFD, else 'original'. NaN loses
    (`nan="plain"`: a NaN compares false, so the original goes on, as in the released code)."""
    if nan == "plain":
        return "ins" if not _nan(ins_ifd) and not _nan(original_ifd) and ins_ifd > original_ifd else "original"
    if _nan(ins_ifd):
        return "original"
    if _nan(original_ifd):
        return "ins"
    return "ins" if ins_ifd > original_ifd else "original"


def phase2(winner_rifd: float | None, response_rifd: float | None, nan: str = "loses") -> str:
    """'res' if the response reflection has the strictly lower r-IFD, else 'kept'. NaN loses
    (`nan="plain"`: a NaN compares false, so the winner is kept)."""
    if nan == "plain":
        return "res" if not _nan(response_rifd) and not _nan(winner_rifd) and response_rifd < winner_rifd else "kept"
    if _nan(response_rifd):
        return "kept"
    if _nan(winner_rifd):
        return "res"
    return "res" if response_rifd < winner_rifd else "kept"


def gate(ifd: float | None, rifd: float | None, need: tuple[str, ...]) -> str | None:
    """The drop decision for a pair under the `< 1` filters in `need`, or None if it passes."""
    values = {"ifd": ifd, "rifd": rifd}
    if any(_nan(values[n]) for n in need):
        return "dropped_nan"
    for n in need:
        if values[n] >= 1:
            return f"dropped_{n}_ge_1"
    return None


def keep_count(records: int, survivors: int, top: float | None, top_k: int | None, top_of: str = "records") -> int:
    """How many survivors to keep: floor(top x records) (at least 1), top_k, or all of them.
    `top_of="survivors"`: floor(top x survivors), as both released code bases cut their fraction."""
    if top is not None:
        k = max(1, int(top * (survivors if top_of == "survivors" else records) + 1e-9))
    elif top_k is not None:
        k = top_k
    else:
        k = survivors
    return min(k, survivors)


# ----------------------------------------------------------------------------- the stage


@dataclass(kw_only=True)
class Outcome:
    """What happened to one record."""

    index: int
    kept: int | None = None  # position in the candidate list of the pair that reached the filter
    decision: str = ""  # "selected" or one of the dropped_* decisions
    phase1: str | None = None
    phase2: str | None = None


@dataclass(kw_only=True)
class SelectResult:
    selected: list[dict[str, Any]]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    outcomes: list[Outcome] = field(default_factory=list)


def output_paths(output: str | os.PathLike) -> tuple[Path, Path, Path]:
    """selected.jsonl -> (selected.jsonl, selected.scores.parquet, selected.report/)."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out, out.with_name(stem + ".scores.parquet"), out.with_name(stem + ".report")


def validate(config: SelectConfig, reflected: bool | None = None) -> str:
    """The settings and the three outputs, before a model loads; returns the method.

    `reflected`: whether the input is a reflect output (read from the file when None; a pipeline
    says so before the file exists)."""
    if reflected is None:
        reflected = is_reflected(config.input)
    if config.top is not None and config.top_k is not None:
        raise SettingError("top_k", "--top and --top-k are mutually exclusive; give one")
    if config.top is not None and not 0 < config.top <= 1:
        raise SettingError("top", f"--top must be a fraction in (0, 1], got {config.top}")
    if config.top_k is not None and config.top_k < 1:
        raise SettingError("top_k", f"--top-k must be at least 1, got {config.top_k}")
    if config.missing_response not in ("drop", "keep"):
        raise SettingError("missing_response", f"--missing-response must be drop or keep, got {config.missing_response!r}")
    method = config.method or ("srt" if reflected else "ifd")
    if method not in METHODS:
        raise SettingError("method", f"unknown method {method!r}; choose {', '.join(METHODS)}")
    if method == "srt" and not reflected:
        raise SettingError("method", f"{config.input}: --method srt needs reflect output (docs/FORMATS.md §8.1); "
                                     "on plain data use --method ifd, rifd or superfilter")
    if method == "superfilter" and not config.proxy_model:
        raise SettingError("proxy_model", "--method superfilter needs --proxy-model (a small model that scores IFD)")
    if method != "superfilter" and config.proxy_model:
        raise SettingError("proxy_model", "--proxy-model applies only to --method superfilter")
    if config.scores is not None:
        if not Path(config.scores).is_file():
            raise SettingError("scores", f"{config.scores}: --scores must be a scores.parquet written by reflect-tune score")
    elif method != "superfilter" and not config.model:
        raise SettingError("model", "--model is required: the student that scores the data (or --scores, a score table)")
    if config.match_reference == "cherry" and method == "srt":
        raise SettingError("match_reference", "--match-reference cherry reproduces Cherry's IFD selection (--method ifd); "
                                              "for the two-phase rule use --match-reference srt")
    scoring_conventions(config)
    selection_conventions(config)
    check_turns(config.turns)
    check_output(config.output, ".jsonl", [config.input])
    check_options(config.template, config.max_length, config.reverse, config.batch_tokens)
    _, scores_path, report_dir = output_paths(config.output)
    check_output(scores_path, ".parquet", [config.input])  # select writes all three: none may be the input
    check_output_folder(report_dir, [config.input], flag="the report folder")
    return method


def run(config: SelectConfig) -> SelectResult:
    """Score what the method needs, apply the rule, write the three outputs (main process only)."""
    from reflect_tune.artifacts import provenance, write_meta

    method = validate(config)  # the input's kind is read from it the same way load_candidates reads it
    out, scores_path, report_dir = output_paths(config.output)
    loaded = load_candidates(config.input, format=config.format, split=config.split, turns=config.turns)
    for w in loaded.warnings:
        log.warning("warning: %s", w)
    rules = selection_conventions(config)
    template, conv = scoring_conventions(config)
    if method == "superfilter" and template == "auto":
        template = "none"  # Superfiltering scores the proxy with no template
    if config.scores is not None:
        scorer, session = None, TableSession(config.scores)
        template = session.meta.get("template", "unknown")
    else:
        scorer = open_scorer(
            config.proxy_model if method == "superfilter" else config.model, template=template, dtype=config.dtype,
            device=config.device, max_length=config.max_length, batch_tokens=config.batch_tokens,
            reverse=config.reverse, trust_remote_code=config.trust_remote_code, conventions=conv,
        )
        template = scorer.template
        session = ScoreSession(scorer, shard_folder(out, scorer.signature), resume=config.resume, progress=config.progress)
    if method == "srt":
        cands = loaded.candidates
        rows, outcomes = _select_srt(session, cands, len(loaded.ids), config.missing_response == "keep", rules)
        need = ("ifd", "rifd")
    else:
        cands = [c for c in loaded.candidates if c.variant == "original"]
        direction = "rifd" if method == "rifd" else "ifd"
        rows = session.score(cands, [(direction,)] * len(cands), label=f"select ({direction})")
        outcomes = [Outcome(index=c.index, kept=i) for i, c in enumerate(cands)]
        need = (direction,)

    # the filter, then the cut
    column = {"ifd": "ifd", "rifd": "rifd"} if rules["ratio"] == "ppl" else {"ifd": "ifd_loss_ratio", "rifd": "rifd_loss_ratio"}
    survivors = []
    for o in outcomes:
        if o.decision:
            continue
        row = rows[o.kept]
        if rules["truncated"] == "skip" and row["truncated"]:
            o.decision = "dropped_truncated"
            continue
        o.decision = gate(row[column["ifd"]], row[column["rifd"]], need) or ""
        if not o.decision:
            survivors.append(o)
    by = "rifd" if method == "rifd" else "ifd"
    sign = 1 if method == "rifd" else -1  # rifd: lowest first; otherwise highest IFD first
    survivors.sort(key=lambda o: (sign * rows[o.kept][column[by]], o.index))
    k = keep_count(len(loaded.ids), len(survivors), config.top, config.top_k, rules["top_of"])
    for rank, o in enumerate(survivors):
        o.decision = "selected" if rank < k else "dropped_below_cut"
    chosen = survivors[:k]
    cutting = config.top is not None or config.top_k is not None
    cut = rows[chosen[-1].kept][column[by]] if chosen and cutting else None  # the last kept score

    selected = [_selected_row(cands[o.kept], rows[o.kept]) for o in chosen]
    if any(r.get("system") for r in selected):
        for r in selected:
            r["system"] = r.get("system") or ""
    else:
        for r in selected:
            r.pop("system", None)
    summary = _summary(config, method, template, loaded, rows, outcomes, selected, cut, by)
    summary["match_reference"] = config.match_reference
    summary["conventions"] = {**conv.__dict__, **rules} if scorer is not None else {**session.meta.get("conventions", {}), **rules}
    summary["nan"] = _nan_report(session, method, cands, rows, outcomes, config.missing_response == "keep", rules, column, need)
    session.finish()
    if method == "srt" and rules["rewrite_loses"] == "drop":
        # what the released code counts but does not append (its count_2 and count_4)
        summary["rewrite_lost_would_pass"] = sum(
            1 for o in outcomes if o.decision == "dropped_rewrite_lost"
            and gate(rows[o.kept][column["ifd"]], rows[o.kept][column["rifd"]], need) is None)
    result = SelectResult(selected=selected, summary=summary, rows=rows, outcomes=outcomes)
    if scorer is not None and not scorer.is_main:
        return result

    inputs = [config.input] if Path(config.input).exists() else []
    if config.scores is not None:
        inputs.append(config.scores)
    meta = provenance("select", config, inputs=inputs)
    meta["scoring"] = scoring_meta(scorer, session.stats) if scorer is not None else {"scores": config.scores, **session.meta}
    meta["summary"] = summary
    if loaded.report is not None:
        meta["load_report"] = loaded.report.__dict__
    write_scores(rows, scores_path)
    write_meta(scores_path, meta)
    _write_jsonl(selected, out)
    write_meta(out, meta)
    _write_report(report_dir, summary, rows, outcomes, method, cut if rules["ratio"] == "ppl" else None, meta)
    if getattr(session, "store", None) is not None:
        session.store.remove()
    return result


class TableSession:
    """Stands in for a ScoreSession: rows from a scores.parquet by (id, variant); no model is loaded."""

    def __init__(self, path: str = "", rows: dict[tuple[str, str], dict[str, Any]] | None = None):
        self.path, self.stats, self.meta = path, ScoreStats(), {}
        if rows is not None:  # rows in hand (the NaN check)
            self.rows = rows
            return
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
            raise ReflectTuneError(f"{path}: --scores: cannot read as Parquet: {e}") from None
        missing = [c for c in SCORE_COLUMNS if c not in table.column_names]
        if missing:
            raise ReflectTuneError(f"{path}: --scores: not a score table of reflect-tune score: no column {missing[0]!r}")
        self.rows = {(r["id"], r["variant"]): r for r in table.to_pylist()}
        try:
            self.meta = json.loads(Path(path + ".meta.json").read_text()).get("scoring", {})
        except (OSError, ValueError):
            self.meta = {}

    def score(self, cands: list[Record], wants: list[tuple[str, ...]], label: str = "") -> list[dict[str, Any]]:
        out = []
        for cand, want in zip(cands, wants):
            row = self.rows.get((cand.id, cand.variant))
            if row is None:
                raise ReflectTuneError(f"{self.path}: --scores has no row for id {cand.id!r}, variant {cand.variant!r}; "
                                       "score this input with reflect-tune score")
            for direction in want:
                if row[direction] is None:
                    raise ReflectTuneError(f"{self.path}: id {cand.id!r}, variant {cand.variant!r}: {direction} was not "
                                           "scored (was reflect-tune score run with --only?)")
            out.append(dict(row))
        return out

    def finish(self) -> None:
        pass


def _error_nan(row: dict[str, Any]) -> bool:
    """A NaN the released code would have recorded as 0: any reason other than NAN_IN_REFERENCE's."""
    parts = [p for p in (row["reason"] or "").split("; ") if p]
    return bool(parts) and not any(tag in p for p in parts for tag in NAN_IN_REFERENCE)


def _nan_report(session, method, cands, rows, outcomes, keep_missing, rules, column, need) -> dict[str, Any]:
    """Pairs dropped for a NaN score, and how many records the released code would have kept instead:
    its try/except records 0 for a pass that raised, and 0 passes its < 1 filters. The rule is run
    again on the records with such a NaN, the NaN read as 0 (their other candidates scored if needed)."""
    dropped = sum(1 for o in outcomes if o.decision == "dropped_nan")
    affected = sorted({cands[i].index for i, r in enumerate(rows) if _error_nan(r)})
    kept_there = 0
    if affected:
        renumber = {index: k for k, index in enumerate(affected)}
        sub = [dataclasses.replace(c, index=renumber[c.index]) for c in cands if c.index in renumber]
        full = session.score(sub, [need] * len(sub), label="select (NaN check)")
        zeroed = {}
        for cand, row in zip(sub, full):
            if _error_nan(row):
                row = {**row, **{column[d]: 0.0 for d in ("ifd", "rifd") if _nan(row[column[d]])}}
            zeroed[(cand.id, cand.variant)] = row
        table = TableSession(rows=zeroed)
        if method == "srt":
            there_rows, there = _select_srt(table, sub, len(affected), keep_missing, rules)
        else:
            there_rows, there = table.score(sub, [need] * len(sub)), [Outcome(index=c.index, kept=k) for k, c in enumerate(sub)]
        passed_here = {o.index for o in outcomes if o.decision in ("selected", "dropped_below_cut")}
        for o in there:
            if not o.decision and gate(there_rows[o.kept][column["ifd"]], there_rows[o.kept][column["rifd"]], need) is None:
                kept_there += affected[o.index] not in passed_here
    return {"dropped": dropped, "released_code_would_keep": kept_there,
            "note": "NaN never passes the filter here; the released code records 0 for a pass that raised, which passes"}


def _select_srt(session, cands: list[Record], records: int, keep_missing: bool = False, rules: dict | None = None):
    """Both phases. Returns a scores row per candidate (unscored passes null) and an outcome per record.
    `keep_missing`: a winner whose response variant is not ok goes on with its own answer (phase 2
    `no_variant`, like the reference's fallback to the original text) instead of being dropped.
    `rules`: the selection conventions (conventions.py); phase 2's loser is dropped under rewrite_loses "drop"."""
    rules = rules or {"phase_nan": "loses", "ratio": "ppl", "rewrite_loses": "keep"}
    ifd, rifd = ("ifd", "rifd") if rules["ratio"] == "ppl" else ("ifd_loss_ratio", "rifd_loss_ratio")
    nan = rules["phase_nan"]
    at: dict[tuple[int, str], int] = {(c.index, c.variant): i for i, c in enumerate(cands)}
    rows: list[dict[str, Any] | None] = [None] * len(cands)

    first = [i for i, c in enumerate(cands) if c.variant in ("original", "ins")]
    for i, row in zip(first, session.score([cands[i] for i in first], [("ifd",)] * len(first), label="select phase 1 (IFD)")):
        rows[i] = row
    outcomes: list[Outcome] = []
    second: list[int] = []
    solo: list[int] = []  # winners with no response variant, kept as they are (keep_missing)
    for index in range(records):
        o = Outcome(index=index)
        orig = at[(index, "original")]
        ins = at.get((index, "ins"))
        o.phase1 = phase1(rows[orig][ifd], rows[ins][ifd] if ins is not None else None, nan)
        winner = orig if o.phase1 == "original" else ins
        response = at.get((index, RESPONSE_OF[o.phase1]))
        if response is None and keep_missing:
            o.phase2, o.kept = "no_variant", winner
            solo.append(winner)
        elif response is None:  # not response-reflected: the reference drops it too
            o.decision = "dropped_variant_not_ok"
            o.kept = winner
        else:
            second.extend([winner, response])
        outcomes.append(o)
    # the winner's IFD is known from phase 1; the response variant's IFD waits until it wins phase 2
    wants = [("ifd", "rifd") if k % 2 == 0 else ("rifd",) for k in range(len(second))]
    scored = session.score([cands[i] for i in second + solo], wants + [("ifd", "rifd")] * len(solo), label="select phase 2 (r-IFD)")
    for i, row in zip(second + solo, scored):
        rows[i] = row
    third: list[int] = []
    for o in outcomes:
        if o.decision or o.phase2 == "no_variant":
            continue
        winner = at[(o.index, o.phase1)]
        response = at[(o.index, RESPONSE_OF[o.phase1])]
        o.phase2 = phase2(rows[winner][rifd], rows[response][rifd], nan)
        o.kept = winner if o.phase2 == "kept" else response
        if o.phase2 == "res":
            third.append(response)
        elif rules["rewrite_loses"] == "drop":  # the released code appends only a winning rewrite
            o.decision = "dropped_rewrite_lost"
    scored = session.score([cands[i] for i in third], [("ifd", "rifd")] * len(third), label="select (IFD of kept responses)")
    for i, row in zip(third, scored):
        rows[i] = row
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:  # candidates the rule never needed: a row with every pass null
        for i, row in zip(missing, session.score([cands[i] for i in missing], [()] * len(missing), label="select (rows)")):
            rows[i] = row
    return rows, outcomes


def _selected_row(cand: Record, row: dict[str, Any]) -> dict[str, Any]:
    def num(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    return {
        "id": cand.id, "instruction": cand.instruction, "input": cand.input, "output": cand.output,
        "system": cand.system, "variant": cand.variant, "ifd": num(row["ifd"]), "rifd": num(row["rifd"]),
        "ifd_loss_ratio": num(row["ifd_loss_ratio"]), "rifd_loss_ratio": num(row["rifd_loss_ratio"]),
    }


def _stats(values: list[float | None]) -> dict[str, Any]:
    import numpy as np

    present = [v for v in values if v is not None]
    finite = np.array([v for v in present if not math.isnan(v)], dtype=float)
    out: dict[str, Any] = {"count": int(finite.size), "nan": len(present) - int(finite.size)}
    for name, q in (("min", 0), ("p50", 50), ("p95", 95), ("max", 100)):
        out[name] = round(float(np.percentile(finite, q)), 6) if finite.size else None
    return out


def _summary(config, method, template, loaded, rows, outcomes, selected, cut, by) -> dict[str, Any]:
    decisions = dict.fromkeys(DECISIONS, 0)
    for o in outcomes:
        if o.phase1:
            decisions[f"phase1_{o.phase1}"] += 1
        if o.phase2:
            decisions[f"phase2_{o.phase2}"] += 1
        if o.decision != "selected":
            decisions[o.decision] += 1
    pool = [rows[o.kept] for o in outcomes if o.kept is not None and o.decision not in UNFILTERED]
    variant_status: dict[str, dict[str, int]] = {}
    for statuses in loaded.statuses:
        for variant, status in statuses.items():
            if variant != "original":
                counts = variant_status.setdefault(variant, {})
                counts[status] = counts.get(status, 0) + 1
    return {
        "method": method, "top": config.top, "top_k": config.top_k, "model": config.model,
        "proxy_model": config.proxy_model, "template": template, "records": len(loaded.ids),
        "candidates": len(rows), "selected": len(selected), "ifd_cut": cut if by == "ifd" else None,
        "rifd_cut": cut if by == "rifd" else None, "decisions": decisions,
        "ifd": _stats([r["ifd"] for r in pool]), "rifd": _stats([r["rifd"] for r in pool]),
        "nan_reasons": nan_summary(rows)["reasons"], "variant_status": variant_status,
    }


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    from reflect_tune.artifacts import atomic_write_text

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise ReflectTuneError(f"{path}: cannot write: {e.strerror or e}") from None


def _write_report(folder: Path, summary, rows, outcomes, method: str, cut: float | None, meta: dict) -> None:
    """The report folder, built aside and swapped in whole: a failed write (disk full) leaves the
    previous report, or none, never half of one."""
    import shutil

    from reflect_tune.artifacts import replace_folder, sweep_temporaries, write_error, write_meta

    sweep_temporaries(folder)  # a report a killed run was building
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _report_files(tmp, summary, rows, outcomes, method, cut)
        write_meta(tmp, meta)
        replace_folder(tmp, folder)
    except OSError as e:
        raise write_error(folder, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_files(folder: Path, summary, rows, outcomes, method: str, cut: float | None) -> None:
    """summary.json plus a histogram of IFD and of r-IFD over the pairs that reached the filter."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reflect_tune.artifacts import atomic_path, atomic_write_text

    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    pool = [rows[o.kept] for o in outcomes if o.kept is not None and o.decision not in UNFILTERED]
    for column, title in (("ifd", "IFD"), ("rifd", "r-IFD")):
        values = [r[column] for r in pool if r[column] is not None and not math.isnan(r[column])]
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        if values:
            # the filter's region is [0, 1]: far outliers (a weak student gives IFD in the thousands)
            # are gathered in one last bin, labelled, so that they cannot squash it
            top = max(2.0, float(np.percentile(values, 95)) * 1.1)
            over = sum(v > top for v in values)
            shown = [min(v, top) for v in values]
            ax.hist(shown, bins=min(50, max(10, len(values) // 4)), range=(0.0, top), color="#4c72b0", alpha=0.85)
            if over:
                ax.annotate(f"{over} above {top:.3g} (max {max(values):.3g})", xy=(top, 0), xytext=(0.97, 0.9),
                            textcoords="axes fraction", ha="right", fontsize=8, arrowprops={"arrowstyle": "->", "color": "gray"})
            ax.axvline(1.0, color="gray", linestyle=":", label=f"{title} = 1 (kept below)")
            if cut is not None and (column == "rifd") == (method == "rifd"):
                ax.axvline(cut, color="#c44e52", linestyle="--", label=f"cut {cut:.4f} ({summary['selected']} selected)")
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, f"{title} not computed by --method {method}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(title)
        ax.set_ylabel("pairs")
        ax.set_title(f"{title} of the pairs that reached the filter ({len(values)})")
        fig.tight_layout()
        with atomic_path(folder / f"{column}_hist.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
