"""Every stage's settings, and reading them from a YAML file or flags so that every mistake is one line.

One keyword-only dataclass per stage: `ReflectConfig`, `ScoreConfig`, `SelectConfig`,
`TrainConfig`, `EvalConfig`, `JudgeConfig`, `StudentConfig`. The CLI and the pipeline build them the same way, with
`from_values(cls, values)`: unknown keys, wrong types and renamed keys are `SettingError`s that
name the setting (the pipeline adds FILE:LINE), types come from the annotations, an int is
taken for a float, a list for a tuple. Train also takes the names Hugging Face users type
(`learning_rate`, `num_train_epochs`, ... see `TRAIN_ALIASES`); the docs use ours.

Each stage checks its own values in its `validate(cfg)`; this module knows only types.

`load_yaml(path)` returns the parsed mapping and the line of each key (`"key"` and
`"section.key"`, `-` read as `_`), and refuses, naming the file and line:

- a key given twice in one mapping (both lines named: YAML would silently keep the last);
- aliases that expand to more than `MAX_VALUES` values (a "billion laughs" file of a few hundred
  bytes would otherwise expand to gigabytes once walked), and recursive aliases;
- an integer literal too long for Python to parse (over 4,000 digits);
- a path that is a FIFO, a device or a symlink loop (never opened, so nothing blocks).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from reflect_tune.artifacts import special_kind
from reflect_tune.errors import ReflectTuneError, clip
from reflect_tune.templates import REVERSE_DEFAULT

MAX_VALUES = 10_000  # nodes after alias expansion; a hand-written config has a few hundred
MAX_INT_DIGITS = 4000


class _Refused(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and integers Python cannot parse."""


def _checked_map(loader: _Loader, node: yaml.MappingNode):
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = (key_node.tag, key_node.value.replace("-", "_")), key_node.start_mark.line + 1
        if key in seen:
            raise _Refused(line, f"key {clip(key_node.value)} is given twice (lines {seen[key]} and {line}); keep one")
        seen[key] = line
    return loader.construct_yaml_map(node)


def _checked_int(loader: _Loader, node: yaml.ScalarNode):
    if sum(c.isdigit() for c in node.value) > MAX_INT_DIGITS:
        raise _Refused(node.start_mark.line + 1, f"a number of {len(node.value)} digits; no setting takes one")
    return loader.construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:map", _checked_map)
_Loader.add_constructor("tag:yaml.org,2002:int", _checked_int)


def _expanded_size(node: yaml.Node) -> int:
    """How many values the document holds once every alias is expanded (computed without expanding)."""
    memo: dict[int, int] = {}
    visiting: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in memo:
            return memo[id(n)]
        if id(n) in visiting:
            raise _Refused(n.start_mark.line + 1, "a recursive alias (an anchor used inside itself)")
        visiting.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        visiting.discard(id(n))
        memo[id(n)] = total = min(total, MAX_VALUES + 1)
        return total

    return size(node)


def _line_map(root: yaml.Node | None) -> dict[str, int]:
    """1-based line of each top-level key and of each key one level down (`-` read as `_`)."""
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            name = str(k.value).replace("-", "_")
            lines.setdefault(name, k.start_mark.line + 1)
            if isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    lines.setdefault(f"{name}.{str(k2.value).replace('-', '_')}", k2.start_mark.line + 1)
    return lines


