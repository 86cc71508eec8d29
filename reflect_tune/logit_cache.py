"""The teacher-logits cache as train reads it: example keys, the tokenizer's identity, the reader.

`reflect-tune teacher-logits` (teacher_logits.py) writes the cache; `train --teacher-logits` reads it
through `open_cache`, `check_cache`, `check_examples` and `batch_top_k` (docs/FORMATS.md §8.8). Kept
apart from the writer, which makes its examples with train's code, so neither imports the other's
module in a circle.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from reflect_tune.artifacts import read_json_object
from reflect_tune.config import TrainConfig
from reflect_tune.errors import DataError, ReflectTuneError, clip
from reflect_tune.losses import IGNORE_INDEX

FORMAT, VERSION = "reflect-tune-teacher-logits", 1


def example_key(input_ids, targets) -> str:
    """sha256 of an example's token ids and targets: the cache's key for it."""
    h = hashlib.sha256(struct.pack("<q", len(input_ids)))
    h.update(np.asarray(input_ids, dtype="<i8").tobytes())
    h.update(np.asarray(targets, dtype="<i8").tobytes())
    return h.hexdigest()


def tokenizer_identity(tok) -> dict[str, Any]:
    """What decides token ids: the vocabulary, the special tokens, the chat template (hashed)."""
    blob = json.dumps({"vocab": sorted(tok.get_vocab().items()), "bos": tok.bos_token, "eos": tok.eos_token,
                       "chat_template": getattr(tok, "chat_template", None), "class": type(tok).__name__}, sort_keys=True)
    return {"name": str(getattr(tok, "name_or_path", "")), "size": len(tok), "sha256": hashlib.sha256(blob.encode()).hexdigest()}


class TeacherLogitsCache:
    """A finished cache, memory-mapped: `lookup(example)` gives its response tokens' top-k, in order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_json_object(self.path / "manifest.json")
        index = read_json_object(self.path / "index.json")
        if self.manifest is None or self.manifest.get("format") != FORMAT:
            raise ReflectTuneError(f"{self.path}: not a teacher-logits cache (no manifest.json); build one with "
                                   "reflect-tune teacher-logits")
        if index is None:
            raise ReflectTuneError(f"{self.path}: unfinished (no index.json); run reflect-tune teacher-logits again to complete it")
        self.entries: dict[str, list] = index["entries"]
        self.top_k, self.vocab_size = self.manifest["settings"]["top_k"], self.manifest["settings"]["vocab_size"]
        self._files: dict[str, Any] = {}

    def __contains__(self, example) -> bool:
        return example_key(example.input_ids, example.targets) in self.entries

    def lookup(self, example, record_id: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids int64 [n,k], lp float32 [n,k], tail float32 [n]) for the example's n response tokens, in order."""
        from safetensors import safe_open

        key = example_key(example.input_ids, example.targets)
        entry = self.entries.get(key)
        n = sum(t != IGNORE_INDEX for t in example.targets)
        s = self.manifest["settings"]
        if entry is None or entry[2] != n:
            rid = record_id or getattr(example, "id", None) or f"with key {key[:12]}"
            raise DataError(f"{self.path}: no entry for record {rid}: the cache was built with another template/tokenizer/"
                            f"max_length (it has template {s['template']}, max_length {s['max_length']}, tokenizer "
                            f"{s['tokenizer']['name']}): rebuild it with reflect-tune teacher-logits and this run's settings")
        name, start, rows = entry
        if name not in self._files:
            self._files[name] = safe_open(str(self.path / "shards" / name), framework="pt")
        fh = self._files[name]
        part = slice(start, start + rows)
        return (fh.get_slice("ids")[part].long(), fh.get_slice("logprobs")[part].float(), fh.get_slice("tail")[part].float())


def open_cache(path: str | os.PathLike) -> TeacherLogitsCache:
    return TeacherLogitsCache(path)


def batch_top_k(rows: list, width: int, cache: TeacherLogitsCache) -> dict[str, torch.Tensor]:
    """The cached teacher of a collated batch (train.collate's rows of examples, right-padded to `width`):
    `top_ids` [B,W,k] int64, `top_lp` [B,W,k] and `tail` [B,W] at every counted position, zeros elsewhere."""
    k = cache.top_k
    ids = torch.zeros((len(rows), width, k), dtype=torch.long)
    lp = torch.zeros((len(rows), width, k), dtype=torch.float32)
    tail = torch.zeros((len(rows), width), dtype=torch.float32)
    for r, row in enumerate(rows):
        at = 0
        for e in row:  # the cache's rows are the example's counted positions, in order
            where = at + torch.nonzero(torch.tensor(e.targets) != IGNORE_INDEX).squeeze(-1)
            ids[r, where], lp[r, where], tail[r, where] = cache.lookup(e, getattr(e, "id", None) or None)
            at += len(e.input_ids)
    return {"top_ids": ids, "top_lp": lp, "tail": tail}


def check_examples(cache: TeacherLogitsCache, examples: list, held: list) -> None:
    """Before training: every training and held-out example has its entry (else one line naming the first missing record)."""
    for what, group in (("training", examples), ("held-out", held)):
        missing = [e for e in group if e not in cache]
        if missing:
            rid = missing[0].id or f"with key {example_key(missing[0].input_ids, missing[0].targets)[:12]}"
            raise DataError(f"{cache.path}: no entry for {what} record {clip(rid)} ({len(missing)} of {len(group)} {what} "
                            "examples missing): the cache was built from other data or with other data settings; rebuild it "
                            "with reflect-tune teacher-logits and the data flags given to train (--template, --max-length, "
                            "--turns, --eval-data/--eval-split, --seed)")


def check_cache(cache: TeacherLogitsCache, cfg: TrainConfig, tok, top_k: Optional[int] = None) -> None:
    """Before training: the cache's settings fit this train run (vocabulary, tokenizer, template, max_length, k)."""
    s = cache.manifest["settings"]
    now = {"vocab_size": len(tok), "tokenizer": tokenizer_identity(tok)["sha256"], "template": cfg.template,
           "max_length": cfg.max_length}
    then = {**{k: s[k] for k in ("vocab_size", "template", "max_length")}, "tokenizer": s["tokenizer"]["sha256"]}
    for key in now:
        if then[key] != now[key]:
            what = "another tokenizer" if key == "tokenizer" else f"{key} {clip(then[key])}, this run has {clip(now[key])}"
            raise ReflectTuneError(f"{cache.path}: built with {what}; rebuild it with reflect-tune teacher-logits and "
                                   "this run's settings")
    if top_k is not None and top_k > s["top_k"]:
        raise ReflectTuneError(f"{cache.path}: holds the top {s['top_k']} tokens per position, fewer than the {top_k} asked for")
