"""The errors a user can cause, and what may be said about them.

The CLI prints a `ReflectTuneError` as one line, `error: <message>`, and exits with code 2.
Two rules keep that line safe to print and to store:

- a value echoed back from the user's input goes through `clip`, so a 300 MB string (or a YAML
  alias bomb) becomes a short excerpt;
- every secret the process has seen (the API key, a `${VAR}` whose name says it is a secret) is
  registered with `register_secret`, and `scrub_secrets` replaces it with `***` in every message
  and in every file a stage writes (`artifacts.redact`).
"""

from __future__ import annotations

import re
import reprlib

CLIP = 200  # characters of a user's value shown in a message

_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = CLIP, 60, CLIP
_SECRETS: set[str] = set()
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{6,}")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)


class ReflectTuneError(Exception):
    """Bad input or configuration: reported as `error: <message>`, no traceback, exit code 2."""

    exit_code = 2


class DataError(ReflectTuneError):
    """A data file cannot be read or has a record that does not fit its shape."""


class ModelError(ReflectTuneError):
    """A model or tokenizer cannot be found or loaded."""


def clip(value: object, limit: int = CLIP) -> str:
    """`repr(value)` cut to `limit` characters, saying how much was left out; secrets scrubbed."""
    text = _REPR.repr(value)  # bounded: a huge nested value is never rendered whole
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return scrub_secrets(text)


def register_secret(value: str | None) -> None:
    """Remember a secret so that no message or written file ever shows it."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def scrub_secrets(text: str) -> str:
    """Replace every registered secret (and anything shaped like an OpenAI key) with `***`."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("sk-***", text)


def looks_like_secret(value: str) -> bool:
    """A value that is probably a credential, not a name: an OpenAI-style key, or a long token."""
    v = value.strip()
    if _KEY_LIKE.search(v) or v in _SECRETS:
        return True
    return len(v) >= 24 and not re.fullmatch(r"[A-Z0-9_]+", v) and bool(re.search(r"\d", v)) and " " not in v


def one_line(message: str, limit: int = 2000) -> str:
    """A message as one printable line: newlines folded, secrets scrubbed, at most `limit` characters."""
    text = " ".join(scrub_secrets(message).split())
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text
