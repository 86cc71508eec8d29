"""The `train` stage: instruction tuning (full, LoRA, QLoRA) with optional white-box logit KD.

The loop is written out, torchtune-style:

    records -> (input_ids, targets) per example, loss on response tokens only
            -> per-epoch shuffled micro-batches (optionally packed, one block-diagonal
               causal mask per row via restarting position_ids)
            -> optimizer steps of `world × grad_accum` micro-batches; every micro-batch loss is
               a token *sum* divided by the step's total token count, so accumulation and data
               parallelism give the gradient of the mean over the step's tokens
            -> AdamW, cosine schedule with warmup, gradient clipping
            -> checkpoints (weights, optimizer, scheduler, RNG, data position), final HF save.

`targets` are aligned with the inputs (`targets[t]` is the token after `input_ids[t]`), so a
packed row never asks one sequence to predict the next one. With a teacher the loss is
`(1 − kd_ratio)·CE + kd_ratio·T²·D(teacher^T ‖ student^T)` from `reflect_tune.losses`,
memory-lean (chunked from final hidden states) by default. The output folder is described in
docs/FORMATS.md §8.4.
"""

from __future__ import annotations

import csv
from contextlib import contextmanager, nullcontext
import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from reflect_tune.artifacts import (
    append_durably,
    atomic_path,
    atomic_write_text,
    check_output_folder,
    claim_folder,
    clear_folder,
    exclusive,
    fix_modes,
    lock_beside,
    owned_by,
    provenance,
    read_marker,
    write_failure,
    write_meta,
)
from reflect_tune.checkpoint import (
    CorruptCheckpoint,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    set_aside,
)
from reflect_tune.config import load_yaml
from reflect_tune.data import load_records
from reflect_tune.errors import DataError, ModelError, ReflectTuneError, clip
from reflect_tune.losses import IGNORE_INDEX, KD_LOSSES, chunked_distill_loss, naive_distill_loss
from reflect_tune.models import load_model, load_tokenizer, resolve_model
from reflect_tune.templates import alpaca_prompt

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "full")
TEMPLATES = ("chat", "alpaca")
# Changing these between a checkpoint and `--resume` is allowed; anything else must match.
_RESUME_FREE = {"resume", "save_every", "keep_checkpoints", "progress", "overwrite", "merge", "eval_samples"}
LOG_FIELDS = ["step", "epoch", "tokens", "loss", "ce_loss", "kd_loss", "lr", "grad_norm", "tokens_per_s", "wall_s"]
# what train writes at the top of its output folder besides the model and tokenizer files (which
# save_final notes in the folder's marker): `--overwrite` removes these and nothing foreign
OUTPUT_NAMES = ("checkpoints", "train_log.csv", "eval_before.json", "loss.png", "train_config.yaml", "meta.json",
                "merged", ".final.tmp", ".merged.tmp")


@dataclass
class TrainConfig:
    """Every setting of a training run. YAML keys and CLI flags share these names (`-` or `_`)."""

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
    kd_ratio: float = 0.5
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
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
    eval_samples: int = 32  # CE on the first N examples before and after training (meta.json); 0: off
    format: Optional[str] = None
    split: Optional[str] = None
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True


# ----------------------------------------------------------------------------- config


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config: a mapping whose keys are TrainConfig fields (`kd-ratio` or `kd_ratio`).
    Duplicate keys, alias bombs and unreadable files are refused with FILE:LINE (config.load_yaml)."""
    raw, lines = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ReflectTuneError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in METHODS:  # `lora: true` / `full: true`, like the flags
            if value is True:
                out["method"] = name
            continue
        if name not in known:
            where = f"{path}:{lines[name]}" if name in lines else str(path)
            raise ReflectTuneError(f"{where}: key {clip(str(key))}: unknown setting (known: {', '.join(sorted(known))})")
        if isinstance(value, str) and "float" in known[name]:  # YAML 1.1 reads `1e-4` (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        out[name] = value
    return out


def setting_type(hint: str) -> str:
    """A config dataclass field's type text without its optionality: 'Optional[int]' / 'int | None' -> 'int'."""
    return hint.replace("Optional[", "").replace(" | None", "").rstrip("]").strip()


