"""What the `train` stage writes about its run besides the model: train_log.csv, loss.png, the
held-out records and the summary of their losses (which train.py measures with its own batches
and loss: `measure`, `train_ce`).

train_log.csv (docs/FORMATS.md §8.4) holds two kinds of rows, told apart by `kind`:
    train  one per optimizer step: loss, ce_loss, kd_loss, lr, grad_norm, tokens_per_s, wall_s
    eval   one per held-out evaluation (step 0 = the starting model, every eval_every steps, the end):
           eval_ce, eval_kd (empty without a teacher)
`step`, `epoch` and `tokens` are filled on both. A log written before `kind` existed reads as train rows.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional


from reflect_tune.artifacts import append_durably, atomic_path
from reflect_tune.errors import DataError, clip
from reflect_tune.records import load_records, split_holdout

log = logging.getLogger(__name__)

LOG_FIELDS = ["step", "epoch", "tokens", "loss", "ce_loss", "kd_loss", "lr", "grad_norm", "tokens_per_s", "wall_s",
              "kind", "eval_ce", "eval_kd"]


def append_log(path: Path, rows: list[dict], keep_until: Optional[int] = None) -> None:
    """Append rows to train_log.csv; `keep_until` first drops rows after that step (a resume; -1 drops all).

    The rewrite is atomic and an append that fails (disk full) is cut back, so the log never holds
    a torn line; rows that cannot be read (a file from a crash) are dropped on the rewrite.
    """
    if keep_until is not None or not path.is_file():
        old = []
        if path.is_file():
            with open(path, newline="") as fh:
                for r in csv.DictReader(fh):
                    try:
                        if int(r["step"]) <= (keep_until or 0):
                            old.append({**{k: v for k, v in r.items() if k in LOG_FIELDS}, "kind": r.get("kind") or "train"})
                    except (KeyError, TypeError, ValueError):
                        continue
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(old + rows)
        return
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=LOG_FIELDS).writerows(rows)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        append_durably(fd, buf.getvalue().encode("utf-8"))
    finally:
        os.close(fd)


def read_log(path: Path, kind: str) -> list[dict]:
    """The rows of one kind ("train" or "eval"); [] without a log."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if (r.get("kind") or "train") == kind]


def held_out(cfg) -> bool:
    return bool(cfg.eval_data) or cfg.eval_split > 0


def heldout_records(cfg, records: list) -> tuple[list, list]:
    """(training records, held-out records): `eval_data` read like the training data, or the
    `eval_split` fraction of the training data set aside by `split_holdout` (seeded, stable per id)."""
    if cfg.eval_split > 0:
        train, held = split_holdout(records, cfg.eval_split, cfg.seed)
        if not train or not held:
            raise DataError(f"{cfg.data}: eval_split {cfg.eval_split} of {len(records)} records leaves "
                            f"{len(train)} to train on and {len(held)} held out; both need at least one")
        return train, held
    if not cfg.eval_data:
        return records, []
    held, report = load_records(cfg.eval_data, format=cfg.format, on_duplicate="keep", on_empty="drop", turns=cfg.turns)
    for line in report.warnings():
        log.warning("warning: eval_data: %s", line)
    shared = {r.id for r in records} & {r.id for r in held}
    if shared:
        log.warning("warning: %s: %d held-out record id(s) are also in the training data (e.g. %s); the held-out "
                    "loss then measures some training examples", cfg.eval_data, len(shared), clip(min(shared)))
    return records, held


def heldout_start(path: Path) -> Optional[dict]:
    """The starting model's held-out losses as the log's step-0 eval row has them (for a resume)."""
    row = next((r for r in read_log(path, "eval") if r["step"] == "0"), None)
    return row and {"ce": float(row["eval_ce"]), "kd": float(row["eval_kd"]) if row["eval_kd"] else None}


