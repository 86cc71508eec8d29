"""The in-process teacher of `reflect --backend transformers`: a local model that cannot miss the layout.

A small model asked to "give the better answer between [[BETTER ANSWER]] and [[END]]" mostly
does not. Run in this process, it does not have to: the reply is built around it.

1. The chat template renders the conversation (system, user, and any re-ask turns) with the
   assistant's turn opened.
2. With `--critique-tokens N` the model first writes up to N tokens of critique, stopped early
   where it starts a marker itself.
3. For each block the request asks for (read from the tagged markers in its last user message,
   in order), the start marker is written into the assistant turn and the model continues from
   it. Generation stops at the end marker (a stop string), at the model's end of turn, or at the
   token budget (`max_tokens`, per block); the end marker is then written for it. A block cut by the budget gets no end
   marker, so the parser reports it as cut ("hit --max-tokens"), as for a server reply, unless it
   ran into a loop (a sentence repeated word for word, as greedy decoding of a small model does):
   then it ends before the first repeat (`cut_loop`). A block
   that another follows (the new instruction, before the new answer) also ends at its first
   blank line: a small model otherwise runs on into the answer.

The result is one ordinary reply text, parsed by `reflect.parse_blocks` like any other, stored in
the same request cache under the same kind of key, written to the same output: resume, `--dry-run`
and the summary work unchanged. `TeacherClient(local=...)` calls `reply(messages, params)`.

Batching: requests from all of reflect's workers queue here; one loop takes up to `batch_size`
prompts, runs `generate` on them in a worker thread (left padding, greedy or sampled as the run's
temperature says) and wakes their owners. On CUDA the batch starts at 64 and halves on
out-of-memory until it fits ("as wide as memory allows").
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from reflect_tune.cache import Reply
from reflect_tune.errors import ReflectTuneError

log = logging.getLogger("reflect_tune.local_teacher")

CPU_BATCH, GPU_BATCH = 8, 64


@dataclass(kw_only=True)
class Piece:
    """What one generate call gave one prompt: the new text, its token count, and why it stopped."""

    text: str
    tokens: int
    stopped: str  # "stop" (a stop string or the end of turn) or "length" (the budget ran out)
    prompt_tokens: int = 0


def layout_of(messages: list[dict[str, str]]) -> tuple[tuple[str, ...], str]:
    """The blocks a request asks for and its tag: the tagged start markers of its last user message.

    The layout sits at the end of the prompt, so the tag is the last marker's; markers with other
    tags (quoted by the data) are not the request's."""
    from reflect_tune.layout import MARKER

    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    found = MARKER.findall(last)
    if not found or not found[-1][1]:
        raise ReflectTuneError("the transformers backend needs the markers layout in the prompt "
                               "(a tagged [[NAME TAG]] marker in the last user message)")
    tag = found[-1][1]
    names: list[str] = []
    for name, t in found:
        if t == tag and name != "END" and name not in names:
            names.append(name)
    return tuple(names), tag


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*\s*")


def cut_loop(text: str) -> tuple[str, bool]:
    """The text before its first repeated sentence (of 3+ words), and whether there was one.

    A small model decoding greedily often ends in a loop ("It is complete and accurate. It is
    complete and accurate. ..."); everything from the first repeat on is dropped."""
    seen: set[str] = set()
    for m in _SENTENCE.finditer(text):
        sentence = " ".join(m.group(0).split()).lower()
        if len(sentence.split()) >= 3 and sentence in seen:
            return text[: m.start()].strip(), True
        seen.add(sentence)
    return text, False


def _Abort(event: threading.Event):
    """A stopping criterion that ends every sequence of a generate call once `event` is set."""
    import torch
    from transformers import StoppingCriteria

    class Abort(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Abort()


class LocalTeacher:
    """A causal LM loaded in this process, answering reflect's requests in batches."""

    def __init__(self, *, spec: str, device: str = "auto", dtype: str = "auto", batch_size: int | None = None,
                 critique_tokens: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                 trust_remote_code: bool = False):
        from reflect_tune.models import load_model, load_tokenizer, resolve_model

        resolved = resolve_model(spec)
        self.tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if not getattr(self.tokenizer, "chat_template", None):
            raise ReflectTuneError(f"{spec}: the tokenizer has no chat template; the transformers backend "
                                   "needs an instruct (chat) model")
        self.model = load_model(resolved, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.device = self.model.device
        import torch

        self.threads = torch.get_num_threads()
        self.batch_size = batch_size or (GPU_BATCH if self.device.type == "cuda" else CPU_BATCH)
        self.critique_tokens = critique_tokens
        self.sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        self._criteria: dict[tuple[str, ...], Any] = {}  # stop strings -> StoppingCriteriaList (costly to build)
        # tokens a block may not start with: blank ones and the end of turn (an empty block), and
        # brackets (how a small model starts echoing the layout's filler, "(the better answer)")
        self.no_start = [i for piece, i in self.tokenizer.get_vocab().items()
                         if self.tokenizer.convert_tokens_to_string([piece]).strip()[:1] in ("(", "[", "<", "")]
        self.generated_tokens = 0
        self.batches = 0
        self._queue: list[tuple[str, int, list[str], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._lock = threading.Lock()  # generate is not re-entrant
        self.abort = threading.Event()  # set when the run stops: the generate call in flight ends at its next token

    # -- one request ------------------------------------------------------------------------------

    async def reply(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Reply:
        """The whole reply to one request: critique (optional), then each block, markers written for it."""
        from reflect_tune.layout import marker

        names, tag = layout_of(messages)
        budget = int(params.get("max_tokens") or params.get("max_completion_tokens") or 512)  # per block
        # the tokenizer itself is used by the generate thread only: a fast tokenizer is not thread-safe
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text, used, finish, prompt_tokens = "", 0, "stop", None
        if self.critique_tokens:
            piece = await self.generate(prompt, self.critique_tokens, ["[["])
            text, used, prompt_tokens = piece.text.split("[[")[0].rstrip(), piece.tokens, piece.prompt_tokens
        for i, name in enumerate(names):
            text += ("\n" if text else "") + marker(name, tag) + "\n"
            left = budget  # each block has the whole budget (the critique has its own)
            # "[[END", not the tagged marker: one stop set for every request, so they batch together.
            # A block with another after it (the new instruction) also ends at its first blank line:
            # a small model otherwise runs on into the answer.
            stops = ["[[END"] if i == len(names) - 1 else ["[[END", "\n\n"]
            piece = await self.generate(prompt + text, left, stops)
            used += piece.tokens
            if prompt_tokens is None:  # what the teacher read first: the prompt and the marker written for it
                prompt_tokens = piece.prompt_tokens
            body = piece.text.split("[[END")[0]
            body = (body if i == len(names) - 1 else body.strip().split("\n\n")[0]).strip()
            if piece.stopped == "length":
                body, looped = cut_loop(body)
                if looped:  # greedy decoding in a loop has nothing new to say: the block ends there
                    piece.stopped = "stop"
            text += body
            if piece.stopped == "length":
                finish = "length"
                break
            text += "\n" + marker("END", tag)
        return Reply(text=text, finish_reason=finish, prompt_tokens=prompt_tokens or 0, completion_tokens=used)

    # -- batching ---------------------------------------------------------------------------------

    async def generate(self, prompt: str, max_new_tokens: int, stops: list[str]) -> Piece:
        """Queue one continuation; the batch loop answers it together with the others waiting."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        self._queue.append((prompt, max_new_tokens, stops, future))
        self._wake.set()
        return await future

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other workers queue their prompts too
            while self._queue:
                # one stop-string set per batch (generate takes one); the longest budget first
                stops = self._queue[0][2]
                batch = [q for q in self._queue if q[2] == stops][: self.batch_size]
                for q in batch:
                    self._queue.remove(q)
                live = [q for q in batch if not q[3].cancelled()]
                if not live:
                    continue
                try:
                    pieces = await asyncio.to_thread(self._run_batch, [q[0] for q in live],
                                                     max(q[1] for q in live), stops, [q[1] for q in live])
                except asyncio.CancelledError:  # the run is stopping (Ctrl-C, a fatal error): end generate early
                    self.abort.set()
                    raise
                except Exception as e:  # handed to every waiter
                    for q in live:
                        if not q[3].done():
                            q[3].set_exception(e)
                    continue
                for q, piece in zip(live, pieces):
                    if not q[3].done():
                        q[3].set_result(piece)

    def _run_batch(self, prompts: list[str], max_new_tokens: int, stops: list[str], budgets: list[int]) -> list[Piece]:
        """generate() on a batch, halving it on CUDA out-of-memory."""
        import torch

        out: list[Piece] = []
        start = 0
        while start < len(prompts):
            size = min(self.batch_size, len(prompts) - start)
            try:
                out += self._generate(prompts[start:start + size], max_new_tokens, stops, budgets[start:start + size])
                start += size
            except torch.OutOfMemoryError:
                if size == 1:
                    raise ReflectTuneError("the teacher does not fit in GPU memory even one prompt at a time; "
                                           "lower --max-tokens or use --device cpu") from None
                torch.cuda.empty_cache()
                self.batch_size = max(1, size // 2)
                log.warning("GPU out of memory at batch %d; the transformers backend now batches %d", size, self.batch_size)
        return out

    def _generate(self, prompts: list[str], max_new_tokens: int, stops: list[str], budgets: list[int]) -> list[Piece]:
        import torch

        tok = self.tokenizer
        torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread: this one is not main
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # the end of the assistant's turn: the model's own end ids (a list for chat models) and the tokenizer's
        ends = self.model.generation_config.eos_token_id
        ends = list(ends) if isinstance(ends, (list, tuple)) else [ends]
        eos = sorted({t for t in (*ends, tok.eos_token_id, tok.pad_token_id) if isinstance(t, int) and t >= 0})
        key = tuple(stops)
        if key not in self._criteria:
            from transformers import StoppingCriteriaList, StopStringCriteria

            self._criteria[key] = StoppingCriteriaList([StopStringCriteria(tokenizer=tok, stop_strings=list(stops)),
                                                        _Abort(self.abort)])
        with self._lock, torch.inference_mode():
            generated = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, stopping_criteria=self._criteria[key],
                pad_token_id=tok.pad_token_id, eos_token_id=eos or None, begin_suppress_tokens=self.no_start,
                **self.sampling,
            )
        self.batches += 1
        width = enc["input_ids"].shape[1]
        pieces = []
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        for row, budget, length in zip(generated[:, width:].tolist(), budgets, lengths):
            ids, stopped = [], "length"
            for t in row[:budget]:
                if t in eos:
                    stopped = "stop"
                    break
                ids.append(t)
            text = tok.decode(ids, skip_special_tokens=True)
            if any(s in text for s in stops):
                stopped = "stop"
            if stopped == "length" and len(ids) < budget:  # padding after a stop string: it stopped early
                stopped = "stop"
            self.generated_tokens += len(ids)
            pieces.append(Piece(text=text, tokens=len(ids), stopped=stopped, prompt_tokens=int(length)))
        return pieces
