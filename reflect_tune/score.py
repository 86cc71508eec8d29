"""Student scoring: IFD and r-IFD for every candidate pair, batched, de-duplicated and resumable.

The definitions (issue 4, docs/FORMATS.md §8.2) in short. s(·) is the mean cross-entropy over
the scored tokens; a token at position i is predicted from positions < i, so position 0 is never
scored.

    s(A|Q)  answer tokens after the templated prompt         IFD   = exp(s(A|Q) - s(A))
    s(A)    the answer alone (tokenizer defaults, e.g. BOS)   r-IFD = exp(s(Q|A') - s(Q))
    s(Q|A') instruction_text tokens after the templated REVERSE(answer) prompt
    s(Q)    instruction_text alone

For `alpaca`, `vicuna` and `none`, the scored tokens of `tokenizer(prompt + text)` are those past
position `len(tokenizer(prompt))`. For `chat`, they are the tokens whose first character lies inside
the assistant's content in the rendered template (see `_chat_pass`).

Where the paper and the released code differ (five conventions of how passes are built, and the
template), `Conventions` says which way; conventions.py and docs/FORMATS.md §8.2a list them.

How it is made fast without changing the numbers:
  - every (text, scored span) is a *unit*; identical units are scored once (s(Q) of (x, y) and
    (x, y_res) is one unit);
  - units are sorted by length and packed into right-padded batches under a token budget, with an
    attention mask and position ids that count from 0 in every row, so padding changes nothing;
  - a prefix that every row of a batch starts with and none scores (a template's opening) is run
    once, and its keys and values are given to every row;
  - only the scored positions go through the LM head, in chunks, and their log-softmax is taken in
    fp32: the full-vocabulary logits of a batch never exist;
  - each finished batch is appended (fsynced) to a shard file, so a killed run resumes and loses at
    most one batch;
  - under `accelerate launch` / `torchrun`, every process scores its share of the batches and the
    results are gathered (data parallel).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import ShardStore, shard_folder
from reflect_tune.config import ScoreConfig, SettingError
from reflect_tune.conventions import RESPONSE_HEADER, Conventions, scoring_conventions
from reflect_tune.errors import ReflectTuneError
from reflect_tune.progress import Progress
from reflect_tune.records import TURN_POLICIES, Record, load_candidates
from reflect_tune.templates import REVERSE_DEFAULT, join_input, reverse_text, template_prompt

log = logging.getLogger(__name__)

TEMPLATES = ("chat", "alpaca", "vicuna", "none")
PASSES = ("a_given_q", "a", "q_given_a", "q")

CPU_BATCH_TOKENS = 4096
GPU_BATCH_TOKENS = 16384
PAD_TOLERANCE = 0.1  # a batch's rows are within 10% of its longest row
PREFIX_KEY = 8  # batches group passes by their first tokens; a shared prefix this long is run once
HEAD_CHUNK_ELEMENTS = 1 << 23  # logits held at once in the LM head: rows x vocab (32 MiB in fp32)



# ----------------------------------------------------------------------------- templates and passes


@dataclass(kw_only=True)
class Pass:
    """One scored span of one token sequence, after truncation."""

    ids: list[int]
    start: int  # first scored position (>= 1)
    end: int  # one past the last scored position
    truncated: bool
    reason: str | None = None  # why nothing can be scored

    @property
    def tokens(self) -> int:
        return max(0, self.end - self.start)

    @property
    def key(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(struct.pack("<qq", self.start, self.end))
        h.update(struct.pack(f"<{len(self.ids)}q", *self.ids))
        return h.hexdigest()


@dataclass(kw_only=True)
class Scorer:
    """A loaded student (or proxy) with the scoring settings."""

    spec: str
    model: Any
    tokenizer: Any
    template: str
    dtype: str
    device: Any
    max_length: int
    batch_tokens: int
    reverse: str
    signature: str  # identifies model + dtype: shards from another signature are never reused
    conv: Conventions = Conventions()
    state: Any = None  # accelerate.PartialState under a multi-process launch, else None
    tokens: Any = None  # a _Tokens cache over `tokenizer`
    head: tuple | None = None  # the LM head's (weight, bias) in fp32, for a model in another dtype

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state is not None else 0

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (x86 avx512_bf16 / amx_bf16, or Arm bf16).

    Without it, PyTorch emulates bf16 matmuls, which on an AVX2 machine measured 8x slower than fp32.
    Unknown (no /proc/cpuinfo) counts as yes, so nothing is claimed that was not seen.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", " bf16"))


def _asked_processes() -> int | None:
    """--num_processes N of the `accelerate launch` that started this process, read from the parent's
    command line (Linux /proc), or None when it is not there (another OS, the number came from an
    accelerate config file, or the parent is no accelerate launcher)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            args = fh.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    if "launch" not in args or not any(Path(a).name.startswith("accelerate") for a in args[: args.index("launch")]):
        return None
    rest = args[args.index("launch") + 1:]
    for i, arg in enumerate(rest):
        if arg in ("-m", "--module") or arg.endswith(".py") or "reflect_tune" in arg or "reflect-tune" in arg:
            break  # the launched program and its own arguments
        name, eq, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            return int(value) if value.isdigit() else None
    return None


