"""Records: read instruction data in any common shape, normalize it, write it back; and read a
reflect output into the candidate pairs that score, select and a pipeline work on.

Shapes (detected from the first record; `format=` overrides):
    alpaca    {"instruction", "input", "output"}           (input may be absent or null)
    wizardlm  {"instruction", "output"}
    sharegpt  {"conversations": [{"from", "value"}, ...]}   first human -> gpt pair
    messages  {"messages": [{"role", "content"}, ...]}      first user -> assistant pair

A conversation with more than that one exchange keeps every turn in `Record.turns`: `convert` to
messages or sharegpt writes them all, and a shape that cannot hold them (alpaca) is refused unless
the caller chooses a turns policy. The policy (`turns=`, `--turns`) says which pairs the stages get:
    first  the first user -> assistant pair (the default); the other turns are counted as dropped
    last   the last pair, the earlier turns as context in its instruction
    each   one pair per answered user turn, each with the turns before it as context
Context is rendered as one line per earlier turn, `User: ...`, `Assistant: ...`, `Tool: ...`, then
`User: ` and the user turn being answered (`render_context`). The counts go in the `LoadReport`.

Containers (read by sources.py): `.json` (a list, one record, or JSON Lines by mistake), `.jsonl`,
`.parquet`, a folder written by `datasets.save_to_disk`, or a hub dataset name (needs a reachable hub).

A reflect output (docs/FORMATS.md §8.1) is read by `read_reflected`: each record's original
and every `ok` variant become `Record`s with `variant` set (`load_candidates` reads either kind).

Every problem is a `DataError` whose message is one line: `FILE:LINE: field 'F': what is wrong`
(`FILE:row N:` for tables). Nothing is ever dropped silently: empty fields and duplicate ids
are counted in the `LoadReport`, and dropping them is the caller's explicit choice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from reflect_tune.artifacts import special_kind
from reflect_tune.errors import DataError, clip
from reflect_tune.sources import CONTAINERS, _json_error, _kind, _LongInt, detect_format, iter_raw, loads  # noqa: F401

FORMATS = ("alpaca", "wizardlm", "sharegpt", "messages")
STATUSES = ("ok", "parse_failed", "api_failed", "skipped")  # of a variant in a reflect output
WRITE_FORMATS = ("alpaca", "sharegpt", "messages")
TURN_POLICIES = ("first", "last", "each")  # which pairs a multi-turn conversation gives (module docstring)

Policy = Literal["error", "drop", "keep"]

# Speaker names seen in ShareGPT-style dumps, mapped to chat roles.
_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "function_call": "tool", "observation": "tool",
}
_MESSAGE_ROLES = {name: name for name in ("user", "assistant", "system", "developer", "tool")}


@dataclass(kw_only=True)
class Record:
    """One instruction pair, the unit every stage works on.

    `turns` holds the whole conversation ({"role", "content", ...} per turn, as read) when the
    source record had more than this one exchange, else None. `where` is `FILE:LINE` (or
    `FILE:row N`) of the source record, for messages. In a reflect output, `variant` says which
    pair of the source record this is (`original`, `ins`, `res`, `res_ins`) and `index` the source
    record's position in the file.
    """

    id: str
    instruction: str
    input: str = ""
    output: str = ""
    system: str = ""
    turns: list[dict[str, Any]] | None = None
    variant: str = "original"
    index: int = field(default=0, compare=False, repr=False)
    where: str = field(default="", compare=False, repr=False)

    @property
    def instruction_text(self) -> str:
        """The instruction with its input, as one user turn: `instruction\\ninput`."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(kw_only=True)
