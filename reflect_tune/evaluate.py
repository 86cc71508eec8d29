"""`reflect-tune eval`: benchmarks through EleutherAI's lm-evaluation-harness, run as it is.

The harness does all the work: its `TaskManager` builds the tasks (lm-eval task, group and tag
names, or task YAML files and folders), its `HFLM` wraps the model, `simple_evaluate` runs them.
What this stage adds:

- every check before a model loads: settings, the output folder, `report_to`, the model spec (it
  exists, has a tokenizer), then every task is built (which reads its data), so a typo or an
  unreachable hub is one line, not a traceback after minutes of loading;
- any model spec the project accepts, and a LoRA train output folder as base + adapter (PEFT);
- relative `data_files` in a local task YAML are read from the YAML's own folder, whatever the cwd;
- the output folder: `results.json` (lm-eval's result dict, serialized as lm-eval does),
  `samples_TASK.jsonl` (lm-eval's per-item records), `eval.json` / `eval.md` (one row per task and
  metric), `meta.json` (provenance) and the folder's marker, swapped in whole at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from reflect_tune.artifacts import check_output_folder, clear_folder, special_kind
from reflect_tune.config import EvalConfig, SettingError
from reflect_tune.errors import ModelError, ReflectTuneError

log = logging.getLogger(__name__)

STAGE = "eval"
OUTPUT_NAMES = ("results.json", "eval.json", "eval.md", "meta.json", "tensorboard", "trackio")
# settings that do not change the numbers: left out of the config hash
_NOT_HASHED = ("output", "overwrite", "progress", "report_to", "run_name")
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
HINT = "point --tasks at a local task YAML instead (e.g. examples/lm_eval_tasks/reflect_tiny_mc.yaml)"


# ----------------------------------------------------------------------------- checks before any work


def validate(cfg: EvalConfig) -> None:
    """The settings, `report_to` and the output folder; cheap, nothing is loaded."""
    from reflect_tune.tracking import check_report_to

    if not cfg.tasks or not all(t.strip() for t in cfg.tasks):
        raise SettingError("tasks", "setting 'tasks': give at least one lm-eval task name or task YAML path")
    checks = [("batch_size", "must be at least 1", cfg.batch_size < 1),
              ("limit", "must be > 0 (a count >= 1, or a fraction < 1)", cfg.limit is not None and not cfg.limit > 0),
              ("limit", "a count >= 1 must be a whole number", cfg.limit is not None and cfg.limit >= 1 and cfg.limit != int(cfg.limit)),
              ("num_fewshot", "must be >= 0", cfg.num_fewshot is not None and cfg.num_fewshot < 0),
              ("max_length", "must be at least 2", cfg.max_length is not None and cfg.max_length < 2)]
    for name, why, failed in checks:
        if failed:
            raise SettingError(name, f"setting '{name}': {why}")
    if cfg.include_path is not None and not Path(cfg.include_path).expanduser().is_dir():
        raise ReflectTuneError(f"{cfg.include_path}: --include-path must be a folder of task YAML files")
    check_report_to(cfg.report_to)
    out = Path(cfg.output)
    check_output_folder(out, [cfg.model, cfg.include_path, *cfg.tasks])
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ReflectTuneError(f"{out}: exists and is not empty; pass --overwrite to replace it, or choose a new --output")
        clear_folder(out, STAGE, OUTPUT_NAMES, check_only=True)  # refuses a folder eval did not write


def check_tasks(cfg: EvalConfig) -> None:
    """Build the tasks once, quietly, and drop them: an unknown task or a broken YAML fails now,
    as one line (the pipeline calls this before training, so a typo does not wait for the end)."""
    quiet_lm_eval()
    with harness_output(False):
        build_tasks(cfg)


def config_hash(cfg: EvalConfig) -> str:
    """First 12 hex of sha256 over the settings that decide the numbers (not output, progress...)."""
    from reflect_tune.artifacts import redact

    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_HASHED}
    blob = json.dumps({"stage": STAGE, "config": redact(values)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the model


@dataclass
class ModelPlan:
    """What MODEL is: a whole model, or a LoRA adapter folder on top of `base`."""

    spec: str
    adapter: str | None = None  # the adapter folder (a LoRA train output)
    base: str | None = None  # the adapter's base model spec


def plan_model(spec: str) -> ModelPlan:
    """Cheap checks of a model spec (nothing is loaded or converted): it exists and has a tokenizer."""
    from reflect_tune.models import (BUNDLED_PREFIX, TOKENIZER_FILES, adapter_base, bundled_gguf_path, has_tokenizer,
                                     is_adapter_folder, resolve_model)

    if spec.startswith(BUNDLED_PREFIX):
        bundled_gguf_path(spec[len(BUNDLED_PREFIX):])  # unknown or not installed: one line
        return ModelPlan(spec=spec)
    path = Path(spec).expanduser()
    if is_adapter_folder(spec):
        base = adapter_base(path)
        plan_model(base)
        return ModelPlan(spec=spec, adapter=str(path), base=base)
    if special_kind(path) is None and path.is_file() and path.suffix.lower() == ".gguf":
        return ModelPlan(spec=spec)  # converted (once) when it loads
    resolved = resolve_model(spec)  # a folder or a hub id: no conversion happens here
    if resolved.kind == "folder" and not has_tokenizer(path):
        raise ModelError(f"{spec}: has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer into the model folder (tokenizer.save_pretrained)")
    return ModelPlan(spec=spec)


def load_lm(plan: ModelPlan, cfg: EvalConfig):
    """lm-eval's HFLM around our model and tokenizer; a LoRA folder as PeftModel(base, adapter)."""
    from lm_eval.models.huggingface import HFLM

    from reflect_tune.models import load_with_adapter

    model, tok = load_with_adapter(plan.spec, merge=False, dtype=cfg.dtype, device=cfg.device,
                                   trust_remote_code=cfg.trust_remote_code)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, max_length=cfg.max_length)