def one_process_warning() -> str | None:
    """The warning line when `accelerate launch` was asked for several processes but started one.

    accelerate's launcher passes the number to no child: with fewer than two GPUs and no
    --multi_gpu it runs its "simple" launcher, one process, whose environment has accelerate's
    variables (ACCELERATE_USE_CPU, ...), no WORLD_SIZE, and MASTER_ADDR/MASTER_PORT, which that
    launcher sets only when more than one process (or machine) was asked. The number itself is read
    from the launcher's command line where it can be (Linux); without it those variables decide."""
    env = os.environ
    if env.get("WORLD_SIZE", "1") not in ("", "1") or "ACCELERATE_USE_CPU" not in env:
        return None  # several processes run, or no accelerate launcher started this one
    asked = _asked_processes()
    if asked is None and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        return None
    if asked is not None and asked <= 1:
        return None
    what = f"{asked} processes" if asked else "more than one process"
    return (f"warning: accelerate launch was asked for {what}, but one process runs: without two or more GPUs, "
            "accelerate launch starts a single process unless --multi_gpu is given; for data parallelism on CPUs "
            "use `torchrun --nproc_per_node N -m reflect_tune.cli ...` (or `accelerate launch --multi_gpu --num_processes N`)")


_warned_one_process = False


def warn_if_one_process() -> None:
    """Log `one_process_warning()` once per process (score, select and train call it)."""
    global _warned_one_process
    line = None if _warned_one_process else one_process_warning()
    if line:
        _warned_one_process = True
        log.warning(line)


