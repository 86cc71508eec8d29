"""Shared by the benchmark scripts: the machine line and the section writer for docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery figure names its machine and command. Ratios are measured side by side in one run.\n\n"


def machine(*extras: str) -> str:
    """'2 cores (AMD EPYC ...; flags avx512_bf16 ...), 24 GiB RAM' plus any extras (library versions, threads)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return ", ".join([f"{os.cpu_count()} cores ({cpu}; {cpu_flags()})", f"{mem:.0f} GiB RAM", *extras])


def cpu_flags() -> str:
    """The flags that decide bf16 speed on a CPU: amx_bf16 / avx512_bf16, else AVX2 only (bf16 emulated)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "flags unknown"
    shown = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return "flags " + (" ".join(shown) if shown else "none of amx_bf16/avx512_bf16/avx2")


def torch_line() -> str:
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section headed `title` in BENCHMARKS.md (or append it), keeping the others."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
