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
ins, the phase-1 winner over its response reflection). Only the passes a rule needs are computed:
srt scores IFD of the original and ins, then r-IFD of the winner and its response reflection, then
IFD of the response reflections that won phase 2.

Input: reflect output JSONL (FORMATS §8.1; every `ok` variant is a candidate) or plain instruction
data (the originals), read by `load_candidates`, which `score` uses too.
Outputs (docs/FORMATS.md §8.3): `selected.jsonl`, `selected.scores.parquet` (every candidate),
`selected.report/` (summary.json and two histograms), each with a provenance sidecar.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflect_tune.data import loads
from reflect_tune.errors import DataError, ReflectTuneError
from reflect_tune.score import (
    REVERSE_DEFAULT,
    STATUSES,
    Candidate,
    ScoreSession,
    check_options,
    check_output,
    nan_summary,
    open_scorer,
    scoring_meta,
    shard_folder,
    write_scores,
)

log = logging.getLogger(__name__)

METHODS = ("srt", "ifd", "rifd", "superfilter")
DECISIONS = (
    "phase1_original", "phase1_ins", "phase2_kept", "phase2_res", "phase2_no_variant", "dropped_variant_not_ok", "dropped_nan",
    "dropped_ifd_ge_1", "dropped_rifd_ge_1", "dropped_below_cut",
)
RESPONSE_OF = {"original": "res", "ins": "res_ins"}


@dataclass
class SelectConfig:
    """Everything `reflect-tune select` needs."""

    input: str
    output: str
    model: str | None = None
    top: float | None = None  # fraction of the input records to keep
    top_k: int | None = None  # or a count
    method: str | None = None  # None: srt on reflect output, ifd on plain data
    missing_response: str = "drop"  # srt, the winner's response variant not ok: "drop" the pair, or "keep" its own answer
    proxy_model: str | None = None
    template: str = "auto"
    dtype: str = "auto"
    batch_tokens: int | None = None
    max_length: int = 2048
    reverse: str = REVERSE_DEFAULT
    device: str = "auto"
    format: str | None = None
    split: str | None = None
    trust_remote_code: bool = False
    resume: bool = True
    progress: bool = True


# ----------------------------------------------------------------------------- reading candidates


@dataclass
class Loaded:
    """What an input file holds: one entry per record, the scorable candidates, and their origin."""

    path: str
    reflected: bool
    ids: list[str]
    candidates: list[Candidate]
    statuses: list[dict[str, str]]  # per record: variant -> status ("ok" for the original)
    warnings: list[str] = field(default_factory=list)


