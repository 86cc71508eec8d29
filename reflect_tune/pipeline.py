"""`reflect-tune run pipeline.yaml`: every stage from one config, each in a folder keyed by its inputs.

The loop is plain: for each stage in order (student, reflect, select, train), compute the stage's
key (a hash of its config and of what it reads), skip it when its folder is finished, else run it.
A stage folder is finished when its `meta.json` exists, which every stage writes last, so an
interrupted stage is simply run again into the same folder and resumes from what it left there:
reflect from its request cache, select from its score shards, train from its latest checkpoint.

Layout (docs/FORMATS.md §8.5):

    RUNS/NAME/pipeline.yaml  run.json  summary.md
    RUNS/NAME/student-KEY/   reflect-KEY/   select-KEY/   train-KEY/

String values may name environment variables, `${NAME}` or `${NAME:-default}` (as in a compose
file), so one file serves machines whose paths or servers differ; a value that is only `${NAME}`
takes the type of the setting it fills (`128` a number for `max_tokens`, text for `name`), and an
empty variable leaves the setting unset. Relative paths inside the YAML (`data`, and any model, prompts or cache path that exists there)
are read relative to the YAML file's folder; `runs_dir` is relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from reflect_tune.artifacts import atomic_write_text, exclusive, fingerprint, provenance, redact, write_meta
from reflect_tune import reflect, selection, student, train
from reflect_tune.layout import is_prompt_set
from reflect_tune.config import (
    EvalConfig,
    JudgeConfig,
    ReflectConfig,
    SelectConfig,
    SettingError,
    StudentConfig,
    TeacherLogitsConfig,
    TrainConfig,
    canonical,
    check_values,
    field_types,
    load_yaml,
    parse_text,
    read_config_text,
)
from reflect_tune.errors import SECRET_NAME, ReflectTuneError, clip, one_line, register_secret
from reflect_tune.records import FORMATS, TURN_POLICIES, check_source, is_reflected
from reflect_tune.summary import read_json, write_summary
from reflect_tune.sweep import expand

log = logging.getLogger(__name__)

STAGES = ("student", "reflect", "select", "teacher_sft", "teacher_logits", "train", "eval", "judge")
# the order of the kinds of stage, for --from/--until (student_sft: the student fine-tuned for a sweep arm)
RANK = {name: i for i, name in enumerate(("student", "reflect", "select", "teacher_sft", "student_sft", "teacher_logits", "train",
                                                        "eval", "judge"))}
TOP_KEYS = ("name", "runs_dir", "data", "format", "split", "turns", "sweep", *STAGES)
# settings the pipeline sets itself: never in the YAML, never in a key
OWNED = {"student": ("output", "overwrite"),
         "reflect": ("input", "output", "progress", "format", "split", "turns"),
         "select": ("input", "output", "progress", "resume", "format", "split", "turns"),
         "train": ("data", "output", "progress", "resume", "overwrite", "format", "split", "turns"),
         # teacher_sft: `model` defaults to train's teacher, `data` to what select kept (any file may be given)
         "teacher_sft": ("output", "progress", "resume", "overwrite", "format", "split", "turns"),
         # teacher_logits: the teacher, student and data settings are each arm's train settings
         "teacher_logits": ("data", "output", "teacher", "model", "template", "max_length", "format", "split", "turns",
                            "eval_data", "eval_split", "seed", "progress", "overwrite"),
         "eval": ("model", "output", "progress", "overwrite"),
         "judge": ("model", "baseline", "output", "progress", "overwrite", "format", "split", "turns")}
# pipeline-only settings of a stage section (not a setting of the stage's command)
EXTRA = {"select": ("holdout", "holdout_seed")}
# select's `holdout`: the records set aside before the first stage reads the data (so none is
# reflected, scored, selected or trained on), in RUNS/NAME/holdout-KEY/ (heldout.jsonl, candidates.jsonl)
# settings that change nothing in a stage's result: left out of its key
# (reflect's base_url is left out like in the request cache's key: the model name identifies the teacher,
# so a server that moved to another port or host keeps its finished work)
UNKEYED = {"reflect": ("base_url", "concurrency", "rpm", "tpm", "timeout", "max_retries", "backoff", "poll_interval",
                       "no_wait", "retry_failed", "cache_dir", "api_key_env", "dry_run", "price_in", "price_out", "tokenizer",
                       "batch_size"),
           "select": ("batch_tokens", "device"),
           "train": ("save_every", "keep_checkpoints", "train_ce_samples", "eval_every", "report_to", "run_name"),
           "teacher_sft": ("save_every", "keep_checkpoints", "train_ce_samples", "eval_every", "report_to", "run_name"),
           "teacher_logits": ("device", "batch_tokens", "concurrency", "timeout", "max_retries", "api_key_env"),
           "eval": ("batch_size", "device", "report_to", "run_name"),
           "judge": ("base_url", "concurrency", "rpm", "tpm", "timeout", "max_retries", "backoff", "poll_interval",
                     "no_wait", "cache_dir", "api_key_env", "dry_run", "price_in", "price_out", "batch_size", "device")}
PATH_KEYS = {"student": ("teacher",), "reflect": ("prompts", "cache_dir", "tokenizer"),
             "select": ("model", "proxy_model", "scores"), "train": ("model", "teacher", "teacher_logits", "eval_data"),
             "teacher_logits": (),
             "teacher_sft": ("model", "teacher", "eval_data", "data"),
             "eval": ("include_path", "tasks"), "judge": ("data", "prompt", "cache_dir")}
TRAINS = ("teacher_sft", "student_sft", "train")  # stages that run train.run
CLASSES = {"student": StudentConfig, "reflect": ReflectConfig, "select": SelectConfig, "teacher_sft": TrainConfig,
           "teacher_logits": TeacherLogitsConfig,
           "train": TrainConfig, "eval": EvalConfig, "judge": JudgeConfig}
NOT_REQUIRED = {"eval": ("tasks",), "judge": ("data",)}  # eval: held-out loss alone; judge: the held-out prompts


@dataclass(kw_only=True)
class Pipeline:
    """A parsed pipeline.yaml. Stage sections hold the stage's own settings (CLI names with `_`)."""

    path: str
    name: str
    data: str
    runs_dir: str = "runs"
    format: str | None = None
    split: str | None = None
    turns: str = "first"  # multi-turn conversations in `data`: first | last | each
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # present stages only
    sweep: dict[str, Any] | None = None  # sweep.check_sweep's {"mode", "axes"}
    lines: dict[str, int] = field(default_factory=dict)  # "section.key" -> line in the file

    @property
    def folder(self) -> Path:
        return Path(self.runs_dir) / self.name

    def where(self, section: str, key: str | None = None) -> str:
        line = self.lines.get(f"{section}.{key}" if key else section)
        return f"{self.path}:{line}" if line else self.path


