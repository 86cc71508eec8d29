"""Every measured figure the README quotes from docs/BENCHMARKS.md occurs there (issue 18).

A README paragraph (or list item) that cites BENCHMARKS (`docs/BENCHMARKS.md`, `see BENCHMARKS`)
quotes figures from it. A figure is a number with a unit of measure: seconds, minutes, MiB/GiB,
a percentage, a ratio (`0.42×`), a rate (`tok/s`, `req/s`), or a count `N of M`. Each must occur
in BENCHMARKS.md as written (thousands separators and the `×`/`x` spelling aside), so a figure
edited on one side only, or a README number no bench script produced, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"BENCHMARKS")
UNIT = r"(?:×|x\b|%|\s?s\b|\s?min\b|\s?MiB\b|\s?GiB\b|\s?tok/s|\s?req/s|\s?steps/min|\s?rec/min)"
FIGURE = re.compile(rf"(?<![\w.])(\d[\d,]*(?:\.\d+)?)({UNIT})|(?<![\w.])(\d+) of (\d+)\b")


def chunks(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each paragraph or list item outside fenced code."""
    out, cur, start, fenced = [], [], 0, False
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            if cur:
                out.append((start, " ".join(cur)))
            cur = []
            continue
        if fenced:
            continue
        new_item = re.match(r"\s*(?:[-*]|\d+\.)\s", line) is not None
        if not line.strip() or new_item or line.startswith("#"):
            if cur:
                out.append((start, " ".join(cur)))
            cur = []
        if line.strip():
            if not cur:
                start = i
            cur.append(line.strip())
    if cur:
        out.append((start, " ".join(cur)))
    return out


def normal(s: str) -> str:
    return s.replace(",", "").replace("×", "x").replace(" ", "")


def figures(text: str) -> list[str]:
    found = []
    for m in FIGURE.finditer(text):
        found.append(f"{m.group(1)}{m.group(2)}" if m.group(1) else f"{m.group(3)} of {m.group(4)}")
    return found


def test_figure_extraction_finds_units_ratios_and_counts():
    text = "took 245 s, 0.42× the server, 6,047 MiB, 44 of 72 variants (61%) at 3.1 rec/min; layer 15"
    assert figures(text) == ["245 s", "0.42×", "6,047 MiB", "44 of 72", "61%", "3.1 rec/min"]


def test_every_readme_figure_citing_benchmarks_occurs_there():
    bench = normal((ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8"))
    bench_counts = (ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    missing, cited = [], 0
    for line, text in chunks((ROOT / "README.md").read_text(encoding="utf-8")):
        if not CITE.search(text):
            continue
        for fig in figures(text):
            cited += 1
            if " of " in fig:
                a, b = fig.split(" of ")
                ok = re.search(rf"\b{a} of {b}\b|\b{a}/{b}\b|\|\s*{a}\s*\|.*\|\s*{b}\s*\|", bench_counts) is not None
            else:
                number = normal(fig).rstrip("xs%").removesuffix("min").removesuffix("MiB").removesuffix("GiB")
                number = re.sub(r"(tok|req|rec|steps)/(s|min)$", "", number)
                ok = re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", bench) is not None
            if not ok:
                missing.append(f"README.md:{line}: {fig}")
    assert cited >= 5, "the README cites figures from BENCHMARKS; none found: the extraction broke"
    assert not missing, "figures the README attributes to docs/BENCHMARKS.md that are not there:\n" + "\n".join(missing)