def _is_reflected(path: str) -> bool:
    """A reflect output (FORMATS §8.1): a JSON Lines file whose first record has `original` and `variants`."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".jsonl", ".json"):
        return False
    try:
        with open(p, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    row = loads(line.lstrip("\ufeff"))
                    return isinstance(row, dict) and "original" in row and "variants" in row
    except (OSError, json.JSONDecodeError, RecursionError):
        return False
    return False


def _get_str(obj: dict, key: str, where: str, label: str, *, nullable: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: field '{label}': missing")
    value = obj[key]
    if value is None and nullable:
        return ""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field '{label}': expected a string, got {kind}")
    return value


def read_reflected(path: str) -> Loaded:
    """Read and validate a reflect output file (FORMATS §8.1) into candidates.

    Only `ok` variants become candidates; `res` takes the original's instruction, `res_ins` takes
    the `ins` instruction. A bad line fails with `FILE:LINE: field 'F': problem`.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    loaded = Loaded(path=str(path), reflected=True, ids=[], candidates=[], statuses=[])
    seen: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: bad JSON at column {e.colno}: {e.msg.removesuffix(' at')}") from None
        except RecursionError:
            raise DataError(f"{where}: bad JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {'null' if row is None else type(row).__name__}")
        rid = row.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid:
            raise DataError(f"{where}: field 'id': expected a non-empty string")
        if rid in seen:
            raise DataError(f"{where}: field 'id': duplicate id {rid!r} (first at {seen[rid]})")
        seen[rid] = n
        orig = row.get("original")
        if not isinstance(orig, dict):
            raise DataError(f"{where}: field 'original': expected an object")
        instruction = _get_str(orig, "instruction", where, "original.instruction")
        inp = _get_str(orig, "input", where, "original.input", nullable=True) if "input" in orig else ""
        output = _get_str(orig, "output", where, "original.output")
        system = _get_str(orig, "system", where, "original.system", nullable=True) if "system" in orig else ""
        variants = row.get("variants")
        if not isinstance(variants, dict):
            raise DataError(f"{where}: field 'variants': expected an object")
        index = len(loaded.ids)
        loaded.ids.append(rid)
        statuses = {"original": "ok"}
        loaded.candidates.append(Candidate(index, rid, "original", instruction, inp, output, system))
        ins_text: tuple[str, str] | None = None
        for name in ("ins", "res", "res_ins"):
            v = variants.get(name)
            label = f"variants.{name}"
            if v is None:
                statuses[name] = "missing"
                continue
            if not isinstance(v, dict):
                raise DataError(f"{where}: field '{label}': expected an object")
            status = v.get("status")
            if status not in STATUSES:
                raise DataError(f"{where}: field '{label}.status': expected one of {', '.join(STATUSES)}, got {status!r}")
            statuses[name] = status
            if status != "ok":
                continue
            out = _get_str(v, "output", where, f"{label}.output")
            if name == "ins":
                ins_instruction = _get_str(v, "instruction", where, f"{label}.instruction")
                ins_input = _get_str(v, "input", where, f"{label}.input", nullable=True) if "input" in v else ""
                ins_text = (ins_instruction, ins_input)
                loaded.candidates.append(Candidate(index, rid, "ins", ins_instruction, ins_input, out, system))
            elif name == "res":
                loaded.candidates.append(Candidate(index, rid, "res", instruction, inp, out, system))
            else:
                if ins_text is None:  # res_ins answers the ins instruction; without it there is no pair
                    statuses[name] = "ins not ok"
                    continue
                loaded.candidates.append(Candidate(index, rid, "res_ins", ins_text[0], ins_text[1], out, system))
        loaded.statuses.append(statuses)
    if not loaded.ids:
        raise DataError(f"{path}: empty file (no records)")
    return loaded


def load_candidates(path: str, *, format: str | None = None, split: str | None = None) -> Loaded:
    """Reflected JSONL (all ok variants) or plain instruction data in any supported shape (originals)."""
    if _is_reflected(path):
        if format is not None:
            raise DataError(f"{path}: --format applies to plain instruction data, not to a reflect output file")
        return read_reflected(path)
    from reflect_tune.data import load_records

    records, report = load_records(path, format=format, split=split, on_duplicate="keep", on_empty="keep")
    loaded = Loaded(path=str(path), reflected=False, ids=[r.id for r in records], candidates=[], statuses=[])
    for i, r in enumerate(records):
        loaded.candidates.append(Candidate(i, r.id, "original", r.instruction, r.input, r.output, r.system))
        loaded.statuses.append({"original": "ok"})
    loaded.warnings = report.warnings()
    return loaded


# ----------------------------------------------------------------------------- the rules (pure)


def _nan(x: float | None) -> bool:
    return x is None or math.isnan(x)


def phase1(original_ifd: float | None, ins_ifd: float | None) -> str:
    """'ins' if the instruction reflection has the strictly higher IFD, else 'original'. NaN loses."""
    if _nan(ins_ifd):
        return "original"
    if _nan(original_ifd):
        return "ins"
    return "ins" if ins_ifd > original_ifd else "original"


def phase2(winner_rifd: float | None, response_rifd: float | None) -> str:
    """'res' if the response reflection has the strictly lower r-IFD, else 'kept'. NaN loses."""
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


def keep_count(records: int, survivors: int, top: float | None, top_k: int | None) -> int:
    """How many survivors to keep: floor(top x records) (at least 1), top_k, or all of them."""
    if top is not None:
        k = max(1, int(top * records + 1e-9))
    elif top_k is not None:
        k = top_k
    else:
        k = survivors
    return min(k, survivors)


