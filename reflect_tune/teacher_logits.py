"""The `teacher-logits` stage: the teacher's top-k log-probabilities on every response token, computed once.

`train --teacher` runs the teacher on every micro-batch of every epoch. This stage runs it once over
the examples `train` will see, made by train's own code (`load_records` with train's settings,
`heldout_records`, `build_examples`: same template, truncation and tokenizer; held-out examples are
cached too), and stores, for every response token (`targets != -100`, in order), the k most likely
next tokens, their log-probabilities at temperature 1 and the log of the mass left over (the tail):

    records -> train's examples, one per key -> length-sorted batches under a token budget
            -> per batch not yet stored: the teacher's final hidden states (eval, no_grad); the
               response rows through the output layer a chunk at a time (logits, top-k, logsumexp),
               so no B×T×V logits exist -> one shard, written atomically
            -> at the end the main process writes index.json and completes manifest.json

CACHE/ holds `manifest.json` (the settings that decide the numbers: teacher identity, k, vocabulary
size, template, max_length, the tokenizer's identity; then tokens, bytes, seconds), `index.json`
(example key -> [shard, first row, rows]) and `shards/rR-NNNNNN.safetensors`, each with `ids` int32
[N,k], `logprobs` float16 [N,k] (float32 with --logprob-dtype float32), `tail` float32 [N] (-inf when k is the vocabulary), `offsets` int64
[E+1] and its example keys in the metadata. An example's key is the sha256 of its input_ids and
targets, so a cache can never answer for an example tokenized another way (template, tokenizer,
max_length): the reader refuses it by name.

Resumable: a shard is renamed into place after every batch, so a killed run loses at most that batch;
a rerun reads the keys of the shards there and skips the batches already stored (the batches are
planned over all examples, so each example is computed in the same batch whatever was done before,
and the numbers do not depend on where a run was cut). Data parallel under `torchrun`, as `score`:
process r takes every world-th batch still to do and writes its own shards.

A second producer reads the same numbers from an OpenAI-compatible server that returns prompt
log-probabilities (vLLM: /v1/completions with the token ids as `prompt`, `max_tokens=1` and
`prompt_logprobs=k`; start vLLM with `--max-logprobs` >= k). The tail is log(1 − Σ exp(top-k)).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from reflect_tune.artifacts import (atomic_path, atomic_write_text, check_output_folder, claim_folder, clear_folder,
                                    default_file_mode, exclusive, fingerprint, lock_beside, owned_by, provenance, read_json_object,
                                    write_failure)
from reflect_tune.config import SettingError, TeacherLogitsConfig, TrainConfig
from reflect_tune.errors import ModelError, ReflectTuneError, clip, register_secret, scrub_secrets
from reflect_tune.logit_cache import (FORMAT, VERSION, TeacherLogitsCache, batch_top_k, check_cache,  # noqa: F401 (the reader, re-exported)
                                      check_examples, example_key, open_cache, tokenizer_identity)
from reflect_tune.losses import IGNORE_INDEX
from reflect_tune.progress import Progress

log = logging.getLogger(__name__)

STAGE = "teacher-logits"
TEMPLATES = ("chat", "alpaca")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # how the log-probs are stored
OUTPUT_NAMES = ("manifest.json", "index.json", "shards")
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 4096, 32768
HEAD_CHUNK_ELEMENTS = 1 << 25  # logits held at once: rows x vocabulary (128 MiB in fp32)


# ----------------------------------------------------------------------------- keys and the top-k


def topk_from_logits(logits: torch.Tensor, k: int, vocab_size: int):
    """(ids int32 [N,k], lp float32 [N,k] log-probs at T=1, tail float32 [N] = log of the rest, -inf when k = V).
    The tail is log1p(−Σ p) while the top k hold under half the mass, else the logsumexp of the other
    columns: each is exact where the other loses digits. (Private until losses.topk_from_logits lands.)"""
    x = logits[:, :vocab_size].float()
    lse = torch.logsumexp(x, dim=-1)
    vals, ids = x.topk(min(k, vocab_size), dim=-1)
    lp = vals - lse[:, None]
    if k >= vocab_size:
        return ids.to(torch.int32), lp, torch.full_like(lse, -math.inf)
    mass = lp.exp().sum(dim=-1)
    tail = torch.log1p(-mass.clamp(max=0.5))
    big = (mass >= 0.5).nonzero().squeeze(-1)  # only these rows need a second pass over the vocabulary
    if big.numel():
        tail[big] = torch.logsumexp(x[big].scatter(1, ids[big], -math.inf), dim=-1) - lse[big]
    return ids.to(torch.int32), lp, tail


# ----------------------------------------------------------------------------- settings and examples


def train_view(cfg: TeacherLogitsConfig) -> TrainConfig:
    """The train settings that decide the examples, so train's own functions make them."""
    return TrainConfig(data=cfg.data, output=cfg.output, model=cfg.model or cfg.teacher, template=cfg.template,
                       max_length=cfg.max_length, format=cfg.format, split=cfg.split, turns=cfg.turns,
                       eval_data=cfg.eval_data, eval_split=cfg.eval_split, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)


