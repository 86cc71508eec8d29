"""Reading YAML config files (a pipeline file, `train --config`) so that every mistake is one line.

`load_yaml(path)` returns the parsed mapping and the line of each key (`"key"` and
`"section.key"`, `-` read as `_`), and refuses, naming the file and line:

- a key given twice in one mapping (both lines named: YAML would silently keep the last);
- aliases that expand to more than `MAX_VALUES` values (a "billion laughs" file of a few hundred
  bytes would otherwise expand to gigabytes once walked), and recursive aliases;
- an integer literal too long for Python to parse (over 4,000 digits);
- a path that is a FIFO, a device or a symlink loop (never opened, so nothing blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from reflect_tune.artifacts import special_kind
from reflect_tune.errors import ReflectTuneError, clip

MAX_VALUES = 10_000  # nodes after alias expansion; a hand-written config has a few hundred
MAX_INT_DIGITS = 4000


class _Refused(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and integers Python cannot parse."""


def _checked_map(loader: _Loader, node: yaml.MappingNode):
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = (key_node.tag, key_node.value.replace("-", "_")), key_node.start_mark.line + 1
        if key in seen:
            raise _Refused(line, f"key {clip(key_node.value)} is given twice (lines {seen[key]} and {line}); keep one")
        seen[key] = line
    return loader.construct_yaml_map(node)


def _checked_int(loader: _Loader, node: yaml.ScalarNode):
    if sum(c.isdigit() for c in node.value) > MAX_INT_DIGITS:
        raise _Refused(node.start_mark.line + 1, f"a number of {len(node.value)} digits; no setting takes one")
    return loader.construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:map", _checked_map)
_Loader.add_constructor("tag:yaml.org,2002:int", _checked_int)


def _expanded_size(node: yaml.Node) -> int:
    """How many values the document holds once every alias is expanded (computed without expanding)."""
    memo: dict[int, int] = {}
    visiting: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in memo:
            return memo[id(n)]
        if id(n) in visiting:
            raise _Refused(n.start_mark.line + 1, "a recursive alias (an anchor used inside itself)")
        visiting.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        visiting.discard(id(n))
        memo[id(n)] = total = min(total, MAX_VALUES + 1)
        return total

    return size(node)


def _line_map(root: yaml.Node | None) -> dict[str, int]:
    """1-based line of each top-level key and of each key one level down (`-` read as `_`)."""
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            name = str(k.value).replace("-", "_")
            lines.setdefault(name, k.start_mark.line + 1)
            if isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    lines.setdefault(f"{name}.{str(k2.value).replace('-', '_')}", k2.start_mark.line + 1)
    return lines


def read_config_text(path: str | Path) -> str:
    """A config file's text; a FIFO, device or symlink loop is refused without being opened."""
    path = Path(path)
    kind = special_kind(path)
    if kind:
        raise ReflectTuneError(f"{path}: {kind}, not a config file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReflectTuneError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def load_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """(data, lines) of a YAML config file; every problem is a one-line `ReflectTuneError` at FILE:LINE."""
    text = read_config_text(path)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is not None and _expanded_size(root) > MAX_VALUES:
            raise _Refused(root.start_mark.line + 1, f"its aliases expand to over {MAX_VALUES:,} values; "
                                                     "write the settings out instead of nesting aliases")
        data = loader.construct_document(root) if root is not None else None
    except _Refused as e:
        raise ReflectTuneError(f"{path}:{e.line}: {e.message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ReflectTuneError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {problem[:200]}") from None
    finally:
        loader.dispose()
    return data, _line_map(root)
