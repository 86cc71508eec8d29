"""Writing artifacts safely: atomic files, and a provenance sidecar beside every output.

Every file a stage writes gets `<file>.meta.json` next to it (or `meta.json` inside an output
folder) with the resolved config, the versions, the inputs' fingerprints and the command line,
so the artifact can be reproduced. Secrets never enter it: any config key that looks like a
credential is dropped, and API keys are only ever read from the environment.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from reflect_tune.errors import ReflectTuneError, clip, scrub_secrets

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)$", re.IGNORECASE)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces `path` atomically.

    A crash or an exception leaves any previous `path` untouched and removes the partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_temporaries(target: Path) -> None:
    """Remove what a killed process left beside `target` while it wrote it: `.NAME.<pid>-<hex>.tmp`
    files, `.NAME.tmp-<pid>` and `.NAME.old-<pid>-<hex>` folders whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)-[0-9a-f]+\.tmp|tmp-(\d+)|old-(\d+)-[0-9a-f]+)$")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or pid_alive(int(next(g for g in m.groups() if g))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object, or None when it is missing, unreadable or something else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    """Drop credential-looking keys, recursively, and scrub every registered secret from the text
    values (`errors.register_secret`). Dataclasses become dicts."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        return {
            k: redact(v) for k, v in config.items() if not _SECRET_KEY.search(str(k))
        }
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    if isinstance(config, Path):
        config = str(config)
    if isinstance(config, str):
        return scrub_secrets(config)
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
    """Write the provenance sidecar: `<file>.meta.json`, or `<folder>/meta.json`. Secrets scrubbed."""
    artifact = Path(artifact)
    target = artifact / "meta.json" if artifact.is_dir() else artifact.with_name(artifact.name + ".meta.json")
    text = scrub_secrets(json.dumps(meta, indent=2, ensure_ascii=False, default=str))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a path with bytes that are not UTF-8: keep it, escaped
        text = json.dumps(meta, indent=2, ensure_ascii=True, default=str)
    try:
        atomic_write_text(target, text + "\n")
    except OSError as e:
        raise write_error(target, e) from None
    return target


def write_error(path: str | os.PathLike, e: OSError) -> ReflectTuneError:
    """One line for a failed write: the path and the system's reason (disk full, read-only, ...)."""
    return ReflectTuneError(f"{path}: cannot write: {e.strerror or e}")