def fits_type(value: Any, base: str) -> bool:
    """Whether a YAML value suits a setting of type `base` (int, float, bool, str; others are not checked)."""
    return {"int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(base, True)


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < flags (an override of None means "not given"), then validated."""
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for name, value in values.items():
        want = setting_type(types[name])
        if not fits_type(value, want) and not (value is None and types[name].startswith("Optional")):
            raise ReflectTuneError(f"setting '{name}': expected {want}, got {clip(value)}")
        if want == "float" and value is not None:
            values[name] = float(value)
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """One line naming the first bad setting."""
    choices = {"method": METHODS, "template": TEMPLATES, "kd_loss": KD_LOSSES, "kd_impl": ("chunked", "naive"),
               "mixed_precision": ("auto", "no", "bf16", "fp16")}
    checks = [(n, "required", not getattr(cfg, n)) for n in ("data", "output", "model")]
    checks += [(n, f"{getattr(cfg, n)!r} is not one of {', '.join(c)}", getattr(cfg, n) not in c) for n, c in choices.items()]
    checks += [(n, "must be at least 1", getattr(cfg, n) < 1) for n in ("epochs", "batch_size", "grad_accum", "lora_r", "keep_checkpoints")]
    checks += [(n, "must be between 0 and 1", not 0.0 <= getattr(cfg, n) <= 1.0)
               for n in ("kd_ratio", "beta", "skew_alpha", "warmup_ratio", "lora_dropout")]
    checks += [("max_length", "must be at least 2", cfg.max_length < 2), ("save_every", "must be >= 0", cfg.save_every < 0),
               ("eval_samples", "must be >= 0", cfg.eval_samples < 0),
               ("max_steps", "must be at least 1", cfg.max_steps is not None and cfg.max_steps < 1),
               ("temperature", "must be > 0", not cfg.temperature > 0), ("lr", "must be > 0", cfg.lr is not None and not cfg.lr > 0),
               ("merge", "only for --lora/--qlora (a full fine-tune is already a whole model)", cfg.merge and cfg.method == "full")]
    for name, why, failed in checks:
        if failed:
            raise ReflectTuneError(f"setting '{name}': {why}")


def _is_train_folder(out: Path) -> bool:
    """A folder this stage wrote: its marker, or (written before markers existed) its checkpoints or log."""
    if owned_by(out, "train"):
        return True
    return read_marker(out) is None and any((out / n).exists() for n in ("checkpoints", "eval_before.json", "train_log.csv"))


def explain_empty_selection(data: str) -> None:
    """An empty selected.jsonl: say that `select` kept nothing, and why, instead of "empty file"."""
    p = Path(data)
    try:
        if not p.is_file() or p.stat().st_size > 0:
            return
        meta = json.loads(p.with_name(p.name + ".meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    s = meta.get("summary") if isinstance(meta, dict) and meta.get("stage") == "select" else None
    if not isinstance(s, dict):
        return
    drops = sorted(((v, k) for k, v in (s.get("decisions") or {}).items() if k.startswith("dropped") and v), reverse=True)
    why = ", ".join(f"{k.removeprefix('dropped_')} {v}" for v, k in drops) or "no candidate was scored"
    raise DataError(f"{p}: select kept 0 of {s.get('records')} records (dropped: {why}), so there is nothing to "
                    "train on; see its report, then loosen the selection (e.g. --missing-response keep, a larger "
                    "--top) or use a stronger student to score")


def resolved_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else (2e-5 if cfg.method == "full" else 2e-4)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(cfg), "lr": resolved_lr(cfg)}


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]  # aligned with input_ids: the next token, or IGNORE_INDEX


def render(rec, tok, template: str) -> tuple[str, str]:
    """(prompt, completion) text for one record; the loss covers the completion only."""
    if template == "alpaca":  # a record's system prompt replaces the Alpaca preamble
        prompt = alpaca_prompt(rec.instruction, rec.input, preamble=rec.system or None) + "\n"
        return prompt, rec.output + (tok.eos_token or "")
    messages = ([{"role": "system", "content": rec.system}] if rec.system else []) + [
        {"role": "user", "content": rec.instruction_text}, {"role": "assistant", "content": rec.output}]
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ModelError("the tokenizer's chat template does not render the prompt as a prefix of the "
                         "conversation, so response tokens cannot be found; use --template alpaca")
    return prompt, full[len(prompt):]


def build_examples(records, tok, cfg: TrainConfig) -> tuple[list[Example], dict[str, int]]:
    """Tokenize every record (response-only targets), cut at max_length; count what was cut."""
    if cfg.template == "chat" and not getattr(tok, "chat_template", None):
        raise ModelError(f"{cfg.model}: the tokenizer has no chat template; use --template alpaca")
    pairs = [render(r, tok, cfg.template) for r in records]
    add_special = cfg.template == "alpaca"  # a chat template writes its own BOS, if any
    prompts = tok([p for p, _ in pairs], add_special_tokens=add_special)["input_ids"]
    answers = tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    examples, stats = [], {"examples": 0, "truncated": 0, "skipped_no_response": 0, "target_tokens": 0}
    for rec, p, a in zip(records, prompts, answers):
        ids, labels = p + a, [IGNORE_INDEX] * len(p) + a
        if len(ids) > cfg.max_length:
            stats["truncated"] += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        targets = labels[1:] + [IGNORE_INDEX]
        n = sum(t != IGNORE_INDEX for t in targets)
        if n == 0:
            stats["skipped_no_response"] += 1
            continue
        examples.append(Example(ids, targets))
        stats["target_tokens"] += n
    stats["examples"] = len(examples)
    if not examples:
        raise DataError(f"{cfg.data}: no example keeps a response token within --max-length {cfg.max_length}")
    return examples, stats


def epoch_micro_batches(examples: list[Example], cfg: TrainConfig, epoch: int) -> list[list[list[int]]]:
    """The epoch's micro-batches: lists of rows, each row a list of example indices (one unless packed)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    if cfg.packing:
        rows, row, used = [], [], 0
        for i in order:
            n = len(examples[i].input_ids)
            if row and used + n > cfg.max_length:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        rows.append(row)
    else:
        rows = [[i] for i in order]
    return [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> dict[str, Any]:
    """Right-padded tensors. Packed rows restart position_ids per sequence and pass no
    attention mask, which transformers turns into a block-diagonal causal mask."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            tgt[r, at : at + n] = torch.tensor(e.targets)
            pos[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding forms its own block
    batch = {"input_ids": ids, "targets": tgt, "tokens": int((tgt != IGNORE_INDEX).sum())}
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    return batch


# ----------------------------------------------------------------------------- models and loss


class StudentLM(torch.nn.Module):
    """Wraps the student so that DDP sees one forward returning final hidden states or logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, position_ids=None, hidden: bool = True):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return final_hidden(self.lm, **inputs) if hidden else self.lm(**inputs, use_cache=False).logits


def final_hidden(model, **inputs) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm), without computing any logits."""
    return model.get_decoder()(**inputs, use_cache=False).last_hidden_state


def _head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def lean_path_ok(model) -> bool:
    """The chunked loss rebuilds logits as final hidden state @ output weight.T: check that on a probe
    (a model with a logit scale, soft-capping, a bias or an unnormed last hidden state fails it)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    ids = torch.tensor([[1, 2, 3]], device=head.weight.device)
    try:
        with torch.no_grad():
            rebuilt = final_hidden(model, input_ids=ids)[:, -1:].to(head.weight.dtype) @ head.weight.T
            logits = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
    except Exception:  # a decoder that does not take these arguments: use full logits
        return False
    tol = 1e-3 if head.weight.dtype == torch.float32 else 3e-2
    return rebuilt.shape == logits.shape and torch.allclose(rebuilt.float(), logits.float(), rtol=tol, atol=tol)


