"""The teacher client: any OpenAI-compatible chat endpoint, cached, rate-limited and retried.

One `TeacherClient.chat(messages)` call is one logical request:

1. The persistent cache (`RequestCache`, SQLite) is checked first. Its key hashes the model, the
   messages and the generation parameters, never the parsing code, so a parser change re-parses
   cached replies for free. A cached request costs nothing and does not count against limits.
2. Otherwise the request waits for a concurrency slot (`--concurrency`) and for the rate limiter
   (`--rpm`, `--tpm`), which never lets a configured limit be exceeded.
3. Transient failures are retried with exponential backoff and full jitter (tenacity), honouring
   `retry-after-ms` / `Retry-After`: HTTP 408, 409, 429 and 5xx, timeouts and dropped
   connections, up to `max_retries` retries. When they run out the request raises `ApiFailed`
   and the caller records the variant as `api_failed`; the run goes on.
4. HTTP 400, 401, 403 and 404 (and 429 `insufficient_quota`) raise `FatalApiError`: retrying
   cannot help, so the run stops at once with one clear line.
5. The reply is committed to the cache before it is returned, so a killed run re-sends at most
   the requests that were in flight.

The API key is only ever handed to the openai SDK. Every message that leaves this module passes
through `scrub`, which removes it.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import re
import sqlite3
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflect_tune.errors import ReflectTuneError

FATAL_STATUS = {400, 401, 403, 404}
RETRY_STATUS = {408, 409, 429}
MAX_RETRY_AFTER = 300.0  # seconds; a server asking for longer is capped, not obeyed blindly
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{6,}")


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
    """Remove the API key (and anything shaped like an OpenAI key) from a message."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("sk-***", text)


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """The cache key: sha256 of the canonical JSON of model, messages and generation parameters."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    retries: int = 0


# ---------------------------------------------------------------------------------------------
# The request cache
# ---------------------------------------------------------------------------------------------


class RequestCache:
    """Append-only SQLite store of teacher replies, keyed by `request_key`.

    WAL journal with `synchronous=NORMAL`: each reply is committed before it is used, and a
    committed row survives the process being killed (only a power cut can lose the last ones).
    A `failures` table remembers Batch API requests that failed, so a rerun does not pay for
    them again unless asked to (`--retry-failed`).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path = self.folder / "requests.sqlite"
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, model TEXT, response TEXT, "
                "finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )
            self.db.execute("CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, reason TEXT, created REAL)")
        except (OSError, sqlite3.Error) as e:
            raise ReflectTuneError(f"{folder}: cannot open the request cache: {e}") from None

    def get(self, key: str) -> Reply | None:
        row = self.db.execute(
            "SELECT response, finish_reason, prompt_tokens, completion_tokens FROM requests WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else Reply(row[0], row[1], row[2] or 0, row[3] or 0, cached=True)

    def put(self, key: str, model: str, reply: Reply) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, model, reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens, time.time()),
        )

    def failure(self, key: str) -> str | None:
        row = self.db.execute("SELECT reason FROM failures WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put_failure(self, key: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (key, reason, time.time()))

    def clear_failures(self) -> int:
        return self.db.execute("DELETE FROM failures").rowcount

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def rough_tokens(chars: int) -> int:
    """What --tpm charges for prompt text: a deliberate over-estimate (3 characters per token)."""
    return chars // 3


def rough_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return sum(rough_tokens(len(m["content"])) + 4 for m in messages)


def reply_from_json(data: Any) -> Reply:
    """A chat.completion object (as JSON) to a `Reply`; tolerant of servers that omit fields."""
    if not isinstance(data, dict):
        data = {}
    choice = (data.get("choices") or [{}])[0] or {}
    usage = data.get("usage") or {}
    return Reply(text=(choice.get("message") or {}).get("content") or "", finish_reason=choice.get("finish_reason"),
                 prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0))


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
    Tokens are charged when a request starts (its prompt estimate plus `max_tokens`, as providers
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


@dataclass
class ClientStats:
    sent: int = 0            # HTTP attempts that reached the wire (retries included)
    succeeded: int = 0       # requests answered
    cached: int = 0          # requests served from the cache
    retries: int = 0
    failures: Counter = field(default_factory=Counter)  # kind -> count of requests given up
    retry_kinds: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0   # paid (not cached)
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    in_flight: int = 0


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


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    message = " ".join(str(message).split())[:300]
    return f"HTTP {status}: {message}" if status else f"{_kind(exc)}: {message}"


class TeacherClient:
    """An OpenAI-compatible chat client with a cache, limits, retries and statistics.

    `collect=True` turns it into a planner: cache hits are returned, misses raise `Pending`
    (used by `--dry-run` and the Batch API mode to find the requests a run still needs).
    """

    def __init__(self, *, model: str, base_url: str | None, api_key: str | None, params: dict[str, Any],
                 cache: RequestCache, concurrency: int = 16, rpm: int | None = None, tpm: int | None = None,
                 timeout: float = 120.0, max_retries: int = 6, backoff: float = 1.0, collect: bool = False):
        self.model, self.base_url, self.params = model, base_url, dict(params)
        self.cache, self.max_retries, self.backoff, self.collect = cache, max_retries, backoff, collect
        self.timeout = timeout
        self._api_key = api_key
        self.limiter = RateLimiter(rpm, tpm)
        self.concurrency = concurrency
        self.stats = ClientStats()
        self.pending: dict[str, dict[str, Any]] = {}  # collect mode: key -> request body
        self._sdk = None
        self._slots: asyncio.Semaphore | None = None
        self._checked: asyncio.Task | None = None
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
        if self._sdk is not None:
            await self._sdk.close()
            self._sdk = None

    def fatal(self, exc: BaseException, what: str) -> FatalApiError:
        hint = ""
        status = _status(exc)
        if status in (401, 403):
            hint = " (check the key in the environment variable named by --api-key-env, and --base-url)"
        elif status == 404:
            hint = f" (is '{self.model}' served at {self.base_url or 'the OpenAI API'}? check --model and --base-url)"
        elif status == 429:
            hint = " (the account is out of quota)"
        return FatalApiError(scrub(f"teacher {what} failed: {_describe(exc)}{hint}", self._api_key))

    async def check_once(self) -> None:
        """Run `check` before the first request that is actually sent (never on a fully cached rerun)."""
        if self._checked is None:
            self._checked = asyncio.ensure_future(self.check())
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
            raise FatalApiError(scrub(f"cannot reach the teacher at {where}: {_describe(e)}", self._api_key)) from None

    # -- one request ------------------------------------------------------------------------------

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, **self.params}

    async def chat(self, messages: list[dict[str, str]], est_prompt_tokens: int = 0) -> Reply:
        key = request_key(self.model, messages, self.params)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cached += 1
            self.stats.cached_prompt_tokens += hit.prompt_tokens
            self.stats.cached_completion_tokens += hit.completion_tokens
            return hit
        if self.collect:
            failed = self.cache.failure(key)
            if failed is not None:
                raise ApiFailed(failed, "batch", 0)
            self.pending[key] = self.body(messages)
            raise Pending(key)
        if not est_prompt_tokens:
            est_prompt_tokens = rough_prompt_tokens(messages)
        reply = await self._send(messages, est_prompt_tokens + int(self.params.get("max_tokens") or 0))
        self.cache.put(key, self.model, reply)
        return reply

    def _wait(self, retry_state) -> float:
        from tenacity import wait_random_exponential

        exc = retry_state.outcome.exception()
        asked = _retry_after(exc) if exc is not None else None
        if asked is not None:
            return asked
        return wait_random_exponential(multiplier=self.backoff, max=60.0)(retry_state)


    async def _send(self, messages: list[dict[str, str]], cost_tokens: int) -> Reply:
        import openai
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        await self.check_once()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
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
                        self.stats.sent += 1
                        self.stats.in_flight += 1
                        try:
                            # The SDK's documented raw call: its errors, auth and transport, without
                            # typed-parameter conversion and model parsing (a third of its CPU per request).
                            response = await self.sdk().post("/chat/completions", cast_to=self._raw_type,
                                                             body=self.body(messages))
                            data = json.loads(response.content)
                        finally:
                            self.stats.in_flight -= 1
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUS or (e.status_code == 429 and not _retryable(e)):
                raise self.fatal(e, "request") from None
            return self._give_up(e, retries[0])
        except openai.APIConnectionError as e:
            return self._give_up(e, retries[0])
        finally:
            if self.on_update is not None:
                self.on_update()
        reply = reply_from_json(data)
        reply.retries = retries[0]
        self.stats.succeeded += 1
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        return reply

    def _give_up(self, exc: BaseException, retries: int):
        kind = _kind(exc)
        self.stats.failures[kind] += 1
        suffix = f"; retries exhausted ({retries})" if _retryable(exc) else ""
        raise ApiFailed(scrub(_describe(exc) + suffix, self._api_key), kind, retries)