# ----------------------------------------------------------------------------- reading the YAML


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str, key: str) -> Any:
    """`${NAME}` / `${NAME:-default}` in a string, from the environment; an unset NAME without a default is an error."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        got = os.environ.get(m.group(1))
        if got is None or (got == "" and m.group(2) is not None):
            if m.group(2) is None:
                raise ReflectTuneError(f"{where}: key '{key}': the environment variable {m.group(1)} is not set "
                                       f"(write ${{{m.group(1)}:-DEFAULT}} for a default)")
            return m.group(2)
        if SECRET_NAME.search(m.group(1)):  # its value never appears in a message or a written file
            register_secret(got)
        return got

    out = _ENV.sub(sub, value)
    return _EnvValue(out) if _ENV.fullmatch(value) else out


class _EnvValue(str):
    """A value that was only `${NAME}`: typed by the setting it fills (`_typed`), not by YAML rules."""


def load_pipeline(path: str | Path, runs_dir: str | None = None) -> Pipeline:
    """Read and check a pipeline file; every problem is one line naming the file, line and key."""
    path = Path(path)
    raw, lines = load_yaml(path)
    if not isinstance(raw, dict):
        raise ReflectTuneError(f"{path}: expected a mapping with `name`, `data` and stage sections ({', '.join(STAGES)})")
    where = lambda key: f"{path}:{lines[key]}" if key in lines else str(path)  # noqa: E731
    for key, value in raw.items():
        if isinstance(value, dict):
            raw[key] = {k: _expand(v, where(f"{key}.{k}"), f"{key}.{k}") for k, v in value.items()}
        else:
            raw[key] = _expand(value, where(str(key)), str(key))
    for key in raw:
        if key not in TOP_KEYS:
            raise ReflectTuneError(f"{where(str(key))}: key '{key}': unknown (known: {', '.join(TOP_KEYS)})")
    raw = {k: (str(v) if isinstance(v, _EnvValue) and v != "" else None if isinstance(v, _EnvValue) else v) for k, v in raw.items()}
    for key in ("name", "data"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ReflectTuneError(f"{where(key)}: key '{key}': required, a non-empty string")
    for key in ("runs_dir", "format", "split", "turns"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise ReflectTuneError(f"{where(key)}: key '{key}': expected a non-empty string, got {clip(raw[key])}")
    if raw.get("format") is not None and raw["format"] not in FORMATS:
        raise ReflectTuneError(f"{where('format')}: key 'format': {clip(raw['format'])} is not one of {', '.join(FORMATS)}")
    if raw.get("turns") is not None and raw["turns"] not in TURN_POLICIES:
        raise ReflectTuneError(f"{where('turns')}: key 'turns': {clip(raw['turns'])} is not one of {', '.join(TURN_POLICIES)}")
    name = raw["name"].strip()
    if "/" in name or name in (".", ".."):
        raise ReflectTuneError(f"{where('name')}: key 'name': a folder name, without '/'")
    base = path.resolve().parent
    data = raw["data"]  # next to the YAML file if it is there; else as given (e.g. a hub dataset name)
    data = data if Path(data).is_absolute() or not (base / data).exists() else str(base / data)
    pipe = Pipeline(path=str(path), name=name, data=str(data), lines=lines,
                    runs_dir=runs_dir or str(raw.get("runs_dir") or "runs"), format=raw.get("format"), split=raw.get("split"),
                    turns=raw.get("turns") or "first")
    for stage in STAGES:
        if stage not in raw:
            continue
        section = raw[stage] if raw[stage] is not None else {}
        if not isinstance(section, dict):
            raise ReflectTuneError(f"{where(stage)}: key '{stage}': expected a mapping of settings")
        pipe.sections[stage] = _check_section(pipe, stage, {str(k).replace("-", "_"): v for k, v in section.items()}, base)
    if not pipe.sections:
        raise ReflectTuneError(f"{path}: no stage sections; add some of {', '.join(STAGES)}")
    if "reflect" in pipe.sections and "train" in pipe.sections and "select" not in pipe.sections:
        raise ReflectTuneError(f"{where('train')}: train reads pairs; after reflect it needs a select section to choose them")
    if "sweep" in raw:
        _check_sweep(pipe, raw["sweep"])
    if "teacher_sft" in pipe.sections:
        t = pipe.sections["teacher_sft"]
        if "train" not in pipe.sections:
            raise ReflectTuneError(f"{where('teacher_sft')}: teacher_sft: fine-tunes the KD teacher of a train section; add one")
        if not t.get("model") and not pipe.sections["train"].get("teacher"):
            raise ReflectTuneError(f"{where('teacher_sft')}: teacher_sft: setting 'model': required when train has no teacher")
        if "reflect" in pipe.sections and "select" not in pipe.sections and not t.get("data"):
            raise ReflectTuneError(f"{where('teacher_sft')}: teacher_sft: after reflect it needs a select section (or 'data')")
    if "teacher_logits" in pipe.sections:
        t, tr = pipe.sections["teacher_logits"], pipe.sections.get("train") or {}
        if "train" not in pipe.sections or not (tr.get("teacher") or "teacher" in ((pipe.sweep or {}).get("axes") or {})):
            raise ReflectTuneError(f"{where('teacher_logits')}: teacher_logits: caches the KD teacher of a train section; "
                                   "give train a teacher")
        if tr.get("teacher_logits"):
            raise ReflectTuneError(f"{where('train.teacher_logits')}: train: setting 'teacher_logits': a cache folder or a "
                                   "teacher_logits section, not both")
        if t.get("teacher_url"):
            raise ReflectTuneError(f"{where('teacher_logits.teacher_url')}: teacher_logits: setting 'teacher_url': not in a "
                                   "pipeline (its teachers are local models); build the cache with `reflect-tune teacher-logits "
                                   "--teacher-url` and give it to train as `teacher_logits: FOLDER`")
    return pipe


def _check_sweep(pipe: Pipeline, block: Any) -> None:
    """The sweep block (sweep.check_sweep) and what its choices need: a train section, teacher_sft for
    `teacher: finetuned`, train's teacher for `teacher: base`."""
    from reflect_tune.sweep import check_sweep

    pipe.sweep = check_sweep(block, lambda key: pipe.where("sweep", key))
    axes = pipe.sweep["axes"]
    if "train" not in pipe.sections:
        raise ReflectTuneError(f"{pipe.where('sweep')}: sweep: varies the train stage; add a train section")
    if "finetuned" in axes.get("teacher", ()) and "teacher_sft" not in pipe.sections:
        raise ReflectTuneError(f"{pipe.where('sweep', 'teacher')}: sweep: teacher: finetuned needs a teacher_sft section "
                               "(how to fine-tune the teacher; `teacher_sft: {}` takes the defaults)")
    if "base" in axes.get("teacher", ()) and not pipe.sections["train"].get("teacher"):
        raise ReflectTuneError(f"{pipe.where('sweep', 'teacher')}: sweep: teacher: base needs train's 'teacher'")