def distributed_state():
    """accelerate's PartialState when launched with several processes (accelerate launch, torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        warn_if_one_process()
        return None
    import torch
    from accelerate import PartialState

    # accelerate sets up a CPU process group (gloo) only when told to use the CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        raise ReflectTuneError(
            f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up {state.distributed_type}; "
            "check the launcher's settings"
        )
    return state


def check_options(template: str, max_length: int, reverse: str, batch_tokens: int | None) -> None:
    """Fail on a bad scoring option before any data or model is read."""
    if template not in ("auto", *TEMPLATES):
        raise SettingError("template", f"unknown template {template!r}; choose auto, chat, alpaca, vicuna or none")
    if max_length < 2:
        raise SettingError("max_length", f"--max-length must be at least 2, got {max_length}")
    if "{answer}" not in reverse:
        raise SettingError("reverse", "--reverse must contain the placeholder {answer}")
    if batch_tokens is not None and batch_tokens < 1:
        raise SettingError("batch_tokens", f"--batch-tokens must be positive, got {batch_tokens}")


def open_scorer(
    spec: str,
    *,
    template: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    max_length: int = 2048,
    batch_tokens: int | None = None,
    reverse: str = REVERSE_DEFAULT,
    trust_remote_code: bool = False,
    conventions: Conventions | None = None,
) -> Scorer:
    """Load a model and tokenizer for scoring. `template="auto"`: chat if the tokenizer has one, else alpaca."""
    import torch

    from reflect_tune.artifacts import fingerprint
    from reflect_tune.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model

    check_options(template, max_length, reverse, batch_tokens)
    state = distributed_state()
    resolved = resolve_model(spec)
    tok = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    if template == "auto":
        template = "chat" if getattr(tok, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tok, "chat_template", None):
        raise ReflectTuneError(f"{spec}: the tokenizer has no chat template; pass --template alpaca, vicuna or none")
    conv = conventions or Conventions()
    if template == "chat" and conv.span == "rfind":
        raise SettingError("span", "--span rfind applies to the text templates (alpaca, vicuna, none); "
                                   "the chat template's span comes from token offsets: pass --template vicuna or alpaca")
    dev = state.device if state is not None else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if dev.type == "cpu" and dtype_name == "bfloat16" and not cpu_has_native_bf16() and (state is None or state.is_main_process):
        log.warning(
            "warning: this CPU has no native bfloat16 instructions (avx512_bf16 or amx_bf16); "
            "--dtype bfloat16 will be several times slower than float32 here"
        )
    model = load_model(resolved, dtype=dtype_name, device=str(dev), trust_remote_code=trust_remote_code)
    if model.get_output_embeddings() is None:
        raise ReflectTuneError(f"{spec}: not a causal LM with an output head; cannot score")
    if batch_tokens is None:
        batch_tokens = GPU_BATCH_TOKENS if dev.type == "cuda" else CPU_BATCH_TOKENS
    fp = fingerprint(resolved.path) if Path(resolved.path).exists() else {"path": resolved.path}
    signature = hashlib.sha256(json.dumps({"model": fp, "dtype": dtype_name}, sort_keys=True).encode()).hexdigest()[:12]
    head = None
    if torch_dtype != torch.float32:  # logits in fp32: one fp32 copy of the head, used on scored rows only
        layer = model.get_output_embeddings()
        bias = getattr(layer, "bias", None)
        head = (layer.weight.detach().float(), bias.detach().float() if bias is not None else None)
    return Scorer(spec=spec, model=model, tokenizer=tok, template=template, dtype=dtype_name, device=dev,
                  max_length=max_length, batch_tokens=batch_tokens, reverse=reverse, signature=signature, state=state,
                  tokens=_Tokens(tok), head=head, conv=conv)


def _truncated(ids: list[int], start: int, end: int, max_length: int, reason: str | None = None,
               what: str = "--max-length") -> Pass:
    start = max(start, 1)  # position 0 has nothing before it to predict it from
    max_length = max(max_length, 1)  # a matched cut (alone_cut) can leave no room at all
    truncated = len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
        end = min(end, max_length)
    if reason is None and end <= start:
        if truncated and start >= max_length:
            reason = f"no scored tokens after truncation at {what} {max_length}"
        else:
            reason = "no scored tokens (nothing to predict)"
    return Pass(ids=ids, start=start, end=end, truncated=truncated, reason=reason)


class _Tokens:
    """Tokenizes each distinct text once (a text recurs across passes and variants)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[tuple[str, bool], list[int]] = {}

    def ids(self, text: str, special: bool = True) -> list[int]:
        key = (text, special)
        if key not in self.cache:
            self.cache[key] = self.tok(text, add_special_tokens=special)["input_ids"]
        return self.cache[key]


def _text_pass(toks: _Tokens, prompt: str, text: str, max_length: int, find: str | None = None,
               what: str = "--max-length") -> Pass:
    """Tokens of tokenizer(prompt + text) past position len(tokenizer(prompt)).

    With `find` (span "rfind"), past position len(tokenizer(full[:full.rfind(find)])) instead, as
    the released code does: the same position unless `find` also occurs after the prompt's end."""
    full = prompt + text
    ids = toks.ids(full)
    start = len(toks.ids(prompt)) if find is None else len(toks.ids(full[: full.rfind(find)]))
    return _truncated(ids, start, len(ids), max_length, what=what)