# ----------------------------------------------------------------------------- the tasks


@dataclass
class TaskPlan:
    manager: Any  # lm_eval's TaskManager
    items: list = field(default_factory=list)  # the built top-level Task / Group objects
    names: list[str] = field(default_factory=list)  # every leaf task's name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def _mentioned(name: str, roots: list[Path]) -> bool:
    """Whether any task YAML under `roots` contains `name`: a name found nowhere is not a task (0.4 s,
    where building lm-eval's whole index of ~14,000 YAML files takes ~15 s)."""
    needle = name.encode()
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".yaml") and needle in Path(dirpath, f).read_bytes():
                    return True
    return False


def _local_config(yaml_path: Path) -> dict | None:
    """A user's task YAML as a config dict with its relative data files made absolute (they are read
    from the YAML's folder, as a reader of the file expects); None when nothing needs it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(cfg.get("task"), str) or not isinstance(kwargs, dict):
        return None

    def fix(p):
        if isinstance(p, str) and not Path(p).is_absolute() and not Path(p).exists() and (yaml_path.parent / p).exists():
            return str((yaml_path.parent / p).resolve())
        if isinstance(p, list):
            return [fix(x) for x in p]
        if isinstance(p, dict):
            return {k: fix(v) for k, v in p.items()}
        return p

    fixed = {k: fix(v) if k in ("data_files", "data_dir") else v for k, v in kwargs.items()}
    return {**cfg, "dataset_kwargs": fixed} if fixed != kwargs else None


def _yaml_task_name(path: Path) -> str | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        name = load_yaml(path, resolve_func=False).get("task")
    except Exception:
        return None
    return name if isinstance(name, str) else None


def _load_error(spec: str, e: Exception, manager, yaml_path: Path | None) -> ReflectTuneError:
    """One line for a task that cannot be built: a broken config, or data that cannot be fetched."""
    text = _first_line(e)
    name = (_yaml_task_name(yaml_path) or spec) if yaml_path is not None else spec
    where = f" (from {yaml_path})" if yaml_path is not None else ""
    hub = (isinstance(e, ConnectionError) or type(e).__name__ in ("DatasetNotFoundError", "OfflineModeIsEnabled",
           "LocalEntryNotFoundError", "HfHubHTTPError", "HFValidationError") or "offline" in text.lower())
    if hub:
        return ReflectTuneError(f"task '{name}'{where}: its dataset cannot be fetched from the Hugging Face hub ({text}); "
                                f"without a hub, {HINT}")
    return ReflectTuneError(f"task '{name}'{where}: cannot be loaded: {type(e).__name__}: {text}")


def build_tasks(cfg: EvalConfig) -> TaskPlan:
    """Every task built by lm-eval's TaskManager (which reads its data), before any model loads."""
    import yaml
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    include = [Path(cfg.include_path).expanduser()] if cfg.include_path else []
    specs: list[tuple[str, Path | None]] = []  # (name or path, the user's YAML when there is one)
    folders: list[Path] = []
    for t in (t.strip() for t in cfg.tasks):
        p = Path(t).expanduser()
        if p.is_dir():
            folders.append(p)
        elif p.is_file() or p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise ReflectTuneError(f"{t}: task YAML file not found")
            specs.append((str(p), p))
        else:
            specs.append((t, None))
    for folder in folders:  # every YAML in it must load; its tasks are all those it defines
        yamls = sorted(folder.glob("**/*.yaml"))
        for y in yamls:
            try:
                load_yaml(y, resolve_func=False)
            except Exception as e:
                raise ReflectTuneError(f"task YAML {y}: cannot be loaded: {_first_line(e)}") from None
        include.append(folder)
    for y in (p for s, p in specs if p is not None):
        try:
            load_yaml(y, resolve_func=False)
        except (yaml.YAMLError, ValueError, OSError, TypeError) as e:
            raise ReflectTuneError(f"task YAML {y}: cannot be loaded: {_first_line(e)}") from None

    local = TaskManager(include_defaults=False, include_path=include or None)
    for folder in folders:
        found = sorted(n for n, e in local.task_index.items() if e.yaml_path and e.kind.name == "TASK"
                       and folder.resolve() in Path(e.yaml_path).resolve().parents)
        if not found:
            raise ReflectTuneError(f"{folder}: no lm-eval task YAML in this folder (a file with a 'task:' name)")
        specs += [(n, Path(local.task_index[n].yaml_path)) for n in found]
    names = [s for s, p in specs if p is None]
    manager = local
    if any(n not in local.task_index for n in names):
        for n in names:
            if n not in local.task_index and not _mentioned(n, [_lm_eval_tasks_dir(), *include]):
                raise ReflectTuneError(f"unknown task {n!r}: not an lm-eval task, group or tag name, nor a task YAML "
                                       f"file or folder (list them with: lm_eval ls tasks)")
        log.info("eval: indexing lm-eval's task definitions")
        manager = TaskManager(include_path=include or None)
    ours = _lm_eval_tasks_dir()
    for i, (s, y) in enumerate(specs):  # a name from --include-path: the user's YAML, read as one
        entry = manager.task_index.get(s) if y is None else None
        if entry is not None and entry.yaml_path and ours not in Path(entry.yaml_path).resolve().parents:
            specs[i] = (s, Path(entry.yaml_path))

    plan = TaskPlan(manager=manager)
    for spec, yaml_path in specs:
        try:
            inline = _local_config(yaml_path) if yaml_path is not None else None
            loaded = manager.load([inline if inline is not None else spec])
        except KeyError:
            raise ReflectTuneError(f"unknown task {spec!r}: not an lm-eval task, group or tag name, nor a task YAML "
                                   f"file or folder (list them with: lm_eval ls tasks)") from None
        except ReflectTuneError:
            raise
        except Exception as e:
            raise _load_error(spec, e, manager, yaml_path) from None
        grouped = {t for g in loaded["groups"].values() for t in (x.task_name for x in g.get_all_tasks())}
        children = {c for cs in loaded["group_map"].values() for c in cs}
        plan.items += [g for n, g in loaded["groups"].items() if n not in children]
        plan.items += [t for n, t in loaded["tasks"].items() if n not in grouped]
        plan.names += [n for n in loaded["tasks"] if n not in plan.names]
    return plan


