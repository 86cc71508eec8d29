"""The `train` stage: instruction tuning (full, LoRA, QLoRA) with optional white-box logit KD.

`run(cfg)` is the recipe, written out top to bottom in the manner of torchtune's recipes:

    records -> (input_ids, targets) per example, loss on response tokens only
            -> per-epoch shuffled micro-batches (optionally packed, one block-diagonal
               causal mask per row via restarting position_ids)
            -> for each optimizer step of `world × grad_accum` micro-batches: forward, loss,
               backward per micro-batch (each loss a token *sum* divided by the step's total token
               count, so accumulation and data parallelism give the gradient of the mean over the
               step's tokens), then clip, AdamW step, cosine schedule, log, checkpoint
               (and every `eval_every` steps the held-out loss)
            -> the held-out loss at the end, the final HF save.

Held-out records (`eval_data`, or the `eval_split` fraction of the data, split by id) are never
trained on; their response-token CE and KD term are measured at step 0, every `eval_every` steps
and at the end (train_log.py). The helpers it calls build things (examples, models, batches, the
loss) and write things (checkpoints, the log, the final folder); the loop itself is in `run`. `targets` are aligned with
the inputs (`targets[t]` is the token after `input_ids[t]`), so a packed row never asks one
sequence to predict the next one. With a teacher the loss is
`(1 − kd_ratio)·CE + kd_ratio·T²·D(teacher^T ‖ student^T)` from `reflect_tune.losses`, memory-lean
(chunked from final hidden states) by default. The output folder: docs/FORMATS.md §8.4.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from reflect_tune.artifacts import (
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
from reflect_tune.config import SettingError, TrainConfig
from reflect_tune.errors import DataError, ModelError, ReflectTuneError, clip
from reflect_tune.losses import (IGNORE_INDEX, KD_LOSSES, chunked_distill_loss, chunked_sparse_distill_loss, naive_distill_loss,
                                 naive_sparse_distill_loss)
from reflect_tune.models import load_model, load_tokenizer, resolve_model
from reflect_tune.progress import Progress
from reflect_tune.records import TURN_POLICIES, load_records
from reflect_tune.logit_cache import batch_top_k, check_cache, check_examples, open_cache
from reflect_tune.templates import alpaca_prompt
from reflect_tune.tracking import check_report_to, open_tracker
from reflect_tune.train_log import (append_log, peak_memory, reset_peak_memory, eval_row, held_out, heldout_records, heldout_start, heldout_summary,
                                    plot_losses, tracker_metrics, train_row)

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "full")
TEMPLATES = ("chat", "alpaca")
# Changing these between a checkpoint and `--resume` is allowed; anything else must match.
_RESUME_FREE = {"resume", "save_every", "keep_checkpoints", "progress", "overwrite", "merge", "train_ce_samples",
                "eval_every", "eval_batch_size", "report_to", "run_name"}
# what train writes at the top of its output folder besides the model and tokenizer files (which
# save_final notes in the folder's marker): `--overwrite` removes these and nothing foreign
OUTPUT_NAMES = ("checkpoints", "train_log.csv", "train_ce_before.json", "eval_before.json", "loss.png", "train_config.yaml",
                "meta.json", "merged", ".final.tmp", ".merged.tmp", "tensorboard", "trackio", "wandb")


# ----------------------------------------------------------------------------- settings


def validate(cfg: TrainConfig) -> None:
    """Every setting, then the output folder; one line naming the first problem, before any work."""
    choices = {"method": METHODS, "template": TEMPLATES, "kd_loss": KD_LOSSES, "kd_impl": ("chunked", "naive"),
               "mixed_precision": ("auto", "no", "bf16", "fp16"), "turns": TURN_POLICIES}
    checks = [(n, "required", not getattr(cfg, n)) for n in ("data", "output", "model")]
    checks += [(n, f"{clip(getattr(cfg, n))} is not one of {', '.join(c)}", getattr(cfg, n) not in c) for n, c in choices.items()]
    checks += [(n, "must be at least 1", getattr(cfg, n) < 1) for n in ("epochs", "batch_size", "grad_accum", "lora_r", "keep_checkpoints")]
    checks += [(n, "must be between 0 and 1", not 0.0 <= getattr(cfg, n) <= 1.0)
               for n in ("kd_ratio", "beta", "skew_alpha", "warmup_ratio", "lora_dropout")]
    checks += [("max_length", "must be at least 2", cfg.max_length < 2), ("save_every", "must be >= 0", cfg.save_every < 0),
               ("train_ce_samples", "must be >= 0", cfg.train_ce_samples < 0), ("eval_every", "must be >= 0", cfg.eval_every < 0),
               ("eval_split", "must be at least 0 and below 1", not 0.0 <= cfg.eval_split < 1.0),
               ("eval_split", "give eval_data or eval_split, not both", bool(cfg.eval_data) and cfg.eval_split > 0),
               ("eval_every", "needs held-out data: eval_data or eval_split", cfg.eval_every > 0 and not held_out(cfg)),
               ("eval_batch_size", "must be at least 1", cfg.eval_batch_size is not None and cfg.eval_batch_size < 1),
               ("max_steps", "must be at least 1", cfg.max_steps is not None and cfg.max_steps < 1),
               ("kd_temperature", "must be > 0", not cfg.kd_temperature > 0),
               ("lr", "must be > 0", cfg.lr is not None and not cfg.lr > 0),
               ("merge", "only for --lora/--qlora (a full fine-tune is already a whole model)", cfg.merge and cfg.method == "full"),
               ("teacher_logits", "give teacher or teacher_logits, not both", bool(cfg.teacher and cfg.teacher_logits))]
    for name, why, failed in checks:
        if failed:
            raise SettingError(name, f"setting '{name}': {why}")
    check_report_to(cfg.report_to)  # an unknown tracker or its missing package: before any model loads
    if cfg.teacher_logits:
        open_cache(cfg.teacher_logits)  # a folder that is no finished cache: one line now
    out = Path(cfg.output)
    check_output_folder(out, [cfg.data, cfg.model, cfg.teacher, cfg.teacher_logits, cfg.eval_data])  # not a file, holds no input, writable
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


def _is_train_folder(out: Path) -> bool:
    """A folder this stage wrote: its marker, or (written before markers existed) its checkpoints or log."""
    if owned_by(out, "train"):
        return True
    return read_marker(out) is None and any((out / n).exists() for n in ("checkpoints", "train_ce_before.json",
                                                                        "eval_before.json", "train_log.csv"))


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
    id: str = ""  # the record's id (for messages)


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


def build_examples(records, tok, cfg: TrainConfig, source: str = "") -> tuple[list[Example], dict[str, int]]:
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
        examples.append(Example(ids, targets, rec.id))
        stats["target_tokens"] += n
    stats["examples"] = len(examples)
    if not examples:
        raise DataError(f"{source or cfg.data}: no example keeps a response token within --max-length {cfg.max_length}")
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


def collate(rows: list[list[Example]], pad_id: int, packed: bool, cache=None) -> dict[str, Any]:
    """Right-padded tensors. Packed rows restart position_ids per sequence and pass no
    attention mask, which transformers turns into a block-diagonal causal mask. With a teacher-logits
    `cache`, also its top-k at every counted position (`top_ids`, `top_lp`, `tail`; zeros elsewhere)."""
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
    if cache is not None:
        batch.update(batch_top_k(rows, width, cache))
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


@dataclass(kw_only=True)
class LossSetup:
    """What the loss needs besides the batch: the vocabulary, the frozen teacher or a teacher-logits cache
    (neither: CE only), the memory-lean path, and the KD settings."""

    vocab_size: int
    teacher: Any = None
    cache: Any = None  # teacher_logits.TeacherLogitsCache: collate adds its top-k to each batch
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
    if "top_ids" in batch:  # a teacher-logits cache: the KD term on its top-k support plus the tail bucket
        sparse = (batch["top_ids"], batch["top_lp"], batch["tail"])
        if setup.lean:
            h_s = student(**inputs, hidden=True)
            return chunked_sparse_distill_loss(h_s, head.to(h_s.dtype) if head.dtype != h_s.dtype else head, targets, *sparse,
                                               chunk_size=setup.chunk_size, **kd)
        return naive_sparse_distill_loss(student(**inputs, hidden=False), targets, *sparse, **kd)
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


def measure(model, head: torch.Tensor, examples: list, batch_size: int, pad_id: int, setup: Any, acc) -> dict | None:
    """Response-token CE (and, with `setup.teacher`, the KD term T²·D, computed as training does) of the
    model on `examples`, each scored on its own (unpacked). {ce, kd, tokens, examples}, or None for none.

    Every process scores its share and the token *sums* are added over processes before dividing,
    so the numbers are those of one process. Each process runs the same number of forwards (a
    process short of examples runs one with no targets), as DDP and FSDP need. The model is put in
    eval mode, without gradients, and the RNG state is restored after, so training is not changed.
    """
    if not examples:
        return None
    world, rank = acc.num_processes, acc.process_index
    rounds = math.ceil(len(examples) / (batch_size * world))
    sums = torch.zeros(3, dtype=torch.float64)
    was_training = model.training
    cuda = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), acc.autocast():
        model.eval()
        try:
            for k in range(rounds):
                lo = (k * world + rank) * batch_size
                part = examples[lo : lo + batch_size]
                batch = collate([[e] for e in (part or examples[:1])], pad_id, packed=False, cache=setup.cache)
                if not part:  # nothing left for this process: a forward that counts no token
                    batch.update(targets=torch.full_like(batch["targets"], IGNORE_INDEX), tokens=0)
                batch = {k2: (v.to(acc.device) if torch.is_tensor(v) else v) for k2, v in batch.items()}
                out = micro_batch_loss(model, head, batch, setup)
                sums += torch.tensor([float(out.ce), float(out.kd), batch["tokens"]], dtype=torch.float64)
        finally:
            model.train(was_training)
    ce, kd, tokens = acc.reduce(sums.to(acc.device), "sum").tolist()
    distils = setup.teacher is not None or setup.cache is not None
    return {"ce": ce / max(tokens, 1), "kd": kd / max(tokens, 1) if distils else None,
            "tokens": int(tokens), "examples": len(examples)}


def train_ce(model, head, examples: list, n: int, batch_size: int, pad_id: int, setup: Any, acc) -> float | None:
    """Mean response-token CE on the first `n` *training* examples (no teacher term); None when n is 0.
    Not held-out: it shows how well the model fits what it trains on (train_ce_before.json)."""
    result = measure(model, head, examples[:n], batch_size, pad_id, dataclasses.replace(setup, teacher=None, cache=None, kd_ratio=0.0),
                     acc)
    return None if result is None else round(result["ce"], 6)


def load_teacher(cfg: TrainConfig, device, precision: str, vocab: int, student_rows: int):
    """The frozen KD teacher (eval mode, no grad), or None; bf16 when training in bf16 (or as
    `teacher_dtype` says). Its output rows must cover the tokenizer; padding may differ from the student's."""
    if not cfg.teacher:
        return None
    dtype = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else ("bfloat16" if precision == "bf16" else "auto")
    teacher = load_model(cfg.teacher, dtype=dtype, device=str(device), trust_remote_code=cfg.trust_remote_code)
    teacher.eval().requires_grad_(False)
    rows = _head_weight(teacher).shape[0]
    if rows < vocab:
        raise ModelError(f"teacher {cfg.teacher}: {rows} output rows, fewer than the tokenizer's {vocab} tokens")
    if rows != student_rows:
        log.info("vocabulary padding differs (student %d, teacher %d rows); using the tokenizer's %d", student_rows, rows, vocab)
    return teacher


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
    # a setting added after the checkpoint was written (e.g. `turns`) counts as its default there
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [k for k in now if k not in _RESUME_FREE and saved.get(k, defaults.get(k)) != now[k]]
    if changed:
        k = changed[0]
        raise ReflectTuneError(f"{ckpt}: cannot resume: setting '{k}' was {clip(saved.get(k))}, now {clip(now[k])} "
                               f"({len(changed)} setting(s) differ); use the same settings or a new --output")


