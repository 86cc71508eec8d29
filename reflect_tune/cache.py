"""The request cache of `reflect`: every paid teacher reply, in SQLite, shared safely between processes.

`RequestCache` is the resume point of a reflect run (the curator way: the output is rebuilt from
it, so a killed run loses at most the requests on the wire). Keys hash the model, the messages and
the generation parameters (`request_key`), never the parsing code. Layout: docs/FORMATS.md §8.1.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflect_tune.artifacts import pid_alive, sweep_temporaries
from reflect_tune.errors import ReflectTuneError, scrub_secrets


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """The cache key: sha256 of the canonical JSON of model, messages and generation parameters."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(kw_only=True)
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # as the server reports them: OpenAI's include the reasoning tokens
    reasoning_tokens: int = 0  # of the completion tokens, those the model spent reasoning (0 when not reported)
    cached: bool = False
    retries: int = 0


class CacheFull(ReflectTuneError):
    """The disk holding the request cache is full: the run stops before it sends anything more."""


def disk_full_error(folder: Path) -> CacheFull:
    return CacheFull(f"{folder}: the disk holding the request cache is full; stopped before sending more (the "
                     "replies in flight were saved in the reserved space). Free some disk space, then run the same "
                     "command again to resume")


def _disk_full(e: BaseException) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code in (getattr(sqlite3, "SQLITE_FULL", 13), getattr(sqlite3, "SQLITE_IOERR", 10)):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in str(e)


