"""Training checkpoints: `checkpoints/step-N/` with the model or adapter, optimizer, scheduler,
RNG state per rank and the trainer state (docs/FORMATS.md §8.4). Written under a temporary name
and renamed when complete, so a kill never leaves a half checkpoint that `--resume` would trust;
a failed write (disk full) removes its temporary folder and leaves the older checkpoints as they
were. `.pt` files are read with `weights_only=True`.

Resuming reads every file of a checkpoint before applying any: a checkpoint damaged afterwards
(a truncated file) is moved aside to `checkpoints/corrupt-step-N/`, and the next older one is
tried, with a warning that names both.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from reflect_tune.artifacts import fix_modes, write_failure
from reflect_tune.errors import ReflectTuneError

log = logging.getLogger("reflect_tune.train")


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy arrays are not weights_only-loadable
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype("int64")),
            pos, has_gauss, gauss], **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(rank: int, world: int) -> str:
    return "rng_state.pt" if world == 1 else f"rng_state_{rank}.pt"


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, state: dict, accelerator, keep: int) -> Path:
    """checkpoints/step-N/, written under a temporary name and renamed when complete."""
    root = out / "checkpoints"
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / _rng_file(accelerator.process_index, accelerator.num_processes))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).lm.save_pretrained(tmp, safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "train_config.json").write_text(json.dumps(state.pop("config"), indent=2))
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            fix_modes(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half checkpoint
        why = write_failure(e, root)
        if why is None:
            raise
        raise ReflectTuneError(f"{final}: cannot write: {why}; the checkpoints before it are intact (continue "
                               "with --resume once there is room)") from None
    if accelerator.is_main_process:
        done = sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    done = [p for p in (out / "checkpoints").glob("step-*")
            if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = checkpoints(out)
    return done[0] if done else None


class CorruptCheckpoint(Exception):
    """A checkpoint whose files cannot be read back."""


def read_checkpoint(ckpt: Path, full: bool, accelerator) -> dict[str, Any]:
    """Every file of a checkpoint, read into memory; a damaged one raises `CorruptCheckpoint`."""
    from safetensors.torch import load_file

    try:
        files = {"weights": load_file(str(ckpt / ("model.safetensors" if full else "adapter_model.safetensors"))),
                 "optimizer": torch.load(ckpt / "optimizer.pt", weights_only=True),
                 "scheduler": torch.load(ckpt / "scheduler.pt", weights_only=True),
                 "state": json.loads((ckpt / "trainer_state.json").read_text()),
                 "config": json.loads((ckpt / "train_config.json").read_text())}
        rng = ckpt / _rng_file(accelerator.process_index, accelerator.num_processes)
        files["rng"] = torch.load(rng, weights_only=True) if rng.is_file() else None
    except Exception as e:  # safetensors, torch.load and json each raise their own types for a cut file
        raise CorruptCheckpoint(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return files


def load_checkpoint(ckpt: Path, files: dict[str, Any], model, optimizer, scheduler, full: bool, accelerator) -> dict:
    """Restore weights (or adapter), optimizer, scheduler and this rank's RNG from `read_checkpoint`'s
    files; returns trainer_state. Files that do not fit the model raise `CorruptCheckpoint`."""
    lm = accelerator.unwrap_model(model).lm
    try:
        if full:
            missing = set(lm.load_state_dict(files["weights"], strict=False).missing_keys)
            tied = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
            if missing - tied:
                raise CorruptCheckpoint(f"it lacks weights: {sorted(missing - tied)[:3]}")
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(lm, files["weights"])
        optimizer.load_state_dict(files["optimizer"])
        scheduler.load_state_dict(files["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CorruptCheckpoint(f"it does not fit the model: {str(e).splitlines()[0][:200]}") from None
    state = files["state"]
    if files["rng"] is not None and state.get("world_size", 1) == accelerator.num_processes:
        _set_rng_state(files["rng"])
    else:
        log.warning("warning: %s: trained with %s process(es), resuming with %s; random state not restored",
                    ckpt, state.get("world_size"), accelerator.num_processes)
    return state


def set_aside(ckpt: Path) -> Path:
    """Move a damaged checkpoint out of the way (`corrupt-step-N`), so it is never picked again."""
    target = ckpt.with_name(f"corrupt-{ckpt.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(ckpt, target)
    return target
