"""Progress of a long stage on stderr: a rich bar on a terminal, plain lines in a batch job.

On a terminal (stderr is a TTY) a stage draws a rich bar. Anywhere else (Docker, CI, nohup, a
pipe) a rich bar shows nothing until the end, so instead one plain line is printed every
`REFLECT_TUNE_PROGRESS_INTERVAL` seconds (default 30; 0: no periodic lines), and one final line
when the stage ends:

    reflect: 120/480 records (25%), 3.1 rec/min, ETA 1h56m, failed 2
    reflect: done, 480/480 records in 2h35m, 3.1 rec/min, failed 2

The rate counts the work done by this run (a resumed run does not count what it found done) over
the time since it started; the ETA is what is left at that rate. `enabled=False` (`--no-progress`)
prints neither bar nor lines. One class for every stage: `Progress(label, total, unit=...)`, then
`update(...)` as work is done and `close()` (or use it as a context manager).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

from reflect_tune.errors import ReflectTuneError, clip

ENV = "REFLECT_TUNE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def interval_from_env() -> float:
    """Seconds between plain progress lines: $REFLECT_TUNE_PROGRESS_INTERVAL, else 30."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ReflectTuneError(f"{ENV}={clip(text)}: expected the seconds between progress lines, a number >= 0")
    return value


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h56m, 2d03h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def rate(count: float, seconds: float, unit: str) -> str:
    """`count` per second, minute or hour, whichever reads as at least 1: 2.5 units/s, 3.1 rec/min."""
    per_s = count / seconds if seconds > 0 else 0.0
    if per_s >= 1:
        return f"{per_s:.1f} {unit}/s"
    if per_s * 60 >= 1:
        return f"{per_s * 60:.1f} {unit}/min"
    return f"{per_s * 3600:.1f} {unit}/h"


def _tail(failed: int | None, note: str) -> str:
    return (f", failed {failed}" if failed is not None else "") + (f", {note}" if note else "")


def progress_line(label: str, done: int, total: int, elapsed: float, *, unit: str, rate_unit: str,
                  counted: int | None = None, failed: int | None = None, note: str = "") -> str:
    """One periodic line. `counted`: the part of `done` this run did (default: all of it), which
    sets the rate; the ETA is the rest of `total` at that rate (`?` before anything is counted)."""
    counted = done if counted is None else counted
    pct = int(100 * done / total) if total else 100
    per_s = counted / elapsed if elapsed > 0 else 0.0
    eta = duration((total - done) / per_s) if per_s > 0 else "?"
    return (f"{label}: {done}/{total} {unit} ({pct}%), {rate(counted, elapsed, rate_unit)}, ETA {eta}"
            + _tail(failed, note))


def final_line(label: str, done: int, total: int, elapsed: float, *, unit: str, rate_unit: str,
               counted: int | None = None, failed: int | None = None, note: str = "") -> str:
    """The line at the end: `done, N/N` when all is done, else where it ended (an error, Ctrl-C, --no-wait)."""
    counted = done if counted is None else counted
    speed = rate(counted, elapsed, rate_unit)
    if done >= total:
        head = f"{label}: done, {done}/{total} {unit} in {duration(elapsed)}, {speed}"
    else:
        pct = int(100 * done / total) if total else 100
        head = f"{label}: ended at {done}/{total} {unit} ({pct}%) after {duration(elapsed)}, {speed}"
    return head + _tail(failed, note)


class Progress:
    """Progress of one stage: a rich bar when stderr is a terminal, plain lines otherwise (module docstring).

    `done`: work already done when the stage starts (a resume); `failed`: shown when not None;
    `note`: the stage's own figures (loss, tokens/s), in the bar and at the end of each line.
    """

    def __init__(self, label: str, total: int, *, unit: str = "items", rate_unit: str | None = None,
                 enabled: bool = True, done: int = 0, tty: bool | None = None):
        self.label, self.total, self.unit, self.rate_unit = label, total, unit, rate_unit or unit
        self.done = self.start_done = done
        self.failed: int | None = None
        self.note = ""
        self.started = time.monotonic()
        self.mode = None if not enabled else ("rich" if (sys.stderr.isatty() if tty is None else tty) else "plain")
        self.closed = False
        self._bar = self._task = self._thread = None
        self._stop = threading.Event()
        if self.mode == "rich":
            self._start_bar()
        elif self.mode == "plain":
            self.interval = interval_from_env()
            if self.interval > 0:
                self._thread = threading.Thread(target=self._tick, name=f"progress-{label}", daemon=True)
                self._thread.start()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), refresh_per_second=4, transient=False,  # stdout stays for results
        )
        self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, info="")
        self._bar.start()

    def _info(self) -> str:
        return "  ".join(x for x in (self.note, f"failed {self.failed}" if self.failed is not None else "") if x)

    def update(self, *, done: int | None = None, advance: int = 0, failed: int | None = None,
               note: str | None = None) -> None:
        """Set what is done (`done`, or `advance` by so much), the failures and the note."""
        self.done = (self.done if done is None else done) + advance
        if failed is not None:
            self.failed = failed
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self._info())

    def _figures(self) -> dict:
        return {"unit": self.unit, "rate_unit": self.rate_unit, "counted": self.done - self.start_done,
                "failed": self.failed, "note": self.note}

    def line(self) -> str:
        return progress_line(self.label, self.done, self.total, time.monotonic() - self.started, **self._figures())

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            _print(self.line())

    def close(self) -> None:
        """Stop the bar or the periodic lines; in plain mode print the final line. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self._info())
            self._bar.stop()
        elif self.mode == "plain":
            _print(final_line(self.label, self.done, self.total, time.monotonic() - self.started, **self._figures()))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # sys.stderr as it is now (a test runner swaps it)
