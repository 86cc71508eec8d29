"""The OpenAI Batch API mode of `reflect` (`--batch-api`): half price, results within 24 hours.

The Batch API only fills the request cache; the reflect loop itself is unchanged. Each round:

1. Walk all records against the cache (`TeacherClient(collect=True)`): every request that is not
   cached yet is collected instead of sent. `res_ins` needs `ins`, and a re-ask needs the first
   reply, so a full run takes about three rounds.
2. Write the collected requests as Batch JSONL (`custom_id` = the request's cache key), split at
   50,000 requests or 200 MB per file, upload them, create one batch per file, and store the ids in
   `<cache>/batches/<job>/batches.json` *before* waiting. `<job>` hashes the set of requests, so a
   rerun of the same command finds the job and polls or collects instead of paying again.
3. Poll until every batch ends, then read both the output file and the error file and join
   results by `custom_id` (the order of lines is not guaranteed). Replies go into the cache;
   failures go into its `failures` table and surface as `api_failed` (`--retry-failed` resubmits).

The rounds of one command form a chain: each round's folder has a `job.json` naming the round
before it (`{"previous": JOB | null}`), written when the round is submitted by the process that
collected the one before. So the run that collects the last round, whether it waited or is the
last of several `--no-wait` reruns, reports the whole job (`account`): every request a round of
the chain submitted counts as answered (or failed) by the Batch API, with its tokens; only what
was cached before the first round counts as from the cache; `client.batch_rounds` has each round.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import atomic_write_text
from reflect_tune.errors import ReflectTuneError
from reflect_tune.teacher import FatalApiError, reply_from_json, scrub

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1000 * 1000
MAX_ROUNDS = 8
TERMINAL = {"completed", "failed", "expired", "cancelled"}
ENDPOINT = "/v1/chat/completions"


def job_key(pending: dict[str, dict]) -> str:
    return hashlib.sha256("\n".join(sorted(pending)).encode()).hexdigest()[:16]


def batch_lines(pending: dict[str, dict]) -> list[bytes]:
    """One Batch API line per request, in a stable order."""
    return [
        (json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": pending[key]},
                    ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        for key in sorted(pending)
    ]


def split_lines(lines: list[bytes], max_requests: int = MAX_REQUESTS_PER_FILE,
                max_bytes: int = MAX_BYTES_PER_FILE) -> list[list[bytes]]:
    """Group lines into files of at most `max_requests` lines and `max_bytes` bytes."""
    files: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        if len(line) > max_bytes:
            raise ReflectTuneError(f"one Batch API request is {len(line)} bytes, over the {max_bytes}-byte file limit")
        if files[-1] and (len(files[-1]) >= max_requests or size + len(line) > max_bytes):
            files.append([])
            size = 0
        files[-1].append(line)
        size += len(line)
    return files


def _call(what: str, fn, api_key: str | None):
    """Run one SDK call; any failure stops the run with one clean line (the key scrubbed)."""
    import openai

    try:
        return fn()
    except openai.APIStatusError as e:
        raise FatalApiError(scrub(f"Batch API: {what} failed: HTTP {e.status_code}: {e.message}", api_key)) from None
    except openai.APIConnectionError as e:
        raise FatalApiError(scrub(f"Batch API: {what} failed: cannot reach the server: {e}", api_key)) from None


class _Job:
    """The on-disk state of one round: input files and their batches (`batches.json`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "batches.json"
        self.entries: list[dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else []

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.entries, indent=2) + "\n")


JOB_FILE = "job.json"  # in a round's folder: {"previous": the round before it in the same command, or null}


def _previous(folder: Path) -> str | None:
    """The round before this one (None for a first round, or a folder written before job.json existed)."""
    try:
        data = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    previous = data.get("previous") if isinstance(data, dict) else None
    return previous if isinstance(previous, str) else None