def _check_section(pipe: Pipeline, stage: str, values: dict[str, Any], base: Path) -> dict[str, Any]:
    """A stage section's settings, typed and checked against the stage's config (config.check_values)."""
    cls = CLASSES[stage]
    extra = {k: values.pop(k) for k in EXTRA.get(stage, ()) if k in values}
    if "holdout" in extra and (isinstance(extra["holdout"], bool) or not isinstance(extra["holdout"], (int, float))
                               or not 0 < extra["holdout"] < 1):
        raise ReflectTuneError(f"{pipe.where(stage, 'holdout')}: {stage}: setting 'holdout': a fraction between 0 and 1 "
                               f"of the records held out for evaluation, got {clip(extra['holdout'])}")
    if "holdout_seed" in extra and (isinstance(extra["holdout_seed"], bool) or not isinstance(extra["holdout_seed"], int)):
        raise ReflectTuneError(f"{pipe.where(stage, 'holdout_seed')}: {stage}: setting 'holdout_seed': an integer, "
                               f"got {clip(extra['holdout_seed'])}")
    if "holdout_seed" in extra and "holdout" not in extra:
        raise ReflectTuneError(f"{pipe.where(stage, 'holdout_seed')}: {stage}: setting 'holdout_seed': needs 'holdout'")
    written = {canonical(cls, k): k for k in values}  # to point at the line of a key given by its alias
    typed = {}
    for key, value in values.items():
        name = canonical(cls, key)
        if isinstance(value, _EnvValue) and name in field_types(cls):  # `${VAR}` alone: typed by its setting
            value = parse_text(cls, name, str(value))
        typed[key] = value
    try:
        values = check_values(cls, typed, owned=OWNED[stage])
    except SettingError as e:
        raise ReflectTuneError(f"{pipe.where(stage, written.get(e.setting, e.setting))}: {stage}: {e}") from None
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in OWNED[stage] and f.name not in values
                and f.name not in NOT_REQUIRED.get(stage, ())]
    if required:
        raise ReflectTuneError(f"{pipe.where(stage)}: {stage}: setting '{required[0]}': required")
    if stage == "reflect" and values.get("dry_run"):
        raise ReflectTuneError(f"{pipe.where(stage, 'dry_run')}: reflect: setting 'dry_run': not in a pipeline (it writes "
                               "no reflections); estimate with `reflect-tune reflect DATA -o X --model M --dry-run`")
    for key in PATH_KEYS[stage]:  # a relative path that exists next to the YAML file means that file
        value = values.get(key)
        if isinstance(value, tuple):  # eval's tasks: names, or task YAML paths next to the file
            values[key] = tuple(str(base / v) if not Path(v).is_absolute() and (base / v).exists() else v for v in value)
        elif stage == "reflect" and key == "prompts" and is_prompt_set(value):
            continue  # a prompt set's name (`conservative`), not a folder; `./conservative` is the folder
        elif isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            values[key] = str(base / value)
    return {**values, **extra}


@contextmanager
def _located(pipe: Pipeline, stage: str):
    """A stage's own check failing on a setting of the file: its message, with the setting's FILE:LINE."""
    try:
        yield
    except SettingError as e:
        raise ReflectTuneError(f"{pipe.where(stage, e.setting)}: {stage}: {e}") from None


# ----------------------------------------------------------------------------- stage configs and keys