def validate(cfg: TeacherLogitsConfig) -> None:
    """Every setting, the inputs and the output folder: one line naming the first problem, before anything loads."""
    from reflect_tune.models import resolve_model
    from reflect_tune.records import TURN_POLICIES, check_source
    from reflect_tune.reflect import check_api_key_env

    checks = [(n, "required", not getattr(cfg, n)) for n in ("data", "output", "teacher")]
    checks += [(n, f"{clip(getattr(cfg, n))} is not one of {', '.join(c)}", getattr(cfg, n) not in c)
               for n, c in (("template", TEMPLATES), ("turns", TURN_POLICIES), ("dtype", DTYPES),
                            ("logprob_dtype", tuple(LOGPROB_DTYPES)))]
    checks += [(n, "must be at least 1", getattr(cfg, n) < 1) for n in ("top_k", "concurrency")]
    checks += [("max_length", "must be at least 2", cfg.max_length < 2), ("max_retries", "must be >= 0", cfg.max_retries < 0),
               ("batch_tokens", "must be at least 1", cfg.batch_tokens is not None and cfg.batch_tokens < 1),
               ("timeout", "must be > 0", not cfg.timeout > 0),
               ("eval_split", "must be at least 0 and below 1", not 0.0 <= cfg.eval_split < 1.0),
               ("eval_split", "give eval_data or eval_split, not both", bool(cfg.eval_data) and cfg.eval_split > 0),
               ("model", "required with teacher_url: the tokenizer that renders the examples (the served model's)",
                bool(cfg.teacher_url) and not cfg.model)]
    for name, why, failed in checks:
        if failed:
            raise SettingError(name, f"setting '{name}': {why}")
    check_api_key_env(cfg.api_key_env)
    for src in (cfg.data, cfg.eval_data):
        if src:
            check_source(src, format=cfg.format, split=cfg.split if src == cfg.data else None)
    specs = [s for s in (None if cfg.teacher_url else cfg.teacher, cfg.model) if s]
    paths = [resolve_model(s).path for s in specs]  # an unknown model: one line now
    out = Path(cfg.output)
    check_output_folder(out, [cfg.data, cfg.eval_data, *paths])
    if out.is_dir() and any(out.iterdir()) and not owned_by(out, STAGE):
        if not cfg.overwrite:
            raise ReflectTuneError(f"{out}: not empty and not a teacher-logits cache; choose a new --output")
        clear_folder(out, STAGE, OUTPUT_NAMES, check_only=True)  # refuses a foreign folder