def _submit(sdk, pending: dict[str, dict], job: _Job, key: str, api_key: str | None, previous: str | None = None) -> int:
    """Create what is missing of this job's files and batches; returns the requests submitted now.
    `previous`: the round this process collected just before (the chain link, written once)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    submitted = 0
    if not (job.folder / JOB_FILE).exists():
        atomic_write_text(job.folder / JOB_FILE, json.dumps({"previous": previous}) + "\n")
    if not job.entries:
        for i, chunk in enumerate(split_lines(batch_lines(pending))):
            name = f"input-{i:03d}.jsonl"
            (job.folder / name).write_bytes(b"".join(chunk))
            job.entries.append({"file": name, "requests": len(chunk), "input_file_id": None, "batch_id": None,
                                "status": None, "output_file_id": None, "error_file_id": None,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "collected": False})
        job.save()
    for entry in job.entries:  # resumable: a crash between steps picks up where it stopped
        if entry["input_file_id"] is None:
            with open(job.folder / entry["file"], "rb") as fh:
                uploaded = _call("upload", lambda: sdk.files.create(file=fh, purpose="batch"), api_key)
            entry["input_file_id"] = uploaded.id
            job.save()
        if entry["batch_id"] is None:
            batch = _call("create batch", lambda: sdk.batches.create(
                input_file_id=entry["input_file_id"], endpoint=ENDPOINT, completion_window="24h",
                metadata={"reflect_tune_job": key, "file": entry["file"]}), api_key)
            entry["batch_id"], entry["status"] = batch.id, batch.status
            job.save()
            submitted += entry["requests"]
            log.info(f"batch {batch.id}: created for {entry['requests']} requests ({entry['file']})")
    return submitted


def _poll(sdk, job: _Job, config, api_key: str | None) -> bool:
    """Wait until every batch ends (True), or check once and report with --no-wait (False).

    A batch's status is logged when it changes; the requests answered in all batches go to one
    progress bar or plain line (progress.py), like the live loop's."""
    from reflect_tune.progress import Progress

    counts = {e["batch_id"]: (e["requests"], 0) for e in job.entries if e["status"] in TERMINAL}  # (done, failed)
    with Progress("reflect (Batch API)", sum(e["requests"] for e in job.entries), unit="requests", rate_unit="req",
                  enabled=config.progress, done=sum(d for d, _ in counts.values())) as bar:
        while True:
            for entry in job.entries:
                if entry["status"] in TERMINAL:
                    continue
                before = entry["status"]
                batch = _call("poll", lambda: sdk.batches.retrieve(entry["batch_id"]), api_key)
                entry.update(status=batch.status, output_file_id=batch.output_file_id, error_file_id=batch.error_file_id)
                if batch.status == "failed":
                    errors = getattr(getattr(batch, "errors", None), "data", None) or []
                    detail = "; ".join(f"line {e.line}: {e.code}: {e.message}" for e in errors[:3]) or "no detail"
                    raise FatalApiError(f"Batch API: batch {batch.id} ({entry['file']}) failed validation: {detail}")
                c = getattr(batch, "request_counts", None)
                if c:
                    counts[batch.id] = (c.completed + c.failed, c.failed)
                if batch.status != before:
                    log.info(f"batch {batch.id}: {batch.status}" + (f" {c.completed + c.failed}/{c.total}" if c else ""))
            bar.update(done=sum(d for d, _ in counts.values()), failed=sum(f for _, f in counts.values()))
            job.save()
            if all(e["status"] in TERMINAL for e in job.entries):
                return True
            if config.no_wait:
                log.info(f"batches are still running; rerun the same command to collect ({job.folder})")
                return False
            time.sleep(config.poll_interval)


def _error_reason(line: dict) -> str:
    response, error = line.get("response") or {}, line.get("error") or {}
    if error:
        return f"batch error {error.get('code')}: {error.get('message')}"
    body = response.get("body") or {}
    message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
    return f"HTTP {response.get('status_code')}: {message or 'no message'} (Batch API)"


def _collect(sdk, job: _Job, pending: dict[str, dict], client, api_key: str | None) -> int:
    """Read output and error files; cache replies, record failures. Returns results stored."""
    stored = 0
    for entry in job.entries:
        if entry["collected"]:
            continue
        for which in ("output_file_id", "error_file_id"):
            if not entry[which]:
                continue
            raw = _call("download", lambda: sdk.files.content(entry[which]).content, api_key)
            for text in raw.decode("utf-8").splitlines():
                if not text.strip():
                    continue
                line = json.loads(text)
                key = line.get("custom_id")
                if key not in pending:
                    continue
                response = line.get("response") or {}
                if response.get("status_code") == 200 and not line.get("error"):
                    client.cache.put(key, client.model, reply_from_json(response.get("body")))
                else:
                    client.cache.put_failure(key, scrub(_error_reason(line), api_key))
                stored += 1
        entry["collected"] = True
        job.save()
    return stored