def read_config_text(path: str | Path) -> str:
    """A config file's text; a FIFO, device or symlink loop is refused without being opened."""
    path = Path(path)
    kind = special_kind(path)
    if kind:
        raise ReflectTuneError(f"{path}: {kind}, not a config file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReflectTuneError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def load_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """(data, lines) of a YAML config file; every problem is a one-line `ReflectTuneError` at FILE:LINE."""
    text = read_config_text(path)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is not None and _expanded_size(root) > MAX_VALUES:
            raise _Refused(root.start_mark.line + 1, f"its aliases expand to over {MAX_VALUES:,} values; "
                                                     "write the settings out instead of nesting aliases")
        data = loader.construct_document(root) if root is not None else None
    except _Refused as e:
        raise ReflectTuneError(f"{path}:{e.line}: {e.message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ReflectTuneError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {problem[:200]}") from None
    finally:
        loader.dispose()
    return data, _line_map(root)


# ----------------------------------------------------------------------------- the stages' settings


@dataclass(kw_only=True)
class ReflectConfig:
    """`reflect-tune reflect`: the teacher rewrites every pair (reflect.py)."""

    input: str
    output: str
    model: str
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    stages: tuple[str, ...] = ("instruction", "response")
    concurrency: int = 16
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_tokens: int = 2048
    temperature: float = 0.0  # the teacher's sampling temperature (the reference uses 0)
    top_p: float = 1.0
    limit: Optional[int] = None
    dry_run: bool = False
    batch_api: bool = False
    no_wait: bool = False
    poll_interval: float = 30.0
    retry_failed: bool = False
    reask: bool = True  # re-ask once when a reply cannot be parsed (off: record parse_failed at once)
    prompts: Optional[str] = None
    cache_dir: Optional[str] = None
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    price_in: Optional[float] = None
    price_out: Optional[float] = None
    tokenizer: Optional[str] = None
    format: Optional[str] = None
    split: Optional[str] = None
    dedupe: bool = False  # drop records whose id was already seen (counted) instead of failing
    turns: str = "first"  # multi-turn conversations: first | last | each (records.TURN_POLICIES)
    progress: bool = True
    # how --max-tokens is sent: auto | max_tokens | max_completion_tokens (teacher.request_params)
    token_param: str = "auto"
    extra_body: Optional[dict] = None  # server-specific fields added to every request body (and its cache key)
    # how the teacher lays out its reply: "markers" (tagged blocks), "json" (a JSON object that
    # follows prompts/*.schema.json, sent as response_format json_schema) or "auto" (json where the
    # server accepts it: one probe, remembered per base URL and model)
    response_format: str = "markers"
    # "http": an OpenAI-compatible server; "transformers": the teacher runs in this process
    # (`model` is a model spec) and keeps to the layout by construction (local_teacher.py)
    backend: str = "http"
    critique_tokens: int = 0  # transformers backend: tokens of critique before the text (0: none)
    batch_size: Optional[int] = None  # transformers backend: prompts per generate call (default: 8 CPU, 64 GPU)
    device: str = "auto"  # transformers backend
    dtype: str = "auto"  # transformers backend



@dataclass(kw_only=True)
class ScoreConfig:
    """`reflect-tune score`: IFD and r-IFD of every candidate (score.py)."""

    input: str
    output: str
    model: str
    template: str = "auto"
    dtype: str = "auto"
    batch_tokens: Optional[int] = None
    max_length: int = 2048
    only: Optional[str] = None  # "ifd" | "rifd" | None (both)
    reverse: str = REVERSE_DEFAULT
    device: str = "auto"
    format: Optional[str] = None
    split: Optional[str] = None
    trust_remote_code: bool = False
    resume: bool = True
    turns: str = "first"  # multi-turn plain data: first | last | each
    progress: bool = True
    # conventions of the released code (docs/FORMATS.md §8.2a); None: as `match_reference` says, else the paper's
    match_reference: Optional[str] = None  # None | "srt" (Reflection_Tuning) | "cherry" (Cherry_LLM)
    input_join: Optional[str] = None  # vicuna/none with an input: "newline" | "labelled" ("\nInput:\n")
    alone_cut: Optional[str] = None  # s(A), s(Q): "full" (cut at max_length) | "matched" (max_length - prompt + 1)
    rifd_text: Optional[str] = None  # r-IFD's instruction text: "newline" (instruction\ninput) | "concat"
    span: Optional[str] = None  # a conditioned pass's scored span: "exact" | "rfind"
    answer_alone: Optional[str] = None  # s(A): "bare" answer | "header" (after "### Response:", Cherry)


@dataclass(kw_only=True)
class SelectConfig:
    """`reflect-tune select`: the student keeps the pairs it learns most from (selection.py)."""

    input: str
    output: str
    model: Optional[str] = None
    top: Optional[float] = None  # fraction of the input records to keep
    top_k: Optional[int] = None  # or a count
    method: Optional[str] = None  # None: srt on reflect output, ifd on plain data
    missing_response: str = "drop"  # srt, the winner's response variant not ok: "drop" the pair, or "keep" its own answer
    proxy_model: Optional[str] = None
    template: str = "auto"
    dtype: str = "auto"
    batch_tokens: Optional[int] = None
    max_length: int = 2048
    reverse: str = REVERSE_DEFAULT
    device: str = "auto"
    format: Optional[str] = None
    split: Optional[str] = None
    trust_remote_code: bool = False
    resume: bool = True
    turns: str = "first"  # multi-turn plain data: first | last | each
    progress: bool = True
    scores: Optional[str] = None  # select from this scores.parquet (reflect-tune score) instead of loading a model
    # conventions of the released code (docs/FORMATS.md §8.2a); None: as `match_reference` says, else the paper's
    match_reference: Optional[str] = None  # None | "srt" (Reflection_Tuning) | "cherry" (Cherry_LLM)
    input_join: Optional[str] = None  # vicuna/none with an input: "newline" | "labelled" ("\nInput:\n")
    alone_cut: Optional[str] = None  # s(A), s(Q): "full" (cut at max_length) | "matched" (max_length - prompt + 1)
    rifd_text: Optional[str] = None  # r-IFD's instruction text: "newline" (instruction\ninput) | "concat"
    span: Optional[str] = None  # a conditioned pass's scored span: "exact" | "rfind"
    answer_alone: Optional[str] = None  # s(A): "bare" answer | "header" (after "### Response:", Cherry)
    rewrite_loses: Optional[str] = None  # srt phase 2, the rewritten answer not better: "keep" the winner | "drop"
    phase_nan: Optional[str] = None  # a NaN in a phase comparison: "loses" | "plain" (compares false, as Python's < and >)
    ratio: Optional[str] = None  # IFD and r-IFD as "ppl" (perplexity ratio) | "loss" (loss ratio)
    top_of: Optional[str] = None  # --top is a fraction of the input "records" | of the filter's "survivors"
    truncated: Optional[str] = None  # a pair with a truncated pass: "keep" | "skip" (Cherry)


@dataclass(kw_only=True)
class TrainConfig:
    """`reflect-tune train`: instruction tuning with optional logit KD (train.py)."""

    data: str = ""
    output: str = ""
    model: str = ""
    method: str = "lora"  # lora | qlora | full
    epochs: int = 1
    lr: Optional[float] = None  # default: 2e-4 for LoRA/QLoRA, 2e-5 for full
    batch_size: int = 4
    grad_accum: int = 4
    max_length: int = 1024
    packing: bool = False
    template: str = "chat"  # chat | alpaca
    teacher: Optional[str] = None
    teacher_logits: Optional[str] = None  # a `reflect-tune teacher-logits` cache: KD from its top-k, no teacher loaded
    kd_ratio: float = 0.5
    kd_loss: str = "forward_kl"
    kd_temperature: float = 1.0  # the softmax temperature of both models in the KD term
    beta: float = 0.5
    skew_alpha: float = 0.1
    kd_impl: str = "chunked"  # chunked (memory-lean) | naive (full logits)
    kd_chunk_size: Optional[int] = None
    teacher_dtype: str = "auto"
    resume: bool = False
    save_every: int = 500
    keep_checkpoints: int = 2
    merge: bool = False
    max_steps: Optional[int] = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target: str = "all-linear"
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    # held-out loss: a file of records never trained on (eval_data), or a seeded, id-stable fraction of
    # the training data set aside (eval_split); its CE (and KD term) every eval_every steps and at the end
    eval_data: Optional[str] = None
    eval_split: float = 0.0
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0: before training and at the end only
    eval_batch_size: Optional[int] = None  # default: batch_size
    # CE on the first N *training* examples before and after training (meta.json); not held-out; 0: off
    train_ce_samples: int = 32
    report_to: str = "none"  # none | tensorboard | trackio | wandb (CSV and PNG are always written)
    run_name: Optional[str] = None  # the tracker's run name; default: the output folder's name
    format: Optional[str] = None
    split: Optional[str] = None
    turns: str = "first"  # multi-turn data: first | last | each
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True


@dataclass(kw_only=True)
class EvalConfig:
    """`reflect-tune eval`: lm-evaluation-harness tasks on a model (evaluate.py)."""

    model: str  # any model spec: bundled:NAME, an HF folder, a .gguf, a train output folder (LoRA: base + adapter)
    tasks: tuple[str, ...]  # lm-eval task names, or paths of task YAML files / folders
    output: str
    limit: Optional[float] = None  # per task: a count (>= 1) or a fraction (< 1), as lm_eval's --limit
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    max_length: Optional[int] = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1234
    include_path: Optional[str] = None  # a folder of extra task YAMLs (lm_eval --include_path)
    trust_remote_code: bool = False
    overwrite: bool = False
    report_to: str = "none"  # none | tensorboard | trackio | wandb
    run_name: Optional[str] = None
    progress: bool = True


@dataclass(kw_only=True)
class JudgeConfig:
    """`reflect-tune judge`: pairwise win rate of a model against a baseline, asked of a judge (judge.py)."""

    model: str  # the candidate: any model spec
    baseline: str  # the model it is compared with: any model spec
    data: str  # prompts: any supported data file (the instruction and input are the prompt)
    judge: str  # the judge model's name on the server
    output: str
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    prompt: Optional[str] = None  # the judge prompt file; default: prompts/judge.txt
    max_new_tokens: int = 256  # the answers of both local models (greedy)
    batch_size: int = 8  # prompts per generate call
    template: str = "chat"  # chat | alpaca: how a prompt is shown to the local models
    device: str = "auto"
    dtype: str = "auto"
    limit: Optional[int] = None
    concurrency: int = 16
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_tokens: int = 512  # the judge's reply
    temperature: float = 0.0
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    cache_dir: Optional[str] = None
    batch_api: bool = False
    no_wait: bool = False
    poll_interval: float = 30.0
    dry_run: bool = False
    price_in: Optional[float] = None
    price_out: Optional[float] = None
    token_param: str = "auto"
    extra_body: Optional[dict] = None
    format: Optional[str] = None
    split: Optional[str] = None
    turns: str = "first"
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass(kw_only=True)
class StudentConfig:
    """`reflect-tune make-student`: a smaller student cut from a teacher (student.py)."""

    teacher: str
    layers: int
    output: str
    overwrite: bool = False
    trust_remote_code: bool = False


# The names Hugging Face's TrainingArguments use, accepted for ours (YAML keys and flags).
TRAIN_ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                 "gradient_accumulation_steps": "grad_accum", "output_dir": "output", "save_steps": "save_every",
                 "save_total_limit": "keep_checkpoints"}
# Keys that were renamed: a clear pointer instead of "unknown setting".
RENAMED = {TrainConfig: {"temperature": "kd_temperature", "eval_samples": "train_ce_samples"},
           StudentConfig: {"from": "teacher"}}


class SettingError(ReflectTuneError):
    """A setting's value is wrong; `setting` names it, so a caller can point at its line."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def field_types(cls) -> dict[str, Any]:
    """Each field's type, evaluated from the annotations (no annotation strings are edited)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base(kind: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


def type_name(kind: Any) -> str:
    base, _ = _base(kind)
    if typing.get_origin(base) is tuple:
        return "list of strings"
    return getattr(base, "__name__", str(base))


def check_value(cls, name: str, value: Any) -> Any:
    """`value` as field `name` of `cls` takes it (an int for a float, a tuple for a list), or a SettingError."""
    base, optional = _base(field_types(cls)[name])
    if value is None:
        if optional:
            return None
    elif typing.get_origin(base) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, base):
        return value
    wanted = type_name(base)
    raise SettingError(name, f"setting '{name}': expected {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}, got {clip(value)}")


def parse_text(cls, name: str, text: str) -> Any:
    """A setting given as text (an environment variable): a number or a boolean by the field's type."""
    base, _ = _base(field_types(cls)[name])
    if text == "":
        return None
    if base in (int, float, bool):
        try:
            parsed = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError):  # not a number, or one too long to parse: check_value says so
            return text
        return parsed if parsed is not None else text
    return text