# ----------------------------------------------------------------------------- the stage


@dataclass
class Outcome:
    """What happened to one record."""

    index: int
    kept: int | None = None  # position in the candidate list of the pair that reached the filter
    decision: str = ""  # "selected" or one of the dropped_* decisions
    phase1: str | None = None
    phase2: str | None = None


@dataclass
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


def _validate(config: SelectConfig, reflected: bool) -> str:
    if config.top is not None and config.top_k is not None:
        raise ReflectTuneError("--top and --top-k are mutually exclusive; give one")
    if config.top is not None and not 0 < config.top <= 1:
        raise ReflectTuneError(f"--top must be a fraction in (0, 1], got {config.top}")
    if config.top_k is not None and config.top_k < 1:
        raise ReflectTuneError(f"--top-k must be at least 1, got {config.top_k}")
    if config.missing_response not in ("drop", "keep"):
        raise ReflectTuneError(f"--missing-response must be drop or keep, got {config.missing_response!r}")
    method = config.method or ("srt" if reflected else "ifd")
    if method not in METHODS:
        raise ReflectTuneError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    if method == "srt" and not reflected:
        raise ReflectTuneError(
            f"{config.input}: --method srt needs reflect output (docs/FORMATS.md §8.1); "
            "on plain data use --method ifd, rifd or superfilter"
        )
    if method == "superfilter" and not config.proxy_model:
        raise ReflectTuneError("--method superfilter needs --proxy-model (a small model that scores IFD)")
    if method != "superfilter" and config.proxy_model:
        raise ReflectTuneError("--proxy-model applies only to --method superfilter")
    if method != "superfilter" and not config.model:
        raise ReflectTuneError("--model is required: the student that scores the data")
    return method


def run_select(config: SelectConfig) -> SelectResult:
    """Score what the method needs, apply the rule, write the three outputs (main process only)."""
    from reflect_tune.artifacts import provenance, write_meta

    from reflect_tune.artifacts import check_output_folder

    check_output(config.output, ".jsonl", [config.input])
    check_options(config.template, config.max_length, config.reverse, config.batch_tokens)
    if config.top is not None and config.top_k is not None:
        raise ReflectTuneError("--top and --top-k are mutually exclusive; give one")
    out, scores_path, report_dir = output_paths(config.output)
    check_output(scores_path, ".parquet", [config.input])  # select writes all three: none may be the input
    check_output_folder(report_dir, [config.input], flag="the report folder")
    loaded = load_candidates(config.input, format=config.format, split=config.split)
    method = _validate(config, loaded.reflected)
    for w in loaded.warnings:
        log.warning("warning: %s", w)
    template = config.template
    if method == "superfilter" and template == "auto":
        template = "none"  # Superfiltering scores the proxy with no template
    scorer = open_scorer(
        config.proxy_model if method == "superfilter" else config.model, template=template, dtype=config.dtype,
        device=config.device, max_length=config.max_length, batch_tokens=config.batch_tokens,
        reverse=config.reverse, trust_remote_code=config.trust_remote_code,
    )
    session = ScoreSession(scorer, shard_folder(out, scorer.signature), resume=config.resume, progress=config.progress)
    if method == "srt":
        cands = loaded.candidates
        rows, outcomes = _select_srt(session, cands, len(loaded.ids), config.missing_response == "keep")
        need = ("ifd", "rifd")
    else:
        cands = [c for c in loaded.candidates if c.variant == "original"]
        direction = "rifd" if method == "rifd" else "ifd"
        rows = session.score(cands, [(direction,)] * len(cands), label=f"scoring {direction}")
        outcomes = [Outcome(index=c.index, kept=i) for i, c in enumerate(cands)]
        need = (direction,)
    session.finish()

    # the filter, then the cut
    survivors = []
    for o in outcomes:
        if o.decision:
            continue
        row = rows[o.kept]
        o.decision = gate(row["ifd"], row["rifd"], need) or ""
        if not o.decision:
            survivors.append(o)
    by = "rifd" if method == "rifd" else "ifd"
    sign = 1 if method == "rifd" else -1  # rifd: lowest first; otherwise highest IFD first
    survivors.sort(key=lambda o: (sign * rows[o.kept][by], o.index))
    k = keep_count(len(loaded.ids), len(survivors), config.top, config.top_k)
    for rank, o in enumerate(survivors):
        o.decision = "selected" if rank < k else "dropped_below_cut"
    chosen = survivors[:k]
    cutting = config.top is not None or config.top_k is not None
    cut = rows[chosen[-1].kept][by] if chosen and cutting else None  # the last kept score

    selected = [_selected_row(cands[o.kept], rows[o.kept]) for o in chosen]
    if any(r.get("system") for r in selected):
        for r in selected:
            r["system"] = r.get("system") or ""
    else:
        for r in selected:
            r.pop("system", None)
    summary = _summary(config, method, scorer.template, loaded, rows, outcomes, selected, cut, by)
    result = SelectResult(selected, summary, rows, outcomes)
    if not scorer.is_main:
        return result

    inputs = [config.input] if Path(config.input).exists() else []
    meta = provenance("select", config, inputs=inputs)
    meta["scoring"] = scoring_meta(scorer, session.stats)
    meta["summary"] = summary
    write_scores(rows, scores_path)
    write_meta(scores_path, meta)
    _write_jsonl(selected, out)
    write_meta(out, meta)
    _write_report(report_dir, summary, rows, outcomes, method, cut, meta)
    if session.store is not None:
        session.store.remove()
    return result