def _direct_pass(toks: _Tokens, text: str, max_length: int, what: str = "--max-length") -> Pass:
    """The text alone, with the tokenizer's default special tokens: every token after the first is scored."""
    ids = toks.ids(text)
    return _truncated(ids, 1, len(ids), max_length, what=what)


def _chat_pass(tokenizer, user: str, assistant: str, max_length: int) -> Pass:
    """Only the assistant's content tokens of the chat template are scored.

    The template is rendered with both turns (`full`) and with the user turn plus the generation
    prompt (`prompt`). The content starts at the first occurrence of the assistant text in `full`
    at or after the end of their common prefix. `full` is tokenized as apply_chat_template does
    (add_special_tokens=False: the template writes its own special tokens). With a fast tokenizer,
    the scored tokens are those whose first character lies inside the content; otherwise, the
    tokens from len(tokenize(full[:content start])) to len(tokenize(full[:content end])).
    """
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    prompt = tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    common = len(os.path.commonprefix([prompt, full]))
    content = assistant
    begin = full.find(content, common)
    if begin < 0:  # some templates strip the content
        content = assistant.strip()
        begin = full.find(content, common) if content else -1
    if begin < 0:
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        return _truncated(ids, 1, 1, max_length, reason="assistant content not found in the chat template's rendering")
    finish = begin + len(content)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if begin <= s < finish and e > s]
        start, end = (inside[0], inside[-1] + 1) if inside else (0, 0)
    else:
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(full[:begin], add_special_tokens=False)["input_ids"])
        end = len(tokenizer(full[:finish], add_special_tokens=False)["input_ids"])
    return _truncated(ids, start, end, max_length)


def build_passes(scorer: Scorer, cand: Record, directions: tuple[str, ...]) -> tuple[dict[str, Pass | None], str | None]:
    """The passes one candidate needs for the wanted directions ("ifd", "rifd").

    Returns {pass name: Pass, or None when not wanted} and a row-level reason (empty field).
    """
    passes: dict[str, Pass | None] = {name: None for name in PASSES}
    if not cand.output.strip():
        return passes, "empty output"
    if not cand.instruction.strip():
        return passes, "empty instruction"
    toks, conv, m = scorer.tokens, scorer.conv, scorer.max_length
    a = cand.output
    rfind = conv.span == "rfind"

    matched = conv.alone_cut == "matched"
    what = "the matched cut" if matched else "--max-length"

    def alone_cut(prompt_tokens: int, extra: int = 1) -> int:  # the released code's matched cut
        return m - min(prompt_tokens, m) + extra if matched else m

    if "ifd" in directions:
        if scorer.template == "chat":
            cond = _chat_pass(scorer.tokenizer, join_input(cand.instruction, cand.input, conv.input_join), a, m)
            prompt_tokens = cond.start
        else:
            prompt = template_prompt(scorer.template, cand.instruction, cand.input, conv.input_join)
            cond = _text_pass(toks, prompt, a, m, find=a if rfind else None)
            prompt_tokens = len(toks.ids(prompt))
        passes["a_given_q"] = cond
        if conv.answer_alone == "header":
            passes["a"] = _text_pass(toks, RESPONSE_HEADER, a, alone_cut(prompt_tokens, -2), find=a if rfind else None, what=what)
        else:
            passes["a"] = _direct_pass(toks, a, alone_cut(prompt_tokens), what=what)
    if "rifd" in directions:
        q = cand.instruction + cand.input if conv.rifd_text == "concat" else cand.instruction_text
        rev = reverse_text(scorer.reverse, a)
        if scorer.template == "chat":
            cond = _chat_pass(scorer.tokenizer, rev, q, m)
            prompt_tokens = cond.start
        else:
            prompt = template_prompt(scorer.template, rev, "", conv.input_join)
            cond = _text_pass(toks, prompt, q, m, find=cand.instruction if rfind else None)
            prompt_tokens = len(toks.ids(prompt))
        passes["q_given_a"] = cond
        passes["q"] = _direct_pass(toks, q, alone_cut(prompt_tokens), what=what)
    return passes, None


# ----------------------------------------------------------------------------- the batched forward


