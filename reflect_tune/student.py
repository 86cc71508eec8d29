"""`make-student`: a smaller student cut from a teacher, DistilBERT-style.

The student keeps every k-th decoder layer of the teacher plus its embeddings, final norm, output
layer and tokenizer, so teacher and student share a vocabulary for knowledge distillation.
The student is built by remapping the teacher's state dict, so any architecture whose decoder
layers are stored as `<prefix>.layers.<i>.` works, without model-specific code.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from pathlib import Path

from reflect_tune.artifacts import check_output_folder, clear_folder, write_failure
from reflect_tune.config import SettingError, StudentConfig
from reflect_tune.errors import ModelError, ReflectTuneError

log = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^(.*?\.)?layers\.(\d+)\.")


def layer_indices(teacher_layers: int, layers: int, teacher: str = "the teacher") -> list[int]:
    """The teacher layers a student of `layers` layers keeps: `[i * L // N for i in range(N)]`.

    With L teacher layers and N student layers this starts at layer 0 and is exactly every k-th
    layer (k = L / N) when N divides L, e.g. 30 -> 10 keeps [0, 3, ..., 27]; otherwise the gaps
    differ by at most one (30 -> 7 keeps [0, 4, 8, 12, 17, 21, 25]). N == L keeps every layer.
    """
    if not 1 <= layers <= teacher_layers:
        raise ReflectTuneError(
            f"--layers {layers}: {teacher} has {teacher_layers} decoder layers; choose 1 to {teacher_layers}"
        )
    return [i * teacher_layers // layers for i in range(layers)]


def _teacher_layer_count(path: str, trust_remote_code: bool) -> int | None:
    """The layer count from config.json alone, so a bad --layers fails before any weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config().num_hidden_layers
    except Exception:  # load_model reports a bad model in one line
        return None


def _check_output(out: Path, overwrite: bool, inputs: list[str]) -> None:
    """Not a file, not (or holding) the teacher, writable; with --overwrite only a folder make-student wrote."""
    if out.exists() and not out.is_dir():
        raise ReflectTuneError(f"{out}: exists and is a file; the output must be a folder")
    check_output_folder(out, inputs)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ReflectTuneError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        clear_folder(out, "make-student", check_only=True)


def _student_config(teacher_config, kept: list[int]):
    """A copy of the teacher config with N layers, and its per-layer lists (e.g. `layer_types`) subset."""
    cfg = copy.deepcopy(teacher_config)
    text = cfg.get_text_config()
    n_teacher = text.num_hidden_layers
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == n_teacher and "token" not in key:
            setattr(text, key, type(value)(value[i] for i in kept))
    text.num_hidden_layers = len(kept)
    return cfg


def _remap(state: dict, kept: list[int], n_teacher: int, spec: str) -> dict:
    """Student state dict: student layer j <- teacher layer kept[j]; every other tensor unchanged."""
    found: dict[str, set[int]] = {}
    for key in state:
        if m := _LAYER_KEY.match(key):
            found.setdefault(m.group(1) or "", set()).add(int(m.group(2)))
    prefixes = [p for p, ids in found.items() if ids == set(range(n_teacher))]
    if len(prefixes) != 1:
        raise ModelError(f"{spec}: cannot find its {n_teacher} decoder layers ('<prefix>.layers.<i>.' weights)")
    prefix, where = prefixes[0], {t: j for j, t in enumerate(kept)}
    out = {}
    for key, tensor in state.items():
        m = _LAYER_KEY.match(key)
        if m is None or (m.group(1) or "") != prefix:
            out[key] = tensor
        elif int(m.group(2)) in where:
            out[f"{prefix}layers.{where[int(m.group(2))]}.{key[m.end():]}"] = tensor
    return out


def validate(cfg: StudentConfig) -> None:
    """The layer count and the output folder, before any model is looked at."""
    if cfg.layers < 1:
        raise SettingError("layers", f"--layers {cfg.layers}: a student needs at least 1 decoder layer")
    _check_output(Path(cfg.output), cfg.overwrite, [cfg.teacher])


def run(cfg: StudentConfig) -> dict:
    """Write a student of `cfg.layers` decoder layers cut from `cfg.teacher` into the folder `cfg.output`.

    Kept teacher layers are `layer_indices(L, layers)` (every k-th, from layer 0). The folder holds
    the HF model (safetensors), the teacher's tokenizer and generation config, and `meta.json`,
    which appears together with everything else (the folder is built aside and renamed into place).
    Returns the summary (also in meta.json).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from reflect_tune.artifacts import claim_folder, fix_modes, provenance, replace_folder, sweep_temporaries, write_meta
    from reflect_tune.models import load_model, load_tokenizer, resolve_model

    validate(cfg)
    source, layers, out, overwrite, trust_remote_code = cfg.teacher, cfg.layers, Path(cfg.output), cfg.overwrite, cfg.trust_remote_code
    resolved = resolve_model(source)
    _check_output(out, overwrite, [resolved.path])  # a bundled or cached teacher, by its folder
    n_config = _teacher_layer_count(resolved.path, trust_remote_code)
    if n_config is not None:
        layer_indices(n_config, layers, source)  # fail fast, before the weights load
    teacher = load_model(resolved, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
    tok = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    n_teacher = teacher.config.get_text_config().num_hidden_layers
    kept = layer_indices(n_teacher, layers, source)
    log.info("making a %d-layer student from %s (%d layers): keeping layers %s", layers, source, n_teacher, kept)

    student = AutoModelForCausalLM.from_config(
        _student_config(teacher.config, kept), dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    try:
        student.load_state_dict(_remap(teacher.state_dict(), kept, n_teacher, source), strict=True)
    except RuntimeError as e:
        raise ModelError(f"{source}: the cut-down weights do not fit the student: {str(e).splitlines()[0]}") from None
    if getattr(student.config.get_text_config(), "tie_word_embeddings", False):
        out_emb = student.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not student.get_input_embeddings().weight:
            student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval()
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    summary = {"output": str(out), "teacher_layers": n_teacher, "kept_layers": kept,
               "parameters": params, "teacher_parameters": teacher_params}

    meta = provenance("make-student", cfg, inputs=[resolved.path] if Path(resolved.path).exists() else [])
    meta.update(teacher=resolved.path, teacher_source=resolved.source, **summary)

    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)  # a student a killed run was building
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        fix_modes(tmp)  # safetensors writes 0600
        claim_folder(tmp, "make-student", [f.name for f in tmp.iterdir()] + ["meta.json"])  # what --overwrite may remove
        write_meta(tmp, meta)  # last: the folder is complete once meta.json is in it
        replace_folder(tmp, out)  # empty, missing, or --overwrite (checked above): swapped in whole
    except Exception as e:
        why = write_failure(e, out.parent)
        if why is None:
            raise
        raise ReflectTuneError(f"{out}: cannot write the student: {why}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
