"""Training checkpoints: `checkpoints/step-N/` with the model or adapter, optimizer, scheduler,
RNG state per rank and the trainer state (docs/FORMATS.md §8.4). Written under a temporary name
and renamed when complete, so a kill never leaves a half checkpoint that `--resume` would trust.
`.pt` files are read with `weights_only=True`.
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, full: bool, accelerator) -> dict:
    """Restore weights (or adapter), optimizer, scheduler and this rank's RNG; returns trainer_state."""
    from safetensors.torch import load_file

    lm = accelerator.unwrap_model(model).lm
    if full:
        missing = set(lm.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False).missing_keys)
        tied = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
        if missing - tied:
            raise ReflectTuneError(f"{ckpt}: checkpoint lacks weights: {sorted(missing - tied)[:3]}")
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(lm, load_file(str(ckpt / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rng = ckpt / _rng_file(accelerator.process_index, accelerator.num_processes)
    if rng.is_file() and state.get("world_size", 1) == accelerator.num_processes:
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        log.warning("warning: %s: trained with %s process(es), resuming with %s; random state not restored",
                    ckpt, state.get("world_size"), accelerator.num_processes)
    return state