# ----------------------------------------------------------------------------- results


def metric_rows(results: dict, model: str, chash: str) -> list[dict]:
    """One row per task (or group) and metric of lm-eval's `results` section."""
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    rows = []
    for task, values in results.get("results", {}).items():
        if task in n_samples:
            n = n_samples[task].get("effective")
        else:  # a group: the items of its tasks
            n = sum(n_samples.get(t, {}).get("effective", 0) for t in subtasks.get(task, [])) or None
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue  # alias, sample_len..., stderr (reported with its metric)
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt,
                         "value": value if isinstance(value, (int, float)) else None,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "samples": n, "model": model, "config_hash": chash})
    return rows


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def render_md(rows: list[dict], model: str, chash: str, lm_eval_version: str) -> str:
    lines = [f"# reflect-tune eval: {model}", "",
             f"lm-evaluation-harness {lm_eval_version}; config hash `{chash}`; results.json holds lm-eval's full result dict.", "",
             "| task | metric | filter | value | stderr | samples | model | config hash |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['filter']} | {_num(r['value'])} | {_num(r['stderr'])} | "
                     f"{_num(r['samples'])} | {r['model']} | {r['config_hash']} |")
    return "\n".join(lines) + "\n"


def _dump(obj) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False)


def quiet_lm_eval() -> None:
    """lm-eval and its libraries log at INFO by default and warn about passing a loaded model: WARNING
    and above only, and not that one."""
    for name in ("lm_eval", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise())


class _KnownNoise(logging.Filter):
    NOISE = ("`pretrained` model kwarg is not of type", "already-initialized model", "Overwriting default num_fewshot")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in record.getMessage() for s in self.NOISE)


