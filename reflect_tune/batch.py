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


def _submit(sdk, pending: dict[str, dict], job: _Job, key: str, api_key: str | None) -> int:
    """Create what is missing of this job's files and batches; returns the requests submitted now."""
    job.folder.mkdir(parents=True, exist_ok=True)
    submitted = 0
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
                    reply = reply_from_json(response.get("body"))
                    client.cache.put(key, client.model, reply)
                    client.stats.prompt_tokens += reply.prompt_tokens
                    client.stats.completion_tokens += reply.completion_tokens
                    client.stats.succeeded += 1
                else:
                    reason = scrub(_error_reason(line), api_key)
                    client.cache.put_failure(key, reason)
                    client.stats.failures["batch"] += 1
                stored += 1
        entry["collected"] = True
        job.save()
    return stored


def run_batches(config, records, prompts, client, api_key: str | None, walk) -> bool:
    """Fill the cache through the Batch API, round by round. False when left running (--no-wait)."""
    import openai

    sdk = openai.OpenAI(api_key=api_key or "unused", base_url=config.base_url, timeout=config.timeout, max_retries=3)
    checked = False
    for _ in range(MAX_ROUNDS):
        client.pending.clear()
        asyncio.run(walk(records, client, prompts, config, progress=False))
        pending = dict(client.pending)
        if not pending:
            return True
        if not checked:
            _call("credential check (GET /models)", lambda: sdk.models.list(), api_key)
            checked = True
        key = job_key(pending)
        job = _Job(client.cache.folder / "batches" / key)
        log.info(f"Batch API round: {len(pending)} requests (job {key})")
        client.stats.sent += _submit(sdk, pending, job, key, api_key)
        if not _poll(sdk, job, config, api_key):
            return False
        stored = _collect(sdk, job, pending, client, api_key)
        if stored < len(pending):  # expired or cancelled: what has no result is a failure, not a retry loop
            for k in pending:
                if client.cache.get(k) is None and client.cache.failure(k) is None:
                    client.cache.put_failure(k, "no result: the batch ended (expired or cancelled) without it")
                    client.stats.failures["batch"] += 1
    raise ReflectTuneError(f"Batch API: requests still pending after {MAX_ROUNDS} rounds")
