"""Sweeps: one pipeline file, many train arms, one comparison (issue 16).

A pipeline file's `sweep:` block lists values for any `train` setting and for two choices that
are not settings: `teacher` (`base`: train's own `teacher`; `finetuned`: the `teacher_sft`
stage's merged model) and `student` (`base`: train's own `model`; `finetuned`: the student first
fine-tuned on the same data with train's settings and no distillation, the `student_sft` stage):

    sweep:
      mode: grid            # every combination (default); zip: the i-th values together
      kd_ratio: [0.0, 0.5, 0.9]
      lr: [1.0e-5, 3.0e-4, 1.0e-3]
      teacher: [base, finetuned]

Each arm is a train stage whose folder is keyed by its own settings (pipeline.plan), so a rerun
skips finished arms, an interrupted arm resumes from its checkpoint, and a new value runs only
the arms it adds. Every arm is followed by the eval (and judge) stage when the file has one, and
the run ends with `compare/` (compare.py). This module only reads and expands the block.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

from reflect_tune.config import SettingError, TrainConfig, canonical, check_value, field_types
from reflect_tune.errors import ReflectTuneError, clip

MODES = ("grid", "zip")
CHOICES = {"teacher": ("base", "finetuned"), "student": ("base", "finetuned")}
# train settings a sweep cannot vary: the pipeline sets them, or they change nothing in the result
NOT_SWEPT = ("data", "output", "progress", "resume", "overwrite", "format", "split", "turns", "report_to", "run_name",
             "save_every", "keep_checkpoints")


def check_sweep(section: Any, where: Callable[[str | None], str]) -> dict[str, Any]:
    """The `sweep:` block as {"mode", "axes": {setting: [typed values]}}; each problem one line naming
    the file and line (`where(key)` gives "FILE:LINE" of `sweep.KEY`, `where(None)` of the block)."""
    if not isinstance(section, dict) or not section:
        raise ReflectTuneError(f"{where(None)}: sweep: expected a mapping of train settings to lists of values")
    mode = section.get("mode", "grid")
    if mode not in MODES:
        raise ReflectTuneError(f"{where('mode')}: sweep: setting 'mode': {clip(mode)} is not one of grid, zip")
    known = field_types(TrainConfig)
    axes: dict[str, list[Any]] = {}
    for key, values in section.items():
        if key == "mode":
            continue
        name = canonical(TrainConfig, str(key).replace("-", "_"))
        if name not in CHOICES and (name not in known or name in NOT_SWEPT):
            raise ReflectTuneError(f"{where(key)}: sweep: setting '{key}': train has no such setting to sweep "
                                   "(sweep any train setting, or teacher: [base, finetuned], student: [base, finetuned])")
        if name in axes:
            raise ReflectTuneError(f"{where(key)}: sweep: setting '{key}': given twice")
        if not isinstance(values, list) or not values:
            raise ReflectTuneError(f"{where(key)}: sweep: setting '{key}': expected a non-empty list of values, "
                                   f"got {clip(values)}")
        typed = []
        for value in values:
            if name in CHOICES:
                if value not in CHOICES[name]:
                    raise ReflectTuneError(f"{where(key)}: sweep: setting '{key}': {clip(value)} is not one of "
                                           f"{', '.join(CHOICES[name])}")
                typed.append(value)
                continue
            try:
                typed.append(check_value(TrainConfig, name, value))
            except SettingError as e:
                raise ReflectTuneError(f"{where(key)}: sweep: {e}") from None
        if mode == "grid" and len(set(map(repr, typed))) != len(typed):
            raise ReflectTuneError(f"{where(key)}: sweep: setting '{key}': a value is listed twice")
        axes[name] = typed
    if not axes:
        raise ReflectTuneError(f"{where(None)}: sweep: no setting to sweep")
    if mode == "zip" and len({len(v) for v in axes.values()}) > 1:
        raise ReflectTuneError(f"{where('mode')}: sweep: mode zip needs lists of one length, got "
                               + ", ".join(f"{k}: {len(v)}" for k, v in axes.items()))
    if mode == "zip":  # a value may repeat down one list (lr: [1e-4, 1e-4, 3e-4]); an arm may not
        seen: set[str] = set()
        for i, combo in enumerate(zip(*axes.values())):
            if repr(combo) in seen:
                raise ReflectTuneError(f"{where('mode')}: sweep: arm {i + 1} ("
                                       + ", ".join(f"{k}={v}" for k, v in zip(axes, combo)) + ") is listed twice")
            seen.add(repr(combo))
    return {"mode": mode, "axes": axes}


def expand(sweep: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The arms, in order: every combination (grid, the last setting varying fastest) or the i-th values (zip).
    No sweep: one arm with no settings."""
    if not sweep:
        return [{}]
    names, lists = list(sweep["axes"]), list(sweep["axes"].values())
    combos = itertools.product(*lists) if sweep["mode"] == "grid" else zip(*lists)
    return [dict(zip(names, combo)) for combo in combos]


def arm_name(arm: dict[str, Any]) -> str:
    """`kd_ratio=0.5 lr=0.0003 teacher=finetuned`, or `train` for the one arm of a file without a sweep."""
    return " ".join(f"{k}={_short(v)}" for k, v in arm.items()) or "train"


def _short(v: Any) -> str:
    if isinstance(v, float) and v != 0 and not math.isnan(v) and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.0e}"
    return str(v)
