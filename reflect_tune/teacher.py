"""The teacher client: any OpenAI-compatible chat endpoint, cached, rate-limited and retried.

One `TeacherClient.chat(messages)` call is one logical request:

1. The persistent cache (`RequestCache`, SQLite) is checked first. Its key hashes the model, the
   messages and every other field the body sends (`request_params`: the generation parameters in
   the form the model takes, and `--extra-body`), never the parsing code, so a parser change
   re-parses cached replies for free. A cached request costs nothing and does not count against limits.
2. Otherwise the request waits for a concurrency slot (`--concurrency`) and for the rate limiter
   (`--rpm`, `--tpm`), which never lets a configured limit be exceeded.
3. Transient failures are retried with exponential backoff and full jitter (tenacity), honouring
   `retry-after-ms` / `Retry-After`: HTTP 408, 409, 429 and 5xx, timeouts and dropped
   connections, up to `max_retries` retries. When they run out the request raises `ApiFailed`
   and the caller records the variant as `api_failed`; the run goes on.
4. HTTP 401, 403 and 404 (and 429 `insufficient_quota`) raise `FatalApiError`: retrying cannot
   help, so nothing more is sent and the run stops with one clear line once the requests on the
   wire have landed. An HTTP 400 about this request's content (context length, a content
   filter) raises `ApiFailed` (the record's variant fails, the run goes on); one about a
   setting every request shares is fatal (`bad_request_scope`).
5. The reply is committed to the cache before it is returned, so a killed run re-sends at most
   the requests that were in flight. Two processes on one cache send each request once: the
   cache's claims make the second wait for the first's reply (cache.py).

The API key is only ever handed to the openai SDK. Every message that leaves this module passes
through `scrub`, which removes it.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from reflect_tune.cache import CacheFull, Reply, RequestCache, disk_full_error, request_key
from reflect_tune.config import SettingError
from reflect_tune.errors import ReflectTuneError, clip, scrub_secrets

log = logging.getLogger("reflect_tune.teacher")

FATAL_STATUS = {401, 403, 404}  # and a 400 about a setting every request shares (bad_request_scope)
RETRY_STATUS = {408, 409, 429}
REJECTED = "rejected by the teacher (not retried)"  # the reason's start for a request the server refused
MAX_RETRY_AFTER = 300.0  # seconds; a server asking for longer is capped, not obeyed blindly


class FatalApiError(ReflectTuneError):
    """The teacher refused in a way no retry can fix (bad request, credentials, model, quota)."""


class ApiFailed(Exception):
    """One request failed for good after its retries; `reason` says how."""

    def __init__(self, reason: str, kind: str, retries: int):
        super().__init__(reason)
        self.reason, self.kind, self.retries = reason, kind, retries


class Pending(Exception):
    """Raised in collect mode (dry run, Batch API) for a request that is not in the cache yet."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def scrub(text: str, secret: str | None) -> str:
    """Remove the API key, every registered secret and anything shaped like an OpenAI key from a message."""
    if secret and len(secret) >= 4:  # a placeholder key ("x") is no secret, and replacing it would garble text
        text = text.replace(secret, "***")
    return scrub_secrets(text)


def check_api_key(key: str | None, where: str = "the API key") -> None:
    """Refuse, in one line and without showing it, a key an HTTP header cannot carry: a control
    character (a newline pasted with it) or a non-ASCII one (a typographic quote). Sent, the first
    reads as 'cannot reach the teacher' and the second ends in an encoding traceback."""
    bad = next(((i, c) for i, c in enumerate(key or "") if not " " <= c <= "~"), None)
    if bad is not None:
        i, c = bad
        kind = "a newline" if c in "\r\n" else "a control character" if ord(c) < 32 or ord(c) == 127 else "a non-ASCII character"
        raise ReflectTuneError(f"{where} holds {kind} at position {i + 1}, which an HTTP header cannot "
                               "carry; set it again (the key is not shown)")


