"""Shared fixtures: an offline environment, the bundled model, tiny random models.

No test reaches a network: hub access is switched off for this process and its children.
The model cache is a fresh folder per test session, so the GGUF conversion is exercised on every
run; set REFLECT_TUNE_TEST_CACHE to a folder to reuse one between local runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    from reflect_tune.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bundled_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would, in a child process."""
    exe = Path(sys.executable).with_name("reflect-tune")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "reflect_tune.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
