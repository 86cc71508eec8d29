"""Experiment tracking (`report_to`): the same scalars train writes to train_log.csv, sent to a tracker.

    tracker = open_tracker("tensorboard", out, "my-run", config)
    tracker.log({"train/loss": 1.9, "train/lr": 2e-4}, step=10)
    tracker.close()

`report_to` is one of `REPORT_TO`:

- `none`: a no-op tracker;
- `tensorboard`: event files under `folder/tensorboard/` (torch's SummaryWriter);
- `trackio`: offline, into `folder/trackio/` (trackio's own SQLite store). trackio reads its storage
  folder once, from the `TRACKIO_DIR` environment variable, when it is imported; so it runs in a small
  child process of its own with that variable set, and this process's environment and any trackio
  imported here are left as they were. Nothing is sent over the network;
- `wandb`: passed through to `wandb.init(project=..., name=run_name, config=config, dir=folder)`.

`check_report_to` says, as one line, what is wrong (an unknown value, a package not installed)
before any model loads. Config values whose key names a secret (key, token, ...) are never passed on.
A tracker that fails while logging warns once and stops; it never stops training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from reflect_tune.errors import SECRET_NAME, ReflectTuneError, clip

log = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
PROJECT = "reflect-tune"
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def check_report_to(report_to: str) -> None:
    """One line naming the problem with `report_to` (unknown, or its package missing); nothing if fine."""
    if report_to not in REPORT_TO:
        raise ReflectTuneError(f"setting 'report_to': {clip(report_to)} is not one of {', '.join(REPORT_TO)}")
    if report_to == "none" or importlib.util.find_spec(_PACKAGES[report_to]) is not None:
        return
    how = "pip install wandb" if report_to == "wandb" else "pip install 'reflect-tune[track]'"
    raise ReflectTuneError(f"report_to {report_to} needs the {_PACKAGES[report_to]} package: {how}")


def safe_config(config: dict) -> dict:
    """The config without keys that name a secret ("key", "token", ...); nested dicts filtered too."""
    out = {}
    for k, v in config.items():
        if SECRET_NAME.search(str(k)):
            continue
        out[str(k)] = safe_config(v) if isinstance(v, dict) else v
    return out


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are finite numbers, as floats (None, "", NaN are left out)."""
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class Tracker:
    """`log(metrics, step)` and `close()`; this base class is the `none` tracker."""

    name = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        values = _scalars(metrics)
        if not values or self.name == "none":
            return
        try:
            self._log(values, int(step))
        except Exception as e:  # a tracker is a convenience: warn once, then stop sending
            log.warning("warning: report_to %s: cannot log (%s); no more metrics go to it", self.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._failed()

    def close(self) -> None:
        pass

    def _log(self, values: dict[str, float], step: int) -> None:
        pass

    def _failed(self) -> None:
        self.name = "none"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
        self.writer.add_text("run_name", run_name, 0)

    def _log(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class _Trackio(Tracker):
    """trackio in a child process (`python -m reflect_tune.tracking`) whose TRACKIO_DIR is `folder/trackio`;
    one JSON line per `log` on its stdin, end of input to finish."""

    name = "trackio"

    def __init__(self, folder: Path, run_name: str, config: dict):
        self.dir = folder / "trackio"
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_DATASET_ID", "TRACKIO_BUCKET_ID")}
        env.update(TRACKIO_DIR=str(self.dir.resolve()), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
        self._stderr = open(self.dir / "child.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "reflect_tune.tracking"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        self._send({"project": PROJECT, "name": run_name, "config": json.loads(json.dumps(config, default=str))})

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def _log(self, values, step):
        self._send({"metrics": values, "step": step})

    def _failed(self):
        super()._failed()
        self.close()

    def close(self):
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        self._stderr.close()
        if rc != 0:
            tail = (self.dir / "child.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no message"]
            log.warning("warning: report_to trackio: the logger exited with code %s (%s)", rc, tail[0][:300])


class _Wandb(Tracker):
    name = "wandb"

    def __init__(self, folder: Path, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_name, config=config, dir=str(folder))

    def _log(self, values, step):
        self.run.log(values, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_tracker(report_to: str, folder: Path, run_name: str, config: dict) -> Tracker:
    """A tracker for one run whose outputs are in `folder`; `config` is logged as the run's settings."""
    check_report_to(report_to)
    folder = Path(folder)
    config = safe_config(config)
    if report_to == "none":
        return Tracker()
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _Wandb}
    try:
        return kinds[report_to](folder, run_name, config)
    except ReflectTuneError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ReflectTuneError(f"report_to {report_to}: cannot start: {first}") from None


def _trackio_child() -> None:
    """The child of `_Trackio`: trackio.init from the first line, trackio.log per line, finish at the end."""
    import trackio

    first = json.loads(sys.stdin.readline())
    trackio.init(project=first["project"], name=first["name"], config=first["config"], embed=False,
                 auto_log_gpu=False, auto_log_cpu=False)
    for line in sys.stdin:
        msg = json.loads(line)
        trackio.log(msg["metrics"], step=msg["step"])
    trackio.finish()


def read_trackio(folder: Path, project: str = PROJECT) -> list[dict]:
    """The logged rows of a trackio store under `folder/trackio` (for tests and checks): dicts with `step`,
    `run` and the metrics. Read with sqlite3 directly, so trackio need not be imported here."""
    import sqlite3

    db = Path(folder) / "trackio" / f"{project}.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step, id").fetchall()
    finally:
        con.close()
    return [{"run": r, "step": s, **json.loads(m)} for r, s, m in rows]


if __name__ == "__main__":
    _trackio_child()