def _round_keys(folder: Path) -> list[str]:
    """The requests one round submitted: the custom_ids of its input files."""
    keys: list[str] = []
    for entry in _Job(folder).entries:
        try:
            with open(folder / entry["file"], encoding="utf-8") as fh:
                keys.extend(json.loads(line)["custom_id"] for line in fh if line.strip())
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(f"warning: {folder / entry['file']}: cannot read the round's requests ({e}); "
                        "the summary counts them as from the cache")
    return keys


def account(client, last: str | None) -> None:
    """Prepare `client` to count the final walk as the whole job whose last round is `last`.

    The chain of rounds is followed back from `last` (job.json links). Each request a round
    submitted is answered by the Batch API (its tokens paid, once) or failed; `client.stats`
    starts afresh, so the final walk counts those as answered and only the rest as from the
    cache; `stats.sent` is the requests the rounds submitted. `client.batch_rounds` lists the
    rounds, oldest first (job, requests, answered, failed, tokens). With `last` None (nothing
    was submitted: a rerun of a finished job) everything is from the cache."""
    from reflect_tune.teacher import ClientStats

    chain, key = [], last
    while key is not None and key not in chain:
        chain.append(key)
        key = _previous(client.cache.folder / "batches" / key)
    rounds, answered, failed = [], set(), set()
    for key in reversed(chain):
        folder = client.cache.folder / "batches" / key
        row = {"job": key, "requests": 0, "answered": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
               "reasoning_tokens": 0, "created": min((e.get("created") or "" for e in _Job(folder).entries), default=None)}
        for k in dict.fromkeys(_round_keys(folder)):
            row["requests"] += 1
            reply = client.cache.get(k)
            if reply is not None and k not in answered:
                answered.add(k)
                row["answered"] += 1
                row["prompt_tokens"] += reply.prompt_tokens
                row["completion_tokens"] += reply.completion_tokens
                row["reasoning_tokens"] += reply.reasoning_tokens
            elif reply is None and client.cache.failure(k) is not None:
                failed.add(k)
                row["failed"] += 1
        rounds.append(row)
    client.stats = ClientStats()
    client.stats.sent = sum(r["requests"] for r in rounds)
    client.batch_answered, client.batch_failed, client.batch_rounds = answered, failed, rounds


def run_batches(config, records, prompts, client, api_key: str | None, walk) -> bool:
    """Fill the cache through the Batch API, round by round. False when left running (--no-wait).

    True when every request is cached or failed; the client is then set up (`account`) so that
    the caller's final walk counts the whole job, all rounds, whichever run submitted them."""
    import openai

    sdk = openai.OpenAI(api_key=api_key or "unused", base_url=config.base_url, timeout=config.timeout, max_retries=3)
    checked = False
    last = None  # the round this process collected last: the next round's `previous`
    for _ in range(MAX_ROUNDS):
        client.pending.clear()
        asyncio.run(walk(records, client, prompts, config, progress=False))
        pending = dict(client.pending)
        if not pending:
            account(client, last)
            return True
        if not checked:
            _call("credential check (GET /models)", lambda: sdk.models.list(), api_key)
            checked = True
        key = job_key(pending)
        job = _Job(client.cache.folder / "batches" / key)
        log.info(f"Batch API round: {len(pending)} requests (job {key})")
        _submit(sdk, pending, job, key, api_key, previous=last)
        if not _poll(sdk, job, config, api_key):
            return False
        stored = _collect(sdk, job, pending, client, api_key)
        if stored < len(pending):  # expired or cancelled: what has no result is a failure, not a retry loop
            for k in pending:
                if client.cache.get(k) is None and client.cache.failure(k) is None:
                    client.cache.put_failure(k, "no result: the batch ended (expired or cancelled) without it")
        last = key
    raise ReflectTuneError(f"Batch API: requests still pending after {MAX_ROUNDS} rounds")