def make_batches(passes: list[Pass], batch_tokens: int) -> list[list[Pass]]:
    """Length-sorted (longest first) batches whose padded size rows x longest stays within the budget.

    A row joins a batch only if it is at least (1 - PAD_TOLERANCE) of the batch's longest row, so
    padding stays under about 10% of the work: on a CPU, padding costs as much as real tokens.
    Passes that start with the most common PREFIX_KEY tokens (a template's system prompt, say) are
    batched apart from the others, so their batches can share that prefix (see `batch_losses`).
    """
    counts: dict[tuple[int, ...], int] = {}
    for p in passes:
        if len(p.ids) > PREFIX_KEY:
            counts[tuple(p.ids[:PREFIX_KEY])] = counts.get(tuple(p.ids[:PREFIX_KEY]), 0) + 1
    common = max(counts, key=counts.get) if counts else None
    groups: dict[bool, list[Pass]] = {True: [], False: []}
    for p in passes:
        groups[len(p.ids) > PREFIX_KEY and tuple(p.ids[:PREFIX_KEY]) == common].append(p)
    batches: list[list[Pass]] = []
    for group in groups.values():
        current: list[Pass] = []
        for p in sorted(group, key=lambda p: len(p.ids), reverse=True):
            longest = len(current[0].ids) if current else len(p.ids)
            too_short = len(p.ids) < (1 - PAD_TOLERANCE) * longest
            if current and ((len(current) + 1) * longest > batch_tokens or too_short):
                batches.append(current)
                current = []
            current.append(p)
        if current:
            batches.append(current)
    return sorted(batches, key=lambda b: len(b[0].ids), reverse=True)


def shared_prefix(batch: list[Pass]) -> int:
    """Tokens every row starts with and none scores (0 if fewer than PREFIX_KEY or a single row)."""
    if len(batch) < 2:
        return 0
    first, n = batch[0].ids, min(min(p.start for p in batch) - 1, min(len(p.ids) for p in batch) - 1)
    for p in batch[1:]:
        i = 0
        while i < n and p.ids[i] == first[i]:
            i += 1
        n = i
    return n if n >= PREFIX_KEY else 0


def batch_losses(model, batch: list[Pass], device, head: tuple | None = None) -> list[float]:
    """Mean cross-entropy over each pass's scored tokens, for a right-padded batch.

    Real tokens sit at positions 0..n-1 in every row (explicit position ids) and the attention mask
    hides the padding, which comes after them. Only the hidden states that predict scored tokens go
    through the LM head, a chunk of rows at a time, and the log-softmax is taken in fp32. `head`
    is an fp32 (weight, bias) of the LM head (see `open_scorer`): with it, a bf16 model's logits
    are computed in fp32 too; without it, in the model's dtype and then upcast.
    """
    import torch
    import torch.nn.functional as F

    rows, longest = len(batch), max(len(p.ids) for p in batch)
    pad = getattr(model.config, "pad_token_id", None) or 0
    ids = torch.full((rows, longest), int(pad), dtype=torch.long)
    mask = torch.zeros((rows, longest), dtype=torch.long)
    positions = torch.zeros((rows, longest), dtype=torch.long)
    row_idx, col_idx, targets, owner = [], [], [], []
    for r, p in enumerate(batch):
        n = len(p.ids)
        ids[r, :n] = torch.tensor(p.ids, dtype=torch.long)
        mask[r, :n] = 1
        positions[r, :n] = torch.arange(n)
        span = range(p.start, p.end)
        row_idx.extend([r] * len(span))
        col_idx.extend(i - 1 for i in span)  # position i-1 predicts token i
        targets.extend(p.ids[p.start : p.end])
        owner.extend([r] * len(span))
    if head is None:
        layer = model.get_output_embeddings()
        head = (layer.weight, getattr(layer, "bias", None))
    weight, bias = head
    softcap = getattr(model.config, "final_logit_softcapping", None)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
    shared = shared_prefix(batch)
    with torch.inference_mode():
        if shared:  # run the common prefix once and give every row its keys and values
            out = model.base_model(input_ids=ids[:1, :shared].to(device), use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            cache.batch_repeat_interleave(rows)
            # transformers 5.x renamed `past_key_values` to `cache`; accept either
            name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
            hidden = model.base_model(
                input_ids=ids[:, shared:].to(device), attention_mask=mask.to(device),
                position_ids=positions[:, shared:].to(device), use_cache=True, **{name: cache},
            ).last_hidden_state
            del cache
            col_idx = [c - shared for c in col_idx]
        else:
            hidden = model.base_model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=False
            ).last_hidden_state
        picked = hidden[torch.tensor(row_idx, device=device), torch.tensor(col_idx, device=device)]
        del hidden
        target = torch.tensor(targets, dtype=torch.long, device=device)
        losses = torch.empty(len(targets), dtype=torch.float32, device=device)
        for c in range(0, len(targets), chunk):
            logits = F.linear(picked[c : c + chunk].to(weight.dtype), weight, bias).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            losses[c : c + chunk] = F.cross_entropy(logits, target[c : c + chunk], reduction="none")
        sums = torch.zeros(rows, dtype=torch.float64, device=device)
        sums.index_add_(0, torch.tensor(owner, device=device), losses.double())
        sums = sums.tolist()
    return [sums[r] / batch[r].tokens for r in range(rows)]