class RequestCache:
    """Append-only SQLite store of teacher replies, keyed by `request_key`, shared safely between processes.

    WAL journal with `synchronous=NORMAL`: each reply is committed before it is used, and a
    committed row survives the process being killed (only a power cut can lose the last ones).
    The first committed reply for a key is final: a later writer gets the stored one back, so two
    runs on one cache always agree.

    Concurrent runs: a process claims a request in the `claims` table before sending it, with a
    lease it renews while the request is in flight (`LEASE_S`). Another process that needs the
    same request waits for the reply instead of paying for it again; a claim whose lease ran out,
    or whose process on this host is gone, is taken over.

    Disk full: `requests.reserve` keeps `RESERVE_BYTES` of disk beside the database. When a commit
    fails for lack of space, the reserve is given up and the commit retried, so the replies in
    flight are kept; `full` then tells the client to stop sending. A `failures` table remembers
    Batch API requests that failed, so a rerun does not pay for them again unless asked to
    (`--retry-failed`).
    """

    RESERVE_BYTES = 4 << 20
    LEASE_S = 30.0

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.owner = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.full = False
        self.reserve = self.folder / "requests.reserve"
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
            self.db.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT, expires REAL)")
            # a table of its own, so caches written before it (and the code that wrote them) still work
            self.db.execute("CREATE TABLE IF NOT EXISTS reasoning (key TEXT PRIMARY KEY, reasoning_tokens INTEGER)")
        except (OSError, sqlite3.Error) as e:
            raise ReflectTuneError(f"{folder}: cannot open the request cache: {e}") from None

    def ensure_reserve(self) -> None:
        """Set aside the disk reserve before anything is sent; refuse to start on a full disk."""
        try:
            if self.reserve.is_file() and self.reserve.stat().st_size >= self.RESERVE_BYTES:
                return
            sweep_temporaries(self.reserve)
            tmp = self.reserve.with_name(f".{self.reserve.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(bytes(self.RESERVE_BYTES))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.reserve)
            finally:
                if tmp.exists():
                    tmp.unlink()
        except OSError as e:
            raise CacheFull(f"{self.folder}: cannot set aside {self.RESERVE_BYTES >> 20} MiB beside the request cache "
                            f"({e.strerror or e}); free some disk space, then run the same command again") from None

    def _write(self, statements: list[tuple[str, tuple]]) -> list[int]:
        """Run the statements in one committed transaction (their row counts); on a full disk, give
        up the reserve once and try again."""
        def run() -> list[int]:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                counts = [self.db.execute(sql, args).rowcount for sql, args in statements]
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            return counts

        try:
            return run()
        except sqlite3.OperationalError as e:
            if not _disk_full(e) or not self.reserve.exists():
                raise CacheFull(f"{self.path}: cannot save a reply: {e}") from None
            self.reserve.unlink()
            self.full = True
            try:
                return run()
            except sqlite3.OperationalError as e2:
                raise CacheFull(f"{self.path}: cannot save a reply even after freeing the reserve: {e2}") from None

    def get(self, key: str) -> Reply | None:
        row = self.db.execute(
            "SELECT response, finish_reason, prompt_tokens, completion_tokens, reasoning.reasoning_tokens FROM requests "
            "LEFT JOIN reasoning USING (key) WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else Reply(text=row[0], finish_reason=row[1], prompt_tokens=row[2] or 0,
                                                  completion_tokens=row[3] or 0, reasoning_tokens=row[4] or 0, cached=True)

    def put(self, key: str, model: str, reply: Reply) -> Reply:
        """Commit `reply` unless a reply for `key` is already committed; return the committed one."""
        # one transaction: the reply goes in (unless one is there) and this process's claim goes away
        statements = [
            ("INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
             (key, scrub_secrets(model), reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens,
              time.time())),
        ]
        if reply.reasoning_tokens:  # only beside the reply it belongs to (changes(): the insert above)
            statements.append(("INSERT OR IGNORE INTO reasoning SELECT ?, ? WHERE changes() = 1", (key, reply.reasoning_tokens)))
        statements.append(("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner)))
        inserted = self._write(statements)[0]
        if inserted == 1:
            return reply
        stored = self.get(key) or reply
        stored.cached, stored.retries = False, reply.retries
        stored.prompt_tokens, stored.completion_tokens = reply.prompt_tokens, reply.completion_tokens  # what this run paid
        stored.reasoning_tokens = reply.reasoning_tokens
        return stored

    # -- claims: one process sends a request, the others wait for its reply ------------------------

    def claim(self, key: str) -> str:
        """'mine' (this process sends it), 'done' (a reply is committed) or 'wait' (another process is sending it)."""
        now = time.time()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.db.execute("SELECT 1 FROM requests WHERE key = ?", (key,)).fetchone():
                    state = "done"
                else:
                    row = self.db.execute("SELECT owner, expires FROM claims WHERE key = ?", (key,)).fetchone()
                    state = "wait" if row and row[0] != self.owner and row[1] > now and _owner_alive(row[0]) else "mine"
                    if state == "mine":
                        self.db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, self.owner, now + self.LEASE_S))
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            if _disk_full(e):
                self.full = True
                raise disk_full_error(self.folder) from None
            raise
        return state

    def renew(self) -> None:
        """Extend the leases of every request this process has in flight."""
        try:
            self.db.execute("UPDATE claims SET expires = ? WHERE owner = ?", (time.time() + self.LEASE_S, self.owner))
        except sqlite3.OperationalError:
            pass  # a full disk: the claims run out and another process may take over; no reply is lost

    def release(self, key: str) -> None:
        try:
            self.db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))
        except sqlite3.OperationalError:
            pass

    def failure(self, key: str) -> str | None:
        row = self.db.execute("SELECT reason FROM failures WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put_failure(self, key: str, reason: str) -> None:
        self._write([("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (key, reason, time.time()))])

    def clear_failures(self) -> int:
        return self.db.execute("DELETE FROM failures").rowcount

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    def close(self) -> None:
        try:
            self.db.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
        except sqlite3.Error:
            pass
        self.db.close()


def _owner_alive(owner: str) -> bool:
    """False for a claim by a process of this host that no longer runs (killed): its claim is void."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host != platform.node() or not pid.isdigit() or pid_alive(int(pid))
