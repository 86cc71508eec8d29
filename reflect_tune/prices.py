"""The built-in price table of `reflect` (OpenAI's standard tier), and how a model name finds its row.

USD per 1M tokens, (prompt, completion). Completion tokens include a reasoning model's reasoning
tokens: OpenAI reports them inside `usage.completion_tokens` (their count is broken out in
`completion_tokens_details.reasoning_tokens`) and bills them as output, so pricing
`completion_tokens` at the output rate charges them exactly once.

Source: OpenAI's pricing page (developers.openai.com/api/docs/pricing), which cannot be reached
from where this table was written; the figures are as copies of that page dated 2026-03 give
them, cross-checked between two or more of them. Unsure: o1 (an older model the page no longer
lists, 15/60 as at its launch) and gpt-5-chat-latest (taken to cost what gpt-5 costs). Prices
change: `--price-in/--price-out` override the table. The Batch API costs half.
"""

from __future__ import annotations

import re

PRICES_DATE = "2026-03"
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00), "gpt-5-mini": (0.25, 2.00), "gpt-5-nano": (0.05, 0.40),
    "gpt-5-chat-latest": (1.25, 10.00),
    "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60),
    "o1": (15.00, 60.00), "o3": (2.00, 8.00), "o3-mini": (1.10, 4.40), "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00), "gpt-3.5-turbo": (0.50, 1.50),
}
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$|-\d{4}$")  # gpt-4o-mini-2024-07-18, gpt-3.5-turbo-0125


def table_row(model: str) -> str | None:
    """The table's name for `model` (a provider prefix such as `openai/` dropped, a dated snapshot
    read as its model; an early snapshot may have cost more), or None. Whole names only: `gpt-5.5`
    or `gpt-4o-audio-preview` is not priced as `gpt-5` or `gpt-4o`, since their prices differ."""
    name = model.split("/")[-1].lower()
    name = _SNAPSHOT.sub("", name) if name not in PRICES else name
    return name if name in PRICES else None