@dataclass(kw_only=True)
class ScoreStats:
    """How much work a scoring run did (it goes in the sidecar)."""

    passes: int = 0  # passes the candidates needed
    units: int = 0  # distinct (text, span) units among them
    resumed: int = 0  # units found in shards from an earlier run
    computed: int = 0  # units scored now (by all processes)
    tokens: int = 0  # real (unpadded) tokens run through the model now, by this process
    padded_tokens: int = 0  # batch rows x longest row, by this process
    shared_tokens: int = 0  # prefix tokens not run again because a batch shared them, by this process
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tokens_per_s"] = round(self.tokens / self.seconds, 1) if self.seconds else None
        return d


def score_units(
    scorer: Scorer,
    units: dict[str, Pass],
    known: dict[str, float],
    store: ShardStore | None,
    stats: ScoreStats,
    *,
    progress: bool = True,
    label: str = "score",
) -> None:
    """Score every unit not in `known` (updated in place), sharing the batches among processes."""
    todo = [p for k, p in units.items() if k not in known]
    if not todo:  # the same on every process: `known` is shared
        return
    batches = make_batches(todo, scorer.batch_tokens)
    mine = batches[scorer.rank :: scorer.world]
    results: list[tuple[str, float, int]] = []
    started = time.perf_counter()
    tokens_done = 0
    with Progress(label, sum(len(b) for b in mine), unit="units", enabled=progress and scorer.is_main) as bar:
        for batch in mine:
            losses = batch_losses(scorer.model, batch, scorer.device, scorer.head)
            done = [(p.key, loss, p.tokens) for p, loss in zip(batch, losses)]
            if store is not None:
                store.append(done)
            results.extend(done)
            tokens_done += sum(len(p.ids) for p in batch)
            stats.padded_tokens += len(batch) * max(len(p.ids) for p in batch)
            stats.shared_tokens += shared_prefix(batch) * (len(batch) - 1)
            elapsed = time.perf_counter() - started
            bar.update(advance=len(batch), note=f"{tokens_done / elapsed:,.0f} tok/s" if elapsed else "")
    stats.tokens += tokens_done
    stats.seconds += time.perf_counter() - started
    if scorer.world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    for k, loss, _ in results:
        known[k] = loss
    stats.computed += len(results)


# ----------------------------------------------------------------------------- rows


SCORE_COLUMNS = (
    "id", "variant", "loss_a_given_q", "loss_a", "ifd", "ifd_loss_ratio", "loss_q_given_a", "loss_q", "rifd",
    "rifd_loss_ratio", "tokens_a_given_q", "tokens_a", "tokens_q_given_a", "tokens_q", "truncated", "reason",
)


def _ratios(cond: float | None, direct: float | None) -> tuple[float | None, float | None]:
    if cond is None or direct is None:
        return None, None
    if math.isnan(cond) or math.isnan(direct):
        return math.nan, math.nan
    return math.exp(cond - direct), (cond / direct if direct != 0 else math.nan)


