"""The teacher's reply layout: the prompt files, the markers and the JSON schemas, and the parsers.

Curator's split: reflect.py sends, this module says what is asked (prompts, rendered with a tag
per request) and how a reply is read (`parse_blocks` for the tagged-marker protocol, `parse_json`
for --response-format json). Both apply the same rules to a block's text (`_unusable`: empty,
"N/A", the layout's filler). The marker format is owned here; the test server and the in-process
teacher ask this module for it. Prompt files: reflect_tune/prompts/README.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from reflect_tune.errors import ReflectTuneError

START_MARKERS = ("NEW INSTRUCTION", "NEW ANSWER", "BETTER ANSWER")
PROMPT_FILES = {
    "system": ("system.txt", (), ()),
    "instruction": ("instruction.txt", ("instruction", "output"), ("NEW INSTRUCTION", "NEW ANSWER", "END")),
    "response": ("response.txt", ("instruction", "output"), ("BETTER ANSWER", "END")),
    "response_input": ("response_input.txt", ("instruction", "input", "output"), ("BETTER ANSWER", "END")),
    "reask": ("reask.txt", ("problem", "layout"), ()),
    "json": ("json.txt", ("fields",), ()),
}
# --response-format json: the JSON schema of each kind of reply (prompts/*.schema.json), and the
# fields it must have: a block's field is its marker name in lower case with "_" for spaces
SCHEMA_FILES = {"instruction": ("instruction.schema.json", ("NEW INSTRUCTION", "NEW ANSWER")),
                "response": ("response.schema.json", ("BETTER ANSWER",))}
# Named prompt sets (`--prompts NAME`): the files of the default set sit in reflect_tune/prompts/,
# another set's folder there holds the files in which it differs (the rest come from the default).
PROMPT_SETS = {
    "paper": "the paper's criteria: why the pair is weak, a more complex and difficult new instruction "
             "(it may move to a related but independent task), answers as detailed as possible",
    "conservative": "keeps the task and intent of the instruction; answers as detailed as the instruction calls for",
}
DEFAULT_SET = "paper"
# The marker format, owned here (the test server asks this module for it): `[[NAME]]` in a prompt
# file, `[[NAME TAG]]` in a request and its reply, TAG being 8 hex characters chosen per request.
MARKER = re.compile(r"\[\[(NEW INSTRUCTION|NEW ANSWER|BETTER ANSWER|END)(?: ([0-9a-f]{6,16}))?\]\]")


def marker(name: str, tag: str = "") -> str:
    """`[[NAME TAG]]`, or `[[NAME]]` without a tag (as written in the prompt files)."""
    return f"[[{name} {tag}]]" if tag else f"[[{name}]]"


def block(name: str, text: str, tag: str = "") -> str:
    """One block of a reply: the start marker, the text, the end marker, on their own lines."""
    return f"{marker(name, tag)}\n{text}\n{marker('END', tag)}"


_TOKEN = re.compile(r"\{(instruction|input|output|problem|layout|fields)\}|\[\[(NEW INSTRUCTION|NEW ANSWER|BETTER ANSWER|END)\]\]")
_GENERIC_PLACEHOLDERS = {
    "your instruction", "your new instruction", "your answer", "your new answer", "your better answer",
    "your improved text here", "your improved instruction", "your improved answer", "new instruction",
    "new answer", "better answer", "the new instruction", "the new answer", "the better answer",
    "insert instruction here", "insert answer here", "your text here",
}
_NA = {"n a", "na", "none", "not applicable", "n a n a"}


# ---------------------------------------------------------------------------------------------
# Prompts: load, validate, render
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Prompts:
    texts: dict[str, str]
    sources: dict[str, str]
    sha256: dict[str, str]
    placeholders: set[str] = field(default_factory=set)
    schemas: dict[str, dict] = field(default_factory=dict)  # "instruction" | "response" -> JSON schema
    set_name: str = DEFAULT_SET  # the built-in set (PROMPT_SETS) of every file the folder does not override
    folder: str | None = None  # a --prompts folder whose files override the set's


def field_of(name: str) -> str:
    """The JSON field of a block: "NEW INSTRUCTION" -> "new_instruction"."""
    return name.lower().replace(" ", "_")


def _normalize(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def is_prompt_set(value: object) -> bool:
    """Whether a --prompts value names a built-in set. A set name always wins over a folder of the
    same name in the current folder; write a path (`./conservative`) to mean the folder."""
    return isinstance(value, str) and value in PROMPT_SETS


def load_prompts(folder: str | None = None) -> Prompts:
    """The prompts of a built-in set, or of a folder whose files override the default set's. Validated.

    `folder`: None (the default set), a set name (PROMPT_SETS: `paper`, `conservative`), or a folder
    holding any of the prompt files (the others come from the default set)."""
    builtin = resources.files("reflect_tune") / "prompts"
    set_name = folder if is_prompt_set(folder) else DEFAULT_SET
    if is_prompt_set(folder):
        folder = None
    elif folder is not None and not Path(folder).is_dir():
        raise ReflectTuneError(f"{folder}: not a prompt set nor a folder; --prompts takes a set ({', '.join(PROMPT_SETS)}) "
                               "or a folder holding any of " + ", ".join(f for f, _, _ in PROMPT_FILES.values()))
    shipped = builtin if set_name == DEFAULT_SET else builtin / set_name

    def pick(filename: str):
        """The file from the folder, else from the set, else from the default set."""
        if folder and (Path(folder) / filename).is_file():
            return Path(folder) / filename
        return shipped / filename if (shipped / filename).is_file() else builtin / filename

    texts, sources, digests, placeholders = {}, {}, {}, set(_GENERIC_PLACEHOLDERS)
    for name, (filename, needs, markers) in PROMPT_FILES.items():
        source = pick(filename)
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReflectTuneError(f"{source}: cannot read prompt: {e}") from None
        where = str(source)
        for placeholder in needs:
            if "{" + placeholder + "}" not in text:
                raise ReflectTuneError(f"{where}: prompt lacks the placeholder {{{placeholder}}}")
        for name_ in markers:
            if marker(name_) not in text:
                raise ReflectTuneError(f"{where}: prompt lacks the marker {marker(name_)}")
        for m in re.finditer(r"\[\[(NEW INSTRUCTION|NEW ANSWER|BETTER ANSWER)\]\](.*?)\[\[END\]\]", text, re.S):
            placeholders.add(_normalize(m.group(2)))  # the layout example's filler text
        texts[name], sources[name] = text.strip("\n"), where
        digests[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    schemas = {}
    for kind, (filename, names) in SCHEMA_FILES.items():
        source = pick(filename)
        schemas[kind] = _load_schema(source, names)
        sources[f"{kind}.schema"] = str(source)
        digests[f"{kind}.schema"] = hashlib.sha256(json.dumps(schemas[kind], sort_keys=True).encode()).hexdigest()
    placeholders.discard("")
    return Prompts(texts=texts, sources=sources, sha256=digests, placeholders=placeholders, schemas=schemas,
                   set_name=set_name, folder=folder)


def _load_schema(source, names: tuple[str, ...]) -> dict:
    try:
        schema = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ReflectTuneError(f"{source}: cannot read the JSON schema: {e}") from None
    except ValueError as e:
        raise ReflectTuneError(f"{source}: not valid JSON: {e}") from None
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict) or schema.get("type") != "object":
        raise ReflectTuneError(f"{source}: expected a JSON schema of an object with \"properties\"")
    for name in names:
        spec = props.get(field_of(name))
        if not isinstance(spec, dict) or spec.get("type") != "string" or field_of(name) not in schema.get("required", []):
            raise ReflectTuneError(f"{source}: the schema needs a required string property {field_of(name)!r}")
    return schema


def render(template: str, values: dict[str, str], tag: str) -> str:
    """Fill placeholders and tag markers in one pass over the template; values are never rescanned."""

    def fill(m: re.Match) -> str:
        if m.group(1):
            return values.get(m.group(1), m.group(0))
        return marker(m.group(2), tag)

    return _TOKEN.sub(fill, template)


def choose_tag(*texts: str) -> str:
    """A marker tag, stable for the same texts (so cache keys are stable), absent from them."""
    seed = json.dumps(texts, ensure_ascii=False)
    for salt in range(1000):
        tag = hashlib.sha256(f"{salt}:{seed}".encode("utf-8")).hexdigest()[:8]
        if not any(tag in t for t in texts):
            return tag
    raise ReflectTuneError("could not choose a marker tag")  # pragma: no cover - needs 1000 collisions


def layout(names: tuple[str, ...], tag: str) -> str:
    return "\n".join(block(n, f"(the {n.lower()})", tag) for n in names)


def parse_blocks(text: str, names: tuple[str, ...], tag: str, placeholders: set[str],
                 finish_reason: str | None = "stop") -> tuple[dict[str, str] | None, str | None]:
    """Take each block's text between its tagged start marker and the next tagged marker.

    The last start marker wins (the teacher's final answer comes after its analysis). A block
    ends at `[[END tag]]` or at the next tagged start marker; a missing end is accepted only when
    the reply ended naturally (not cut at max_tokens). A block that is empty, "N/A", or the layout's
    filler (whole, or as its first line) is a problem. Returns (blocks, None) or (None, problem).
    """
    end, out = marker("END", tag), {}
    for name in names:
        start = marker(name, tag)
        i = text.rfind(start)
        if i < 0:
            return None, f"no {start} marker"
        body_start = i + len(start)
        stops = [j for j in (text.find(m, body_start) for m in [end] + [marker(n, tag) for n in START_MARKERS]) if j >= 0]
        if not stops and finish_reason == "length":
            return None, f"no {end} marker after {start} (the reply hit --max-tokens)"
        body = text[body_start:min(stops)] if stops else text[body_start:]
        body = body.strip()
        problem = _unusable(body, f"after {start}", placeholders)
        if problem:
            return None, problem
        out[name] = body
    return out, None


def _unusable(body: str, where: str, placeholders: set[str]) -> str | None:
    """Why a block's text cannot be used (empty, N/A, the layout's filler), or None. Both protocols."""
    norm = _normalize(body)
    if not body:
        return f"empty text {where}"
    if norm in _NA:
        return f"N/A {where}"
    if norm in placeholders or _normalize(body.split("\n", 1)[0]) in placeholders:
        # the whole block, or its first line, is the layout's filler: what follows it was not
        # written as the answer (a small teacher echoes "(the better answer)", then chats on)
        return f"placeholder echo {where}"
    return None


def parse_json(text: str, names: tuple[str, ...], placeholders: set[str],
               finish_reason: str | None = "stop") -> tuple[dict[str, str] | None, str | None]:
    """--response-format json: the reply is one JSON object; each block is its string field.

    A code fence around the object is tolerated. Markers inside the strings are plain text (the
    protocol has none). The same rules as for markers apply to each field's text (empty, N/A,
    placeholder). Returns (blocks keyed by marker name, None) or (None, problem)."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fence:
        body = fence.group(1)
    try:
        data = json.loads(body)
    except ValueError as e:
        if finish_reason == "length":
            return None, "the JSON was cut (the reply hit --max-tokens)"
        return None, f"not valid JSON ({e.msg} at character {e.pos})"
    if not isinstance(data, dict):
        return None, f"the JSON is {type(data).__name__}, not an object"
    out = {}
    for name in names:
        key = field_of(name)
        value = data.get(key)
        if value is None:
            return None, f"the JSON lacks the field {key!r} (schema)"
        if not isinstance(value, str):
            return None, f"the JSON field {key!r} is {type(value).__name__}, not a string (schema)"
        problem = _unusable(value.strip(), f"in the field {key!r}", placeholders)
        if problem:
            return None, problem
        out[name] = value.strip()
    return out, None