# ----------------------------------------------------------------------------- outputs


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


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; returns the summary (also in OUTDIR/meta.json, under `result`).

    Under `accelerate launch` / `torchrun` every process runs this; the main one holds the output's
    lock, writes the log, the checkpoints' shared files and the final folder.
    """
    from transformers.utils import logging as hf_logging

    validate(cfg)
    hf_logging.disable_progress_bar()  # our own bar is enough
    out = Path(cfg.output)
    main_rank = os.environ.get("RANK", "0") == "0"
    with exclusive(lock_beside(out), str(out)) if main_rank else nullcontext(), _writes_checked(out), ExitStack() as stack:
        # data: read, tokenized and checked before any weights load
        explain_empty_selection(cfg.data)
        records, report = load_records(cfg.data, format=cfg.format, split=cfg.split, on_duplicate="keep", on_empty="drop",
                                       turns=cfg.turns)
        for line in report.warnings():
            log.warning("warning: %s", line)
        tok = load_tokenizer(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
        if cfg.teacher:
            check_tokenizers(tok, load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code), cfg.model, cfg.teacher)
        records, held_recs = heldout_records(cfg, records)
        examples, data_stats = build_examples(records, tok, cfg)
        held = build_examples(held_recs, tok, cfg, source=cfg.eval_data or f"{cfg.data} (eval_split)")[0] if held_recs else []
        cache = open_cache(cfg.teacher_logits) if cfg.teacher_logits else None
        if cache is not None:  # built for these examples: settings, then every example's entry (one line if not)
            check_cache(cache, cfg, tok)
            check_examples(cache, examples, held)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

        # processes, the output folder, the models
        reset_peak_memory()
        acc, precision = make_accelerator(cfg)
        main, world = acc.is_main_process, acc.num_processes
        if main:
            if cfg.overwrite and not cfg.resume:
                clear_folder(out, "train", OUTPUT_NAMES)  # only what train wrote there
            claim_folder(out, "train")
        acc.wait_for_everyone()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        student = load_student(cfg, acc.device)
        if _head_weight(student).shape[0] < len(tok):
            raise ModelError(f"{cfg.model}: {_head_weight(student).shape[0]} output rows, fewer than the tokenizer's {len(tok)} tokens")
        teacher = load_teacher(cfg, acc.device, precision, len(tok), _head_weight(student).shape[0])
        # the chunked loss reads the output weight outside forward: whole weights only (not FSDP / ZeRO-3 shards)
        ds = getattr(acc.state, "deepspeed_plugin", None)
        sharded = acc.distributed_type.name == "FSDP" or getattr(ds, "zero_stage", 0) == 3
        distils = teacher is not None or cache is not None
        lean = cfg.kd_impl == "chunked" and not sharded and lean_path_ok(student) and (teacher is None or lean_path_ok(teacher))
        if cfg.kd_impl == "chunked" and not lean:
            log.warning("warning: sharded weights or an output layer that is not a plain linear map; using full logits")
        setup = LossSetup(vocab_size=len(tok), teacher=teacher, cache=cache, lean=lean, kd_ratio=cfg.kd_ratio, kd_loss=cfg.kd_loss,
                          temperature=cfg.kd_temperature, beta=cfg.beta, alpha=cfg.skew_alpha, chunk_size=cfg.kd_chunk_size)

        # the plan of every epoch, the optimizer and its schedule
        plan = [epoch_micro_batches(examples, cfg, e) for e in range(cfg.epochs)]
        group = world * cfg.grad_accum  # micro-batches per optimizer step, over all processes
        total_steps = sum(math.ceil(len(mbs) / group) for mbs in plan)
        total_steps = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=resolved_lr(cfg), weight_decay=cfg.weight_decay)
        warmup = int(round(cfg.warmup_ratio * total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, warmup, total_steps))
        model, optimizer = acc.prepare(StudentLM(student), optimizer)
        head = _head_weight(acc.unwrap_model(model).lm)
        teacher_path = resolve_model(cfg.teacher).path if cfg.teacher else None
        meta = provenance("train", config_dict(cfg), inputs=[p for p in (cfg.data, resolve_model(cfg.model).path, teacher_path)
                                                            if p and Path(p).exists()])
        meta.update(data=data_stats, load_report=report.__dict__)  # meta["config"]: the config, redacted
        if cache is not None:  # which teacher the cached numbers come from, and how they were stored
            meta["teacher_logits"] = {"path": str(cache.path), "settings": {k: cache.manifest["settings"].get(k) for k in
                                      ("teacher", "top_k", "logprob_dtype", "vocab_size", "template", "max_length")},
                                      "stats": {k: (cache.manifest.get("stats") or {}).get(k) for k in ("examples", "tokens", "bytes")}}
        if held_recs:
            meta["data"]["heldout"] = {"records": len(held_recs), "examples": len(held), "source": cfg.eval_data or "eval_split"}

        # where to start: a checkpoint, or step 0
        step = tokens_seen = samples_seen = start_epoch = start_mb = 0
        resumed_from = None
        if cfg.resume:
            state, ckpt = resume_state(out, cfg, model, optimizer, scheduler, acc)
            if ckpt is None:
                log.warning("warning: %s: no checkpoint to resume from; starting from scratch", out)
            else:
                step, tokens_seen, samples_seen = state["step"], state["tokens_seen"], state["samples_seen"]
                start_epoch, start_mb = state["data_position"]["epoch"], state["data_position"]["micro_batch"]
                resumed_from = str(ckpt)
                log.info("resuming from %s (step %d of %d)", ckpt, step, total_steps)
        log_path, ce_path = out / "train_log.csv", out / "train_ce_before.json"
        if main:  # a resume keeps the rows up to its checkpoint (eval rows included), a fresh start none
            append_log(log_path, [], keep_until=step if resumed_from else -1)
        old_ce_path = ce_path if ce_path.is_file() else out / "eval_before.json"  # the name before 0.2
        if resumed_from and old_ce_path.is_file():  # measured before the first step of the run being resumed
            loss_before = json.loads(old_ce_path.read_text())["loss"]
        else:
            loss_before = train_ce(model, head, examples, cfg.train_ce_samples, cfg.batch_size, pad_id, setup, acc) if step == 0 else None
            if main:
                atomic_write_text(ce_path, json.dumps({"loss": loss_before, "examples": min(cfg.train_ce_samples, len(examples))}))
        eval_bs = cfg.eval_batch_size or cfg.batch_size
        tracker = stack.enter_context(open_tracker(cfg.report_to if main else "none", out, cfg.run_name or out.name,
                                                   config_dict(cfg)))  # only the main process reports

        def held_out_eval(epoch: float) -> Optional[dict]:
            """The held-out losses now: a log row and tracker scalars at this step (main process)."""
            result = measure(model, head, held, eval_bs, pad_id, setup, acc)
            if main and result is not None:
                row = eval_row(step, epoch, tokens_seen, result)
                append_log(log_path, [row])
                tracker.log(tracker_metrics(row), step)
            return result

        # the starting model's held-out losses: measured now, or (a resume) read from the log's step-0 row
        heldout_before = (held_out_eval(0.0) if step == 0 else heldout_start(log_path)) if held else None

        # the loop
        run_start, run_tokens, last = time.time(), 0, {}
        with Progress("train", total_steps, unit="steps", rate_unit="steps", done=step, enabled=main and cfg.progress) as progress:
            for epoch in range(start_epoch, cfg.epochs):
                mbs = plan[epoch]
                for g0 in range(start_mb if epoch == start_epoch else 0, len(mbs), group):
                    if step >= total_steps:
                        break
                    t0 = time.time()
                    step_mbs = mbs[g0 : g0 + group]
                    batches = [collate([[examples[i] for i in row] for row in mb], pad_id, cfg.packing, cache) for mb in step_mbs]
                    step_tokens = sum(b["tokens"] for b in batches)  # over every process: the mean's denominator
                    mine = rank_share(batches, acc)
                    sums = torch.zeros(3, dtype=torch.float64)  # token sums of loss, CE, KD on this process
                    for i, batch in enumerate(mine):
                        # gradients are averaged over processes only on the last micro-batch of the step
                        sync = nullcontext() if i == len(mine) - 1 else acc.no_sync(model)
                        with sync, acc.autocast():
                            losses = micro_batch_loss(model, head, batch, setup)  # forward and loss: token sums
                            acc.backward(losses.loss * world / max(step_tokens, 1))  # -> grad of the step's mean
                        sums += torch.tensor([float(losses.loss.detach()), float(losses.ce), float(losses.kd)], dtype=torch.float64)
                    loss, ce, kd = (float(x) / max(step_tokens, 1) for x in acc.reduce(sums.to(acc.device), "sum").tolist())
                    grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)  # None where DeepSpeed clips itself
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                    step, tokens_seen = step + 1, tokens_seen + step_tokens
                    samples_seen += sum(len(row) for mb in step_mbs for row in mb)
                    run_tokens += step_tokens
                    tps = run_tokens / max(time.time() - run_start, 1e-9)
                    at_epoch = round(epoch + min(g0 + group, len(mbs)) / len(mbs), 4)
                    last = train_row(step, at_epoch, tokens_seen, loss, ce, kd if distils else None, lr, grad_norm, tps,
                                     time.time() - t0)
                    if main:
                        append_log(log_path, [last])
                        tracker.log(tracker_metrics(last), step)
                    if held and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                        held_out_eval(at_epoch)  # the last step's evaluation is the final one, below
                    progress.update(done=step, note=f"loss {loss:.4f}, {tps:,.0f} tok/s")
                    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                        nxt = g0 + group
                        position = {"epoch": epoch, "micro_batch": nxt} if nxt < len(mbs) else {"epoch": epoch + 1, "micro_batch": 0}
                        save_checkpoint(out, step, model, optimizer, scheduler,
                                        {"step": step, "epoch": epoch, "samples_seen": samples_seen, "tokens_seen": tokens_seen,
                                         "data_position": position, "world_size": world, "config": meta["config"]},
                                        acc, cfg.keep_checkpoints)

        # the end: the held-out losses, the summary, the final folder
        heldout_after = held_out_eval(float(last["epoch"]) if last else float(start_epoch)) if held else None
        tracker.close()
        summary = {"steps": step, "total_steps": total_steps, "tokens_seen": tokens_seen, "samples_seen": samples_seen,
                   "final_loss": float(last["loss"]) if last else None, "loss_before": loss_before,
                   "loss_after": train_ce(model, head, examples, cfg.train_ce_samples, cfg.batch_size, pad_id, setup, acc),
                   "eval_examples": min(cfg.train_ce_samples, len(examples)), "vocab_size": setup.vocab_size,
                   "heldout": heldout_summary(held, heldout_before, heldout_after, cfg) if held else None,
                   "world_size": world, "lean_loss": lean, "resumed_from": resumed_from,
                   "wall_s": round(time.time() - run_start, 1), **peak_memory()}
        meta["result"] = summary
        if main:
            save_final(out, model, tok, cfg, meta, acc)
        acc.wait_for_everyone()
        return {**summary, "is_main": main}


def make_accelerator(cfg: TrainConfig):
    """The Accelerator for this run and its precision: bf16 on a CUDA GPU that has it (`auto`), else fp32."""
    from accelerate import Accelerator

    from reflect_tune.score import warn_if_one_process

    warn_if_one_process()  # accelerate launch --num_processes N that started one process: say so
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available()), precision


def rank_share(batches: list[dict], acc) -> list[dict]:
    """This process's micro-batches of a step, on its device. A short last step gives a process
    fewer than the others; it adds no-op batches (no targets) so every process calls backward
    the same number of times, as DDP needs."""
    world = acc.num_processes
    mine = batches[acc.process_index :: world]
    while len(mine) < math.ceil(len(batches) / world):
        mine.append({**batches[0], "targets": torch.full_like(batches[0]["targets"], IGNORE_INDEX), "tokens": 0})
    return [{k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in mine]


@contextmanager
def _writes_checked(out: Path):
    try:
        yield
    except OSError as e:
        raise ReflectTuneError(f"{e.filename or out}: cannot write: {e.strerror or e}; the finished checkpoints in "
                               f"{out / 'checkpoints'} are intact (continue with --resume once there is room)") from None


def resume_state(out: Path, cfg: TrainConfig, model, optimizer, scheduler, acc) -> tuple[dict, Optional[Path]]:
    """Load the newest checkpoint that reads back whole; a damaged one is set aside with a warning.
    Returns (trainer_state, checkpoint), or ({}, None) when the folder has none."""
    bad = []
    for ckpt in checkpoints(out):
        try:
            files = read_checkpoint(ckpt, cfg.method == "full", acc)
            check_resume_config(ckpt, cfg, files["config"])
            state = load_checkpoint(ckpt, files, model, optimizer, scheduler, cfg.method == "full", acc)
        except CorruptCheckpoint as e:
            bad.append(f"{ckpt.name}: {e}")
            acc.wait_for_everyone()
            if acc.is_main_process:
                moved = set_aside(ckpt)
                log.warning("warning: %s cannot be read back (%s); moved it to %s and trying the one before", ckpt, e, moved.name)
            continue
        if bad:
            log.warning("warning: resuming from %s, the newest checkpoint that loads", ckpt)
        return state, ckpt
    if bad:
        raise ReflectTuneError(f"{out}: no checkpoint loads ({'; '.join(bad)}); pass --overwrite to train from the start")
    return {}, None


def _cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