@dataclass
class LossSetup:
    vocab_size: int
    teacher: Any = None
    lean: bool = True
    kd_ratio: float = 0.5
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    chunk_size: Optional[int] = None


def micro_batch_loss(student: torch.nn.Module, head: torch.Tensor, batch: dict, setup: LossSetup):
    """Token *sums* of (total, ce, kd) for one micro-batch; `student` is a (maybe DDP-wrapped) StudentLM."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    targets = batch["targets"]
    kd = dict(kd_ratio=setup.kd_ratio, kd_loss=setup.kd_loss, temperature=setup.temperature, beta=setup.beta,
              alpha=setup.alpha, vocab_size=setup.vocab_size, reduction="sum")
    t_out = w_t = None
    if setup.teacher is not None:
        with torch.no_grad():  # frozen teacher: only its final hidden state (lean) or its logits
            t_out = final_hidden(setup.teacher, **inputs) if setup.lean else setup.teacher(**inputs, use_cache=False).logits
        w_t = _head_weight(setup.teacher)
        t_out = t_out.to(w_t.dtype) if setup.lean and t_out.dtype != w_t.dtype else t_out
    if setup.lean:
        h_s = student(**inputs, hidden=True)
        return chunked_distill_loss(h_s, head.to(h_s.dtype) if head.dtype != h_s.dtype else head, targets, t_out, w_t,
                                    chunk_size=setup.chunk_size, **kd)
    return naive_distill_loss(student(**inputs, hidden=False), targets, t_out, **kd)


def accumulate_gradients(student, head, micro_batches: list[dict], setup: LossSetup, total_tokens: int,
                         world_size: int = 1, accelerator=None) -> dict[str, float]:
    """Backward over one step's micro-batches of this rank. Each loss is a token sum over
    `total_tokens` (the step's count over all ranks) times `world_size` (DDP averages), so the
    summed gradient is that of the mean loss over every token of the step."""
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    scale = world_size / max(total_tokens, 1)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = nullcontext() if (last or accelerator is None) else accelerator.no_sync(student)
        with sync:
            out = micro_batch_loss(student, head, batch, setup)
            loss = out.loss * scale
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        sums["loss"] += float(out.loss.detach())
        sums["ce"] += float(out.ce)
        sums["kd"] += float(out.kd)
    return sums


def check_tokenizers(student_tok, teacher_tok, student: str, teacher: str) -> None:
    """Logit KD needs one vocabulary: the same token -> id map (padding rows may differ)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    diff = next((t for t in sorted(sv) if tv.get(t) != sv[t]), None) or next(t for t in sorted(tv) if t not in sv)
    raise ModelError(
        f"teacher {teacher} and student {student} use different tokenizers ({len(tv)} vs {len(sv)} tokens; "
        f"token {diff!r} is id {tv.get(diff)} vs {sv.get(diff)}); logit distillation needs a shared tokenizer"
    )


def load_student(cfg: TrainConfig, device: torch.device):
    resolved = resolve_model(cfg.model)
    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise ReflectTuneError("--qlora needs a CUDA GPU (4-bit bitsandbytes); none found here. Use --lora instead")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ReflectTuneError("--qlora needs the bitsandbytes package: pip install bitsandbytes")
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        try:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, quantization_config=quant, dtype=torch.bfloat16,
                                                         device_map={"": device.index or 0}, use_safetensors=True,
                                                         trust_remote_code=cfg.trust_remote_code)
        except Exception as e:
            raise ModelError(f"{cfg.model}: cannot load in 4 bits: {str(e).splitlines()[0] if str(e) else e}") from None
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = load_model(resolved, dtype="float32", device=str(device), trust_remote_code=cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.method == "lora":
                model.enable_input_require_grads()
    model.config.use_cache = False
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=target, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise ReflectTuneError(f"setting 'lora_target': {str(e).splitlines()[0]}") from None
    return model.train()


# ----------------------------------------------------------------------------- checkpoints


def check_resume_config(ckpt: Path, cfg: TrainConfig, saved: dict) -> None:
    """Resuming with other settings would silently train something else: refuse, naming one."""
    now = config_dict(cfg)
    changed = [k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ReflectTuneError(f"{ckpt}: cannot resume: setting '{k}' was {clip(saved.get(k))}, now {clip(now[k])} "
                               f"({len(changed)} setting(s) differ); use the same settings or a new --output")


# ----------------------------------------------------------------------------- outputs


def _append_log(path: Path, rows: list[dict], keep_until: Optional[int] = None) -> None:
    """Append rows to train_log.csv; `keep_until` first drops rows after that step (a resume).

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
                            old.append(r)
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


def plot_losses(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = (("loss", "loss"), ("ce_loss", "CE"), ("kd_loss", "KD (T²·D)")) if rows and rows[0]["kd_loss"] else (("loss", "loss"),)
    for key, label in keys:
        ax.plot([int(r["step"]) for r in rows], [float(r[key]) for r in rows], label=label)
    ax.set(xlabel="optimizer step", ylabel="loss per target token", title="reflect-tune train")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_final(out: Path, model, tok, cfg: TrainConfig, meta: dict, accelerator) -> None:
    """The HF model (or adapter), tokenizer, config, log plot and provenance in OUTDIR."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        accelerator.unwrap_model(model).lm.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        fix_modes(tmp)  # safetensors writes 0600; the other outputs are 0644 under the usual umask
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written model is left behind
        if write_failure(e) is None:
            raise
        raise ReflectTuneError(f"{out}: cannot write the trained model: {write_failure(e, out)}; the checkpoints are "
                               "intact (continue with --resume once there is room)") from None
    claim_folder(out, "train", [f.name for f in tmp.iterdir()])
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    atomic_write_text(out / "train_config.yaml", yaml.safe_dump(meta["config"], sort_keys=False))
    if (out / "train_log.csv").is_file():
        plot_losses(out / "train_log.csv", out / "loss.png")
    if cfg.merge:
        merge_adapter(out, cfg, tok, meta)
    write_meta(out, meta)


def merge_adapter(out: Path, cfg: TrainConfig, tok, meta: dict) -> Path:
    """OUTDIR/merged: the base model reloaded unquantized with the adapter folded in."""
    from peft import PeftModel

    base = load_model(cfg.model, dtype="auto", device="cpu" if not torch.cuda.is_available() else "auto",
                      trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    tmp, final = out / ".merged.tmp", out / "merged"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        fix_modes(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if write_failure(e) is None:
            raise
        raise ReflectTuneError(f"{final}: cannot write the merged model: {write_failure(e, out)}") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_meta(final, {**meta, "merged_from": str(out)})
    return final


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What the loop needs, built once by `_setup`."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    tok: Any
    examples: list
    plan: list  # per epoch, its micro-batches
    model: Any  # the prepared (maybe DDP-wrapped) StudentLM
    head: torch.Tensor
    optimizer: Any
    scheduler: Any
    setup: LossSetup
    params: list
    total_steps: int
    meta: dict


def _setup(cfg: TrainConfig) -> _Run:
    from accelerate import Accelerator

    validate_config(cfg)
    out = Path(cfg.output)
    # everything cheap is checked before any weights load: the output folder first
    check_output_folder(out, [cfg.data, cfg.model, cfg.teacher])  # not a file, holds no input, writable
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not (cfg.resume or cfg.overwrite):
        raise ReflectTuneError(f"{out}: not empty; pass --resume to continue its run, --overwrite to replace it, "
                               "or choose a new --output")
    if nonempty and cfg.resume and not cfg.overwrite and not _is_train_folder(out):
        raise ReflectTuneError(f"{out}: not a folder that reflect-tune train wrote; --resume continues only a train "
                               "run's own folder. Choose a new --output")
    if cfg.resume and not cfg.overwrite and (out / "meta.json").is_file() and latest_checkpoint(out) is None:
        raise ReflectTuneError(f"{out}: holds a finished run and no checkpoint to resume from; pass --overwrite to train again")
    if nonempty and cfg.overwrite and not cfg.resume:
        clear_folder(out, "train", OUTPUT_NAMES, check_only=True)  # refuses a foreign folder before any work
    explain_empty_selection(cfg.data)
    records, report = load_records(cfg.data, format=cfg.format, split=cfg.split, on_duplicate="keep", on_empty="drop")
    for line in report.warnings():
        log.warning("warning: %s", line)
    student = resolve_model(cfg.model)
    tok = load_tokenizer(student, trust_remote_code=cfg.trust_remote_code)
    if cfg.teacher:
        check_tokenizers(tok, load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code), cfg.model, cfg.teacher)
    examples, data_stats = build_examples(records, tok, cfg)

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    if cfg.overwrite and not cfg.resume and accelerator.is_main_process and out.is_dir():
        clear_folder(out, "train", OUTPUT_NAMES)  # only what train wrote there
    if accelerator.is_main_process:
        claim_folder(out, "train")
    accelerator.wait_for_everyone()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model = load_student(cfg, accelerator.device)
    vocab, rows = len(tok), _head_weight(model).shape[0]
    if rows < vocab:
        raise ModelError(f"{cfg.model}: {rows} output rows, fewer than the tokenizer's {vocab} tokens")
    teacher = None
    if cfg.teacher:
        # frozen, eval mode, no grad; bf16 when training in bf16 (or as `teacher_dtype` says)
        dtype = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else ("bfloat16" if mp == "bf16" else "auto")
        teacher = load_model(cfg.teacher, dtype=dtype, device=str(accelerator.device), trust_remote_code=cfg.trust_remote_code)
        teacher.eval().requires_grad_(False)
        t_rows = _head_weight(teacher).shape[0]
        if t_rows < vocab:
            raise ModelError(f"teacher {cfg.teacher}: {t_rows} output rows, fewer than the tokenizer's {vocab} tokens")
        if t_rows != rows:
            log.info("vocabulary padding differs (student %d, teacher %d rows); using the tokenizer's %d", rows, t_rows, vocab)
    # the chunked loss reads the output weight outside forward: whole weights only (not FSDP / ZeRO-3 shards)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = accelerator.distributed_type.name == "FSDP" or getattr(ds, "zero_stage", 0) == 3
    lean = cfg.kd_impl == "chunked" and not sharded and lean_path_ok(model) and (teacher is None or lean_path_ok(teacher))
    if cfg.kd_impl == "chunked" and not lean:
        log.warning("warning: sharded weights or an output layer that is not a plain linear map; using full logits")

    plan = [epoch_micro_batches(examples, cfg, e) for e in range(cfg.epochs)]
    steps = sum(math.ceil(len(mbs) / (accelerator.num_processes * cfg.grad_accum)) for mbs in plan)
    total_steps = steps if cfg.max_steps is None else min(cfg.max_steps, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=resolved_lr(cfg), weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, warmup, total_steps))
    wrapped, optimizer = accelerator.prepare(StudentLM(model), optimizer)
    config = config_dict(cfg)
    teacher_path = resolve_model(cfg.teacher).path if cfg.teacher else None  # cached after the first resolve
    meta = provenance("train", config, inputs=[p for p in (cfg.data, student.path, teacher_path) if p and Path(p).exists()])
    meta.update(data=data_stats, load_report=report.__dict__)  # meta["config"]: the config, redacted
    return _Run(cfg, out, accelerator, tok, examples, plan, wrapped, _head_weight(accelerator.unwrap_model(wrapped).lm),
                optimizer, scheduler, LossSetup(vocab, teacher, lean, cfg.kd_ratio, cfg.kd_loss, cfg.temperature, cfg.beta,
                                                           cfg.skew_alpha, cfg.kd_chunk_size), params, total_steps, meta)


def _optimizer_step(run: _Run, group_mbs: list) -> tuple[dict, int, int]:
    """One optimizer step over a group of micro-batches (all ranks'); returns (sums, tokens, samples)."""
    acc, world = run.accelerator, run.accelerator.num_processes
    pad_id = run.tok.pad_token_id if run.tok.pad_token_id is not None else 0
    batches = [collate([[run.examples[i] for i in row] for row in mb], pad_id, run.cfg.packing) for mb in group_mbs]
    step_tokens = sum(b["tokens"] for b in batches)
    mine = batches[acc.process_index :: world]
    while len(mine) < math.ceil(len(batches) / world):  # a short last step: this rank adds a no-op
        mine.append({**batches[0], "targets": torch.full_like(batches[0]["targets"], IGNORE_INDEX), "tokens": 0})
    mine = [{k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in mine]
    with acc.autocast():
        sums = accumulate_gradients(run.model, run.head, mine, run.setup, step_tokens, world, acc)
    totals = acc.reduce(torch.tensor([sums["loss"], sums["ce"], sums["kd"]], dtype=torch.float64, device=acc.device), "sum")
    sums = dict(zip(("loss", "ce", "kd"), (float(x) / max(step_tokens, 1) for x in totals.tolist())))
    norm = acc.clip_grad_norm_(run.params, run.cfg.max_grad_norm)  # None where DeepSpeed clips itself
    sums["grad_norm"] = float(norm) if norm is not None else math.nan
    sums["lr"] = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, step_tokens, sum(len(row) for mb in group_mbs for row in mb)


def eval_loss(run: _Run) -> float | None:
    """Mean response-token cross-entropy of the model on the first `eval_samples` examples (the
    same ones before and after training; no teacher term), or None when switched off."""
    n = min(run.cfg.eval_samples, len(run.examples))
    if n == 0:
        return None
    acc = run.accelerator
    pad_id = run.tok.pad_token_id if run.tok.pad_token_id is not None else 0
    ce_setup = dataclasses.replace(run.setup, teacher=None, kd_ratio=0.0)
    total = tokens = 0.0
    run.model.eval()
    with torch.no_grad(), acc.autocast():
        for i in range(0, n, run.cfg.batch_size):  # unpacked, so every example is scored on its own
            batch = collate([[e] for e in run.examples[i : min(i + run.cfg.batch_size, n)]], pad_id, packed=False)
            batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            total += float(micro_batch_loss(run.model, run.head, batch, ce_setup).ce)
            tokens += batch["tokens"]
    run.model.train()
    return round(total / max(tokens, 1), 6)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training described by `cfg`; returns a summary (also stored in OUTDIR/meta.json)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is enough
    validate_config(cfg)
    if os.environ.get("RANK", "0") != "0":  # one lock per run: the main process holds it
        return _train(cfg)
    with exclusive(lock_beside(cfg.output), f"{cfg.output}"):  # two trainings into one folder would mix
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    run = _setup(cfg)
    acc, out, main = run.accelerator, run.out, run.accelerator.is_main_process
    with _writes_checked(out):  # a failed write (disk full, read-only) is one line; checkpoints stay intact
        group = acc.num_processes * cfg.grad_accum
        step = tokens_seen = samples_seen = start_epoch = start_mb = 0
        resumed_from = None
        if cfg.resume:
            state, ckpt = resume_state(run)
            if ckpt is None:
                log.warning("warning: %s: no checkpoint to resume from; starting from scratch", out)
            else:
                step, tokens_seen, samples_seen = state["step"], state["tokens_seen"], state["samples_seen"]
                start_epoch, start_mb = state["data_position"]["epoch"], state["data_position"]["micro_batch"]
                resumed_from = str(ckpt)
                log.info("resuming from %s (step %d of %d)", ckpt, step, run.total_steps)
        log_path, eval_path = out / "train_log.csv", out / "eval_before.json"
        if main:
            _append_log(log_path, [], keep_until=step)
        if resumed_from and eval_path.is_file():  # measured before the first step of the run being resumed
            loss_before = json.loads(eval_path.read_text())["loss"]
        else:
            loss_before = eval_loss(run) if step == 0 else None
            if main:
                atomic_write_text(eval_path, json.dumps({"loss": loss_before, "examples": min(cfg.eval_samples, len(run.examples))}))
        progress = Progress(TextColumn("[bold]train[/bold]"), BarColumn(), TaskProgressColumn(),
                            TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not (main and cfg.progress))
        run_start, run_tokens, last = time.time(), 0, {}
        with progress:
            task = progress.add_task("train", total=run.total_steps, completed=step, loss="-", tps="-")
            for epoch in range(start_epoch, cfg.epochs):
                mbs = run.plan[epoch]
                for g0 in range(start_mb if epoch == start_epoch else 0, len(mbs), group):
                    if step >= run.total_steps:
                        break
                    t0 = time.time()
                    sums, step_tokens, n_samples = _optimizer_step(run, mbs[g0 : g0 + group])
                    step, tokens_seen, samples_seen = step + 1, tokens_seen + step_tokens, samples_seen + n_samples
                    run_tokens += step_tokens
                    tps = run_tokens / max(time.time() - run_start, 1e-9)
                    last = {"step": step, "epoch": round(epoch + min(g0 + group, len(mbs)) / len(mbs), 4), "tokens": tokens_seen,
                            "loss": f"{sums['loss']:.6f}", "ce_loss": f"{sums['ce']:.6f}",
                            "kd_loss": f"{sums['kd']:.6f}" if cfg.teacher else "", "lr": f"{sums['lr']:.6g}",
                            "grad_norm": f"{sums['grad_norm']:.6f}", "tokens_per_s": f"{tps:.1f}", "wall_s": f"{time.time() - t0:.3f}"}
                    if main:
                        _append_log(log_path, [last])
                    progress.update(task, completed=step, loss=f"{sums['loss']:.4f}", tps=f"{tps:,.0f}")
                    if cfg.save_every and step % cfg.save_every == 0 and step < run.total_steps:
                        nxt = g0 + group
                        position = {"epoch": epoch, "micro_batch": nxt} if nxt < len(mbs) else {"epoch": epoch + 1, "micro_batch": 0}
                        save_checkpoint(out, step, run.model, run.optimizer, run.scheduler,
                                        {"step": step, "epoch": epoch, "samples_seen": samples_seen, "tokens_seen": tokens_seen,
                                         "data_position": position, "world_size": acc.num_processes, "config": run.meta["config"]},
                                        acc, cfg.keep_checkpoints)
        summary = {"steps": step, "total_steps": run.total_steps, "tokens_seen": tokens_seen, "samples_seen": samples_seen,
                   "final_loss": float(last["loss"]) if last else None, "loss_before": loss_before, "loss_after": eval_loss(run),
                   "eval_examples": min(cfg.eval_samples, len(run.examples)), "vocab_size": run.setup.vocab_size,
                   "world_size": acc.num_processes, "lean_loss": run.setup.lean, "resumed_from": resumed_from,
                   "wall_s": round(time.time() - run_start, 1)}
        run.meta["result"] = summary
        if main:
            save_final(out, run.model, run.tok, cfg, run.meta, acc)
        acc.wait_for_everyone()
        return {**summary, "is_main": main}


@contextmanager
def _writes_checked(out: Path):
    try:
        yield
    except OSError as e:
        raise ReflectTuneError(f"{e.filename or out}: cannot write: {e.strerror or e}; the finished checkpoints in "
                               f"{out / 'checkpoints'} are intact (continue with --resume once there is room)") from None


def resume_state(run: _Run) -> tuple[dict, Optional[Path]]:
    """Load the newest checkpoint that reads back whole; a damaged one is set aside with a warning.
    Returns (trainer_state, checkpoint), or ({}, None) when the folder has none."""
    found, bad = checkpoints(run.out), []
    for ckpt in found:
        try:
            files = read_checkpoint(ckpt, run.cfg.method == "full", run.accelerator)
            check_resume_config(ckpt, run.cfg, files["config"])
            state = load_checkpoint(ckpt, files, run.model, run.optimizer, run.scheduler, run.cfg.method == "full",
                                    run.accelerator)
        except CorruptCheckpoint as e:
            bad.append(f"{ckpt.name}: {e}")
            run.accelerator.wait_for_everyone()
            if run.accelerator.is_main_process:
                moved = set_aside(ckpt)
                log.warning("warning: %s cannot be read back (%s); moved it to %s and trying the one before", ckpt, e, moved.name)
            continue
        if bad:
            log.warning("warning: resuming from %s, the newest checkpoint that loads", ckpt)
        return state, ckpt
    if bad:
        raise ReflectTuneError(f"{run.out}: no checkpoint loads ({'; '.join(bad)}); pass --overwrite to train from the start")
    return {}, None


def _cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