def rough_tokens(chars: int) -> int:
    """What --tpm charges for prompt text: a deliberate over-estimate (3 characters per token)."""
    return chars // 3


def rough_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return sum(rough_tokens(len(m["content"])) + 4 for m in messages)


def reply_from_json(data: Any) -> Reply:
    """A chat.completion object (as JSON) to a `Reply`; tolerant of servers that omit fields.

    `usage.completion_tokens_details.reasoning_tokens` (OpenAI's reasoning models) is kept as
    `reasoning_tokens`: a part of `completion_tokens`, which OpenAI reports and bills with them in.
    """
    if not isinstance(data, dict):
        data = {}
    choice = (data.get("choices") or [{}])[0] or {}
    usage = data.get("usage") or {}
    details = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Reply(text=(choice.get("message") or {}).get("content") or "", finish_reason=choice.get("finish_reason"),
                 prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0),
                 reasoning_tokens=int(reasoning or 0))


# ---------------------------------------------------------------------------------------------
# What a request sends
# ---------------------------------------------------------------------------------------------

TOKEN_PARAMS = ("auto", "max_tokens", "max_completion_tokens")
OPENAI_HOST = "api.openai.com"
# OpenAI's reasoning models: o1, o3, o3-mini, o4-mini, the gpt-5 family and later (gpt-5.4, gpt-6-...),
# fine-tuned ones (`ft:o4-mini-...`) too. They refuse `max_tokens` (they take `max_completion_tokens`,
# which counts the reasoning tokens as well) and any temperature or top_p but the default.
_REASONING_NAME = re.compile(r"^(?:ft:)?(?:o\d+(?![a-z0-9])|gpt-(?:[5-9]|\d{2,})(?![0-9]))", re.IGNORECASE)
_SETTING_FLAGS = {"temperature": "--temperature", "top_p": "top_p (a YAML setting)",
                  "max_tokens": "--max-tokens and --token-param", "max_completion_tokens": "--max-tokens and --token-param"}
_OURS = {"model": "--model", "messages": "the prompts", "stream": "reflect-tune (it reads whole replies)"}


def official_openai(base_url: str | None) -> bool:
    """The request goes to OpenAI's own API: no base URL (nor OPENAI_BASE_URL, which the SDK reads
    then), or one whose host is api.openai.com."""
    url = base_url or os.environ.get("OPENAI_BASE_URL") or ""
    return not url or (urlparse(url).hostname or "").lower() == OPENAI_HOST


def reasoning_model(model: str) -> bool:
    """An OpenAI reasoning model's name (o1, o3, o4-mini, gpt-5, gpt-5-mini, ...)."""
    return bool(_REASONING_NAME.match(model.strip()))


def request_params(*, model: str, base_url: str | None, max_tokens: int, temperature: float, top_p: float,
                   token_param: str = "auto", extra_body: dict | None = None) -> dict[str, Any]:
    """Every field of a chat request besides `model` and `messages`; all of it goes into the cache key.

    Two forms. `max_tokens`: `temperature`, `top_p` and `max_tokens` (what every OpenAI-compatible
    server takes). `max_completion_tokens`: the cap as `max_completion_tokens`, and no temperature
    or top_p (OpenAI's reasoning models refuse both `max_tokens` and any sampling setting but the
    default; a temperature or top_p the user changed is dropped with a warning). `token_param`
    'auto' takes the second form for an OpenAI reasoning model's name on OpenAI's own API, the
    first everywhere else; 'max_tokens' / 'max_completion_tokens' choose one (a proxy or Azure
    serving a reasoning model needs 'max_completion_tokens').

    `extra_body` fields are added as they are (`reasoning_effort`, vLLM's `chat_template_kwargs`,
    `guided_json`, ...). A field a setting already sends, or that reflect-tune owns, is refused.
    """
    if token_param not in TOKEN_PARAMS:
        raise SettingError("token_param", f"--token-param (token_param): expected one of {', '.join(TOKEN_PARAMS)}, "
                                          f"got {clip(token_param)}")
    form = token_param
    if form == "auto":
        form = "max_completion_tokens" if official_openai(base_url) and reasoning_model(model) else "max_tokens"
    if form == "max_tokens":
        params: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    else:
        params = {"max_completion_tokens": max_tokens}
        dropped = tuple(f"{name} {value:g}" for name, value, default in (("temperature", temperature, 0.0), ("top_p", top_p, 1.0))
                        if value != default)
        if dropped:
            _warn_dropped(model, dropped)
    for key, value in (extra_body or {}).items():
        if not isinstance(key, str) or not key:
            raise SettingError("extra_body", f"--extra-body (extra_body): field names are non-empty strings, got {clip(key)}")
        if key in _OURS:
            raise SettingError("extra_body", f"--extra-body (extra_body): '{key}' is set by {_OURS[key]}, not here")
        if key in params or key in ("max_tokens", "max_completion_tokens"):
            raise SettingError("extra_body", f"--extra-body (extra_body): '{key}' is already sent from {_SETTING_FLAGS[key]}; "
                                             "set it there")
        params[key] = value
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SettingError("extra_body", f"--extra-body (extra_body): not expressible as JSON ({e})") from None
    return params