def load_examples(cfg: TeacherLogitsConfig, tok) -> tuple[list, dict[str, Any]]:
    """Train's examples and then its held-out ones, made exactly as `train.run` makes them."""
    from reflect_tune.records import load_records
    from reflect_tune.train import build_examples, explain_empty_selection
    from reflect_tune.train_log import heldout_records

    tcfg = train_view(cfg)
    explain_empty_selection(cfg.data)
    records, report = load_records(cfg.data, format=cfg.format, split=cfg.split, on_duplicate="keep", on_empty="drop",
                                   turns=cfg.turns)
    for line in report.warnings():
        log.warning("warning: %s", line)
    records, held_recs = heldout_records(tcfg, records)
    examples, stats = build_examples(records, tok, tcfg)
    held = build_examples(held_recs, tok, tcfg, source=cfg.eval_data or f"{cfg.data} (eval_split)")[0] if held_recs else []
    return examples + held, {**stats, "heldout_examples": len(held)}


def plan_batches(keyed: dict[str, Any], batch_tokens: int) -> list[list[tuple[str, Any]]]:
    """(key, example) batches, longest first; a batch's rows x its longest row stays within `batch_tokens`."""
    order = sorted(keyed.items(), key=lambda kv: (-len(kv[1].input_ids), kv[0]))
    batches, current = [], []
    for e in order:
        if current and (len(current) + 1) * len(current[0][1].input_ids) > batch_tokens:
            batches.append(current)
            current = []
        current.append(e)
    return batches + ([current] if current else [])


# ----------------------------------------------------------------------------- the producers


def teacher_identity(cfg: TeacherLogitsConfig, device) -> dict[str, Any]:
    """Which teacher, known before it loads: the server and name, or the weights' fingerprint and dtype."""
    from reflect_tune.models import resolve_dtype, resolve_model

    if cfg.teacher_url:
        return {"producer": "server", "url": cfg.teacher_url, "model": cfg.teacher}
    path = resolve_model(cfg.teacher).path
    return {"producer": "local", "spec": cfg.teacher, "dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
            "fingerprint": fingerprint(path) if Path(path).exists() else {"path": path}}


class LocalTeacher:
    """The teacher in this process: final hidden states, then the output layer on response rows, in chunks."""

    def __init__(self, cfg: TeacherLogitsConfig, device, vocab_size: int, pad_id: int):
        from reflect_tune.models import load_model
        from reflect_tune.train import _head_weight, lean_path_ok

        self.identity = teacher_identity(cfg, device)
        self.model = load_model(cfg.teacher, dtype=self.identity["dtype"], device=str(device), trust_remote_code=cfg.trust_remote_code)
        self.model.eval().requires_grad_(False)
        rows = _head_weight(self.model).shape[0]
        if rows < vocab_size:
            raise ModelError(f"teacher {cfg.teacher}: {rows} output rows, fewer than the tokenizer's {vocab_size} tokens")
        self.lean = lean_path_ok(self.model)
        if not self.lean:
            log.warning("warning: %s: an output layer that is not a plain linear map; using full logits", cfg.teacher)
        self.weight = _head_weight(self.model).detach()[:vocab_size].float()  # logits in fp32 (a copy for bf16 weights)
        self.k, self.vocab, self.pad_id, self.device = cfg.top_k, vocab_size, pad_id, device
        self.chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab_size)

    def compute(self, batch: list) -> list[tuple]:
        from reflect_tune.train import collate, final_hidden

        b = collate([[e] for e in batch], self.pad_id, packed=False)
        inputs = {k: b[k].to(self.device) for k in ("input_ids", "attention_mask")}
        rows = (b["targets"] != IGNORE_INDEX).to(self.device)  # row-major: example by example, position by position
        with torch.no_grad():
            if self.lean:
                h = final_hidden(self.model, **inputs)[rows]
                parts = [topk_from_logits(F.linear(h[c : c + self.chunk].float(), self.weight), self.k, self.vocab)
                         for c in range(0, h.shape[0], self.chunk)]
            else:
                parts = [topk_from_logits(self.model(**inputs, use_cache=False).logits[rows], self.k, self.vocab)]
        ids, lp, tail = (torch.cat([p[i] for p in parts]).cpu() for i in range(3))
        counts = [int(n) for n in rows.sum(dim=1).tolist()]
        return list(zip(ids.split(counts), lp.split(counts), tail.split(counts)))