class LoadReport:
    """What reading a file found. Counts are over the records read, before any dropping."""

    path: str
    container: str
    format: str
    records: int = 0
    empty_instruction: int = 0
    empty_output: int = 0
    empty_dropped: int = 0
    duplicate_ids: int = 0
    duplicates_dropped: int = 0
    with_input: int = 0
    with_system: int = 0
    multi_turn: int = 0  # records with turns besides their first exchange and its system prompt
    turns: str = "first"  # the policy the pairs were made by (TURN_POLICIES)
    pairs: int = 0  # pairs made from the records read (more than `records` with turns="each")
    context_turns: int = 0  # earlier turns written into instructions as context (last, each)
    turns_dropped: int = 0  # turns in no pair, context or system prompt (first: all but the first pair)
    empty_locations: list[str] = field(default_factory=list)  # the first few, for messages
    duplicate_locations: list[str] = field(default_factory=list)
    multi_turn_locations: list[str] = field(default_factory=list)
    extra_fields: list[str] = field(default_factory=list)  # source fields no Record holds (e.g. "category")

    def turns_line(self) -> str | None:
        """One line on what the turns policy did with multi-turn records, or None when there were none."""
        if not self.multi_turn:
            return None
        head = (f"{self.path}: {self.multi_turn} record(s) have more than one exchange (first at "
                f"{', '.join(self.multi_turn_locations)}); ")
        if self.turns == "first":
            return (head + f"--turns first used the first pair of each and dropped {self.turns_dropped} other "
                    "turn(s) (use --turns each or last)")
        dropped = (f"; dropped {self.turns_dropped} turn(s) that answer nothing (tool calls, turns after the last "
                   "answer)" if self.turns_dropped else "")
        if self.turns == "last":
            return head + f"--turns last used the last pair of each, {self.context_turns} earlier turn(s) as context{dropped}"
        return (head + f"--turns each made {self.pairs} pairs of {self.records} records, "
                f"{self.context_turns} turn(s) of context in all{dropped}")

    def warnings(self, multi_turn: bool = True) -> list[str]:
        """Human-readable lines about what was found empty, duplicated or (for the stages) multi-turn."""
        out = []
        line = self.turns_line() if multi_turn else None
        if line:
            out.append(line)
        if self.empty_instruction or self.empty_output:
            what = "dropped" if self.empty_dropped else "kept"
            out.append(
                f"{self.path}: {self.empty_instruction} empty instruction(s), "
                f"{self.empty_output} empty output(s) ({what}; first at "
                f"{', '.join(self.empty_locations)})"
            )
        if self.duplicate_ids:
            what = "dropped" if self.duplicates_dropped else "kept"
            out.append(
                f"{self.path}: {self.duplicate_ids} duplicate id(s) ({what}; first at "
                f"{', '.join(self.duplicate_locations)})"
            )
        return out