def _select_srt(session: ScoreSession, cands: list[Candidate], records: int, keep_missing: bool = False):
    """Both phases. Returns a scores row per candidate (unscored passes null) and an outcome per record.
    `keep_missing`: a winner whose response variant is not ok goes on with its own answer (phase 2
    `no_variant`, like the reference's fallback to the original text) instead of being dropped."""
    at: dict[tuple[int, str], int] = {(c.index, c.variant): i for i, c in enumerate(cands)}
    rows: list[dict[str, Any] | None] = [None] * len(cands)

    first = [i for i, c in enumerate(cands) if c.variant in ("original", "ins")]
    for i, row in zip(first, session.score([cands[i] for i in first], [("ifd",)] * len(first), label="phase 1: IFD")):
        rows[i] = row
    outcomes: list[Outcome] = []
    second: list[int] = []
    solo: list[int] = []  # winners with no response variant, kept as they are (keep_missing)
    for index in range(records):
        o = Outcome(index=index)
        orig = at[(index, "original")]
        ins = at.get((index, "ins"))
        o.phase1 = phase1(rows[orig]["ifd"], rows[ins]["ifd"] if ins is not None else None)
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
    scored = session.score([cands[i] for i in second + solo], wants + [("ifd", "rifd")] * len(solo), label="phase 2: r-IFD")
    for i, row in zip(second + solo, scored):
        rows[i] = row
    third: list[int] = []
    for o in outcomes:
        if o.decision or o.phase2 == "no_variant":
            continue
        winner = at[(o.index, o.phase1)]
        response = at[(o.index, RESPONSE_OF[o.phase1])]
        o.phase2 = phase2(rows[winner]["rifd"], rows[response]["rifd"])
        o.kept = winner if o.phase2 == "kept" else response
        if o.phase2 == "res":
            third.append(response)
    scored = session.score([cands[i] for i in third], [("ifd", "rifd")] * len(third), label="IFD of kept responses")
    for i, row in zip(third, scored):
        rows[i] = row
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:  # candidates the rule never needed: a row with every pass null
        for i, row in zip(missing, session.score([cands[i] for i in missing], [()] * len(missing), label="rows")):
            rows[i] = row
    return rows, outcomes


def _selected_row(cand: Candidate, row: dict[str, Any]) -> dict[str, Any]:
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
    pool = [rows[o.kept] for o in outcomes if o.kept is not None and o.decision != "dropped_variant_not_ok"]
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
    pool = [rows[o.kept] for o in outcomes if o.kept is not None and o.decision != "dropped_variant_not_ok"]
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
