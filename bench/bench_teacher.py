"""Benchmark: teacher client throughput against a local fake server with a fixed 200 ms latency.

Side by side, in one run on one machine, against one `python tests/fakes/openai_server.py
--latency 0.2` child process (its own process, so client and server do not share a GIL):
  ours       `reflect_tune.teacher.TeacherClient` (semaphore for concurrency, RateLimiter for RPM,
             SQLite request cache in a fresh temporary folder per run, so every request is sent)
             at concurrency 1, 8, 10, 32, 128 without a limit, and at 32 / 128 with RPM 1200 / 3000
             (each limited run lasts more than a minute, so whole 60 s windows are checked)
  reference  the reference code's pattern: plain `openai.AsyncOpenAI(max_retries=0)`, batches of
             10 requests sent with `asyncio.gather`, then a barrier; no rate limiter
Every request has distinct content (no cache hits). The client's one-off credential check
(`GET /models`) runs before the clock starts. Rate = requests / client wall time (gather start to
last reply). Ideal = min(concurrency / 0.2 s, RPM / 60). "Over the limit" is judged on the
SERVER's arrival times: the most arrivals in any half-open 60-second window [t, t+60) must be
<= RPM. The most arrivals in any 1-second window is reported beside ceil(RPM/60), as burstiness.
Writes a section into docs/BENCHMARKS.md (replacing an earlier one) unless --no-write.

    python bench/bench_teacher.py [--no-write] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from common import machine, write_section  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Teacher client throughput"
LATENCY = 0.2
PARAMS = {"temperature": 0, "top_p": 1, "max_tokens": 16}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------ server


class Server:
    """The fake OpenAI server as a child process."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fakes" / "openai_server.py"), "--port", "0", "--latency", str(latency)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY "):
            self.proc.kill()
            raise SystemExit(f"the test server did not start: {line!r}")
        self.base_url = line.split(" ", 1)[1]
        self.root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def stats(self) -> dict:
        with urllib.request.urlopen(self.root + "/_stats", timeout=30) as r:
            return json.load(r)

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.root + "/_reset", data=b"", method="POST"), timeout=30).read()

    def cpu(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------ drivers


async def run_ours(base_url: str, n: int, concurrency: int, rpm: int | None, tag: str) -> float:
    from reflect_tune.cache import RequestCache
    from reflect_tune.teacher import TeacherClient

    with tempfile.TemporaryDirectory(prefix="reflect-tune-bench-teacher-") as tmp:
        cache = RequestCache(Path(tmp))
        client = TeacherClient(model="fake-model", base_url=base_url, api_key="unused", params=PARAMS, cache=cache,
                               concurrency=concurrency, rpm=rpm, tpm=None, timeout=30, max_retries=2)
        try:
            await client.check_once()  # the GET /models credential check, outside the timing
            start = time.perf_counter()
            await asyncio.gather(*(client.chat([{"role": "user", "content": f"{tag} request {i}"}]) for i in range(n)))
            wall = time.perf_counter() - start
            if client.stats.sent != n or client.stats.retries or client.stats.failures:
                raise SystemExit(f"{tag}: unexpected client stats {client.stats}")
        finally:
            await client.aclose()
            cache.close()
    return wall


async def run_reference(base_url: str, n: int, batch: int, tag: str) -> float:
    import openai

    sdk = openai.AsyncOpenAI(api_key="unused", base_url=base_url, timeout=30, max_retries=0)
    try:
        start = time.perf_counter()
        for lo in range(0, n, batch):
            await asyncio.gather(*(
                sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"{tag} request {i}"}],
                                            **PARAMS)
                for i in range(lo, min(lo + batch, n))
            ))
        return time.perf_counter() - start
    finally:
        await sdk.close()