def score_row(cand: Record, passes: dict[str, Pass | None], row_reason: str | None, known: dict[str, float]) -> dict[str, Any]:
    """One scores.parquet row (FORMATS §8.2): None for a pass not run, NaN + reason for an undefined one."""
    row: dict[str, Any] = {"id": cand.id, "variant": cand.variant}
    reasons = [row_reason] if row_reason else []
    losses: dict[str, float | None] = {}
    for name in PASSES:
        p = passes[name]
        if p is None:
            losses[name] = math.nan if row_reason else None
            row[f"tokens_{name}"] = 0 if row_reason else None
            continue
        row[f"tokens_{name}"] = p.tokens
        if p.reason:
            reasons.append(f"{name}: {p.reason}")
            losses[name] = math.nan
        else:
            losses[name] = known[p.key]
    if row_reason:  # an empty field: every pass is undefined, whether or not it was wanted
        for name in PASSES:
            losses[name] = math.nan
    row["loss_a_given_q"], row["loss_a"] = losses["a_given_q"], losses["a"]
    row["ifd"], row["ifd_loss_ratio"] = _ratios(losses["a_given_q"], losses["a"])
    row["loss_q_given_a"], row["loss_q"] = losses["q_given_a"], losses["q"]
    row["rifd"], row["rifd_loss_ratio"] = _ratios(losses["q_given_a"], losses["q"])
    row["truncated"] = any(p is not None and p.truncated for p in passes.values())
    row["reason"] = "; ".join(reasons) if reasons else None
    return {c: row[c] for c in SCORE_COLUMNS}


class ScoreSession:
    """Scores candidates in one or more rounds (select needs two), sharing units, shards and stats."""

    def __init__(self, scorer: Scorer, shards: Path | None, *, resume: bool = True, progress: bool = True):
        self.scorer = scorer
        self.progress = progress
        self.store = ShardStore(shards, scorer.rank) if shards is not None else None
        self.known: dict[str, float] = {}
        self.stats = ScoreStats()
        if self.store is not None and resume:
            self.known = self.store.load()
            if self.known and scorer.is_main:
                log.info("resuming: %d scored units found in %s", len(self.known), shards)
        if scorer.world > 1:  # every process must see the same finished units before any writes more
            scorer.state.wait_for_everyone()
        self._resumed = set(self.known)
        self._seen: set[str] = set()
        self._passes: set[tuple[int, str, str]] = set()

    def score(self, cands: list[Record], wants: list[tuple[str, ...]], label: str = "score") -> list[dict[str, Any]]:
        """A scores row per candidate; `wants[i]` names the directions ("ifd", "rifd") candidate i needs."""
        built = [build_passes(self.scorer, c, w) for c, w in zip(cands, wants)]
        units: dict[str, Pass] = {}
        for cand, (passes, _) in zip(cands, built):
            for name, p in passes.items():
                if p is not None and p.reason is None:
                    if (cand.index, cand.variant, name) not in self._passes:  # a later round may ask again
                        self._passes.add((cand.index, cand.variant, name))
                        self.stats.passes += 1
                    units.setdefault(p.key, p)
        new = set(units) - self._seen
        self._seen |= new
        self.stats.units += len(new)
        self.stats.resumed += len(new & self._resumed)
        score_units(self.scorer, units, self.known, self.store, self.stats, progress=self.progress, label=label)
        return [score_row(c, passes, reason, self.known) for c, (passes, reason) in zip(cands, built)]

    def finish(self) -> None:
        if self.store is not None:
            self.store.close()


