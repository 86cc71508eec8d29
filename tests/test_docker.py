"""The Docker image: a real build where a Docker daemon is reachable, and a few static checks.

- Built (slow; only where `docker info` succeeds, else skipped with the reason): the CPU variant
  (`--build-arg VARIANT=cpu`) is built from the repository root, `docker run --rm IMAGE --help`
  prints the CLI's help, the container runs as a non-root user, its environment names no
  secret, and the package, the build folder and the volume folders hold no key or weight file.
  The default CUDA variant (several GB of CUDA libraries) is built too when
  REFLECT_TUNE_TEST_DOCKER_CUDA=1 is set.
- Static (always): the Dockerfile switches to a non-root USER before its ENTRYPOINT, which is
  reflect-tune; no ARG/ENV name looks like a secret; it pins torch and the bundled model as the
  Makefile does (TORCH_SPEC, BUNDLED_MODEL) and repeats the torch pin in the package install;
  `.dockerignore` first excludes everything and lets back only pyproject.toml, README.md and
  reflect_tune/; and the package folder holds no test fakes, weights or keys.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
# weights, checkpoints, archives of them, keys and certificates, environment files
KEY_OR_WEIGHT = re.compile(r"\.(safetensors|gguf|bin|pt|pth|ckpt|onnx|whl|key|pem|p12|pfx|crt)$|^\.env|^id_(rsa|ed25519|ecdsa)",
                           re.I)
BUILD_TIMEOUT = 3600  # s: the CPU variant downloads torch (~200 MB) and the package's dependencies
RUN_TIMEOUT = 120


# ----------------------------------------------------------------------------- static


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile line, `\\` continuations joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    return ins[last_from:]


def test_runs_reflect_tune_as_a_non_root_user():
    stage = final_stage()
    kinds = [kw for kw, _ in stage]
    assert kinds.count("ENTRYPOINT") == 1, "one ENTRYPOINT in the final stage"
    entry = kinds.index("ENTRYPOINT")
    assert json.loads(stage[entry][1]) == ["reflect-tune"], f"ENTRYPOINT {stage[entry][1]}: the exec form [\"reflect-tune\"]"
    users = [i for i, kw in enumerate(kinds) if kw == "USER"]
    assert users and users[-1] < entry, "a USER instruction must come before the ENTRYPOINT"
    assert "RUN" not in kinds[users[-1]:], "nothing may RUN after the switch to the non-root user"
    user = stage[users[-1]][1].split(":")[0].strip()
    assert user not in ("", "root", "0"), f"USER {stage[users[-1]][1]} is root"


def test_no_arg_or_env_name_looks_like_a_secret():
    names = []
    for kw, args in instructions():
        if kw == "ARG":
            names += [a.split("=", 1)[0] for a in shlex.split(args)]
        elif kw == "ENV":
            names += re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args) or args.split()[:1]
    assert "VARIANT" in names and "TORCH_SPEC" in names, names  # the regexes above do see the names
    bad = [n for n in names if SECRET_NAME.search(n)]
    assert not bad, f"ARG/ENV names that look like credentials (build args and ENV stay in the image): {bad}"
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", DOCKERFILE.read_text(encoding="utf-8")), "an API key in the Dockerfile"


@pytest.mark.parametrize("name", ["TORCH_SPEC", "BUNDLED_MODEL"])
def test_pins_equal_the_makefiles(name):
    makefile = re.search(rf"^{name}\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    pinned = re.search(rf"^ARG {name}=(\S+)\s*$", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert makefile and pinned, f"{name} in the Makefile (`{name} ?= ...`) and the Dockerfile (`ARG {name}=...`)"
    assert pinned.group(1) == makefile.group(1), f"Dockerfile {name} {pinned.group(1)} vs Makefile {makefile.group(1)}"


def test_package_install_repeats_the_torch_pin():
    # the package install repeats the pin, so resolving the package cannot swap torch
    assert any(kw == "RUN" and re.search(r'pip install[^&]*"\$TORCH_SPEC"[^&]*"\.\[serve\]"', args) for kw, args in final_stage())


def test_dockerignore_allows_only_the_install_inputs():
    rules = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything (`*`)"
    let_back = sorted(r[1:].strip() for r in rules if r.startswith("!"))
    assert let_back == ["README.md", "pyproject.toml", "reflect_tune/"], \
        f".dockerignore lets back {let_back}; only pyproject.toml, README.md and reflect_tune/ are needed"
    copies = [args for kw, args in instructions() if kw in ("COPY", "ADD")]
    assert all(not kw == "ADD" for kw, _ in instructions()), "use COPY (ADD fetches URLs and unpacks archives)"
    sources = {s.rstrip("/") for args in copies if "--from" not in args for s in args.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "reflect_tune"}, sources


def test_package_folder_holds_no_fakes_weights_or_keys():
    package = ROOT / "reflect_tune"
    found = []
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(ROOT).as_posix()
            if name in ("testing.py", "testing_server.py") or KEY_OR_WEIGHT.search(name):
                found.append(rel)
            elif path.stat().st_size > 1_000_000:
                found.append(f"{rel} ({path.stat().st_size} bytes: weights?)")
    assert not found, f"the package folder (copied into the image) holds: {found}; test fakes live in tests/fakes/"
    assert (package / "cli.py").is_file() and list((package / "prompts").glob("*.txt")), "not the package folder"


# ----------------------------------------------------------------------------- a real build


def docker(*args: str, timeout: float = RUN_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"docker {' '.join(args)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"
    return r


@pytest.fixture(scope="module")
def daemon() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI here")
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker daemon here: `docker info` did not answer within 60 s")
    if r.returncode != 0:
        why = next((line.strip() for line in (r.stderr or r.stdout).splitlines() if line.strip()), f"exit {r.returncode}")
        pytest.skip(f"no Docker daemon here: {why}")


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def image(request, daemon):
    variant = request.param
    if variant == "cuda" and os.environ.get("REFLECT_TUNE_TEST_DOCKER_CUDA") != "1":
        pytest.skip("the cuda variant (several GB) is built only with REFLECT_TUNE_TEST_DOCKER_CUDA=1")
    tag = f"reflect-tune-test:{variant}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}  # the Dockerfile needs BuildKit (only the named base stage)
    r = subprocess.run(["docker", "build", "--progress", "plain", "-t", tag, "--build-arg", f"VARIANT={variant}",
                        "-f", str(DOCKERFILE), str(ROOT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env)
    assert r.returncode == 0, f"docker build ({variant}) failed:\n{(r.stdout + r.stderr)[-6000:]}"
    yield tag
    docker("image", "rm", "-f", tag, check=False)  # the build cache keeps the layers for the next run


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 600)
def test_image_prints_the_help(image):
    r = docker("run", "--rm", image, "--help")
    for command in ("inspect", "reflect", "select", "train", "run"):
        assert re.search(rf"\b{command}\b", r.stdout), f"`{command}` missing from the image's --help:\n{r.stdout}"
    assert docker("run", "--rm", image).stdout == r.stdout, "without a command the image prints the help (CMD --help)"
    assert docker("run", "--rm", image, "--version").stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 600)
def test_image_runs_as_non_root_with_no_keys_or_weights_inside(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] and config["User"].split(":")[0] not in ("root", "0"), config["User"]
    assert config["Entrypoint"] == ["reflect-tune"], config["Entrypoint"]
    uid = docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
    assert uid != "0", "the container runs as root"
    names = [e.split("=", 1)[0] for e in config.get("Env") or []]
    assert not [n for n in names if SECRET_NAME.search(n)], names

    # the installed package, the (removed) build folder, the working folder, the volumes, the home
    script = r"""
