"""PLACEHOLDER: being written."""

from __future__ import annotations

from reflect_tune.cli_common import user_errors
from reflect_tune.errors import ReflectTuneError


def eval_command() -> None:
    """Placeholder."""
    with user_errors():
        raise ReflectTuneError("not built yet")