def canonical(cls, key: str) -> str:
    """A key as the dataclass spells it: `-` read as `_`, train's Hugging Face names mapped to ours."""
    name = str(key).replace("-", "_")
    return TRAIN_ALIASES.get(name, name) if cls is TrainConfig else name


def check_values(cls, values: dict[str, Any], owned: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` (keys as in YAML or flags; None means "not given") with canonical keys and checked types.

    `owned` keys are set by the caller (a pipeline sets inputs and outputs) and refused in `values`.
    """
    known = field_types(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = canonical(cls, key)
        if name in RENAMED.get(cls, {}):
            raise SettingError(name, f"setting '{key}' is now '{RENAMED[cls][name]}'")
        if name not in known:
            raise SettingError(name, f"setting '{key}': unknown (known: {', '.join(sorted(known))})")
        if name in owned:
            raise SettingError(name, f"setting '{key}': set by the pipeline")
        if name in out:
            raise SettingError(name, f"setting '{key}' is given twice (as '{name}' and an alias of it)")
        if value is not None:
            out[name] = check_value(cls, name, value)
    return out


def from_values(cls, values: dict[str, Any]):
    """A `cls` from `values` (see `check_values`); a required setting that is missing is named."""
    out = check_values(cls, values)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in out
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SettingError(missing[0], f"setting '{missing[0]}': required")
    return cls(**out)


def train_config_file(path: str | Path) -> dict[str, Any]:
    """`train --config FILE`: its settings as a mapping (checked by `from_values` with the flags).
    `lora: true`, `qlora: true` or `full: true` set `method`, like the flags."""
    raw, lines = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ReflectTuneError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = canonical(TrainConfig, key)
        if name in ("lora", "qlora", "full"):
            if value is True:
                out["method"] = name
            continue
        if isinstance(value, str) and name in field_types(TrainConfig) and _base(field_types(TrainConfig)[name])[0] is float:
            try:  # YAML 1.1 reads `1e-4` (no dot) as text
                value = float(value)
            except ValueError:
                pass
        try:
            check_values(TrainConfig, {key: value})
        except SettingError as e:
            raise ReflectTuneError(f"{path}:{lines.get(name, lines.get(str(key), 1))}: {e}") from None
        out[name] = value
    return out


@dataclass(kw_only=True)
class TeacherLogitsConfig:
    """`reflect-tune teacher-logits`: the teacher's top-k log-probabilities on every response token of
    the training examples, computed once and stored for `train --teacher-logits` (teacher_logits.py).

    The data settings are train's and mean the same (the examples are tokenized by train's own code),
    so a user passes the flags given to train."""

    data: str = ""
    output: str = ""
    teacher: str = ""  # a model spec; with teacher_url, the model's name on that server
    model: Optional[str] = None  # the student: its tokenizer renders the examples (default: the teacher's)
    top_k: int = 64
    logprob_dtype: str = "float16"  # how the log-probs are stored: float16 (half the bytes) | float32 (exact)
    template: str = "chat"  # chat | alpaca, as train
    max_length: int = 1024  # as train
    format: Optional[str] = None
    split: Optional[str] = None
    turns: str = "first"
    eval_data: Optional[str] = None  # held-out records are cached too, so train's held-out KD term can use them
    eval_split: float = 0.0
    seed: int = 42  # the eval_split draw, as train
    teacher_url: Optional[str] = None  # an OpenAI-compatible server with prompt_logprobs (vLLM); None: in process
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8  # requests in flight to teacher_url
    timeout: float = 300.0
    max_retries: int = 6
    dtype: str = "auto"  # the teacher's weights: auto (bf16 on a CUDA GPU that has it, else fp32) | float32 | bfloat16 | float16
    device: str = "auto"
    batch_tokens: Optional[int] = None  # padded tokens per teacher forward (default: 4096 CPU, 32768 GPU)
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