class ServerTeacher:
    """An OpenAI-compatible server with vLLM's prompt log-probabilities: one request per example."""

    def __init__(self, cfg: TeacherLogitsConfig, vocab_size: int):
        import openai

        self.key = os.environ.get(cfg.api_key_env) or None
        register_secret(self.key)  # never in a message or a written file
        self.client = openai.OpenAI(base_url=cfg.teacher_url, api_key=self.key or "unused", timeout=cfg.timeout,
                                    max_retries=cfg.max_retries)
        self.url, self.name, self.k, self.vocab = cfg.teacher_url, cfg.teacher, cfg.top_k, vocab_size
        self.pool = ThreadPoolExecutor(cfg.concurrency)

    def compute(self, batch: list) -> list[tuple]:
        return list(self.pool.map(self._one, batch))

    def _one(self, e) -> tuple:
        import openai

        try:
            resp = self.client.completions.create(model=self.name, prompt=list(e.input_ids), max_tokens=1,
                                                  extra_body={"prompt_logprobs": self.k})
        except openai.APIError as err:
            raise ReflectTuneError(scrub_secrets(f"teacher {self.name} at {self.url}: {str(err).splitlines()[0][:300]}")) from None
        plp = getattr(resp.choices[0], "prompt_logprobs", None) if resp.choices else None
        return parse_prompt_logprobs(plp, e.targets, self.k, self.vocab, f"teacher {self.name} at {self.url}")


def parse_prompt_logprobs(plp, targets: list[int], k: int, vocab: int, where: str) -> tuple:
    """vLLM's prompt_logprobs ([None, {token id: {"logprob", "rank", ...}}, ...], entry i for prompt token i,
    k or k + 1 entries: the prompt token is added when outside the top k) -> the top k by value at each
    response position t (entry t + 1 predicts targets[t]), and the tail log(1 − Σ exp(lp))."""
    if not isinstance(plp, list) or len(plp) != len(targets):
        raise ReflectTuneError(f"{where}: no prompt_logprobs for the {len(targets)} prompt tokens in the reply; the "
                               "server must accept vLLM's prompt_logprobs on /v1/completions")
    ids, lps, tails = [], [], []
    for t, y in enumerate(targets):
        if y == IGNORE_INDEX:
            continue
        entry = plp[t + 1] if isinstance(plp[t + 1], dict) else {}
        ranked = sorted(((float(v["logprob"] if isinstance(v, dict) else v), int(i)) for i, v in entry.items()),
                        key=lambda x: (-x[0], x[1]))[:k]
        if len(ranked) < k:
            raise ReflectTuneError(f"{where}: {len(ranked)} log-probabilities at prompt position {t + 1}, fewer than "
                                   f"--top-k {k} (start vLLM with --max-logprobs {k} or more)")
        mass = math.fsum(math.exp(v) for v, _ in ranked)
        ids.append([i for _, i in ranked])
        lps.append([v for v, _ in ranked])
        tails.append(math.log1p(-mass) if k < vocab and mass < 1.0 else -math.inf)
    return (torch.tensor(ids, dtype=torch.int32).reshape(-1, k), torch.tensor(lps, dtype=torch.float32).reshape(-1, k),
            torch.tensor(tails, dtype=torch.float32))


# ----------------------------------------------------------------------------- shards, index, manifest


