"""Writing artifacts safely: atomic files, and a provenance sidecar beside every output.

Every file a stage writes gets `<file>.meta.json` next to it (or `meta.json` inside an output
folder) with the resolved config, the versions, the inputs' fingerprints and the command line,
so the artifact can be reproduced. Secrets never enter it: any config key that looks like a
credential is dropped, and API keys are only ever read from the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from reflect_tune.errors import ReflectTuneError

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)$", re.IGNORECASE)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces `path` atomically.

    A crash or an exception leaves any previous `path` untouched and removes the partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask, as a plain open() would (mkstemp would give 0600)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identify an input: sha256 for files, name/size/mtime of each file for folders."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"path": str(p), "tree_sha256": h.hexdigest(), "files": len(files)}
    return {"path": str(path), "remote": True}


def redact(config: Any) -> Any:
    """Drop credential-looking keys, recursively. Dataclasses become dicts."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        return {
            k: redact(v) for k, v in config.items() if not _SECRET_KEY.search(str(k))
        }
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def provenance(stage: str, config: Any, inputs: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """The record of how an artifact was made: stage, config, inputs, versions, command."""
    from reflect_tune import __version__

    versions = {"reflect_tune": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers", "datasets", "peft", "openai"):
        if mod in sys.modules:  # report what was actually used, without importing more
            versions[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": _redacted_argv(sys.argv),
        "config": redact(config),
        "inputs": [fingerprint(p) for p in inputs],
        "versions": versions,
        "host": platform.node(),
    }


def _redacted_argv(argv: list[str]) -> list[str]:
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("--") and _SECRET_KEY.search(flag.lstrip("-").replace("-", "_")):
            if eq:
                out.append(f"{flag}=***")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out


def write_meta(artifact: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write the provenance sidecar: `<file>.meta.json`, or `<folder>/meta.json`."""
    artifact = Path(artifact)
    target = artifact / "meta.json" if artifact.is_dir() else artifact.with_name(artifact.name + ".meta.json")
    text = json.dumps(meta, indent=2, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a path with bytes that are not UTF-8: keep it, escaped
        text = json.dumps(meta, indent=2, ensure_ascii=True, default=str)
    try:
        atomic_write_text(target, text + "\n")
    except OSError as e:
        raise ReflectTuneError(f"{target}: cannot write: {e.strerror or e}") from None
    return target


# Resumable work: fsynced append-only shards (used by `score`; a kill loses at most one batch)


class ShardStore:
    """Finished units on disk: `<folder>/part-<rank>-<pid>-<time>.jsonl`, one fsynced append per batch.

    A line is {"k": unit key, "l": mean loss (NaN allowed), "n": scored tokens}. A torn last line
    (a kill mid-write) is ignored, so at most the batch being written is lost.
    """

    def __init__(self, folder: Path, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank
        self._fh = None

    def load(self) -> dict[str, float]:
        done: dict[str, float] = {}
        if not self.folder.is_dir():
            return done
        for part in sorted(self.folder.glob("part-*.jsonl")):
            with open(part, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        done[row["k"]] = float(row["l"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # a line cut short by a kill
        return done

    def append(self, results: list[tuple[str, float, int]]) -> None:
        if self._fh is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{self.rank}-{os.getpid()}-{time.time_ns()}.jsonl"
            self._fh = open(self.folder / name, "a", encoding="utf-8")
        self._fh.write("".join(json.dumps({"k": k, "l": loss, "n": n}) + "\n" for k, loss, n in results))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Drop the shards once the final artifact is written (it holds everything they held)."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def shard_folder(output: str | os.PathLike, signature: str) -> Path:
    """Where a run writing `output` keeps its shards: `<output>.parts/<signature>/`."""
    out = Path(output)
    return out.with_name(out.name + ".parts") / signature