@dataclass(kw_only=True)
class Stage:
    name: str
    key: str
    folder: Path
    config: Any  # the stage's config (eval: the trained student's; `extra["before"]`: its starting point's)
    upstream: dict[str, str]  # names and keys (or fingerprints) of what it reads
    extra: dict[str, Any] = field(default_factory=dict)  # select: the hold-out; eval: the starting point's config

    @property
    def done(self) -> bool:
        return (self.folder / "meta.json").is_file()


def stage_key(stage: str, config: dict[str, Any], upstream: dict[str, Any]) -> str:
    """First 12 hex of sha256 over the canonical JSON of {stage, redacted config, upstream}."""
    blob = json.dumps({"stage": stage, "config": redact(config), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _content_id(path: str) -> dict[str, Any]:
    """A file's or folder's fingerprint without its path, so a moved checkout keeps its keys."""
    return {k: v for k, v in fingerprint(path).items() if k != "path"} if Path(path).exists() else {"name": path}


def _model_id(spec: str) -> Any:
    """What identifies a model for a key: a folder's file listing, a file's hash, or the name."""
    return _content_id(spec) if Path(spec).exists() else spec


def plan(pipe: Pipeline) -> list[Stage]:
    """Each present stage with its key, folder and config; cheap (hashes the data file once).

    A stage's key is computed from its settings and what it reads; its config is then built once,
    with the folder the key names as its output, and never edited afterwards."""
    stages: list[Stage] = []
    data_id = _data_id(pipe)
    hold = holdout_plan(pipe, data_id)
    if hold:  # the stages read the records that are not held out; the split's key hashes the data
        data_id = {"holdout": hold["key"]}
    source = hold["candidates"] if hold else pipe.data
    feed = ("data", data_id)  # what the next pair-reading stage reads: (label, identity)
    student_dir = None
    by_name: dict[str, Stage] = {}

    def folder(name: str, keyed: dict[str, Any], upstream: dict[str, Any]) -> tuple[str, Path]:
        key = stage_key(name, keyed, upstream)
        return key, pipe.folder / f"{name}-{key}"

    def add(name: str, key: str, where: Path, config: Any, upstream: dict[str, Any], **extra: Any) -> Stage:
        st = Stage(name=name, key=key, folder=where, config=config, upstream=upstream, extra=extra)
        stages.append(st)
        by_name[name] = st
        return st

    def from_data() -> dict[str, Any]:  # the top-level format and split, for the stage that reads `data`
        return {"format": pipe.format, "split": pipe.split, "turns": pipe.turns} if feed[0] == "data" and not hold else {}

    if "student" in pipe.sections:
        s = pipe.sections["student"]
        up = {"from": _model_id(s["teacher"])}
        key, where = folder("student", s, up)
        add("student", key, where, StudentConfig(**s, output=str(where)), up)
        student_dir = str(where)
    if "reflect" in pipe.sections:
        s = pipe.sections["reflect"]
        keyed = {k: v for k, v in s.items() if k not in UNKEYED["reflect"]}
        # the prompt texts themselves (built-in or a --prompts folder): an edited prompt is a new reflection
        texts = json.dumps(reflect.load_prompts(s.get("prompts")).texts, sort_keys=True)
        up = {"data": data_id, "prompts": hashlib.sha256(texts.encode()).hexdigest()}
        key, where = folder("reflect", keyed, up)
        # one request cache for the run: a changed setting (limit, stages) re-sends only new requests
        cache = s.get("cache_dir") or str(pipe.folder / "reflect-cache")
        cfg = ReflectConfig(**{**s, "cache_dir": cache}, input=source, output=str(where / "reflected.jsonl"), **from_data())
        add("reflect", key, where, cfg, up)
        feed = ("reflect", key)
    model_note = {"model": by_name["student"].key} if student_dir else {}
    if "select" in pipe.sections:
        s = dict(pipe.sections["select"])
        if not s.get("model") and student_dir and s.get("method") != "superfilter":
            s["model"] = student_dir  # the paper: the student itself scores the candidates
        if not s.get("model") and s.get("method") != "superfilter":
            raise ReflectTuneError(f"{pipe.where('select')}: select: setting 'model': required without a student section")
        keyed = {k: v for k, v in s.items() if k not in UNKEYED["select"]}
        up = {feed[0]: feed[1]}
        if student_dir and s.get("model") == student_dir:
            keyed["model"] = "student"
            up.update(model_note)
        for name in ("model", "proxy_model", "scores"):
            if s.get(name) and keyed.get(name) != "student":
                up[name] = _model_id(s[name])
        key, where = folder("select", keyed, up)
        for extra in EXTRA["select"]:
            s.pop(extra, None)
        cfg = SelectConfig(**s, input=_feed_path(by_name, feed, source), output=str(where / "selected.jsonl"), **from_data())
        add("select", key, where, cfg, up, **({"holdout": hold} if hold else {}))
        feed = ("select", key)
    trains: list[Stage] = []
    if "train" in pipe.sections:
        s = dict(pipe.sections["train"])
        if not s.get("model") and student_dir:
            s["model"] = student_dir
        if not s.get("model"):
            raise ReflectTuneError(f"{pipe.where('train')}: train: setting 'model': required without a student section")
        keyed = {k: v for k, v in s.items() if k not in UNKEYED["train"]}
        up = {feed[0]: feed[1]}
        if student_dir and s["model"] == student_dir:
            keyed["model"] = "student"
            up.update(model_note)
        else:
            up["model"] = _model_id(s["model"])
        if s.get("teacher"):
            up["teacher"] = _model_id(s["teacher"])
        if s.get("teacher_logits"):  # a cache folder built outside the pipeline: by its files
            keyed.pop("teacher_logits")
            up["teacher_logits"] = _content_id(s["teacher_logits"])
        if hold and not s.get("eval_data") and not s.get("eval_split"):
            s["eval_data"] = hold["heldout"]  # the held-out records (the split's key is in the upstream's)
            keyed["eval_data"] = "holdout"
        elif s.get("eval_data"):  # by content, like the data
            keyed.pop("eval_data")
            up["eval_data"] = _content_id(s["eval_data"])
        data = _feed_path(by_name, feed, source)
        finetuned = {}  # "teacher" / "student": (stage, the fine-tuned model's folder)
        if "teacher_sft" in pipe.sections:
            finetuned["teacher"] = _sft_stage(pipe, add, folder, "teacher_sft", dict(pipe.sections["teacher_sft"]),
                                              base_model=s.get("teacher"), data=data, feed=feed, from_data=from_data)
        arms = expand(pipe.sweep)
        if any(arm.get("student") == "finetuned" for arm in arms):
            # the student fine-tuned first: train's own settings, no distillation (a full model when LoRA: merged)
            plain = {k: v for k, v in s.items() if k not in ("teacher", "kd_ratio", "kd_loss", "kd_temperature", "jsd_beta",
                                                               "skew_alpha")}
            finetuned["student"] = _sft_stage(pipe, add, folder, "student_sft", plain, base_model=s["model"], data=data,
                                              feed=feed, from_data=from_data, model_id=(keyed["model"], up["model"]))
        for arm in arms:
            a_s, a_keyed, a_up = {**s}, {**keyed}, {**up}
            for name, value in arm.items():
                if name in ("teacher", "student"):
                    if value == "finetuned":
                        sft, path = finetuned[name]
                        target = "teacher" if name == "teacher" else "model"
                        a_s[target], a_keyed[target], a_up[target] = path, sft.name, sft.key
                else:
                    a_s[name] = a_keyed[name] = value
            if "teacher_logits" in pipe.sections:  # KD from the teacher's cached top-k: one cache per teacher and data
                tl = _logits_stage(pipe, stages, add, folder, a_s, a_keyed, a_up, data=data, feed=feed, from_data=from_data,
                                   student=(s["model"], keyed["model"], up["model"]))
                a_s["teacher_logits"], a_keyed["teacher_logits"], a_up["teacher_logits"] = str(tl.folder / "cache"), tl.name, tl.key
                a_s.pop("teacher")
            key, where = folder("train", a_keyed, a_up)
            cfg = TrainConfig(**a_s, data=data, output=str(where), **from_data())
            add("train", key, where, cfg, a_up, arm=arm)
            trains.append(by_name["train"])
    for name in ("eval", "judge"):
        if name in pipe.sections and not trains:
            raise ReflectTuneError(f"{pipe.where(name)}: {name}: compares the trained student with its starting point; "
                                   "it needs a train section")
    for tr in trains:  # every arm is followed by its evaluation
        if "eval" in pipe.sections:
            s = dict(pipe.sections["eval"])
            # task files and folders by their content, so a moved checkout keeps its keys
            keyed = {k: v for k, v in s.items() if k not in UNKEYED["eval"] and k not in ("tasks", "include_path")}
            up = {"train": tr.key, "tasks": [_content_id(t) if Path(t).exists() else t for t in s.get("tasks", ())]}
            if s.get("include_path"):
                up["include_path"] = _content_id(s["include_path"])
            key, where = folder("eval", keyed, up)
            after = EvalConfig(**{"tasks": (), **s}, model=str(tr.folder), output=str(where / "after"))
            add("eval", key, where, after, up, before=dataclasses.replace(after, model=tr.config.model, output=str(where / "before")),
                arm=tr.extra.get("arm"))
        if "judge" in pipe.sections:
            s = dict(pipe.sections["judge"])
            if not s.get("data") and not hold:
                raise ReflectTuneError(f"{pipe.where('judge')}: judge: setting 'data': required without a select 'holdout' "
                                       "(the held-out prompts are judged by default)")
            keyed = {k: v for k, v in s.items() if k not in UNKEYED["judge"] and k not in ("data", "prompt")}
            up = {"train": tr.key, "data": _content_id(s["data"]) if s.get("data") else {"holdout": hold["key"]}}
            if s.get("prompt"):
                up["prompt"] = _content_id(s["prompt"])
            key, where = folder("judge", keyed, up)
            data = {"data": s.pop("data")} if s.get("data") else {"data": hold["heldout"]}
            add("judge", key, where, JudgeConfig(**s, **data, model=str(tr.folder), baseline=tr.config.model, output=str(where)),
                up, arm=tr.extra.get("arm"))
    # each arm's eval and judge right after its train stage: a stopped sweep leaves its finished arms evaluated
    after = {tr.key: [st for st in stages if st.name in ("eval", "judge") and st.upstream.get("train") == tr.key]
             for tr in trains}
    return [x for st in stages if st.name not in ("eval", "judge")
            for x in (st, *(after.get(st.key, []) if st.name == "train" else []))]


def _sft_stage(pipe: Pipeline, add, folder, name: str, s: dict[str, Any], *, base_model: str | None, data: str,
               feed: tuple[str, Any], from_data, model_id: tuple[Any, Any] | None = None) -> tuple[Stage, str]:
    """teacher_sft (the KD teacher fine-tuned on the target data) or student_sft (the student
    fine-tuned first, for a sweep's `student: finetuned`): the train code path, LoRA merged into a
    full model folder by default. Returns the stage and the folder of the model it makes."""
    s.setdefault("model", base_model)
    if name == "teacher_sft":
        s.setdefault("method", "lora")
    if s.get("method", "lora") != "full":
        s.setdefault("merge", True)
    keyed = {k: v for k, v in s.items() if k not in UNKEYED["train"]}
    up: dict[str, Any] = {"model": _model_id(s["model"])}
    if model_id is not None and s["model"] == base_model:  # train's model, identified as train's key does
        keyed["model"], up["model"] = model_id
    if s.get("data"):  # any file, by its content
        keyed.pop("data")
        up["data"] = _content_id(s["data"])
    else:
        up[feed[0]] = feed[1]
    if s.get("teacher"):
        up["teacher"] = _model_id(s["teacher"])
    key, where = folder(name, keyed, up)
    cfg = TrainConfig(**{**s, "data": s.get("data") or data}, output=str(where), **({} if s.get("data") else from_data()))
    return add(name, key, where, cfg, up), str(where / "merged" if cfg.merge else where)


def _logits_stage(pipe: Pipeline, stages: list[Stage], add, folder, arm: dict[str, Any], arm_keyed: dict[str, Any],
                  arm_up: dict[str, Any], *, data: str, feed: tuple[str, Any], from_data, student: tuple) -> Stage:
    """The teacher_logits stage an arm distils from: the arm's teacher on the arm's examples (its
    template, max_length and held-out records), tokenized with the student's tokenizer (the train
    section's student: a fine-tuned student keeps it). Arms with the same teacher and data settings
    share one; the cache is `teacher_logits-KEY/cache/`."""
    s = dict(pipe.sections["teacher_logits"])
    same = {k: arm[k] for k in ("template", "max_length", "eval_split", "seed") if arm.get(k) is not None}
    keyed = {**{k: v for k, v in s.items() if k not in UNKEYED["teacher_logits"]}, **same,
             "teacher": arm_keyed["teacher"], "model": student[1], "eval_data": arm_keyed.get("eval_data")}
    up = {feed[0]: feed[1], "teacher": arm_up["teacher"], "model": student[2],
          **({"eval_data": arm_up["eval_data"]} if "eval_data" in arm_up else {})}
    key, where = folder("teacher_logits", keyed, up)
    known = next((st for st in stages if st.name == "teacher_logits" and st.key == key), None)
    if known is not None:
        return known
    cfg = TeacherLogitsConfig(**s, **same, data=data, output=str(where / "cache"), teacher=arm["teacher"], model=student[0],
                              eval_data=arm.get("eval_data"), **from_data())
    return add("teacher_logits", key, where, cfg, up)


def _data_id(pipe: Pipeline) -> dict[str, Any]:
    data_id = {**_content_id(pipe.data), "format": pipe.format, "split": pipe.split}
    if pipe.turns != "first":  # the default leaves the keys of earlier runs as they were
        data_id["turns"] = pipe.turns
    return data_id


def holdout_plan(pipe: Pipeline, data_id: dict[str, Any]) -> dict[str, Any] | None:
    """select's `holdout` (and `holdout_seed`, default 42): where the split of the data goes."""
    s = pipe.sections.get("select") or {}
    if "holdout" not in s:
        return None
    fraction, seed = s["holdout"], s.get("holdout_seed", 42)
    key = stage_key("holdout", {"fraction": fraction, "seed": seed}, {"data": data_id})
    where = pipe.folder / f"holdout-{key}"
    return {"fraction": fraction, "seed": seed, "key": key, "folder": str(where),
            "candidates": str(where / "candidates.jsonl"), "heldout": str(where / "heldout.jsonl")}


def _feed_path(by_name: dict[str, Stage], feed: tuple[str, Any], source: str) -> str:
    if feed[0] == "data":
        return source
    st = by_name[feed[0]]
    return str(st.folder / ("reflected.jsonl" if feed[0] == "reflect" else "selected.jsonl"))


# ----------------------------------------------------------------------------- the run


def run_pipeline(path: str | Path, start: str | None = None, until: str | None = None,
                 runs_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns run.json's content. Finished stages are skipped."""
    pipe = load_pipeline(path, runs_dir)
    stages = plan(pipe)
    chosen = stages_between(pipe, stages, start, until)
    _check_before_running(pipe, [st for i, st in enumerate(stages) if i in chosen])
    with exclusive(pipe.folder / ".run.lock", f"the run folder {pipe.folder}"):  # one run of a pipeline at a time
        return _run_stages(pipe, stages, chosen, progress)


def stages_between(pipe: Pipeline, stages: list[Stage], start: str | None, until: str | None) -> set[int]:
    """The indices `--from START --until UNTIL` runs. By kind, not position: a sweep interleaves its
    arms' train and eval stages, and `--until train` means every train arm, `--from eval` every eval."""
    names = list(dict.fromkeys(s.name for s in stages))
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise ReflectTuneError(f"{flag} {value}: not a stage of {pipe.path} (its stages: {', '.join(names)})")
    first, last = RANK[start] if start else 0, RANK[until] if until else len(RANK)
    if first > last:
        raise ReflectTuneError(f"--from {start} comes after --until {until}")
    for st in stages:
        if RANK[st.name] < first and not st.done:
            raise ReflectTuneError(f"--from {start}: the earlier stage {st.name} is not finished ({st.folder}); "
                                   f"run without --from first")
    return {i for i, st in enumerate(stages) if first <= RANK[st.name] <= last}


def _run_stages(pipe: Pipeline, stages: list[Stage], chosen: set[int], progress: bool) -> dict[str, Any]:
    pipe.folder.mkdir(parents=True, exist_ok=True)
    copy, text = pipe.folder / "pipeline.yaml", read_config_text(pipe.path)
    if not copy.is_file() or copy.read_text(encoding="utf-8") != text:
        atomic_write_text(copy, text)
    record = _load_record(pipe, stages)
    for i, st in enumerate(stages):
        entry = record["stages"][i]
        if i not in chosen:  # outside --from/--until: left as it is
            entry.update(status="done" if st.done else "pending", skipped=True)
            continue
        if st.done:
            log.info("%s: finished earlier, skipped (%s)", st.name, st.folder)
            entry.update(status="done", skipped=True)
            _save_record(pipe, record)
            continue
        # started before under the same key (run.json), or left files: this run continues that work
        resuming = entry.get("started") is not None or (st.folder.is_dir() and any(st.folder.iterdir()))
        log.info("%s: %s (%s)", st.name, "resuming" if resuming else "running", st.folder)
        entry.update(status="running", skipped=False, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), finished=None)
        _save_record(pipe, record)
        t0 = time.time()
        try:
            result = _run_stage(st, progress)
        except BaseException as e:
            entry.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         error=one_line(str(e), 500) if str(e) else type(e).__name__)
            try:
                _save_record(pipe, record)
                write_summary(pipe, stages, holdout_plan(pipe, _data_id(pipe)))
            except OSError:  # a full disk: the stage's own error is the one to report
                pass
            raise
        entry.update(status="done" if st.done else "pending", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     wall_s=round(time.time() - t0, 1), error=None)
        _save_record(pipe, record)
        if not st.done:  # a Batch API job submitted with no_wait: its results come on a later run
            log.warning("%s: %s; run the pipeline again to collect", st.name, result.get("status", "not finished"))
            break
    if pipe.sweep:
        write_comparison(pipe, stages, record)
    write_summary(pipe, stages, holdout_plan(pipe, _data_id(pipe)))
    return record


def arms_of(stages: list[Stage], record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per train arm: its name, swept settings, train folder, eval folder, wall time."""
    from reflect_tune.sweep import arm_name

    walls = {(e["name"], e["key"]): e.get("wall_s") for e in (record or {}).get("stages", [])}
    evals = {st.upstream.get("train"): st for st in stages if st.name == "eval"}
    return [{"name": arm_name(st.extra.get("arm") or {}), "settings": st.extra.get("arm") or {}, "train": str(st.folder),
             "eval": str(evals[st.key].folder) if st.key in evals else None, "wall_s": walls.get(("train", st.key))}
            for st in stages if st.name == "train"]


def write_comparison(pipe: Pipeline, stages: list[Stage], record: dict[str, Any]) -> dict[str, Any]:
    """RUNS/NAME/compare/: one row per arm, overlaid curves, the best arm per metric (compare.py)."""
    from reflect_tune.compare import write_compare

    return write_compare(pipe.folder / "compare", arms_of(stages, record))


def _check_before_running(pipe: Pipeline, stages: list[Stage]) -> None:
    """Everything that can be checked before any work (or paid call): the data, and each unfinished
    stage's own `validate` (its settings, outputs, reflect's API key); a bad setting names its line."""
    if any(not st.done and "data" in st.upstream for st in stages):
        try:
            check_source(pipe.data, format=pipe.format, split=pipe.split)
        except ReflectTuneError as e:
            raise ReflectTuneError(f"{pipe.where('data')}: data: {e}") from None
    hold = holdout_plan(pipe, _data_id(pipe))
    if hold and any(not st.done for st in stages):
        _hold_out(pipe, hold)  # cheap and the same every time; the stages' checks read its files
    for st in stages:
        if st.done:
            continue
        with _located(pipe, st.name):
            if st.name == "student":
                student.validate(st.config)
            elif st.name == "reflect":
                st.folder.mkdir(parents=True, exist_ok=True)
                reflect.validate(st.config)
            elif st.name == "select":
                selection.validate(st.config, reflected="reflect" in st.upstream or is_reflected(st.config.input))
            elif st.name in TRAINS:  # settings and the output folder; the models load when the stage runs
                cache = st.config.teacher_logits  # one the teacher_logits stage has yet to build: checked when it exists
                built = cache is None or (Path(cache) / "index.json").is_file() or "teacher_logits" not in st.upstream
                train.validate(dataclasses.replace(st.config, resume=_started(st.folder), teacher_logits=cache if built else None,
                                                   eval_data=_exists_or(st.config.eval_data, pipe.data)))
            elif st.name == "teacher_logits":
                from reflect_tune import teacher_logits

                later = [m for m in (st.config.teacher, st.config.model) if str(pipe.folder) in m and not Path(m).exists()]
                if not later:  # a teacher or student an earlier stage makes: checked when this stage runs
                    teacher_logits.validate(dataclasses.replace(st.config, data=_exists_or(st.config.data, pipe.data),
                                                                eval_data=_exists_or(st.config.eval_data, pipe.data)))
            else:  # eval, judge: before the student is trained, checked on its starting point
                _validate_comparison(st, pipe)


def _exists_or(path: str | None, stand_in: str) -> str | None:
    """A file a stage reads that an earlier stage writes: a stand-in of the same kind until it exists."""
    return path if path is None or Path(path).exists() else stand_in


def _validate_comparison(st: Stage, pipe: Pipeline) -> None:
    from reflect_tune import evaluate, judge

    trained = Path(st.config.model) / "meta.json"
    if st.name == "eval":
        if st.config.tasks:
            evaluate.validate(st.config if trained.is_file() else st.extra["before"])
            evaluate.check_tasks(st.config)  # a task that cannot load stops the run before training
        return
    cfg = st.config if trained.is_file() else dataclasses.replace(st.config, model=st.config.baseline)
    judge.validate(dataclasses.replace(cfg, data=_exists_or(cfg.data, pipe.data)))


def _started(folder: Path) -> bool:
    """A stage folder with files but no meta.json: an interrupted run, continued by the next one."""
    return folder.is_dir() and any(folder.iterdir())


def _load_record(pipe: Pipeline, stages: list[Stage]) -> dict[str, Any]:
    """run.json's content for this plan; a stage with the same key keeps its times from an earlier run."""
    earlier = {}
    old = read_json(pipe.folder / "run.json")
    if isinstance(old, dict) and isinstance(old.get("stages"), list):
        earlier = {(e.get("name"), e.get("key")): e for e in old["stages"] if isinstance(e, dict)}
    rows = []
    for s in stages:
        before = earlier.get((s.name, s.key), {})
        rows.append({"name": s.name, "key": s.key, "folder": s.folder.name, "status": "done" if s.done else "pending",
                     "skipped": None, "started": before.get("started"), "finished": before.get("finished"),
                     **({"wall_s": before["wall_s"]} if "wall_s" in before else {})})
    return {"name": pipe.name, "pipeline": str(Path(pipe.path).resolve()), "folder": str(pipe.folder), "stages": rows}


def _save_record(pipe: Pipeline, record: dict[str, Any]) -> None:
    atomic_write_text(pipe.folder / "run.json", json.dumps(record, indent=2) + "\n")


def _run_stage(st: Stage, progress: bool) -> dict[str, Any]:
    """Run one stage into its folder (each stage writes its meta.json last; for reflect and select
    the pipeline writes the folder's); returns its summary, or {"status": ...} when unfinished."""
    if st.name == "student":
        if st.folder.exists():  # an interrupted make-student leaves no meta.json: start it again
            shutil.rmtree(st.folder)
        return student.run(st.config)
    if st.name in TRAINS:  # train, an arm of a sweep, teacher_sft, student_sft: one code path
        return train.run(dataclasses.replace(st.config, progress=progress, resume=_started(st.folder)))
    if st.name == "judge":
        from reflect_tune import judge

        return judge.run(dataclasses.replace(st.config, progress=progress))
    st.folder.mkdir(parents=True, exist_ok=True)
    if st.name == "teacher_logits":  # the cache in cache/ (resumes there); the stage's meta.json beside it, last
        from reflect_tune import teacher_logits

        summary = teacher_logits.run(dataclasses.replace(st.config, progress=progress))
        if summary.get("is_main", True):
            meta = provenance("teacher_logits", st.config, inputs=[])
            meta.update(key=st.key, upstream=st.upstream, summary=summary)
            write_meta(st.folder, meta)
        return summary
    if st.name == "eval":
        summary = _run_eval(st, progress)
        meta = provenance("eval", st.config, inputs=[])
        meta.update(key=st.key, upstream=st.upstream, summary=summary)
        write_meta(st.folder, meta)
        return summary
    if st.name == "reflect":
        result = reflect.run(dataclasses.replace(st.config, progress=progress))
        if result.status == "submitted":
            return {"status": "submitted to the Batch API"}
        summary = result.summary
        # a request the server refused for its content (HTTP 400) fails the same way every time: final;
        # one that ran out of retries is not cached, so a rerun retries it: the stage waits for those
        failed = sum(v.get("api_failed", 0) for v in summary["variants"].values()) - summary.get("variants_rejected", 0)
        if failed:
            return {"status": f"{failed} requests failed after every retry (api_failed, see "
                              f"{st.config.output}); the next run retries only those"}
    else:
        summary = selection.run(dataclasses.replace(st.config, progress=progress)).summary
        if "holdout" in st.extra:
            summary["heldout"] = _count_lines(Path(st.extra["holdout"]["heldout"]))
    meta = provenance(st.name, st.config, inputs=[st.config.input])
    meta.update(key=st.key, upstream=st.upstream, summary=summary)
    write_meta(st.folder, meta)
    return summary


def _hold_out(pipe: Pipeline, hold: dict[str, Any]) -> None:
    """Split the data by record id (records.split_holdout: seeded, stable per id) into heldout.jsonl
    and candidates.jsonl (alpaca JSON Lines, ids kept), which the stages read instead of `data`.
    Written once (meta.json last); the same data and settings always give the same files."""
    from reflect_tune.convert import record_to_row, write_rows
    from reflect_tune.records import load_records, split_holdout

    where = Path(hold["folder"])
    if (where / "meta.json").is_file():
        return
    records, _ = load_records(pipe.data, format=pipe.format, split=pipe.split, turns=pipe.turns)
    keep, held = split_holdout(records, hold["fraction"], hold["seed"])
    if not held or not keep:
        raise ReflectTuneError(f"{pipe.where('select', 'holdout')}: select: setting 'holdout': {hold['fraction']} of "
                               f"{len(records)} records holds out {len(held)}; choose a fraction that leaves both sides "
                               "some records (or another holdout_seed)")
    system = any(r.system for r in records)
    where.mkdir(parents=True, exist_ok=True)
    write_rows([record_to_row(r, "alpaca", with_system=system) for r in keep], hold["candidates"])
    write_rows([record_to_row(r, "alpaca", with_system=system) for r in held], hold["heldout"])
    meta = provenance("holdout", {"data": pipe.data, "fraction": hold["fraction"], "seed": hold["seed"]},
                      inputs=[pipe.data] if Path(pipe.data).exists() else [])
    meta.update(key=hold["key"], records=len(records), heldout=len(held), candidates=len(keep))
    write_meta(where, meta)


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _run_eval(st: Stage, progress: bool) -> dict[str, Any]:
    """The eval stage: the lm-eval tasks on the starting point (before/) and the trained student
    (after/), each skipped when finished earlier; held-out loss from the train stage's meta.json."""
    from reflect_tune import evaluate

    summary: dict[str, Any] = {"tasks": list(st.config.tasks)}
    for side, cfg in (("before", st.extra["before"]), ("after", st.config)):
        if not cfg.tasks:
            continue
        out = Path(cfg.output)
        if not (out / "eval.json").is_file():  # an interrupted side is run again from the start
            evaluate.run(dataclasses.replace(cfg, progress=progress, overwrite=out.exists()))
        summary[side] = read_json(out / "eval.json")
    train_meta = read_json(Path(st.config.model) / "meta.json") or {}
    summary["heldout"] = (train_meta.get("result") or {}).get("heldout")
    return summary