@functools.lru_cache(maxsize=None)
def _warn_dropped(model: str, dropped: tuple[str, ...]) -> None:
    """Once per process for a model and the values dropped."""
    log.warning("warning: %s not sent: %s takes no sampling settings in the max_completion_tokens form "
                "(OpenAI's reasoning models refuse them; see --token-param)", " and ".join(dropped), model)


# ---------------------------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------------------------


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits that are never exceeded.

    Requests follow a schedule of one start every 60/rpm seconds. A start that wakes a little late
    keeps the schedule (the next one is not pushed back), so the rate reaches the limit; slots
    never lag more than a quarter interval, so there is no burst after a pause. On top, a log of
    the last 61 seconds' starts makes the limit hard: no 60-second window ever holds more than
    `rpm`, even when network jitter of up to a second bunches the arrivals at the server.
    Tokens are charged when a request starts (its prompt estimate plus the completion cap, as providers
    reserve them) and a request waits until the last 60 seconds' charges plus its own fit in
    `tpm`. Waiters are served in arrival order.
    """

    WINDOW = 60.0
    GUARD = 1.0  # seconds added to the hard window, so network jitter cannot push arrivals over the limit
    SLACK = 0.25  # of an interval: how late a start may be and still keep the schedule

    def __init__(self, rpm: int | None = None, tpm: int | None = None, clock=time.monotonic, sleep=asyncio.sleep):
        self.rpm, self.tpm, self.clock, self.sleep = rpm, tpm, clock, sleep
        self.next_start = float("-inf")
        self.starts: deque[float] = deque()
        self.charges: deque[tuple[float, int]] = deque()
        self.charged = 0
        self.lock = asyncio.Lock()
        self.waited = 0.0

    def _rpm_wait(self, now: float) -> float:
        span = self.WINDOW + self.GUARD
        while self.starts and self.starts[0] <= now - span:
            self.starts.popleft()
        wait = self.next_start - now
        if len(self.starts) >= self.rpm:  # the hard guarantee, whatever the schedule says
            wait = max(wait, self.starts[0] + span - now)
        return wait

    def _tpm_wait(self, now: float, tokens: int) -> float:
        span = self.WINDOW + self.GUARD
        while self.charges and self.charges[0][0] <= now - span:
            self.charged -= self.charges.popleft()[1]
        if self.charged + tokens <= self.tpm:
            return 0.0
        over, wait = self.charged + tokens - self.tpm, 0.0
        for t, n in self.charges:  # wait until enough old charges leave the window
            over -= n
            wait = t + span - now
            if over <= 0:
                break
        return max(wait, 1e-3)

    async def acquire(self, tokens: int = 0) -> None:
        if self.rpm is None and self.tpm is None:
            return
        if self.tpm:
            tokens = min(tokens, self.tpm)  # callers validate; never wait forever
        async with self.lock:
            while True:
                now = self.clock()
                wait = self._rpm_wait(now) if self.rpm else 0.0
                if self.tpm:
                    wait = max(wait, self._tpm_wait(now, tokens))
                if wait <= 0:
                    break
                self.waited += wait
                await self.sleep(wait)
            if self.rpm:
                interval = self.WINDOW / self.rpm
                on_schedule = now - self.next_start <= self.SLACK * interval
                self.next_start = (self.next_start if on_schedule else now) + interval
                self.starts.append(now)
            if self.tpm:
                self.charges.append((now, tokens))
                self.charged += tokens


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ClientStats:
    sent: int = 0            # HTTP attempts that reached the wire (retries included)
    succeeded: int = 0       # requests answered
    cached: int = 0          # requests served from the cache
    retries: int = 0
    failures: Counter = field(default_factory=Counter)  # kind -> count of requests given up
    retry_kinds: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0   # paid (not cached)
    completion_tokens: int = 0  # reasoning tokens included, as OpenAI reports and bills them
    reasoning_tokens: int = 0   # the part of completion_tokens spent reasoning
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cached_reasoning_tokens: int = 0
    in_flight: int = 0
    waited_for_others: int = 0  # requests another process was sending: its reply was used, not paid again


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _kind(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    status = _status(exc)
    return f"http_{status}" if status else type(exc).__name__


def _retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, then `Retry-After`), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(float(ms) / 1000.0, MAX_RETRY_AFTER)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return min(float(value), MAX_RETRY_AFTER)
        except ValueError:
            date = email.utils.parsedate_to_datetime(value) if value else None
            if date is not None:
                return min(max(date.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)
    return None


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes timeouts and dropped connections
        return True
    status = _status(exc)
    if status == 429 and _error_code(exc) == "insufficient_quota":
        return False
    return status is not None and (status in RETRY_STATUS or status >= 500)


def _error_code(exc: BaseException) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return err.get("code") or err.get("type")
    return getattr(exc, "code", None)


def _error_field(exc: BaseException, name: str) -> str:
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    value = err.get(name) if isinstance(err, dict) else getattr(exc, name, None)
    return value if isinstance(value, str) else ""


# A 400 that is about one request's content: the run records it and goes on.
_ABOUT_THIS_REQUEST = re.compile(
    r"context[ _-]?length|context window|maximum context|too many tokens|too long|reduce the length|string_above_max_length|"
    r"content[ _-]?(filter|policy|management)|safety|invalid[ _-]?(prompt|content|image)|flagged", re.IGNORECASE)
# A 400 about a setting every request shares: nothing can succeed, the run stops.
_ABOUT_EVERY_REQUEST = {"unsupported_parameter", "unsupported_value", "unknown_parameter", "invalid_parameter",
                        "model_not_found", "invalid_model"}
FIRST_400_LIMIT = 3  # unexplained 400s before any success that stop a run


def bad_request_scope(exc: BaseException) -> str:
    """For an HTTP 400: 'request' (this request's content), 'run' (a shared setting) or 'unknown'."""
    code, param = _error_field(exc, "code"), _error_field(exc, "param")
    text = " ".join((code, _error_field(exc, "type"), param, str(getattr(exc, "message", "") or exc)))
    if _ABOUT_THIS_REQUEST.search(text) or param.startswith("messages"):
        return "request"
    if code in _ABOUT_EVERY_REQUEST or param:
        return "run"
    return "unknown"


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    message = " ".join(str(message).split())[:300]
    return f"HTTP {status}: {message}" if status else f"{_kind(exc)}: {message}"


class Stopped(Exception):
    """A request that was not sent because the run is stopping (`TeacherClient.stop_error` says why)."""


async def wait_workers(client: "TeacherClient", workers: list) -> None:
    """Wait for the worker tasks of a stage. On the first error, send nothing more but let the
    requests on the wire answer and reach the cache (they are paid for), cancel the other
    workers, and raise that error (the first that is not the resulting `Stopped`)."""
    try:
        done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if errors:
            first = next((e for e in errors if not isinstance(e, Stopped)), None)
            client.stop(first or errors[0])
            await client.settle()
            raise first or client.stop_error
    finally:
        # however this ends (an error, Ctrl-C cancelling us mid-wait): no worker outlives the stage,
        # and every worker's exception is retrieved here, never reported by asyncio at exit
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


class TeacherClient:
    """An OpenAI-compatible chat client with a cache, limits, retries and statistics.

    `collect=True` turns it into a planner: cache hits are returned, misses raise `Pending`
    (used by `--dry-run` and the Batch API mode to find the requests a run still needs).

    Stopping: the first answer that ends the run (401, 403, 404, a 400 about a shared setting, a
    full disk) sets `stop_error`. From then on no request is sent; requests already on the wire
    finish and their replies are committed (`settle()` waits for them), so nothing paid is lost.

    `local`: an in-process teacher (local_teacher.LocalTeacher) answers instead of a server; the
    cache, the claims, stopping and the statistics are the same.
    """

    def __init__(self, *, model: str, base_url: str | None, api_key: str | None, params: dict[str, Any],
                 cache: RequestCache, concurrency: int = 16, rpm: int | None = None, tpm: int | None = None,
                 timeout: float = 120.0, max_retries: int = 6, backoff: float = 1.0, collect: bool = False,
                 local=None):
        self.model, self.base_url, self.params, self.local = model, base_url, dict(params), local
        self.cache, self.max_retries, self.backoff, self.collect = cache, max_retries, backoff, collect
        self.timeout = timeout
        check_api_key(api_key)  # one line here too for callers that did not check it first (judge)
        self._api_key = api_key
        self.limiter = RateLimiter(rpm, tpm)
        self.concurrency = concurrency
        self.stats = ClientStats()
        self.pending: dict[str, dict[str, Any]] = {}  # collect mode: key -> request body
        # Batch API (batch.account): requests this job's rounds answered / failed, counted as such by
        # the final walk (answered ones once, with their tokens), and the rounds themselves
        self.batch_answered: set[str] = set()
        self.batch_failed: set[str] = set()
        self.batch_rounds: list[dict[str, Any]] = []
        self.unsaved: dict[str, Reply] = {}  # replies paid for that the cache could not take (disk full)
        self.stop_error: BaseException | None = None
        self._sdk = None
        self._slots: asyncio.Semaphore | None = None
        self._checked: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._unexplained_400 = 0
        self._idle: asyncio.Event | None = None  # set when no request is on the wire
        self.on_update = None  # optional callback after each request finishes

    # -- SDK access -------------------------------------------------------------------------------

    def sdk(self):
        if self._sdk is None:
            import openai

            # The SDK's own retries are off: ours count, log and honour limits.
            # the SDK's HTTP library: httpx, or httpx2 in newer SDKs
            import openai._base_client as base

            http = getattr(base, "httpx2", None) or getattr(base, "httpx")
            self._raw_type = http.Response
            # keep a connection alive per concurrent request (the SDK's default keeps 100)
            limits = http.Limits(max_connections=max(1000, self.concurrency), max_keepalive_connections=self.concurrency)
            self._sdk = openai.AsyncOpenAI(api_key=self._api_key or "unused", base_url=self.base_url,
                                           timeout=self.timeout, max_retries=0,
                                           http_client=openai.DefaultAsyncHttpxClient(limits=limits))
        return self._sdk

    async def aclose(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._sdk is not None:
            await self._sdk.close()
            self._sdk = None

    # -- stopping ---------------------------------------------------------------------------------

    def stop(self, error: BaseException) -> None:
        """Send nothing more; the first reason given is the one reported."""
        if self.stop_error is None:
            self.stop_error = error

    def _check_stopped(self) -> None:
        if self.stop_error is not None:
            raise Stopped(str(self.stop_error))

    async def settle(self, timeout: float | None = None) -> None:
        """Wait until every request on the wire has answered and been committed."""
        if self.stats.in_flight and self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout if timeout is not None else self.timeout + 5)
            except asyncio.TimeoutError:
                pass

    def save_unsaved(self) -> int:
        """Try once more to commit replies the cache refused; returns how many are still unsaved."""
        for key, reply in list(self.unsaved.items()):
            try:
                self.cache.put(key, self.model, reply)
                del self.unsaved[key]
            except CacheFull:
                break
        return len(self.unsaved)

    def fatal(self, exc: BaseException, what: str) -> FatalApiError:
        hint, text = "", _describe(exc)
        status = _status(exc)
        if status in (401, 403):
            hint = " (check the key in the environment variable named by --api-key-env, and --base-url)"
        elif status == 404:
            hint = f" (is '{self.model}' served at {self.base_url or 'the OpenAI API'}? check --model and --base-url)"
        elif status == 429:
            hint = " (the account is out of quota)"
        elif status == 400:
            param = _error_field(exc, "param")
            if param:  # name it first: the server's own wording may bury it
                text = f"the server refused the parameter '{param}' ({text})"
            hint = self._refused_hint(param)
        error = FatalApiError(scrub(f"teacher {what} failed: {text}{hint}", self._api_key))
        error.status = status
        self.stop(error)
        return error

    def _refused_hint(self, param: str) -> str:
        """What to change for a 400 about a setting every request shares, naming the parameter the
        server refused when its error says which (OpenAI's `param`)."""
        if not param:
            return (" (the server refuses a setting every request shares; check --model, --max-tokens, --temperature, "
                    "--token-param, --extra-body)")
        field = re.split(r"[.\[]", param, maxsplit=1)[0]
        from_settings = {"max_tokens", "max_completion_tokens"} | ({"temperature", "top_p"} if "max_tokens" in self.params else set())
        if field in self.params and field not in from_settings:
            fix = "it comes from --extra-body (extra_body): remove or change it"
        elif field == "max_tokens":
            fix = "this model takes max_completion_tokens instead: pass --token-param max_completion_tokens"
        elif field == "max_completion_tokens":
            fix = "this server takes max_tokens instead: pass --token-param max_tokens"
        elif field in ("temperature", "top_p"):
            fix = ("this model takes no sampling settings: pass --token-param max_completion_tokens, which leaves "
                   "temperature and top_p out")
        else:
            fix = "check --model, --max-tokens, --temperature, --token-param, --extra-body"
        return f"; {fix}"

    async def check_once(self) -> None:
        """Run `check` before the first request that is actually sent (never on a fully cached rerun)."""
        if self._checked is None:
            self._checked = asyncio.ensure_future(self.check())
            # its error is raised to every waiter; marking it retrieved keeps asyncio from printing
            # "Task exception was never retrieved" when every waiter was cancelled first
            self._checked.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._checked)

    async def check(self) -> None:
        """One cheap request before the bulk: list the models (free on OpenAI and local servers)."""
        import openai

        try:
            await self.sdk().models.list()
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise self.fatal(e, "credential check (GET /models)") from None
            # Some servers do not implement /models; the first real request will tell.
        except openai.APIConnectionError as e:
            where = self.base_url or "https://api.openai.com/v1"
            error = FatalApiError(scrub(f"cannot reach the teacher at {where}: {_describe(e)}", self._api_key))
            self.stop(error)
            raise error from None

    # -- one request ------------------------------------------------------------------------------

    def body(self, messages: list[dict[str, str]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The request body: model, messages, the run's parameters, and this request's `extra` fields."""
        return {"model": self.model, "messages": messages, **self.params, **(extra or {})}

    def _local_done(self, key: str, reply: Reply) -> Reply:
        """A reply of the in-process teacher: committed like a paid one, counted, announced."""
        reply = self._commit(key, reply)
        self.stats.sent += 1
        self.stats.succeeded += 1
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        if self.on_update is not None:
            self.on_update()
        return reply

    async def probe_json(self, schema: dict[str, Any]) -> tuple[bool, str]:
        """Does the server honour `response_format: json_schema`? One small request, never cached.

        (True, why) when it answers with a JSON object that has the schema's required fields;
        (False, why) when it refuses the field (HTTP 400/422) or ignores it (free text back).
        Credentials, a missing model or an unreachable server raise as for any request."""
        import openai

        self._check_stopped()
        await self.check_once()
        messages = [{"role": "user", "content": "Reply with a JSON object whose field \"ok\" is true."}]
        extra = {"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "probe", "strict": True, "schema": schema}}}
        try:
            response = await self.sdk().post("/chat/completions", cast_to=self._raw_type, body=self.body(messages, extra))
        except openai.APIStatusError as e:
            if e.status_code in (400, 422):
                return False, f"the server refused response_format ({_describe(e)})"
            if e.status_code in FATAL_STATUS:
                raise self.fatal(e, "response_format probe") from None
            return False, f"the probe failed ({_describe(e)})"
        except openai.APIConnectionError as e:
            return False, f"the probe failed ({_describe(e)})"
        reply = reply_from_json(json.loads(response.content))
        try:
            data = json.loads(reply.text)
        except ValueError:
            return False, "the server ignored response_format (the reply was not JSON)"
        if not isinstance(data, dict) or any(k not in data for k in schema.get("required", ())):
            return False, "the server ignored the schema (the reply lacked its fields)"
        return True, "the server answered the probe with JSON that follows the schema"

    def _batch_answered(self, reply: Reply) -> Reply:
        self.stats.succeeded += 1
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        self.stats.reasoning_tokens += reply.reasoning_tokens
        return reply

    def _hit(self, hit: Reply) -> Reply:
        self.stats.cached += 1
        self.stats.cached_prompt_tokens += hit.prompt_tokens
        self.stats.cached_completion_tokens += hit.completion_tokens
        self.stats.cached_reasoning_tokens += hit.reasoning_tokens
        return hit

    async def chat(self, messages: list[dict[str, str]], est_prompt_tokens: int = 0,
                   extra: dict[str, Any] | None = None) -> Reply:
        """One logical request. `extra`: fields of this request only (its response_format), in its key too."""
        key = request_key(self.model, messages, {**self.params, **extra} if extra else self.params)
        hit = self.cache.get(key)
        if hit is not None:
            if key in self.batch_answered:  # paid in a Batch API round of this job: answered, not from the cache
                self.batch_answered.discard(key)  # once; the same request again is a cache hit
                return self._batch_answered(hit)
            return self._hit(hit)
        if self.collect:
            failed = self.cache.failure(key)
            if failed is not None:
                if key in self.batch_failed:
                    self.batch_failed.discard(key)
                    self.stats.failures["batch"] += 1
                raise ApiFailed(failed, "batch", 0)
            self.pending[key] = self.body(messages, extra)
            raise Pending(key)
        await self._claim(key)
        if (hit := self.cache.get(key)) is not None:  # another process answered it while we waited
            self.stats.waited_for_others += 1
            return self._hit(hit)
        if not est_prompt_tokens:
            est_prompt_tokens = rough_prompt_tokens(messages)
        try:
            if self.local is not None:  # the in-process teacher: no wire, no limits, no retries
                return self._local_done(key, await self.local.reply(messages, self.params))
            cap = self.params.get("max_tokens") or self.params.get("max_completion_tokens") or 0
            return await self._send(messages, est_prompt_tokens + int(cap), key, extra)
        except BaseException:  # not answered: let another process have it (a committed reply ends the claim itself)
            self.cache.release(key)
            raise

    async def _claim(self, key: str) -> None:
        """Wait while another process is sending this very request; then own it (or find its reply)."""
        pause = 0.1
        while True:
            self._check_stopped()
            try:
                state = self.cache.claim(key)
            except CacheFull as e:
                self.stop(e)
                raise Stopped(str(e)) from None
            if state != "wait":
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        if self._heartbeat is None:
            self._heartbeat = asyncio.ensure_future(self._renew_claims())

    async def _renew_claims(self) -> None:
        while True:
            await asyncio.sleep(self.cache.LEASE_S / 3)
            self.cache.renew()

    def _commit(self, key: str, reply: Reply) -> Reply:
        """Store a paid reply; on a full disk keep it in memory and stop sending."""
        try:
            reply = self.cache.put(key, self.model, reply)
        except CacheFull as e:
            self.unsaved[key] = reply
            self.stop(e)
            return reply
        if self.cache.full:
            self.stop(disk_full_error(self.cache.folder))
        return reply

    def _wait(self, retry_state) -> float:
        from tenacity import wait_random_exponential

        exc = retry_state.outcome.exception()
        asked = _retry_after(exc) if exc is not None else None
        if asked is not None:
            return asked
        return wait_random_exponential(multiplier=self.backoff, max=60.0)(retry_state)

    async def _send(self, messages: list[dict[str, str]], cost_tokens: int, key: str,
                    extra: dict[str, Any] | None = None) -> Reply:
        import openai
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        await self.check_once()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
            self._idle = asyncio.Event()
        retries = [0]

        def before_sleep(retry_state) -> None:
            retries[0] += 1
            self.stats.retries += 1
            self.stats.retry_kinds[_kind(retry_state.outcome.exception())] += 1

        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_retries + 1), wait=self._wait,
                                 retry=retry_if_exception(_retryable), before_sleep=before_sleep, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    async with self._slots:
                        await self.limiter.acquire(cost_tokens)
                        self._check_stopped()  # at the last moment: a fatal answer may have come in meanwhile
                        self.stats.sent += 1
                        self.stats.in_flight += 1  # until its reply is committed
                        self._idle.clear()
                        try:
                            # The SDK's documented raw call: its errors, auth and transport, without
                            # typed-parameter conversion and model parsing (a third of its CPU per request).
                            response = await self.sdk().post("/chat/completions", cast_to=self._raw_type,
                                                             body=self.body(messages, extra))
                            reply = reply_from_json(json.loads(response.content))
                            reply.retries = retries[0]
                            reply = self._commit(key, reply)  # before anything else can happen to it
                        finally:
                            self.stats.in_flight -= 1
                            if not self.stats.in_flight:
                                self._idle.set()
        except openai.APIStatusError as e:
            if e.status_code == 400:
                return self._bad_request(e, retries[0])
            if e.status_code in FATAL_STATUS or (e.status_code == 429 and not _retryable(e)):
                raise self.fatal(e, "request") from None
            return self._give_up(e, retries[0])
        except openai.APIConnectionError as e:
            return self._give_up(e, retries[0])
        finally:
            if self.on_update is not None:
                self.on_update()
        self.stats.succeeded += 1
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        self.stats.reasoning_tokens += reply.reasoning_tokens
        return reply

    def _bad_request(self, exc: BaseException, retries: int):
        """HTTP 400: about this request (record it, go on) or about every request (stop the run).

        A 400 that says neither is taken as this request's, unless the run has had no success yet
        and it is the FIRST_400_LIMIT-th such answer: then a shared setting is the likely cause.
        """
        scope = bad_request_scope(exc)
        if scope == "unknown" and not self.stats.succeeded:
            self._unexplained_400 += 1
            if self._unexplained_400 >= FIRST_400_LIMIT:
                raise self.fatal(exc, f"request (the first {FIRST_400_LIMIT} answers were all HTTP 400)")
        if scope == "run":
            raise self.fatal(exc, "request")
        self.stats.failures["rejected"] += 1
        raise ApiFailed(scrub(f"{REJECTED}: {_describe(exc)}", self._api_key), "rejected", retries)

    def _give_up(self, exc: BaseException, retries: int):
        kind = _kind(exc)
        self.stats.failures[kind] += 1
        suffix = f"; retries exhausted ({retries})" if _retryable(exc) else ""
        raise ApiFailed(scrub(_describe(exc) + suffix, self._api_key), kind, retries)