def content_id(system: str, instruction: str, input: str, output: str) -> str:
    """A stable id from content alone: the same pair gets the same id in any container."""
    blob = json.dumps([system, instruction, input, output], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def check_source(path: str | os.PathLike, *, format: str | None = None, split: str | None = None) -> None:
    """Cheap checks a stage would meet only when it runs: the format name, a local file that exists,
    is readable in a supported container, and whose first record fits the shape. Hub names are not
    fetched here."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    p = Path(path)
    looks_like_path = str(path).startswith((".", "/", "~")) or p.suffix.lower() in (*CONTAINERS, ".gz")
    if not (p.exists() or p.is_symlink() or special_kind(p) or looks_like_path):
        return  # a hub dataset name: checked when it is loaded
    _, rows = iter_raw(path, split=split)
    for loc, row in rows:
        fmt = format or detect_format(row)
        if fmt is None:
            raise DataError(f"{path}:{loc}: unknown record shape; expected alpaca, wizardlm, sharegpt or messages")
        normalize(row, fmt, f"{path}:{loc}")
        return
    raise DataError(f"{path}: no records")


# ----------------------------------------------------------------------------- normalizing


def _string(row: dict, key: str, where: str, *, optional: bool = False, label: str | None = None) -> str:
    label = label or key
    if key not in row:
        if optional:
            return ""
        raise DataError(f"{where}: field '{label}': missing")
    value = row[key]
    if value is None and optional:
        return ""
    if not isinstance(value, str) or isinstance(value, _LongInt):
        raise DataError(f"{where}: field '{label}': expected a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        detail = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise DataError(f"{where}: field '{label}': not valid UTF-8 ({detail})") from None
    return value


def _message_text(content: Any, where: str, label: str) -> str:
    """OpenAI content is a string or a list of parts; text parts are joined."""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise DataError(f"{where}: field '{label}[{j}]': only text content parts are supported")
            parts.append(_string(part, "text", where, label=f"{label}[{j}].text"))
        return "".join(parts)
    return _string({"content": content}, "content", where, label=label)


def _turn_list(row: dict, key: str, where: str) -> list:
    turns = row[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}': expected a list of turns, got {_kind(turns)}")
    return turns


def _turn_role(turn: Any, j: int, key: str, who: str, what: str, roles: dict[str, str], where: str) -> tuple[str, str]:
    """(label, role) of turn j, checked: an object with a known speaker and a content field."""
    label = f"{key}[{j}]"
    if not isinstance(turn, dict):
        raise DataError(f"{where}: field '{label}': expected an object with '{who}' and '{what}'")
    speaker = _string(turn, who, where, label=f"{label}.{who}")
    role = roles.get(speaker.lower())
    if role is None:
        raise DataError(f"{where}: field '{label}.{who}': unknown speaker {clip(speaker)}")
    if what not in turn:
        raise DataError(f"{where}: field '{label}.{what}': missing")
    return label, role


def _first_pair(row: dict, key: str, who: str, what: str, roles: dict[str, str],
                where: str) -> tuple[str, str, str, list[dict[str, Any]] | None, int]:
    """(system, user, assistant, turns, unused) from the first user turn answered by an assistant turn.

    Turns up to that pair are checked strictly; system turns before it are joined. An assistant
    turn with null content (a tool call) answers nothing. `turns` is the whole conversation, each
    turn as {"role", "content", ...its other keys}, when any turn lies outside the pair and its
    system turns (a later exchange, a greeting, tool calls); else None. Later turns are kept as
    they are, unchecked. `unused` counts the turns outside the pair and its system turns.
    """
    turns = _turn_list(row, key, where)
    system_parts: list[str] = []
    used: list[int] = []
    user: tuple[int, str] | None = None
    for j, turn in enumerate(turns):
        label, role = _turn_role(turn, j, key, who, what, roles, where)
        if role == "assistant" and turn[what] is None:
            user = None
            continue
        text = _message_text(turn[what], where, f"{label}.{what}")
        if role == "assistant" and user is not None:
            used += [user[0], j]
            whole = _conversation(turns, who, what, roles) if len(used) < len(turns) else None
            return "\n\n".join(system_parts), user[1], text, whole, len(turns) - len(used)
        if role in ("system", "developer"):
            system_parts.append(text)
            used.append(j)
        user = (j, text) if role == "user" else None
    raise DataError(f"{where}: field '{key}': no user turn followed by an assistant turn")


ROLE_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_context(turns: list[tuple[str, str]], user: str) -> str:
    """The instruction of a pair with earlier turns: one `Label: text` line per earlier turn (role
    user, assistant or tool), then `User: ` and the user turn being answered. With no earlier turns
    it is the user turn alone, exactly as the first-pair policy reads it."""
    if not turns:
        return user
    return "".join(f"{ROLE_LABELS[role]}: {text}\n" for role, text in turns) + f"User: {user}"


@dataclass
class _Pair:
    system: str  # the system turns before this pair, joined with a blank line
    context: list[tuple[str, str]]  # (role, text) of the earlier user, assistant and tool turns
    user: str
    assistant: str
    end: int  # index of the assistant turn


def _all_pairs(row: dict, key: str, who: str, what: str, roles: dict[str, str],
               where: str) -> tuple[list[_Pair], int, bool]:
    """Every user turn directly answered by an assistant turn, for `--turns last|each`; every turn is
    checked. Returns (pairs, dropped, multi): `dropped` counts turns no pair uses (assistant tool
    calls with null content before the last pair, and every turn after it); `multi` says the
    conversation holds more than its first pair and the system turns before it.
    """
    turns = _turn_list(row, key, where)
    system_parts: list[str] = []
    context: list[tuple[str, str]] = []
    pairs: list[_Pair] = []
    calls: list[int] = []  # assistant turns with null content: no text for any context
    user: str | None = None
    first_used = 0
    for j, turn in enumerate(turns):
        label, role = _turn_role(turn, j, key, who, what, roles, where)
        if role == "assistant" and turn[what] is None:
            calls.append(j)
            text = None
        else:
            text = _message_text(turn[what], where, f"{label}.{what}")
        if role == "assistant" and user is not None and text is not None:
            pairs.append(_Pair("\n\n".join(system_parts), list(context), user, text, j))
            if len(pairs) == 1:
                first_used = len(system_parts) + 2
            context += [("user", user), ("assistant", text)]
            user = None
            continue
        if user is not None:  # a user turn nobody answered directly: context for what follows
            context.append(("user", user))
            user = None
        if role in ("system", "developer"):
            system_parts.append(text)
        elif role == "user":
            user = text
        elif text is not None:
            context.append(("assistant" if role == "assistant" else "tool", text))
    if not pairs:
        raise DataError(f"{where}: field '{key}': no user turn followed by an assistant turn")
    last = pairs[-1].end
    dropped = sum(j < last for j in calls) + len(turns) - 1 - last
    return pairs, dropped, len(turns) > first_used


def _conversation(turns: list, who: str, what: str, roles: dict[str, str]) -> list[dict[str, Any]]:
    """Every turn as {"role", "content", ...other keys}; speakers mapped to chat roles where known."""
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            out.append({"role": None, "content": turn})
            continue
        speaker = turn.get(who)
        role = roles.get(speaker.lower(), speaker) if isinstance(speaker, str) else speaker
        rest = {k: v for k, v in turn.items() if k not in (who, what)}
        out.append({"role": role, "content": turn.get(what), **rest})
    return out


_RECORD_FIELDS = {"alpaca": {"id", "instruction", "input", "output", "system"},
                  "wizardlm": {"id", "instruction", "input", "output", "system"},
                  "sharegpt": {"id", "conversations", "system"}, "messages": {"id", "messages", "system"}}


def normalize(row: Any, fmt: str, where: str) -> Record:
    """One raw row in shape `fmt` to a Record: its first pair, with every turn in `turns` (see `pairs_of`)."""
    return _normalize(row, fmt, where)[0]


def _normalize(row: Any, fmt: str, where: str) -> tuple[Record, int]:
    """(the Record of the row's first pair, how many turns of the row lie outside it and its system prompt)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(row)}")
    if fmt in ("alpaca", "wizardlm"):
        system = _string(row, "system", where, optional=True)
        instruction = _string(row, "instruction", where)
        inp = _string(row, "input", where, optional=True)
        output = _string(row, "output", where)
    elif fmt in ("sharegpt", "messages"):
        key, who, what, roles = (
            ("conversations", "from", "value", _SHAREGPT_ROLES)
            if fmt == "sharegpt"
            else ("messages", "role", "content", _MESSAGE_ROLES)
        )
        if key not in row:
            raise DataError(f"{where}: field '{key}': missing")
        system, instruction, output, turns, unused = _first_pair(row, key, who, what, roles, where)
        system = system or _string(row, "system", where, optional=True)  # a top-level system prompt
        inp = ""
    else:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rid = row.get("id")
    if rid is None or rid == "":
        rid = content_id(system, instruction, inp, output)
    elif isinstance(rid, (int, str)) and not isinstance(rid, bool):
        rid = _string({"id": f"{rid}"}, "id", where)
    else:
        raise DataError(f"{where}: field 'id': expected a string or integer, got {_kind(rid)}")
    chat = fmt in ("sharegpt", "messages")
    return Record(id=rid, instruction=instruction, input=inp, output=output, system=system,
                  turns=turns if chat else None, where=where), unused if chat else 0


def pairs_of(row: Any, fmt: str, where: str, turns: str = "first") -> tuple[list[Record], bool, int, int]:
    """The records one raw row gives under a turns policy: (records, multi, dropped, context).

    `first`: the first pair, `turns` holding the whole conversation (for convert). `last`: the last
    pair; `each`: every pair. Their instruction holds the earlier turns (`render_context`), their
    system prompt the system turns before the pair (else the top-level `system`), `turns` is None
    (the record is its pair), `where` is the row's. Ids: the row's id (or the content id of its
    first pair, as `first` gives), and with `each` on a conversation of several pairs `ID#t1`,
    `ID#t2`, ... by exchange. `multi`: the row holds turns besides its first pair and system
    prompt; `dropped`: turns in no pair, context or system prompt; `context`: context turns written.
    """
    if turns not in TURN_POLICIES:
        raise DataError(f"unknown turns policy {turns!r}; choose one of {', '.join(TURN_POLICIES)}")
    rec, unused = _normalize(row, fmt, where)
    if rec.turns is None:  # one exchange (or not a chat shape): every policy gives the same pair
        return [rec], False, 0, 0
    if turns == "first":
        return [rec], True, unused, 0
    key, who, what, roles = (("conversations", "from", "value", _SHAREGPT_ROLES) if fmt == "sharegpt"
                             else ("messages", "role", "content", _MESSAGE_ROLES))
    pairs, dropped, _ = _all_pairs(row, key, who, what, roles, where)
    top_system = _string(row, "system", where, optional=True)
    chosen = list(enumerate(pairs, start=1))[-1:] if turns == "last" else list(enumerate(pairs, start=1))
    out = [Record(id=f"{rec.id}#t{k}" if len(chosen) > 1 else rec.id, instruction=render_context(p.context, p.user),
                  output=p.assistant, system=p.system or top_system, where=where) for k, p in chosen]
    return out, True, dropped, sum(len(p.context) for _, p in chosen)


# ----------------------------------------------------------------------------- reflect output


@dataclass(kw_only=True)
class Loaded:
    """What an input file holds: one entry per source record, the scorable candidates, their origin."""

    path: str
    reflected: bool
    ids: list[str]
    candidates: list[Record]  # every pair to score, `variant` and `index` set
    statuses: list[dict[str, str]]  # per source record: variant -> status ("ok" for the original)
    warnings: list[str] = field(default_factory=list)
    report: LoadReport | None = None  # plain data only: what reading it found (multi-turn counts, ...)


def is_reflected(path: str | os.PathLike) -> bool:
    """A reflect output (FORMATS §8.1): a JSON Lines file whose first record has `original` and `variants`."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".jsonl", ".json"):
        return False
    try:
        with open(p, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    row = loads(line.lstrip("\ufeff"))
                    return isinstance(row, dict) and "original" in row and "variants" in row
    except (OSError, json.JSONDecodeError, RecursionError):
        return False
    return False


def read_reflected(path: str | os.PathLike) -> Loaded:
    """Read and validate a reflect output file (FORMATS §8.1) into candidates.

    Only `ok` variants become candidates; `res` takes the original's instruction, `res_ins` takes
    the `ins` instruction. A bad line fails with `FILE:LINE: field 'F': problem`.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    loaded = Loaded(path=str(path), reflected=True, ids=[], candidates=[], statuses=[])
    seen: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(Path(path), n, e) from None
        except RecursionError:
            raise DataError(f"{where}: bad JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(row)}")
        rid = row.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = f"{rid}"
        if not isinstance(rid, str) or not rid:
            raise DataError(f"{where}: field 'id': expected a non-empty string")
        if rid in seen:
            raise DataError(f"{where}: field 'id': duplicate id {clip(rid)} (first at {seen[rid]})")
        seen[rid] = n
        orig = row.get("original")
        if not isinstance(orig, dict):
            raise DataError(f"{where}: field 'original': expected an object")
        pair = {k: _string(orig, k, where, optional=k in ("input", "system"), label=f"original.{k}")
                for k in ("instruction", "input", "output", "system")}
        variants = row.get("variants")
        if not isinstance(variants, dict):
            raise DataError(f"{where}: field 'variants': expected an object")
        index = len(loaded.ids)
        loaded.ids.append(rid)
        statuses = {"original": "ok"}
        loaded.candidates.append(Record(id=rid, **pair, variant="original", index=index, where=where))
        ins: dict[str, str] | None = None
        for name in ("ins", "res", "res_ins"):
            v = variants.get(name)
            label = f"variants.{name}"
            if v is None:
                statuses[name] = "missing"
                continue
            if not isinstance(v, dict):
                raise DataError(f"{where}: field '{label}': expected an object")
            status = v.get("status")
            if status not in STATUSES:
                raise DataError(f"{where}: field '{label}.status': expected one of {', '.join(STATUSES)}, got {clip(status)}")
            statuses[name] = status
            if status != "ok":
                continue
            out = _string(v, "output", where, label=f"{label}.output")
            if name == "ins":
                ins = {"instruction": _string(v, "instruction", where, label=f"{label}.instruction"),
                       "input": _string(v, "input", where, optional=True, label=f"{label}.input")}
                asked = ins
            elif name == "res":
                asked = {"instruction": pair["instruction"], "input": pair["input"]}
            elif ins is None:  # res_ins answers the ins instruction; without it there is no pair
                statuses[name] = "ins not ok"
                continue
            else:
                asked = ins
            loaded.candidates.append(Record(id=rid, **asked, output=out, system=pair["system"], variant=name,
                                            index=index, where=where))
        loaded.statuses.append(statuses)
    if not loaded.ids:
        raise DataError(f"{path}: empty file (no records)")
    return loaded


def load_candidates(path: str | os.PathLike, *, format: str | None = None, split: str | None = None,
                    turns: str = "first") -> Loaded:
    """Reflect output (the original and every ok variant) or plain instruction data (the originals,
    made into pairs by the `turns` policy)."""
    if is_reflected(path):
        if format is not None:
            raise DataError(f"{path}: --format applies to plain instruction data, not to a reflect output file")
        if turns != "first":
            raise DataError(f"{path}: --turns applies to plain instruction data; a reflect output holds pairs "
                            "(choose the turns policy when running reflect)")
        return read_reflected(path)
    records, report = load_records(path, format=format, split=split, on_duplicate="keep", on_empty="keep", turns=turns)
    for i, r in enumerate(records):
        r.index = i
    return Loaded(path=str(path), reflected=False, ids=[r.id for r in records], candidates=records,
                  statuses=[{"original": "ok"} for _ in records], warnings=report.warnings(), report=report)


def _keep(rec: Record, report: LoadReport, seen: dict[str, str], loc: str, where: str, on_empty: Policy,
          on_duplicate: Policy) -> bool:
    """Count an empty field or a repeated id of `rec` in `report`; False when the policy drops it."""
    empty = [name for name in ("instruction", "output") if not getattr(rec, name).strip()]
    if empty:
        report.empty_instruction += "instruction" in empty
        report.empty_output += "output" in empty
        if len(report.empty_locations) < 5:
            report.empty_locations.append(f"{loc} ({'+'.join(empty)})")
        if on_empty == "error":
            raise DataError(f"{where}: field '{empty[0]}': empty (pass --drop-empty to drop such records)")
        if on_empty == "drop":
            report.empty_dropped += 1
            return False
    if rec.id in seen:
        report.duplicate_ids += 1
        if len(report.duplicate_locations) < 5:
            report.duplicate_locations.append(loc)
        if on_duplicate == "error":
            raise DataError(
                f"{where}: field 'id': duplicate id {clip(rec.id)} (first at {seen[rec.id]}); "
                "pass --dedupe (`dedupe: true` in a pipeline's reflect section) to keep only the first"
            )
        if on_duplicate == "drop":
            report.duplicates_dropped += 1
            return False
    else:
        seen[rec.id] = loc
    return True


def load_records(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    on_duplicate: Policy = "error",
    on_empty: Policy = "keep",
    split: str | None = None,
    limit: int | None = None,
    turns: str = "first",
) -> tuple[list[Record], LoadReport]:
    """Read, validate and normalize every record of `path`.

    on_duplicate: "error" stops at the first repeated id; "drop" keeps the first occurrence;
    "keep" keeps all. on_empty (empty instruction or output): "keep", "drop" or "error".
    Both are always counted in the returned report. turns: which pairs a conversation gives
    (`pairs_of`); multi-turn records and the turns dropped or made context are counted too.
    `limit` counts the records returned (pairs, with turns="each").
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if turns not in TURN_POLICIES:
        raise DataError(f"unknown turns policy {turns!r}; choose one of {', '.join(TURN_POLICIES)}")
    container, rows = iter_raw(path, split=split)
    fmt = format
    report = LoadReport(path=str(path), container=container, format=fmt or "", turns=turns)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for loc, row in rows:
        where = f"{path}:{loc}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(row)}")
        if fmt is None:
            fmt = detect_format(row)
            if fmt is None and "original" in row and "variants" in row:
                raise DataError(f"{where}: a reflect output (docs/FORMATS.md §8.1), not instruction pairs; run "
                                "`reflect-tune select` on it and use its selected.jsonl")
            if fmt is None:
                raise DataError(
                    f"{where}: unknown record shape with keys {sorted(row)}; expected alpaca "
                    "(instruction, input, output), wizardlm (instruction, output), sharegpt "
                    "(conversations) or messages (messages); or pass --format"
                )
            report.format = fmt
        recs, multi, dropped, context = pairs_of(row, fmt, where, turns)
        report.records += 1
        report.pairs += len(recs)
        report.with_input += bool(recs[0].input)
        report.with_system += bool(recs[0].system)
        if multi:
            report.multi_turn += 1
            report.turns_dropped += dropped
            report.context_turns += context
            if len(report.multi_turn_locations) < 5:
                report.multi_turn_locations.append(loc)
        if len(report.extra_fields) < 20:
            for k in row:
                if k not in _RECORD_FIELDS[fmt] and k not in report.extra_fields:
                    report.extra_fields.append(str(k))
        for rec in recs:
            if not _keep(rec, report, seen, loc, where, on_empty, on_duplicate):
                continue
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
        if limit is not None and len(records) >= limit:
            break
    if report.records == 0:
        raise DataError(f"{path}: no records")
    if not records:
        raise DataError(
            f"{path}: no records left after dropping {report.empty_dropped} with empty fields "
            f"and {report.duplicates_dropped} duplicates"
        )
    return records, report


def split_holdout(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): the records whose id hashes, with `seed`, below `fraction` are held out.

    A record's side depends only on (seed, id), never on the other records or their order, so
    adding records never moves an existing one. The pairs `turns="each"` makes of one conversation
    (`ID#t1`, `ID#t2`, ...) hash by `ID` and stay together, as do the variants of one reflect record
    (which share its id). Both lists keep the input order. `train`'s `eval_split` uses this rule."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    train, heldout = [], []
    for rec in records:
        rid = rec.id if isinstance(rec, Record) else rec["id"]
        base = rid[: rid.rindex("#t")] if "#t" in rid and rid.rsplit("#t", 1)[1].isdigit() else rid
        digest = hashlib.sha256(f"{int(seed)}\x00{base}".encode("utf-8")).digest()
        (heldout if int.from_bytes(digest[:8], "big") / 2.0**64 < fraction else train).append(rec)
    return train, heldout
