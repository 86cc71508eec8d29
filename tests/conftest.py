"""Shared fixtures: an offline environment, the bundled model, tiny random models.

No test reaches a network: hub access is switched off for this process and its children.
The model cache is a fresh folder per test session, so the GGUF conversion is exercised on every
run; set REFLECT_TUNE_TEST_CACHE to a folder to reuse one between local runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUNDLED = "bundled:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("REFLECT_TUNE_TEST_CACHE") or tmp_path_factory.mktemp("reflect-tune-cache"))
    os.environ["REFLECT_TUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def bundled_dir(model_cache) -> Path:
    """The bundled SmolLM2-135M-Instruct, converted (once) to a safetensors folder."""
    from reflect_tune.models import resolve_model

    return Path(resolve_model(BUNDLED).path)


@pytest.fixture(scope="session")
def tiny_model_dir(bundled_dir, tmp_path_factory) -> Path:
    """A seeded 2-layer, 64-wide random Llama with the SmolLM2 tokenizer."""
    from fakes.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bundled_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would, in a child process."""
    exe = Path(sys.executable).with_name("reflect-tune")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "reflect_tune.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- small filesystems for fault tests


def mount_reason() -> str | None:
    """None when this process can mount a tmpfs (root, or a user namespace that allows it), else why not."""
    import shutil
    import tempfile

    if sys.platform != "linux" or shutil.which("mount") is None:
        return "tmpfs mounts need Linux and the mount command"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (run the suite as root, e.g. in the CI container)"
    probe = Path(tempfile.mkdtemp(prefix="rt-mount-probe-"))
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs failed here: {r.stderr.strip()[:200]}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


class Tmpfs:
    """A tmpfs of a given size at `path` (an empty folder), unmounted on exit; `resize` grows or shrinks it."""

    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path, self.size, self.read_only = Path(path), size, read_only

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        opts = f"size={self.size}" + (",ro" if self.read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)], check=True)
        return self

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """A folder no process of ours can write in: a read-only tmpfs as root, a 0555 folder otherwise."""
    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    reason = mount_reason()
    if reason:
        pytest.skip(f"no read-only folder can be made: {reason}")
    with Tmpfs(path, "1m", read_only=True):
        yield path


def one_error_line(stderr: str) -> str:
    """The run's error: exactly one `error:` line, no traceback. Returns it."""
    assert "Traceback" not in stderr and "Task exception was never retrieved" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_teacher(bundled_dir, tmp_path_factory):
    """`transformers serve` with the bundled model, started once for the session (reflect and judge tests);
    yields (base_url, model name); always stopped."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.fail("the `transformers` CLI is missing: install the [serve] extra (make install does)")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(exe), "serve", str(bundled_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--continuous-batching",
             # a small paged KV cache (8192 tokens, ~0.4 GB); by default it takes a share of all memory
             "--cb-block-size", "128", "--cb-num-blocks", "64"],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # bounded wait for the port to answer
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # it answers HTTP: it is up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
        yield base + "/v1", str(bundled_dir)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