def train_row(step: int, epoch: float, tokens: int, loss: float, ce: float, kd: Optional[float], lr: float,
              grad_norm: Optional[float], tps: float, wall: float) -> dict:
    return {"step": step, "epoch": epoch, "tokens": tokens, "kind": "train", "loss": f"{loss:.6f}", "ce_loss": f"{ce:.6f}",
            "kd_loss": "" if kd is None else f"{kd:.6f}", "lr": f"{lr:.6g}",
            "grad_norm": f"{float(grad_norm) if grad_norm is not None else math.nan:.6f}",
            "tokens_per_s": f"{tps:.1f}", "wall_s": f"{wall:.3f}"}


def eval_row(step: int, epoch: float, tokens: int, result: dict) -> dict:
    kd = result.get("kd")
    return {"step": step, "epoch": epoch, "tokens": tokens, "kind": "eval", "eval_ce": f"{result['ce']:.6f}",
            "eval_kd": "" if kd is None else f"{kd:.6f}"}


def tracker_metrics(row: dict) -> dict[str, float]:
    """A log row as tracker scalars: train/loss, train/ce, train/kd, train/lr, ... or eval/ce, eval/kd."""
    names = {"loss": "train/loss", "ce_loss": "train/ce", "kd_loss": "train/kd", "lr": "train/lr",
             "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s", "eval_ce": "eval/ce", "eval_kd": "eval/kd"}
    out = {}
    for key, name in names.items():
        try:
            out[name] = float(row[key])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def plot_losses(log_path: Path, png: Path) -> None:
    """loss.png: the training loss (and its CE) with the held-out CE; with a teacher a second panel
    holds the KD term, training and held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, held = read_log(log_path, "train"), read_log(log_path, "eval")
    has_kd = any(r.get("kd_loss") for r in train) or any(r.get("eval_kd") for r in held)
    fig, axes = plt.subplots(1, 2 if has_kd else 1, figsize=(12 if has_kd else 7, 4), squeeze=False)

    def curve(ax, rows, key, label, **style):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)

    ce_ax = axes[0][0]
    if has_kd:
        curve(ce_ax, train, "loss", "train loss (mixed)", alpha=0.5)
    curve(ce_ax, train, "ce_loss" if has_kd else "loss", "train CE")
    curve(ce_ax, held, "eval_ce", "held-out CE", marker="o")
    ce_ax.set(xlabel="optimizer step", ylabel="CE per response token", title="cross-entropy")
    if has_kd:
        kd_ax = axes[0][1]
        curve(kd_ax, train, "kd_loss", "train KD (T²·D)")
        curve(kd_ax, held, "eval_kd", "held-out KD (T²·D)", marker="o")
        kd_ax.set(xlabel="optimizer step", ylabel="KD term per response token", title="distillation term")
    for ax in axes[0]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("reflect-tune train")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def heldout_summary(held: list, before: Optional[dict], after: Optional[dict], cfg) -> dict:
    """meta.json's `result.heldout`: the held-out losses of the starting and the trained model."""
    pick = lambda r, k: None if r is None or r.get(k) is None else round(r[k], 6)
    return {"source": cfg.eval_data or "eval_split", "examples": len(held), "tokens": after["tokens"] if after else None,
            "ce_before": pick(before, "ce"), "ce_after": pick(after, "ce"), "kd_before": pick(before, "kd"),
            "kd_after": pick(after, "kd"), "kd_loss": cfg.kd_loss if cfg.teacher or cfg.teacher_logits else None}


def reset_peak_memory() -> None:
    """Start the peaks `peak_memory` reads from now: a pipeline runs several train stages in one process."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the resident high-water mark
    except OSError:
        pass


def peak_memory() -> dict[str, Any]:
    """Peak resident memory since `reset_peak_memory` (MiB; Linux VmHWM, else ru_maxrss: the process's
    whole life) and, on CUDA, peak allocated GPU memory (MiB): `peak_rss_mib`, `peak_gpu_mib` (null without)."""
    rss = None
    try:
        line = next(t for t in Path("/proc/self/status").read_text().splitlines() if t.startswith("VmHWM:"))
        rss = int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": round(rss, 1), "peak_gpu_mib": round(gpu, 1) if gpu is not None else None}
