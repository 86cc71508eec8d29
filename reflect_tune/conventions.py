"""Where the papers and their released code differ, and the switches that pick either (issue 15).

The defaults follow the papers (Selective Reflection-Tuning, Cherry LLM's IFD). The released code,
Reflection_Tuning `selection_code/` ("srt") and Cherry_LLM `cherry_seletion/` ("cherry"), makes
other choices, some of them bugs that change which pairs are kept. `match_reference` switches every
convention to one code base's behaviour at once; each convention also has its own setting, so they
can be mixed. docs/FORMATS.md §8.2a has the table: paper text, released code, default, flag.

Scoring (score.py, `Conventions`):
    input_join    "newline" | "labelled": vicuna, none and chat join an input as "\nInput:\n" (srt)
    alone_cut     "full" | "matched": s(A) is cut at max_length - prompt tokens + 1 and s(Q) at
                  max_length - reverse prompt tokens + 1, so each covers its conditioned pass's
                  tokens (with answer_alone "header": max_length - prompt tokens - 2, Cherry's rule)
    rifd_text     "newline" | "concat": r-IFD's instruction text is instruction + input, no separator
    span          "exact" | "rfind": a conditioned pass is scored from len(tokenizer(text[:text.rfind(t)])),
                  t being the answer, or for r-IFD the instruction alone (so an input that repeats
                  the instruction moves the span, as in the released code)
    answer_alone  "bare" | "header": s(A) scores the answer after the text "### Response:" (Cherry)
    template      "auto" is vicuna under srt and alpaca under cherry
Selection (selection.py):
    rewrite_loses "keep" | "drop": srt phase 2, when the teacher's answer does not have the lower
                  r-IFD, keep the phase-1 winner (the paper) or drop the record (the released code:
                  the line that would keep it is commented out)
    phase_nan     "loses" | "plain": a NaN score loses a phase comparison, or compares false as in
                  Python (`ins > original` is false, so the original goes on)
    ratio         "ppl" | "loss": IFD and r-IFD as perplexity ratios (the paper) or loss ratios (Cherry)
    top_of        "records" | "survivors": --top is a fraction of the input records, or of the pairs
                  that pass the < 1 filters (both code bases: SRT's 5% subset is 2,316 of 46,325)
    truncated     "keep" | "skip": Cherry skips a pair whose passes were cut by the max length
NaN is never let through (the released code records 0 for a pass that raised an error, and 0
passes its < 1 filters); the select summary counts the pairs that code would have kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reflect_tune.config import SettingError

# The scoring conventions and their values; the first value is the default (the paper's).
CONVENTIONS = {
    "input_join": ("newline", "labelled"),
    "alone_cut": ("full", "matched"),
    "rifd_text": ("newline", "concat"),
    "span": ("exact", "rfind"),
    "answer_alone": ("bare", "header"),
}
REFERENCES = ("srt", "cherry")
# What each released code base does, where it differs from the default. Cherry has no r-IFD; its
# alpaca prompt gives an input its own section, so input_join and rifd_text keep their defaults.
REFERENCE_SCORING = {
    "srt": {"template": "vicuna", "input_join": "labelled", "alone_cut": "matched", "rifd_text": "concat", "span": "rfind"},
    "cherry": {"template": "alpaca", "alone_cut": "matched", "span": "rfind", "answer_alone": "header"},
}
RESPONSE_HEADER = "### Response:"  # Cherry scores s(A) after this text


@dataclass(frozen=True, kw_only=True)
class Conventions:
    """How the passes are built where the paper and the released code differ (module docstring)."""

    input_join: str = "newline"
    alone_cut: str = "full"
    rifd_text: str = "newline"
    span: str = "exact"
    answer_alone: str = "bare"


def resolve_conventions(config: Any, table: dict[str, tuple[str, ...]], presets: dict[str, dict[str, str]]) -> dict[str, str]:
    """Each setting of `table`: its value in `config`, else what `config.match_reference` sets, else the default."""
    ref = config.match_reference
    if ref is not None and ref not in REFERENCES:
        raise SettingError("match_reference", f"--match-reference must be {' or '.join(REFERENCES)}, got {ref!r}")
    out = {}
    for name, choices in table.items():
        value = getattr(config, name)
        if value is None:
            value = presets.get(ref, {}).get(name, choices[0]) if ref else choices[0]
        if value not in choices:
            raise SettingError(name, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
        out[name] = value
    return out


def scoring_conventions(config: Any) -> tuple[str, Conventions]:
    """The template ("auto" under a reference becomes its template) and the scoring conventions of a config."""
    conv = Conventions(**resolve_conventions(config, CONVENTIONS, REFERENCE_SCORING))
    template = config.template
    if template == "auto" and config.match_reference:
        template = REFERENCE_SCORING[config.match_reference]["template"]
    return template, conv


SELECTION = {
    "rewrite_loses": ("keep", "drop"),
    "phase_nan": ("loses", "plain"),
    "ratio": ("ppl", "loss"),
    "top_of": ("records", "survivors"),
    "truncated": ("keep", "skip"),
}
REFERENCE_SELECTION = {
    "srt": {"rewrite_loses": "drop", "phase_nan": "plain", "top_of": "survivors"},
    "cherry": {"ratio": "loss", "top_of": "survivors", "truncated": "skip"},
}


def selection_conventions(config: Any) -> dict[str, str]:
    """The selection conventions of a SelectConfig, resolved like the scoring ones."""
    return resolve_conventions(config, SELECTION, REFERENCE_SELECTION)