async def run_limiter(rpm: int, n: int) -> float:
    """The client's RateLimiter alone (no HTTP): acquires per second, as a fraction of RPM / 60."""
    from reflect_tune.teacher import RateLimiter

    limiter = RateLimiter(rpm=rpm)
    await limiter.acquire()
    start = time.perf_counter()
    await asyncio.gather(*(limiter.acquire() for _ in range(n)))
    return n / (time.perf_counter() - start) / (rpm / 60)


# ------------------------------------------------------------------------------------ analysis


def max_in_window(times: list[float], width: float) -> int:
    """The most arrivals in any half-open window [t, t + width)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        if j < i:
            j = i
        while j < len(times) and times[j] < t + width:
            j += 1
        best = max(best, j - i)
    return best


def busy_cpu() -> float:
    """CPU seconds all processes have used so far (user + nice + system + irq + softirq + steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / CLK_TCK


def measure(server: Server, name: str, kind: str, n: int, concurrency: int, rpm: int | None) -> dict:
    server.reset()
    cpu0, scpu0, all0 = time.process_time(), server.cpu(), busy_cpu()
    tag = f"{name} {time.time_ns()}"
    if kind == "ours":
        wall = asyncio.run(run_ours(server.base_url, n, concurrency, rpm, tag))
    else:
        wall = asyncio.run(run_reference(server.base_url, n, concurrency, tag))
    cpu, scpu, allcpu = time.process_time() - cpu0, server.cpu() - scpu0, busy_cpu() - all0
    st = server.stats()
    arrivals = [e["t"] for e in st["log"]]
    statuses = {e["status"] for e in st["log"]}
    if st["chat_requests"] != n or statuses != {200}:
        raise SystemExit(f"{name}: server saw {st['chat_requests']} requests (wanted {n}), statuses {statuses}")
    ideal = concurrency / LATENCY if rpm is None else min(concurrency / LATENCY, rpm / 60)
    row = {
        "name": name, "kind": kind, "n": n, "concurrency": concurrency, "rpm": rpm, "wall": wall,
        "rate": n / wall, "ideal": ideal, "achieved": n / wall / ideal,
        "server_span": max(e["done"] for e in st["log"]) - min(arrivals),
        "max_in_flight": st["max_in_flight"], "max_1s": max_in_window(arrivals, 1.0),
        "max_60s": max_in_window(arrivals, 60.0), "client_cpu": cpu, "server_cpu": scpu,
        "other_cpu": max(0.0, allcpu - cpu - scpu),
    }
    if rpm is not None:
        row["limit_1s"] = math.ceil(rpm / 60)
        row["over"] = max(0, row["max_60s"] - rpm)
        gaps = sorted(b - a for a, b in zip(sorted(arrivals), sorted(arrivals)[1:]))
        row["min_gap"] = gaps[0] if gaps else float("nan")
    return row


# ------------------------------------------------------------------------------------ report


def _openai_version() -> str:
    import openai

    return openai.__version__


def revision() -> str:
    from reflect_tune import __version__

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    rev = git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") or git(
        "ls-files", "--others", "--exclude-standard", "reflect_tune/teacher.py") else ""
    teacher = hashlib.sha256((ROOT / "reflect_tune" / "teacher.py").read_bytes()).hexdigest()[:12]
    return f"reflect-tune {__version__}, commit {rev or 'unknown'}{dirty}; reflect_tune/teacher.py sha256 {teacher}"