def shard_keys(folder: Path) -> dict[str, list[str]]:
    """Each finished shard's example keys, by shard name (unreadable shards are skipped with a warning)."""
    from safetensors import safe_open

    found = {}
    for shard in sorted(folder.glob("r*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as fh:
                found[shard.name] = json.loads(fh.metadata()["keys"])
        except Exception as e:  # a shard damaged after it was written: its examples are computed again
            log.warning("warning: %s cannot be read (%s); its examples will be computed again", shard, str(e)[:200])
    return found


def write_shard(folder: Path, rank: int, entries: list[tuple], lp_dtype: torch.dtype = torch.float16) -> Path:
    """One shard of (key, ids, lp, tail) entries, renamed into place whole; the log-probs stored as `lp_dtype`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    seqs = [int(m.group(1)) for p in folder.glob(f"r{rank:03d}-*.safetensors") if (m := re.search(r"-(\d+)\.", p.name))]
    path = folder / f"r{rank:03d}-{max(seqs, default=-1) + 1:06d}.safetensors"
    counts = [len(e[3]) for e in entries]
    tensors = {"ids": torch.cat([e[1] for e in entries]).contiguous(), "logprobs": torch.cat([e[2] for e in entries]).to(lp_dtype),
               "tail": torch.cat([e[3] for e in entries]).float(), "offsets": torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64)}
    try:
        with atomic_path(path) as tmp:  # a failed or killed write leaves no shard under its final name
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "keys": json.dumps([e[0] for e in entries])})
            os.chmod(tmp, default_file_mode())  # safetensors writes 0600
    except Exception as e:
        if write_failure(e) is None:
            raise
        raise ReflectTuneError(f"{path}: cannot write: {write_failure(e, folder)}; the shards written so far are kept: "
                               "run again once there is room") from None
    return path


def sweep_temporaries(folder: Path) -> None:
    """Shards a killed run was writing: ours (`.NAME.<pid>-<hex>.tmp`) and safetensors' own (`.tmpXXXXXX`).
    Called by the main process holding the output's lock, before any process writes: every dot-file is one."""
    for p in folder.glob(".*") if folder.is_dir() else []:
        p.unlink(missing_ok=True)


def build_index(out: Path) -> tuple[dict[str, list], int, int]:
    """index.json's entries from the shards: key -> [shard, first row, rows]; and the rows and shard bytes."""
    from safetensors import safe_open

    entries, rows, size = {}, 0, 0
    for name, keys in shard_keys(out / "shards").items():
        with safe_open(str(out / "shards" / name), framework="pt") as fh:
            offsets = fh.get_tensor("offsets").tolist()
        size += (out / "shards" / name).stat().st_size
        for i, key in enumerate(keys):
            if key not in entries:
                entries[key] = [name, offsets[i], offsets[i + 1] - offsets[i]]
                rows += offsets[i + 1] - offsets[i]
    return entries, rows, size


def check_settings(out: Path, settings: dict, overwrite: bool) -> Optional[dict]:
    """The manifest there, if its settings are this run's; a cache built otherwise is refused (unless --overwrite)."""
    old = read_json_object(out / "manifest.json")
    if old is None or overwrite:
        return None
    then = old.get("settings") or {}
    for key in settings:
        if then.get(key) != settings[key]:
            raise ReflectTuneError(f"{out}: a cache built with {key} {clip(then.get(key))}, now {clip(settings[key])}; "
                                   "pass --overwrite to rebuild it, or choose another --output")
    return old


# ----------------------------------------------------------------------------- the run


def run(cfg: TeacherLogitsConfig) -> dict[str, Any]:
    """Store the teacher's top-k on every response token of the examples; returns the summary."""
    from reflect_tune.models import load_tokenizer, resolve_device, resolve_model
    from transformers.utils import logging as hf_logging

    from reflect_tune.score import distributed_state

    validate(cfg)
    hf_logging.disable_progress_bar()  # our own bar is enough
    out, started = Path(cfg.output), time.time()
    state = distributed_state()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = rank == 0
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    with exclusive(lock_beside(out), str(out)) if main else nullcontext():
        # the examples, exactly as train makes them; the settings that decide the numbers
        tok = load_tokenizer(resolve_model(cfg.model or cfg.teacher), trust_remote_code=cfg.trust_remote_code)
        if cfg.model and not cfg.teacher_url:
            from reflect_tune.train import check_tokenizers

            check_tokenizers(tok, load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code), cfg.model, cfg.teacher)
        vocab = len(tok)
        if cfg.top_k > vocab:
            raise SettingError("top_k", f"setting 'top_k': {cfg.top_k} is more than the vocabulary's {vocab} tokens")
        examples, data_stats = load_examples(cfg, tok)
        unique: dict[str, Any] = {}  # key -> example (a record given twice is one example)
        for e in examples:
            unique.setdefault(example_key(e.input_ids, e.targets), e)
        device = state.device if state is not None else resolve_device(cfg.device)
        settings = {"teacher": teacher_identity(cfg, device), "top_k": cfg.top_k, "logprob_dtype": cfg.logprob_dtype, "vocab_size": vocab,
                    "template": cfg.template, "max_length": cfg.max_length, "tokenizer": tokenizer_identity(tok)}
        old = check_settings(out, settings, cfg.overwrite)  # every process, before the teacher loads: all raise alike
        producer = ServerTeacher(cfg, vocab) if cfg.teacher_url else LocalTeacher(cfg, device, vocab, tok.pad_token_id or 0)
        barrier()
        if main:
            if cfg.overwrite:
                clear_folder(out, STAGE, OUTPUT_NAMES)
            claim_folder(out, STAGE, OUTPUT_NAMES)
            sweep_temporaries(out / "shards")
            (out / "index.json").unlink(missing_ok=True)  # the index is rewritten whole at the end
            atomic_write_text(out / "manifest.json", json.dumps({"format": FORMAT, "version": VERSION, "settings": settings,
                                                                 "stats": (old or {}).get("stats")}, indent=1) + "\n")
        barrier()
        done = {k for keys in shard_keys(out / "shards").values() for k in keys}
        barrier()  # every process has read what is stored before any writes more

        # the plan: batches over every example, so each example's batch is the same on any resume
        budget = cfg.batch_tokens or (GPU_BATCH_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS)
        todo = [b for b in plan_batches(unique, budget) if any(k not in done for k, _ in b)]
        skipped = sum(k in done for k in unique)
        if main and skipped:
            log.info("resuming: %d of %d examples already in %s; skipping them", skipped, len(unique), out)
        mine = todo[rank::world]
        tokens, loop_start = 0, time.time()
        with Progress(STAGE, sum(len(b) for b in mine), unit="examples", enabled=main and cfg.progress) as bar:
            for batch in mine:
                results = producer.compute([e for _, e in batch])
                entries = [(k, *r) for (k, _), r in zip(batch, results) if k not in done]
                write_shard(out / "shards", rank, entries, LOGPROB_DTYPES[cfg.logprob_dtype])
                tokens += sum(len(r[2]) for r in entries)
                elapsed = time.time() - loop_start
                bar.update(advance=len(batch), note=f"{tokens / elapsed:,.0f} tok/s" if elapsed else "")
        barrier()

        # the end: the index and the manifest's figures (main process)
        summary = {"examples": len(unique), "heldout_examples": data_stats["heldout_examples"], "skipped": skipped,
                   "computed": len(unique) - skipped, "world_size": world, "seconds": round(time.time() - started, 2),
                   "output": str(out)}
        if main:
            entries, rows, size = build_index(out)
            missing = sum(k not in entries for k in unique)
            if missing:
                raise ReflectTuneError(f"{out}: {missing} examples were not stored (a shard could not be read); run again")
            atomic_write_text(out / "index.json", json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}) + "\n")
            prior = ((old or {}).get("stats") or {}).get("total_seconds", 0.0)
            stats = {"examples": len(entries), "tokens": rows, "bytes": size, "bytes_per_token": round(size / max(rows, 1), 2),
                     "seconds": summary["seconds"], "total_seconds": round(prior + summary["seconds"], 2),
                     "world_size": world, "data": data_stats}
            summary.update(tokens=rows, bytes=size, bytes_per_token=stats["bytes_per_token"])
            teacher_path = settings["teacher"].get("fingerprint", {}).get("path")
            meta = provenance(STAGE, cfg, inputs=[p for p in (cfg.data, cfg.eval_data, teacher_path) if p and Path(p).exists()])
            atomic_write_text(out / "manifest.json", json.dumps({"format": FORMAT, "version": VERSION, "settings": settings,
                                                                 "stats": stats, "provenance": meta}, indent=1, default=str) + "\n")
        barrier()
        return {**summary, "is_main": main}