def check_json_ready(prompts: Prompts) -> None:
    """--response-format json|auto: the last paragraph of each reflection prompt must be its layout
    (json.txt replaces it); otherwise the task text would be cut. Checked before any request."""
    for name in ("instruction", "response", "response_input"):
        last = prompts.texts[name].split("\n\n")[-1]
        for name_ in PROMPT_FILES[name][2]:
            if marker(name_) not in last:
                raise ReflectTuneError(f"{prompts.sources[name]}: with --response-format json the last paragraph must give "
                                       f"the layout (the marker {marker(name_)} is not in it): json.txt replaces that paragraph")


def json_prompt(prompts: Prompts, template: str, schema_kind: str) -> str:
    """A marker prompt for --response-format json: its layout paragraph becomes json.txt with the fields."""
    head = template.split("\n\n")[:-1]
    return "\n\n".join(head + [prompts.texts["json"].replace("{fields}", json_fields(prompts, schema_kind))])


def json_fields(prompts: Prompts, schema_kind: str) -> str:
    schema = prompts.schemas[schema_kind]
    lines = []
    for key in schema["properties"]:
        about = schema["properties"][key].get("description", "")
        lines.append(f'- "{key}": {about}' if about else f'- "{key}"')
    return "\n".join(lines)


def response_format(prompts: Prompts, schema_kind: str) -> dict[str, Any]:
    """The request field that asks the server for JSON following the schema (OpenAI's json_schema)."""
    return {"type": "json_schema",
            "json_schema": {"name": f"{schema_kind}_reflection", "strict": True, "schema": prompts.schemas[schema_kind]}}