@contextmanager
def harness_output(bars: bool) -> Iterator[None]:
    """While lm-eval runs: its print()s (bootstrapping notes) are dropped, so stdout stays ours; and
    without `bars` (--no-progress, or stderr not a terminal) its tqdm bars and those of datasets and
    transformers are switched off."""
    import tqdm as tqdm_module
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    original = tqdm_module.tqdm

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return original(*args, **kwargs)

    import lm_eval.evaluator

    git_hash = lm_eval.evaluator.get_git_commit_hash

    def quiet_git_hash():  # lm-eval runs `git describe` and lets git complain outside a repository
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            return git_hash()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)

    lm_eval.evaluator.get_git_commit_hash = quiet_git_hash
    modules = (tqdm_module, lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface)
    if not bars:
        ds_logging.disable_progress_bar()
        hf_logging.disable_progress_bar()
        for m in modules:
            m.tqdm = silent
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        for m in modules:
            m.tqdm = original
        lm_eval.evaluator.get_git_commit_hash = git_hash


# ----------------------------------------------------------------------------- the run


def run(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.tasks` with lm-eval; write the output folder; returns the summary
    (`rows`: one per task and metric, also in eval.json)."""
    from reflect_tune.artifacts import (claim_folder, exclusive, lock_beside, provenance, replace_folder,
                                        sweep_temporaries, write_meta, atomic_write_text)
    from reflect_tune.tracking import open_tracker

    validate(cfg)
    quiet_lm_eval()
    started = time.time()
    bars = cfg.progress and sys.stderr.isatty()
    model_plan = plan_model(cfg.model)  # a missing model or tokenizer: before the tasks are built
    with harness_output(bars):
        tasks = build_tasks(cfg)  # an unknown task, a broken YAML, an unreachable hub: before any weights load
    chash = config_hash(cfg)
    out = Path(cfg.output)
    limit = None if cfg.limit is None else int(cfg.limit) if cfg.limit >= 1 else cfg.limit

    with exclusive(lock_beside(out), str(out)), harness_output(bars):
        import lm_eval
        from lm_eval.evaluator import simple_evaluate

        log.info("eval: %d task(s) (%s); loading %s", len(tasks.names), ", ".join(tasks.names), cfg.model)
        lm = load_lm(model_plan, cfg)
        results = simple_evaluate(model=lm, tasks=tasks.items, task_manager=tasks.manager, num_fewshot=cfg.num_fewshot,
                                  limit=limit, log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                  torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        samples = results.pop("samples", {})
        rows = metric_rows(results, cfg.model, chash)
        seconds = time.time() - started
        summary = {"model": cfg.model, "adapter": model_plan.adapter, "base_model": model_plan.base,
                   "tasks": tasks.names, "config_hash": chash, "lm_eval_version": lm_eval.__version__,
                   "items": sum(v.get("effective", 0) for v in results.get("n-samples", {}).values()),
                   "seconds": round(seconds, 2), "rows": rows}

        sweep_temporaries(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            atomic_write_text(tmp / "results.json", _dump(results) + "\n")
            for task, items in samples.items():
                atomic_write_text(tmp / f"samples_{task.replace(os.sep, '_')}.jsonl",
                                  "".join(json.dumps(s, default=_dump_default(), ensure_ascii=False) + "\n" for s in items))
            atomic_write_text(tmp / "eval.json", _dump({k: v for k, v in summary.items()}) + "\n")
            atomic_write_text(tmp / "eval.md", render_md(rows, cfg.model, chash, lm_eval.__version__))
            tracker = open_tracker(cfg.report_to, tmp, cfg.run_name or f"eval-{chash}", dataclasses.asdict(cfg))
            with tracker:
                tracker.log({f"eval/{r['task']}/{r['metric']}": r["value"] for r in rows if r["value"] is not None}, step=0)
            meta = provenance(STAGE, cfg, inputs=[p for p in (model_plan.adapter, model_plan.base, cfg.model)
                                                  if p and Path(p).exists()][:1])
            meta["result"] = {k: v for k, v in summary.items() if k != "rows"}
            claim_folder(tmp, STAGE, [f.name for f in tmp.iterdir()] + ["meta.json"])  # what --overwrite may remove
            write_meta(tmp, meta)  # last: the folder is complete once meta.json is in it
            if cfg.overwrite and out.is_dir():
                clear_folder(out, STAGE, OUTPUT_NAMES, check_only=True)
            replace_folder(tmp, out)
        except OSError as e:
            raise ReflectTuneError(f"{out}: cannot write the results: {e.strerror or e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if cfg.progress:
        log.info("eval: done, %d items in %.0fs (%.1f items/s); wrote %s", summary["items"], seconds,
                 summary["items"] / max(seconds, 1e-9), out)
    return summary


def _dump_default():
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable
