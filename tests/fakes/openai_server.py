"""A fake OpenAI-compatible HTTP server for tests and benchmarks (the standard library, and the
marker format from reflect_tune.layout, which owns it).

`FakeOpenAI` serves /v1/models, /v1/chat/completions, the Files and the Batches APIs from its own
asyncio loop in a daemon thread; `python tests/fakes/openai_server.py` does the same in a child
process after printing one line `READY <base_url>`.

Replies are deterministic. Let `last` be the text of the last user message, `h` the first 8 hex of
sha256(last), `tag` the tag (or "" when untagged) of the LAST `[[NAME TAG]]` marker in
`last`, and `D` the space-joined, de-duplicated `FAULT:...` directives of all messages (so they
propagate into rewritten instructions). A NEW INSTRUCTION marker in `last` gives "Analysis of the
pair." + blocks NEW INSTRUCTION "Improved instruction {h} {D}" and NEW ANSWER "Improved answer {h}";
else a BETTER ANSWER marker gives "Critique of the answer." + block BETTER ANSWER "Better answer
{h}"; else the reply is "Echo: " + last[:200]. A block is "\n" + `reflect.block(NAME, text, tag)`.

Fault directives are `FAULT:<kind>` or `FAULT:<kind>:<n>` anywhere in any message; unknown kinds
are ignored. Every request body has a key (sha256 of its canonical JSON) with an attempt counter
(stats "by_key"; batch lines count too, so resubmitting a failed line is a retry). Status and
transport faults hit the first n attempts (default 1) of that exact body, and chain in order of
appearance (`FAULT:429 FAULT:500:2` -> 429, 500, 500, then success):

* `429` -> 429, headers `retry-after-ms: 100` and `retry-after: 1`, type "rate_limit_exceeded";
* `500` `502` `503` `408` `409` (retryable) and `400` `401` `403` `404` -> that status
  with an OpenAI error body;
* `context_length` / `bad_param` -> a 400 worded as OpenAI words a prompt over the context
  window (code context_length_exceeded, param messages) / an unsupported parameter (code
  unsupported_parameter, param max_tokens);
* `stall` -> sleep `stall_seconds`, then answer normally (a client timeout fires first);
* `drop` -> close the TCP connection without writing any response;
* `batch_expired` -> ignored live; in a batch the line goes to the error file as
  `{"response": null, "error": {"code": "batch_expired", ...}}`.
In a batch, a status fault gives an error-file line whose response.status_code is that status;
`stall` and `drop` give status 500 there.

Content faults hit every attempt (`:n` is ignored; the first applicable one wins). With the suffix
`-once` (`FAULT:garbage-once`) they skip requests holding an assistant message (re-asks):

* `garbage` -> random-looking words, no markers;
* `inject` -> decoys first (untagged markers, wrong-tag markers, a correctly tagged START marker
  with decoy text and no END before the next START), then the normal reply;
* `na` / `empty` / `placeholder` -> every block's text is "N/A" / "" / "<your improved text
  here>" (an echo reply is replaced whole).

Structured outputs: a body with `response_format: {type: json_schema, json_schema: {schema}}` is
answered (json_mode "accept") with one JSON object holding every property of the schema: strings
"Critique of the pair.", "Improved instruction {h} {D}", "Improved answer {h}", "Better answer
{h}" for critique / new_instruction / new_answer / better_answer (others "{name} {h}"), true for
booleans. Content faults apply to the fields (not to critique); `inject` appends marker decoys to
every string; `json_invalid` cuts the JSON text in half; `json_schema` drops the last field.
json_mode "reject" answers such a body with a 400 (param response_format, code
unsupported_parameter); "ignore" answers with the free-text reply as if the field were absent.

Batches start "validating". The first `batch_polls` GETs show "in_progress" (the last of them
"finalizing" when batch_polls >= 2); the next GET answers every line (no latency) and shows
"completed", with seeded-shuffled output / error files (purpose "batch_output", null when
empty). An invalid input file (bad JSON, missing or duplicate custom_id, method not POST, url not
/v1/chat/completions, body not an object, over MAX_BATCH_BYTES / MAX_BATCH_LINES) makes the first
GET show "failed" with errors.data = [{code, message, param, line}]. Cancel gives "cancelling",
the next GET "cancelled".

OpenAI's reasoning models: a model whose name starts with one of `reasoning_models` (default
o1, o3, o4, gpt-5) is answered as OpenAI answers those. A body with `max_tokens` gets the 400
`bad_param` gives (param max_tokens, code unsupported_parameter); a `temperature` or `top_p`
other than 1 gets a 400 "Unsupported value: 'temperature' does not support 0 with this model.
Only the default (1) value is supported." (param temperature / top_p, code unsupported_value).
Their replies' usage has `completion_tokens_details.reasoning_tokens` = `reasoning_tokens`
(default 40), and `completion_tokens` includes them, as OpenAI counts them.

Pairwise judging: with `judge=RULE` (JUDGE_RULES), a request whose user message shows two answers
as reflect_tune.judge's built-in prompt does is answered "Both answers read." and a last line
`Verdict: [[1]]` / `[[2]]` / `[[tie]]`: always the first / second / tie, or `longer` (the answer
with more characters; tie when equal). Content faults apply as to any reply. Off by default.

Prompt log-probabilities (vLLM's completions API): with `logits_model=PATH` (a transformers causal LM
folder, loaded in the server process), POST /v1/completions takes a `prompt` of token ids (a list
of ints, or a list holding one such list), `max_tokens` >= 1 and `prompt_logprobs=k`, and answers
as vLLM does: choices[0].prompt_logprobs is a list with one entry per prompt token, null for the
first and otherwise {"<token id>": {"logprob", "rank", "decoded_token"}} for the model's log_softmax
(float32, the prompt run once, unpadded) at the position before it: the prompt token first, then
the top k by rank (k + 1 entries when the prompt token is outside the top k, as vLLM sends them);
`text` is the most likely next token. A text prompt, or no logits_model, is a 400.
completion_requests counts these calls.

Stats (`stats()`, GET /_stats; `reset()`, POST /_reset clear them and the attempt counters):
chat_requests (live calls, any outcome), by_status ({"200": n, "drop": n, ...}), by_key,
in_flight, max_in_flight, log ([{t, done, key, status, model}] per live call, plus `body` (the
request body as parsed) and `usage` (the usage answered, or None) with `record_bodies=True`),
files (uploads via POST /v1/files), batches_created. The API key is never stored in stats,
logged or echoed. Request targets may be absolute (`POST http://api.openai.com/v1/...`, as a
client sends them to an HTTP proxy), so a test can point HTTP_PROXY at the server and keep the
client's base URL on OpenAI's host.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import random
import re
import signal
import sys
import threading
import time
from http import HTTPStatus

from reflect_tune.layout import MARKER, block, marker

MAX_BATCH_BYTES = 200 * 1024 * 1024
MAX_BATCH_LINES = 50_000
MAX_BODY = 256 * 1024 * 1024
BATCH_ENDPOINT = "/v1/chat/completions"

FAULT_RE = re.compile(r"FAULT:([A-Za-z0-9_]+(?:-once)?)(?::(\d+))?")
ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_request"), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"), 404: ("invalid_request_error", "not_found"),
    408: ("timeout_error", "timeout"), 409: ("conflict_error", "conflict"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"), 500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"), 503: ("server_error", "service_unavailable"),
}
STATUS_FAULTS = {str(code) for code in ERROR_KINDS}
CONTENT_FAULTS = {"garbage", "inject", "na", "empty", "placeholder", "json_invalid", "json_schema"}
BLANK_TEXT = {"na": "N/A", "empty": "", "placeholder": "<your improved text here>"}


def _hex(n: int = 12) -> str:
    return os.urandom(n).hex()


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None, param=None) -> dict:
    """An OpenAI-style error payload."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def request_key(body) -> str:
    """sha256 of the canonical JSON of a request body: the key of its fault attempt counter."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# 400s worded as real servers word them: about this request's content, or about a setting every request shares
NAMED_400 = {
    "context_length": error_body("This model's maximum context length is 8192 tokens. However, your messages "
                                 "resulted in 9000 tokens. Please reduce the length of the messages.",
                                 code="context_length_exceeded", param="messages"),
    "bad_param": error_body("Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                            "'max_completion_tokens' instead.", code="unsupported_parameter", param="max_tokens"),
}


def content_text(content) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def find_directives(texts) -> list[str]:
    """All `FAULT:...` directives in `texts`, de-duplicated, in order of appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        for m in FAULT_RE.finditer(text):
            seen.setdefault(m.group(0))
    return list(seen)


JUDGE_RULES = ("longer", "first", "second", "tie")


def judge_verdict(msgs: list, rule: str) -> str | None:
    """A pairwise judge's verdict by `rule` when a user message shows two answers the way
    reflect_tune.judge's prompt does (longer: the answer with more characters, tie when equal), else None."""
    from reflect_tune.judge import shown_answers

    for m in msgs:
        pair = shown_answers(content_text(m.get("content"))) if m.get("role") == "user" else None
        if pair is not None:
            first, second = len(pair[0]), len(pair[1])
            return {"first": "1", "second": "2", "tie": "tie",
                    "longer": "1" if first > second else "2" if second > first else "tie"}[rule]
    return None


def build_reply(messages: list, content_fault: str | None = None, judge: str | None = None) -> str:
    """The assistant text for `messages`, optionally spoiled by a content fault (see module doc)."""
    msgs = [m for m in messages if isinstance(m, dict)]
    last = next((content_text(m.get("content")) for m in reversed(msgs) if m.get("role") == "user"), "")
    found = MARKER.findall(last)  # the marker format is layout.py's: (name, tag) pairs
    tag = found[-1][1] if found else ""
    names = {name for name, _ in found}
    h = hashlib.sha256(last.encode()).hexdigest()[:8]
    if content_fault == "garbage":
        rng = random.Random(h)
        return " ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(2, 9))) for _ in range(24))
    if "NEW INSTRUCTION" in names:
        d = " ".join(find_directives(content_text(m.get("content")) for m in msgs))
        pre = "Analysis of the pair."
        blocks = [("NEW INSTRUCTION", f"Improved instruction {h} {d}".strip()), ("NEW ANSWER", f"Improved answer {h}")]
    elif "BETTER ANSWER" in names:
        pre, blocks = "Critique of the answer.", [("BETTER ANSWER", f"Better answer {h}")]
    elif judge is not None and (verdict := judge_verdict(msgs, judge)) is not None:
        pre, blocks = f"Both answers read.\nVerdict: [[{verdict}]]", []
    else:
        pre, blocks = "Echo: " + last[:200], []
    if content_fault in BLANK_TEXT:
        blocks = [(name, BLANK_TEXT[content_fault]) for name, _ in blocks]
        pre = pre if blocks else BLANK_TEXT[content_fault]
    reply = pre + "".join("\n" + block(name, text, tag) for name, text in blocks)
    if content_fault == "inject":
        wrong = "ffffff" if tag == "000000" else "000000"
        first = blocks[0][0] if blocks else "BETTER ANSWER"
        untagged = " ".join(f"{marker(n)} decoy {marker('END')}" for n in ("BETTER ANSWER", "NEW INSTRUCTION", "NEW ANSWER"))
        misfit = " ".join(f"{marker(n, wrong)} decoy {marker('END', wrong)}" for n in ("BETTER ANSWER", "NEW INSTRUCTION"))
        reply = f"Draft notes: {untagged}\n{misfit}\n{marker(first, tag)}\ndecoy draft that is never closed\n" + reply
    return reply


REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")


def refuse_for_reasoning(body: dict) -> dict | None:
    """The 400 body OpenAI gives a reasoning model's request for `max_tokens` or a sampling setting, or None."""
    if "max_tokens" in body:
        return NAMED_400["bad_param"]
    for name in ("temperature", "top_p"):
        if name in body and body[name] != 1:
            return error_body(f"Unsupported value: '{name}' does not support {body[name]} with this model. Only the "
                              "default (1) value is supported.", code="unsupported_value", param=name)
    return None


def build_json_reply(messages: list, schema, content_fault: str | None = None) -> str:
    """The JSON object answering a request with response_format json_schema (see module doc)."""
    msgs = [m for m in messages if isinstance(m, dict)]
    last = next((content_text(m.get("content")) for m in reversed(msgs) if m.get("role") == "user"), "")
    h = hashlib.sha256(last.encode()).hexdigest()[:8]
    d = " ".join(find_directives(content_text(m.get("content")) for m in msgs))
    texts = {"critique": "Critique of the pair.", "new_instruction": f"Improved instruction {h} {d}".strip(),
             "new_answer": f"Improved answer {h}", "better_answer": f"Better answer {h}"}
    props = (schema or {}).get("properties") or {} if isinstance(schema, dict) else {}
    data = {}
    for name, spec in props.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        data[name] = True if kind == "boolean" else 0 if kind in ("integer", "number") else texts.get(name, f"{name} {h}")
    if content_fault in BLANK_TEXT:
        data = {k: (BLANK_TEXT[content_fault] if k != "critique" and isinstance(v, str) else v) for k, v in data.items()}
    if content_fault == "inject":  # marker strings inside the JSON strings: plain text in this protocol
        data = {k: (f"{v} [[END ffffffff]] [[BETTER ANSWER 00000000]] decoy" if isinstance(v, str) else v) for k, v in data.items()}
    if content_fault == "json_schema" and data:
        data.pop(list(data)[-1])  # the last required field is missing
    text = json.dumps(data, ensure_ascii=False)
    if content_fault == "json_invalid":
        text = text[: len(text) // 2]  # cut in the middle
    return text


def decide(body, attempt: int, models, *, batch: bool = False, reasoning_models=REASONING_MODELS,
           reasoning_tokens: int = 40, json_mode: str = "accept", judge: str | None = None) -> tuple:
    """Answer one chat-completions request body on its `attempt`-th try (1-based).

    Returns ("ok", chat.completion dict), ("error", status, error body, extra headers),
    ("stall", chat.completion dict), ("drop",) or ("expired",) (batches only).
    """
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return ("error", 400, error_body("'messages' must be a non-empty list", param="messages"), {})
    model = body.get("model")
    if not isinstance(model, str):
        return ("error", 400, error_body("'model' is required", param="model"), {})
    if models is not None and model not in models:
        return ("error", 404, error_body(f"The model `{model}` does not exist", code="model_not_found"), {})
    reasoning = model.startswith(tuple(reasoning_models))
    if reasoning and (refusal := refuse_for_reasoning(body)) is not None:
        return ("error", 400, refusal, {})
    msgs = [m for m in body["messages"] if isinstance(m, dict)]
    texts = [content_text(m.get("content")) for m in msgs]
    faults = [(m.group(1), int(m.group(2) or 1)) for m in map(FAULT_RE.fullmatch, find_directives(texts))]
    upto, action = 0, None
    for kind, n in faults:
        if kind in STATUS_FAULTS or kind in NAMED_400 or kind in ("stall", "drop") or (batch and kind == "batch_expired"):
            upto += n
            if attempt <= upto:
                action = kind
                break
    if action in NAMED_400:
        return ("error", 400, NAMED_400[action], {})
    if action in STATUS_FAULTS or (batch and action in ("stall", "drop")):
        status = 500 if action in ("stall", "drop") else int(action)
        type_, code = ERROR_KINDS[status]
        headers = {"retry-after-ms": "100", "retry-after": "1"} if status == 429 else {}
        return ("error", status, error_body(f"Injected fault: HTTP {status}", type_, code), headers)
    if action in ("drop", "batch_expired"):
        return ("drop",) if action == "drop" else ("expired",)
    wants_json = isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "json_schema"
    if wants_json and json_mode == "reject":
        return ("error", 400, error_body("Unsupported parameter: 'response_format' is not supported by this server.",
                                         code="unsupported_parameter", param="response_format"), {})
    has_assistant = any(m.get("role") == "assistant" for m in msgs)
    content_fault = None
    for kind, _ in faults:
        base = kind[:-5] if kind.endswith("-once") else kind
        if base in CONTENT_FAULTS and not (kind.endswith("-once") and has_assistant):
            content_fault = base
            break
    if wants_json and json_mode == "accept":
        reply = build_json_reply(msgs, (body["response_format"].get("json_schema") or {}).get("schema"), content_fault)
    else:
        reply = build_reply(msgs, content_fault, judge)
    prompt_tokens = sum(len(t.split()) for t in texts)
    completion_tokens = len(reply.split()) + (reasoning_tokens if reasoning else 0)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    return ("stall" if action == "stall" else "ok", {
        "id": "chatcmpl-" + _hex(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": usage})


def validate_batch_input(data: bytes) -> tuple[list, list]:
    """Parse a batch input file: (list of (custom_id, body), list of BatchError dicts)."""
    def err(code, message, line=None):
        return {"code": code, "message": message, "param": None, "line": line}

    if len(data) > MAX_BATCH_BYTES:
        return [], [err("file_too_large", f"Input file exceeds {MAX_BATCH_BYTES} bytes")]
    lines = data.split(b"\n")
    if sum(1 for raw in lines if raw.strip()) > MAX_BATCH_LINES:
        return [], [err("too_many_requests", f"Input file has more than {MAX_BATCH_LINES} requests")]
    items, errors, seen = [], [], set()
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            errors.append(err("invalid_json_line", "This line is not parseable as valid JSON.", no))
            continue
        if not isinstance(row, dict):
            errors.append(err("invalid_json_line", "This line is not a JSON object.", no))
        elif not isinstance(row.get("custom_id"), str):
            errors.append(err("missing_custom_id", "Each line needs a string custom_id.", no))
        elif row["custom_id"] in seen:
            errors.append(err("duplicate_custom_id", f"The custom_id {row['custom_id']!r} is duplicated.", no))
        elif row.get("method") != "POST":
            errors.append(err("invalid_method", "The method must be POST.", no))
        elif row.get("url") != BATCH_ENDPOINT:
            errors.append(err("invalid_url", f"The url must be {BATCH_ENDPOINT}.", no))
        elif not isinstance(row.get("body"), dict):
            errors.append(err("invalid_body", "The body must be a JSON object.", no))
        else:
            seen.add(row["custom_id"])
            items.append((row["custom_id"], row["body"]))
    return items, errors


def parse_multipart(body: bytes, content_type: str) -> dict:
    """Parse multipart/form-data into {name: (filename or None, bytes)}."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("multipart body without boundary")
    fields = {}
    for part in (b"\r\n" + body).split(b"\r\n--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("malformed multipart part")
        disp = next((ln for ln in head.decode("utf-8", "replace").split("\r\n")
                     if ln.lower().startswith("content-disposition:")), "")
        name = re.search(r';\s*name="([^"]*)"', disp)
        filename = re.search(r';\s*filename="([^"]*)"', disp)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, data)
    return fields


def _http_response(status: int, payload=None, *, raw: bytes | None = None, ctype: str = "application/json",
                   headers: dict | None = None, keep: bool = True) -> bytes:
    body = raw if raw is not None else json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"content-type: {ctype}", f"content-length: {len(body)}",
            "connection: " + ("keep-alive" if keep else "close"), "x-request-id: req_" + _hex(8)]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _new_stats() -> dict:
    return {"chat_requests": 0, "by_status": {}, "by_key": {}, "in_flight": 0, "max_in_flight": 0,
            "log": [], "files": 0, "batches_created": 0, "completion_requests": 0}


def _copy_stats(st: dict) -> dict:
    return {**st, "by_status": dict(st["by_status"]), "by_key": dict(st["by_key"]),
            "log": [dict(e) for e in st["log"]]}


async def _acall(fn):
    return fn()


class _Drop(Exception):
    """Raised by a handler to close the connection without a response."""


class FakeOpenAI:
    """The fake server; use as a context manager or call `start()` / `stop()` (see module doc)."""

    def __init__(self, latency: float = 0.0, api_key: str | None = None, models=None,
                 stall_seconds: float = 30.0, batch_polls: int = 2, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0, record_bodies: bool = False, reasoning_models=REASONING_MODELS,
                 reasoning_tokens: int = 40, json_mode: str = "accept", judge: str | None = None,
                 logits_model: str | None = None):
        self.latency, self.models, self.stall_seconds = latency, None if models is None else list(models), stall_seconds
        self.record_bodies, self.reasoning_models = record_bodies, tuple(reasoning_models)
        self.reasoning_tokens = reasoning_tokens
        self.judge = judge  # None, or a pairwise judge's rule (JUDGE_RULES) for reflect_tune.judge's prompts
        self.json_mode = json_mode  # response_format json_schema: "accept", "reject" (HTTP 400) or "ignore" (free text)
        self.batch_polls, self.host, self.port = batch_polls, host, port
        self._api_key, self._rng, self._stats, self._in_flight = api_key, random.Random(seed), _new_stats(), 0
        self._files: dict[str, tuple[dict, bytes]] = {}
        self._batches: dict[str, dict] = {}
        self._pending: dict[str, dict] = {}  # batch id -> {"polls", "items", "errors"}
        self._conns: set = set()
        self._loop = self._thread = self._server = None
        self._lm = self._lm_tok = None
        self._lm_lock = threading.Lock()
        if logits_model is not None:  # a real model for /v1/completions' prompt_logprobs
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._lm = AutoModelForCausalLM.from_pretrained(logits_model, dtype="float32").eval()
            self._lm_tok = AutoTokenizer.from_pretrained(logits_model)

    # ---------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        """Start listening (own event loop in a daemon thread); returns self."""
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="FakeOpenAI", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._astart(), self._loop).result(30)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then stop the loop thread."""
        if self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._astop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()
            self._thread = self._loop = self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _call(self, fn):
        """Run `fn` on the server loop (so it sees a consistent state) and return its result."""
        if self._loop is None:
            return fn()
        return asyncio.run_coroutine_threadsafe(_acall(fn), self._loop).result(30)

    def stats(self) -> dict:
        """A copy of the stats dict (taken on the server loop, so it is consistent)."""
        return self._call(lambda: _copy_stats(self._stats))

    def reset(self) -> None:
        """Clear the stats and the fault attempt counters (files and batches are kept)."""
        self._call(self._reset)

    def _reset(self) -> None:
        self._stats = _new_stats()
        self._stats["in_flight"] = self._stats["max_in_flight"] = self._in_flight

    async def _astart(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _astop(self) -> None:
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    # ---------------------------------------------------------------- HTTP
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(_http_response(431, error_body("Request header too large"), keep=False))
                    break
                text = head.decode("latin-1").lstrip("\r\n")
                if not text:
                    continue
                try:
                    method, target, version, headers = _parse_head(text)
                    body = await _read_body(reader, writer, headers)
                except (ValueError, UnicodeError) as exc:
                    writer.write(_http_response(400, error_body(f"Bad request: {exc}"), keep=False))
                    break
                conn = headers.get("connection", "").lower()
                keep = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn
                try:
                    path = re.sub(r"^https?://[^/]*", "", target.split("?", 1)[0])  # absolute form (via a proxy)
                    status, payload, extra = await self._dispatch(method, path, headers, body)
                except _Drop:
                    break
                except Exception as exc:  # a bad request never kills the server
                    status, payload, extra = 500, error_body(f"Internal error: {type(exc).__name__}", "server_error"), {}
                if isinstance(payload, bytes):
                    writer.write(_http_response(status, raw=payload, ctype="application/octet-stream", keep=keep))
                else:
                    writer.write(_http_response(status, payload, headers=extra, keep=keep))
                await writer.drain()
                if not keep:
                    break
        except (Exception, asyncio.CancelledError):  # EOF, reset, oversized chunk line, stop(): just close
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    def _authorized(self, headers: dict) -> bool:
        got = headers.get("authorization", "").encode("utf-8", "replace")
        return self._api_key is None or hmac.compare_digest(got, f"Bearer {self._api_key}".encode())

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes) -> tuple:
        if path == "/_stats" and method == "GET":
            return 200, _copy_stats(self._stats), {}
        if path == "/_reset" and method == "POST":
            self._reset()
            return 200, {"ok": True}, {}
        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(headers, body)
        if path == "/v1/completions" and method == "POST":
            return await self._completions(headers, body)
        if not path.startswith("/v1/"):
            return 404, error_body(f"Unknown route {method} {path}", code="unknown_url"), {}
        if not self._authorized(headers):
            return 401, error_body("Incorrect API key provided", code="invalid_api_key"), {}
        parts = path[4:].strip("/").split("/")
        if parts == ["models"] and method == "GET":
            names = ["fake-model"] if self.models is None else self.models
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]
            return 200, {"object": "list", "data": data}, {}
        if parts[0] == "files":
            return self._files_api(method, parts, headers, body)
        if parts[0] == "batches":
            return self._batches_api(method, parts, body)
        return 404, error_body(f"Unknown route {method} {path}", code="unknown_url"), {}

    # ---------------------------------------------------------------- chat
    async def _chat(self, headers: dict, body: bytes) -> tuple:
        st = self._stats
        entry = {"t": time.time(), "done": None, "key": None, "status": None, "model": None}
        st["log"].append(entry)
        st["chat_requests"] += 1
        self._in_flight, status = self._in_flight + 1, 500
        st["in_flight"], st["max_in_flight"] = self._in_flight, max(st["max_in_flight"], self._in_flight)
        try:
            if not self._authorized(headers):
                status = 401
                return 401, error_body("Incorrect API key provided", code="invalid_api_key"), {}
            try:
                req = json.loads(body)
            except ValueError:
                status = 400
                return 400, error_body("We could not parse the JSON body of your request."), {}
            key = entry["key"] = request_key(req)
            if isinstance(req, dict) and isinstance(req.get("model"), str):
                entry["model"] = req["model"]
            if self.record_bodies:
                entry["body"], entry["usage"] = req, None
            attempt = st["by_key"][key] = st["by_key"].get(key, 0) + 1
            outcome = decide(req, attempt, self.models, reasoning_models=self.reasoning_models,
                             reasoning_tokens=self.reasoning_tokens, json_mode=self.json_mode, judge=self.judge)
            if self.record_bodies and outcome[0] in ("ok", "stall"):
                entry["usage"] = outcome[1]["usage"]
            status = outcome[1] if outcome[0] == "error" else "drop" if outcome[0] == "drop" else 200
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if outcome[0] == "drop":
                raise _Drop
            if outcome[0] == "stall":
                await asyncio.sleep(self.stall_seconds)
            return (status, outcome[2], outcome[3]) if outcome[0] == "error" else (200, outcome[1], {})
        finally:
            self._in_flight -= 1
            cur = self._stats
            cur["in_flight"] = self._in_flight
            cur["by_status"][str(status)] = cur["by_status"].get(str(status), 0) + 1
            entry["status"], entry["done"] = status, time.time()

    # ---------------------------------------------------------------- completions (prompt log-probs)
    async def _completions(self, headers: dict, body: bytes) -> tuple:
        self._stats["completion_requests"] += 1
        if not self._authorized(headers):
            return 401, error_body("Incorrect API key provided", code="invalid_api_key"), {}
        try:
            req = json.loads(body)
        except ValueError:
            return 400, error_body("We could not parse the JSON body of your request."), {}
        prompt = req.get("prompt") if isinstance(req, dict) else None
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if self._lm is None:
            return 400, error_body("this fake server has no logits_model; prompt_logprobs are unavailable"), {}
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return 400, error_body("'prompt' must be a non-empty list of token ids", param="prompt"), {}
        if self.models is not None and req.get("model") not in self.models:
            return 404, error_body(f"The model `{req.get('model')}` does not exist", code="model_not_found"), {}
        k = req.get("prompt_logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            return 400, error_body("'prompt_logprobs' must be a non-negative integer", param="prompt_logprobs"), {}
        if not isinstance(req.get("max_tokens", 16), int) or req.get("max_tokens", 16) < 1:
            return 400, error_body("'max_tokens' must be at least 1", param="max_tokens"), {}
        choice = await asyncio.get_running_loop().run_in_executor(None, self._prompt_logprobs, prompt, k)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        return 200, {"id": "cmpl-" + _hex(), "object": "text_completion", "created": int(time.time()),
                     "model": req.get("model"), "choices": [choice],
                     "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1}}, {}

    def _prompt_logprobs(self, prompt: list, k: int | None) -> dict:
        """vLLM's choice for `prompt`: the next token, and per prompt token the prompt token + top k (module doc)."""
        import torch

        with self._lm_lock, torch.no_grad():
            logp = torch.log_softmax(self._lm(torch.tensor([prompt])).logits[0].float(), dim=-1)
        entries = None
        if k is not None:
            entries = [None]
            for i in range(1, len(prompt)):
                row, actual = logp[i - 1], prompt[i]
                rank = lambda t: int((row > row[t]).sum()) + 1  # noqa: E731  vLLM's rank: 1 + tokens more likely
                # the prompt token, then the top k without it: k entries when it is among them, else k + 1
                ids = [actual] + [t for t in row.topk(min(k, row.numel())).indices.tolist() if t != actual]
                entries.append({str(t): {"logprob": float(row[t]), "rank": rank(t),
                                         "decoded_token": self._lm_tok.decode([t])} for t in ids})
        nxt = int(logp[-1].argmax())
        return {"index": 0, "text": self._lm_tok.decode([nxt]), "logprobs": None, "finish_reason": "length",
                "stop_reason": None, "prompt_logprobs": entries}

    # ---------------------------------------------------------------- files
    def _add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        meta = {"id": "file-" + _hex(), "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        self._files[meta["id"]] = (meta, data)
        return meta

    def _files_api(self, method: str, parts: list, headers: dict, body: bytes) -> tuple:
        if parts == ["files"] and method == "POST":
            try:
                fields = parse_multipart(body, headers.get("content-type", ""))
            except ValueError as exc:
                return 400, error_body(str(exc)), {}
            if "file" not in fields or "purpose" not in fields:
                return 400, error_body("Both 'file' and 'purpose' are required", param="file"), {}
            self._stats["files"] += 1
            purpose = fields["purpose"][1].decode("utf-8", "replace")
            return 200, self._add_file(fields["file"][0] or "upload", purpose, fields["file"][1]), {}
        if parts == ["files"] and method == "GET":
            data = [meta for meta, _ in reversed(self._files.values())]
            return 200, {"object": "list", "data": data, "has_more": False}, {}
        if len(parts) not in (2, 3) or parts[1] not in self._files:
            return 404, error_body(f"No such File object: {'/'.join(parts[1:])}", param="id", code="not_found"), {}
        meta, data = self._files[parts[1]]
        if len(parts) == 3 and parts[2] == "content" and method == "GET":
            return 200, data, {}
        if len(parts) == 2 and method == "GET":
            return 200, meta, {}
        if len(parts) == 2 and method == "DELETE":
            del self._files[parts[1]]
            return 200, {"id": parts[1], "object": "file", "deleted": True}, {}
        return 404, error_body("Unknown files route", code="unknown_url"), {}

    # ---------------------------------------------------------------- batches
    def _batches_api(self, method: str, parts: list, body: bytes) -> tuple:
        if parts == ["batches"] and method == "POST":
            return self._create_batch(body)
        if parts == ["batches"] and method == "GET":
            data = [dict(b) for b in reversed(self._batches.values())]
            return 200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": False}, {}
        if len(parts) < 2 or parts[1] not in self._batches:
            return 404, error_body("No such Batch object", param="id", code="not_found"), {}
        batch, now = self._batches[parts[1]], int(time.time())
        if len(parts) == 2 and method == "GET":
            self._advance(batch, now)
            return 200, dict(batch), {}
        if parts[2:] == ["cancel"] and method == "POST":
            if batch["status"] in ("validating", "in_progress", "finalizing"):
                batch.update(status="cancelling", cancelling_at=now)
                return 200, dict(batch), {}
            return 409, error_body(f"Cannot cancel a batch with status {batch['status']}", code="conflict"), {}
        return 404, error_body("Unknown batches route", code="unknown_url"), {}

    def _create_batch(self, body: bytes) -> tuple:
        try:
            req = json.loads(body)
        except ValueError:
            return 400, error_body("We could not parse the JSON body of your request."), {}
        if not isinstance(req, dict):
            return 400, error_body("The body must be a JSON object."), {}
        if req.get("endpoint") != BATCH_ENDPOINT:
            return 400, error_body(f"Only {BATCH_ENDPOINT} is supported", param="endpoint"), {}
        if req.get("completion_window") != "24h":
            return 400, error_body("completion_window must be '24h'", param="completion_window"), {}
        file_id = req.get("input_file_id")
        if file_id not in self._files:
            return 404, error_body(f"No such File object: {file_id}", param="input_file_id", code="not_found"), {}
        items, errors = validate_batch_input(self._files[file_id][1])
        now = int(time.time())
        batch = {"id": "batch_" + _hex(), "object": "batch", "endpoint": BATCH_ENDPOINT, "errors": None,
                 "input_file_id": file_id, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0 if errors else len(items), "completed": 0, "failed": 0},
                 "metadata": req.get("metadata")}
        self._batches[batch["id"]] = batch
        self._pending[batch["id"]] = {"polls": 0, "items": items, "errors": errors}
        self._stats["batches_created"] += 1
        return 200, dict(batch), {}

    def _advance(self, batch: dict, now: int) -> None:
        state = self._pending.get(batch["id"])
        if state is None:
            return
        if batch["status"] == "cancelling" or state["errors"]:
            del self._pending[batch["id"]]
            if batch["status"] == "cancelling":
                return batch.update(status="cancelled", cancelled_at=now)
            return batch.update(status="failed", failed_at=now, errors={"object": "list", "data": state["errors"]})
        k = state["polls"] = state["polls"] + 1
        batch["in_progress_at"] = batch["in_progress_at"] or now
        if k <= self.batch_polls:
            if k == self.batch_polls and k >= 2:
                batch.update(status="finalizing", finalizing_at=now)
            else:
                batch["status"] = "in_progress"
            return
        del self._pending[batch["id"]]
        out, err = self._run_batch(state["items"])
        self._rng.shuffle(out)
        self._rng.shuffle(err)
        for lines, field, suffix in ((out, "output_file_id", "output"), (err, "error_file_id", "error")):
            if lines:
                data = "".join(json.dumps(x) + "\n" for x in lines).encode()
                batch[field] = self._add_file(f"{batch['id']}_{suffix}.jsonl", "batch_output", data)["id"]
        batch.update(status="completed", finalizing_at=batch["finalizing_at"] or now, completed_at=now,
                     request_counts={"total": len(out) + len(err), "completed": len(out), "failed": len(err)})

    def _run_batch(self, items: list) -> tuple[list, list]:
        out, err, by_key = [], [], self._stats["by_key"]
        for custom_id, body in items:
            key = request_key(body)
            attempt = by_key[key] = by_key.get(key, 0) + 1
            outcome = decide(body, attempt, self.models, batch=True, reasoning_models=self.reasoning_models,
                             reasoning_tokens=self.reasoning_tokens, json_mode=self.json_mode, judge=self.judge)
            line = {"id": "batch_req_" + _hex(), "custom_id": custom_id, "response": None, "error": None}
            if outcome[0] == "expired":
                line["error"] = {"code": "batch_expired", "message": "The request was not run within the window."}
            else:
                status, payload = (outcome[1], outcome[2]) if outcome[0] == "error" else (200, outcome[1])
                line["response"] = {"status_code": status, "request_id": "req_" + _hex(), "body": payload}
            (out if line["response"] and line["response"]["status_code"] == 200 else err).append(line)
        return out, err


def _parse_head(text: str) -> tuple[str, str, str, dict]:
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError("malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0].upper(), parts[1], parts[2], headers


async def _read_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict) -> bytes:
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length = int(headers.get("content-length") or 0) if not chunked else 0
    if length < 0 or length > MAX_BODY:
        raise ValueError("bad content-length")
    if headers.get("expect", "").lower() == "100-continue" and (length or chunked):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if not chunked:
        return await reader.readexactly(length) if length else b""
    chunks, total = [], 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        total += size
        if size < 0 or total > MAX_BODY:
            raise ValueError("chunked body too large")
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def main(argv: list[str] | None = None) -> int:
    """CLI: serve until SIGTERM/SIGINT after printing `READY <base_url>`."""
    p = argparse.ArgumentParser(prog="python tests/fakes/openai_server.py", description=__doc__.split("\n")[0])
    for flag, typ, default in (("--host", str, "127.0.0.1"), ("--port", int, 0), ("--latency", float, 0.0),
                               ("--stall-seconds", float, 30.0), ("--batch-polls", int, 2), ("--seed", int, 0)):
        p.add_argument(flag, type=typ, default=default)
    p.add_argument("--api-key-env", default=None, help="name of an environment variable holding the API key")
    p.add_argument("--logits-model", default=None, help="a model folder whose log-probs /v1/completions returns")
    args = p.parse_args(argv)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        p.error(f"environment variable {args.api_key_env} is not set")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    srv = FakeOpenAI(latency=args.latency, api_key=api_key, stall_seconds=args.stall_seconds,
                     batch_polls=args.batch_polls, seed=args.seed, host=args.host, port=args.port,
                     logits_model=args.logits_model).start()
    try:
        print(f"READY {srv.base_url}", flush=True)
        while not done.wait(0.2):
            pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