def write_scores(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows to Parquet with the §8.2 types: nulls stay null, NaN stays NaN."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reflect_tune.artifacts import atomic_path

    types = {"id": pa.string(), "variant": pa.string(), "truncated": pa.bool_(), "reason": pa.string()}
    arrays = []
    for col in SCORE_COLUMNS:
        kind = types.get(col, pa.int32() if col.startswith("tokens_") else pa.float64())
        arrays.append(pa.array([r[col] for r in rows], type=kind, from_pandas=False))
    table = pa.Table.from_arrays(arrays, names=list(SCORE_COLUMNS))
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except OSError as e:
        raise ReflectTuneError(f"{path}: cannot write: {e.strerror or e}") from None
    return path


# ----------------------------------------------------------------------------- the `score` stage


@dataclass(kw_only=True)
class ScoreResult:
    rows: list[dict[str, Any]]
    stats: ScoreStats
    records: int
    template: str
    dtype: str


def check_output(path: str | os.PathLike, suffix: str, inputs: list[str] = ()) -> None:
    """Before any model loads: the right suffix, not a folder, not an input, a writable folder."""
    from reflect_tune.artifacts import check_output_file

    out = Path(path)
    if out.suffix.lower() != suffix:
        raise ReflectTuneError(f"{out}: the output must be a {suffix} file")
    check_output_file(out, inputs)


def nan_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts for the report: rows with a reason, grouped by the reason's text."""
    reasons: dict[str, int] = {}
    for r in rows:
        if r["reason"]:
            for part in r["reason"].split("; "):
                reasons[part] = reasons.get(part, 0) + 1
    return {
        "rows": len(rows),
        "with_reason": sum(1 for r in rows if r["reason"]),
        "truncated": sum(1 for r in rows if r["truncated"]),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }


def check_turns(turns: str) -> None:
    if turns not in TURN_POLICIES:
        raise SettingError("turns", f"setting 'turns': {turns!r} is not one of {', '.join(TURN_POLICIES)}")


def validate(config: ScoreConfig) -> None:
    """The settings and the output, before the input is read or a model loads."""
    if config.only not in (None, "ifd", "rifd"):
        raise SettingError("only", f"--only must be ifd or rifd, got {config.only!r}")
    check_turns(config.turns)
    check_output(config.output, ".parquet", [config.input])
    check_options(config.template, config.max_length, config.reverse, config.batch_tokens)
    scoring_conventions(config)


def run(config: ScoreConfig) -> ScoreResult:
    """Score every candidate of the input in the wanted directions and write scores.parquet + sidecar."""
    from reflect_tune.artifacts import provenance, write_meta

    validate(config)
    loaded = load_candidates(config.input, format=config.format, split=config.split, turns=config.turns)
    for w in loaded.warnings:
        log.warning("warning: %s", w)
    template, conv = scoring_conventions(config)
    scorer = open_scorer(
        config.model, template=template, dtype=config.dtype, device=config.device,
        max_length=config.max_length, batch_tokens=config.batch_tokens, reverse=config.reverse,
        trust_remote_code=config.trust_remote_code, conventions=conv,
    )
    directions = (config.only,) if config.only else ("ifd", "rifd")
    shards = shard_folder(config.output, scorer.signature)
    session = ScoreSession(scorer, shards, resume=config.resume, progress=config.progress)
    rows = session.score(loaded.candidates, [directions] * len(loaded.candidates))
    session.finish()
    result = ScoreResult(rows=rows, stats=session.stats, records=len(loaded.ids), template=scorer.template, dtype=scorer.dtype)
    if not scorer.is_main:
        return result
    meta = provenance("score", config, inputs=[config.input] if Path(config.input).exists() else [])
    meta["scoring"] = scoring_meta(scorer, session.stats)
    meta["report"] = {"records": len(loaded.ids), "reflected": loaded.reflected, **nan_summary(rows)}
    if loaded.report is not None:
        meta["load_report"] = loaded.report.__dict__
    write_scores(rows, config.output)
    write_meta(config.output, meta)
    if session.store is not None:
        session.store.remove()
    return result


def scoring_meta(scorer: Scorer, stats: ScoreStats) -> dict[str, Any]:
    """The settings that decide the numbers, for a sidecar."""
    return {
        "model": scorer.spec,
        "template": scorer.template,
        "dtype": scorer.dtype,
        "device": str(scorer.device),
        "max_length": scorer.max_length,
        "batch_tokens": scorer.batch_tokens,
        "reverse": scorer.reverse,
        "conventions": dict(scorer.conv.__dict__),
        "processes": scorer.world,
        "stats": stats.to_dict(),
    }