def render(rows: list[dict], ref: dict, command: str, loadavg: tuple, limiter_only: dict) -> str:
    def limit(r):
        return f"{r['rpm']}" if r["rpm"] else "none"

    def window(r):
        if r["rpm"] is None:
            return f"{r['max_1s']}"
        return f"{r['max_1s']} (limit {r['limit_1s']})"

    cores = os.cpu_count() or 1
    table = [
        "| client | concurrency | RPM limit | requests | req/s | ideal req/s | achieved / ideal | vs reference | "
        "max in flight | max arrivals in 1 s | over limit | client CPU ms / request | CPU / wall: client, server, others |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        over = "-" if r["rpm"] is None else str(r["over"])
        table.append(
            f"| {'ours' if r['kind'] == 'ours' else 'reference (batches of 10 + barrier)'} | {r['concurrency']} | "
            f"{limit(r)} | {r['n']} | {r['rate']:.1f} | {r['ideal']:.0f} | {r['achieved']:.2f} | "
            f"{r['rate'] / ref['rate']:.2f}x | {r['max_in_flight']} | {window(r)} | {over} | "
            f"{1000 * r['client_cpu'] / r['n']:.1f} | "
            f"{r['client_cpu'] / r['wall']:.2f}, {r['server_cpu'] / r['wall']:.2f}, {r['other_cpu'] / r['wall']:.2f} |"
        )
    ours = [r for r in rows if r["kind"] == "ours"]
    missed = [r for r in ours if r["achieved"] < 0.9]
    limited = [r for r in ours if r["rpm"]]
    over = sum(r["over"] for r in limited)
    summary = [
        f"Target: achieved / ideal >= 0.90 with 0 requests over the limit. "
        f"{len(ours) - len(missed)} of {len(ours)} runs of ours meet the throughput target"
        + (": all do." if not missed else "; missed: " + ", ".join(
            f"concurrency {r['concurrency']}{' RPM ' + str(r['rpm']) if r['rpm'] else ''} "
            f"({r['rate']:.0f} of {r['ideal']:.0f} req/s, {r['achieved']:.2f})" for r in missed) + ".")
        + f" Requests over the limit (any 60 s window) in the RPM runs: {over}"
        + ("." if not over else " (" + ", ".join(
            f"RPM {r['rpm']} at concurrency {r['concurrency']}: {r['max_60s']} arrivals in one minute"
            for r in limited if r["over"]) + ")."),
    ]
    for r in missed:
        busy = (r["client_cpu"] + r["server_cpu"] + r["other_cpu"]) / r["wall"]
        ceiling = r["n"] / r["client_cpu"] if r["client_cpu"] else float("inf")
        where = f"Concurrency {r['concurrency']}{' (RPM ' + str(r['rpm']) + ')' if r['rpm'] else ''}"
        cost = (f"the client spends {1000 * r['client_cpu'] / r['n']:.1f} ms CPU per request in one event loop, "
                f"so ~{ceiling:.0f} req/s is its ceiling on one free core")
        if busy > 0.85 * cores or r["client_cpu"] / r["wall"] > 0.85:
            summary.append(
                f"{where}: CPU-bound. The machine was {100 * min(busy / cores, 1):.0f}% busy ({r['client_cpu']:.1f} s "
                f"client, {r['server_cpu']:.1f} s server, {r['other_cpu']:.1f} s other processes, in {r['wall']:.1f} s "
                f"on {cores} cores); {cost}"
                + (f", below the ideal {r['ideal']:.0f} req/s." if ceiling < r["ideal"] else
                   f"; the ideal {r['ideal']:.0f} req/s needs less, so the shortfall is waiting for a CPU the "
                   f"other processes held" + (" and the limiter's drift (below)." if r["rpm"] else ".")))
        else:
            summary.append(f"{where}: not CPU-bound (machine {100 * busy / cores:.0f}% busy, client "
                           f"{r['client_cpu'] / r['wall']:.2f} core): {r['rate']:.0f} of {r['ideal']:.0f} req/s; {cost}.")
    gaps = ", ".join(f"RPM {r['rpm']} at concurrency {r['concurrency']}: {r['min_gap'] * 1000:.0f} ms "
                     f"(pacing interval {60000 / r['rpm']:.0f} ms)" for r in limited)
    lines = [
        SECTION,
        "",
        f"- Machine: {machine(f'Python {platform.python_version()}', f'openai {_openai_version()}')}; load average at start {loadavg[0]:.2f} (other jobs may share the cores)",
        f"- Command: `{command}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}, {revision()}",
        f"- Server: `python tests/fakes/openai_server.py --latency {LATENCY}` in its own process; every request "
        "has distinct content, so none is a cache hit; the client's `GET /models` check runs before the clock.",
        "- req/s = requests / client wall time. Ideal = min(concurrency / 0.2 s, RPM / 60). "
        "\"vs reference\" divides by the reference pattern's req/s from the same run. Max in flight is counted "
        "by the server. \"Over limit\" uses the server's arrival times: arrivals beyond RPM in any half-open "
        "60 s window (the limited runs last 66 s). \"Max arrivals in 1 s\" shows burstiness beside ceil(RPM/60). "
        "CPU / wall: CPU seconds per wall second "
        "(1.00 = one core busy) of the client process, the server process, and all other processes on the "
        "machine (from /proc/stat).",
        "",
        *table,
        "",
        *summary,
        "",
        f"Smallest gap between consecutive server arrivals in the RPM runs: {gaps}. The limiter starts requests "
        f"on a schedule of one every 60/RPM s; a start that wakes up to a quarter interval late keeps the "
        f"schedule, so two arrivals can be closer than the interval (and a 1 s window can hold one more than "
        f"RPM/60), while a log of the last minute's starts keeps every 60 s window at or below RPM. The client's "
        f"RateLimiter alone, no HTTP, in this run: "
        + ", ".join(f"RPM {k}: {v:.3f} of RPM/60" for k, v in limiter_only.items()) + ".",
        "",
        f"The reference pattern has no limiter: it put {ref['max_1s']} requests into one second, "
        f"{ref['max_1s'] / 20:.1f}x an RPM 1200 limit's share of a second. At the same concurrency (10), ours / reference = "
        f"{next(r['rate'] for r in rows if r['kind'] == 'ours' and r['concurrency'] == 10 and not r['rpm']) / ref['rate']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch docs/BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests (a smoke test)")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0

    def count(rounds: int, c: int) -> int:
        return max(c, int(rounds * scale) * c)

    # (name, kind, requests, concurrency, rpm); request counts are whole rounds of `concurrency`
    plan = [
        ("reference", "reference", count(40, 10), 10, None),
        ("ours-c1", "ours", count(40, 1), 1, None),
        ("ours-c8", "ours", count(40, 8), 8, None),
        ("ours-c10", "ours", count(40, 10), 10, None),
        ("ours-c32", "ours", count(20, 32), 32, None),
        ("ours-c128", "ours", count(10, 128), 128, None),
    ]
    for rpm in (1200, 3000):
        for c in (32, 128):  # 66 s each: more than a whole minute of arrivals
            plan.append((f"ours-c{c}-rpm{rpm}", "ours", max(20, int(66 * rpm / 60 * scale)), c, rpm))

    import openai  # noqa: F401  (imports stay out of the first run's CPU time)

    import reflect_tune.teacher  # noqa: F401

    loadavg = os.getloadavg()
    server = Server(LATENCY)
    rows = []
    try:
        for name, kind, n, c, rpm in plan:
            row = measure(server, name, kind, n, c, rpm)
            rows.append(row)
            print(f"  {name:<18} {n:>5} requests  {row['wall']:6.2f} s  {row['rate']:7.1f} req/s  "
                  f"ideal {row['ideal']:5.0f}  {row['achieved']:.2f}  max 1 s {row['max_1s']:>4}  "
                  f"in flight {row['max_in_flight']:>3}  cpu client {row['client_cpu']:.1f} s server {row['server_cpu']:.1f} s "
                  f"others {row['other_cpu']:.1f} s",
                  file=sys.stderr, flush=True)
        limiter_only = {rpm: asyncio.run(run_limiter(rpm, int(3 * rpm / 60 * scale))) for rpm in (1200, 3000)}
    finally:
        server.close()
    ref = rows[0]
    command = ".venv/bin/python bench/bench_teacher.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    text = render(rows, ref, command, loadavg, limiter_only)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