set -eu
pkg=$(python -c 'import os, reflect_tune; print(os.path.dirname(reflect_tune.__file__))')
test ! -e /src || { echo "LEFT: /src"; }
for f in testing.py testing_server.py; do test ! -e "$pkg/$f" || echo "FAKE: $pkg/$f"; done
find "$pkg" /work /data /models /cache /runs /home -xdev \( -type f -o -type l \) 2>/dev/null | sed 's/^/FILE: /'
"""
    out = docker("run", "--rm", "--entrypoint", "sh", image, "-c", script).stdout
    assert "LEFT:" not in out and "FAKE:" not in out, out
    files = [line[len("FILE: "):] for line in out.splitlines() if line.startswith("FILE: ")]
    assert any(f.endswith("/reflect_tune/cli.py") for f in files), out  # the find did look into the package
    bad = [f for f in files if KEY_OR_WEIGHT.search(os.path.basename(f)) and "/__pycache__/" not in f]
    assert not bad, f"key or weight files in the image: {bad}"
    outside = [f for f in files if not re.search(r"/site-packages/reflect_tune/", f) and not f.startswith("/home/")
               and f != "/work/runs"]
    assert not outside, f"files in the working folder or the volumes of a fresh image: {outside}"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", history), "something like an API key in the image history"