def write_failure(e: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """Why a library's save failed, when it failed for want of room or rights, else None (a bug).

    torch.save reports a failed write as a RuntimeError from its zip writer ("iostream error",
    "unexpected pos"), safetensors as a SafetensorError; the free space on `where` is added."""
    if isinstance(e, OSError):
        why = e.strerror or str(e)
    else:
        text = str(e).splitlines()[0] if str(e) else ""
        if not (type(e).__name__ == "SafetensorError" or isinstance(e, RuntimeError)
                and re.search(r"writ|space|disk|iostream|unexpected pos|I/O", text, re.I)):
            return None
        why = text[:200]
    if where is not None:
        try:
            free = shutil.disk_usage(_nearest_existing(Path(where))).free
            why += f" ({free / 2**20:.1f} MiB free there)"
        except OSError:
            pass
    return why


# ---------------------------------------------------------------------------------------------
# Checks before any work: inputs that are not files, outputs that would clobber inputs or cannot
# be written. Every stage runs them before it loads a model or sends a request.
# ---------------------------------------------------------------------------------------------


def special_kind(path: str | os.PathLike) -> str | None:
    """What a path is when it is neither a regular file nor a folder ('a FIFO', ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else None
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through symlinks and hard links)."""
    a, b = Path(a), Path(b)
    try:
        return _resolved(a) == _resolved(b) or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> bool:
    c, f = _resolved(child), _resolved(folder)
    return c == f or f in c.parents


def _nearest_existing(path: Path) -> Path:
    p = _resolved(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(folder: Path, target: str | os.PathLike) -> None:
    """Create and remove a temporary file in `folder`: the same errors a real write would meet."""
    probe = folder / f".reflect-tune-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise ReflectTuneError(f"{target}: cannot write in {folder}: {e.strerror or e}") from None


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      flag: str = "--output") -> None:
    """An output file must not be a folder, a device or an input, and its folder must be writable.

    A missing folder is fine (it will be created); the nearest existing one is probed instead.
    """
    p = Path(path)
    kind = special_kind(p)
    if kind:
        raise ReflectTuneError(f"{p}: {flag} is {kind}, not a regular file")
    if p.is_dir():
        raise ReflectTuneError(f"{p}: {flag} is a folder; give a file name")
    for i in inputs:
        if i and Path(i).exists() and same_path(p, Path(i)):
            raise ReflectTuneError(f"{p}: {flag} would overwrite the input {i}; choose another output")
    folder = _nearest_existing(p.parent)
    if not folder.is_dir():
        raise ReflectTuneError(f"{p}: {folder} is not a folder")
    probe_writable(folder, p)


def check_output_folder(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                        flag: str = "--output") -> None:
    """An output folder must not be a file or device, must not be or hold an input, and must be writable."""
    p = Path(path)
    kind = special_kind(p)
    if kind:
        raise ReflectTuneError(f"{p}: {flag} is {kind}, not a folder")
    if p.exists() and not p.is_dir():
        raise ReflectTuneError(f"{p}: {flag} exists and is not a folder")
    for i in inputs:
        if i and Path(i).exists() and _inside(Path(i), p):
            what = "is" if same_path(Path(i), p) else "contains"
            raise ReflectTuneError(f"{p}: {flag} {what} the input {i}; choose another output folder")
    probe_writable(_nearest_existing(p), p)


# An output folder's marker: which stage made it and the entries it wrote there. `--overwrite`
# removes only those, so a foreign folder (or a file a user put beside the outputs) is never lost.
MARKER = ".reflect-tune.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("written"), list) else None


def claim_folder(folder: Path, stage: str, written: Iterable[str] = ()) -> None:
    """Create `folder` if needed and mark it as `stage`'s, noting the entries it wrote (more may follow)."""
    marker = read_marker(folder) or {"stage": stage, "written": []}
    names = sorted(set(marker["written"]) | set(written))
    if marker.get("stage") == stage and names == marker["written"] and (folder / MARKER).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_text(folder / MARKER, json.dumps({"stage": stage, "written": names}, indent=1) + "\n")
    except OSError as e:
        raise write_error(folder / MARKER, e) from None


def owned_by(folder: Path, stage: str) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("stage") == stage


def clear_folder(folder: Path, stage: str, always: Iterable[str] = (), check_only: bool = False) -> None:
    """Empty `folder` for a fresh run of `stage` (--overwrite): only entries the stage wrote.

    The folder must carry `stage`'s marker, and every entry in it must be one the marker lists (or
    one of `always`, the stage's fixed output names); otherwise nothing is removed and the error
    names what is foreign. `check_only`: the checks, without removing anything.
    """
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return
    marker = read_marker(folder)
    if marker is None or marker.get("stage") != stage:
        whose = f"reflect-tune {marker.get('stage')}" if marker else "something other than reflect-tune"
        raise ReflectTuneError(f"{folder}: --overwrite only replaces a folder that reflect-tune {stage} wrote; this one "
                               f"was written by {whose} (no {MARKER} of {stage}). Delete it yourself or choose a new --output")
    known = set(marker["written"]) | set(always) | {MARKER}
    foreign = [e.name for e in entries if e.name not in known]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ReflectTuneError(f"{folder}: holds {clip(foreign[0])}{more}, which reflect-tune {stage} did not write; "
                               "--overwrite removes only its own files. Move them away or choose a new --output")
    if check_only:
        return
    for e in entries:
        if e.name == MARKER:
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (created if needed) while the block runs; another process
    holding it gets a one-line error at once. The kernel drops the lock when a process dies, so a
    killed run never leaves a stale one; the empty lock file stays (removing it would let a third
    process lock a new file while a second still holds the old one)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(lock, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReflectTuneError(f"{what} is in use by another reflect-tune process; wait for it to finish, "
                                   "or choose another output") from None
        yield  # the lock file is left as it is (not even touched), so a rerun changes nothing on disk
    finally:
        os.close(fd)


def lock_beside(path: str | os.PathLike) -> Path:
    """The lock file of an output: `.NAME.lock` in the same folder."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the finished folder `tmp` in place of `folder`, whole: readers see the old one or the new
    one, never a mix. Safe when another process swaps the same folder at the same time."""
    for _ in range(10):
        try:
            os.replace(tmp, folder)  # succeeds onto a missing or empty folder
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            os.replace(folder, old)
        except FileNotFoundError:
            continue  # another process moved it first: try again
        shutil.rmtree(old, ignore_errors=True)
    raise ReflectTuneError(f"{folder}: kept being replaced by another process; run again")


def default_file_mode() -> int:
    """0o666 under the process umask: the mode a plain open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fix_modes(folder: Path) -> None:
    """Give files a library wrote with a private mode (safetensors writes 0600) the usual mode."""
    mode = default_file_mode()
    for f in [folder] if folder.is_file() else folder.rglob("*"):
        if f.is_file() and not f.is_symlink() and stat.S_IMODE(f.stat().st_mode) != mode:
            os.chmod(f, mode)


def append_durably(fd: int, data: bytes) -> None:
    """Append `data` to an O_APPEND file and fsync; if the write fails (disk full), cut the file back
    to where it was, so no torn line is left behind, and re-raise."""
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise


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
        try:
            if self._fh is None:
                self._path = self.folder / f"part-{self.rank}-{os.getpid()}-{time.time_ns()}.jsonl"
                for attempt in range(3):  # a twin run that just finished may remove the folder under us
                    self.folder.mkdir(parents=True, exist_ok=True)
                    try:
                        self._fh = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
            text = "".join(json.dumps({"k": k, "l": loss, "n": n}) + "\n" for k, loss, n in results)
            append_durably(self._fh, text.encode("utf-8"))
        except OSError as e:
            raise write_error(getattr(self, "_path", self.folder), e) from None

    def close(self) -> None:
        if self._fh is not None:
            os.close(self._fh)
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
