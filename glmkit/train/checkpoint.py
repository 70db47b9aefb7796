"""Resumable training checkpoints: everything a stopped run needs to go on as if it never stopped.

A checkpoint is a folder `<out_dir>/checkpoints/step-000123/`:

    trainable.safetensors   the parameters that train (all of them for full fine-tuning), whole
    optimizer.pt            AdamW's state, whole, keyed by parameter name (read with weights_only)
    trainer.json            step, total steps, scheduler state, data size, the run-defining settings
    rng-rank{R}.pt          each process's RNG states (dropout masks), read with weights_only

State is gathered whole on the first process and written by it (torch.distributed.checkpoint's
full state dicts), so a checkpoint does not depend on how the model was sharded. The folder is
written under a temporary name and renamed when complete: a run killed while saving leaves no
half checkpoint that `latest` could pick.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import RUN_DEFINING, TrainConfig
from .distributed import DistContext, barrier

CHECKPOINTS = "checkpoints"
TRAINABLE, OPTIMIZER, TRAINER = "trainable.safetensors", "optimizer.pt", "trainer.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@dataclass
class TrainingState:
    """Where a run stands, besides tensors: what trainer.json holds."""

    step: int  # optimizer steps done
    total_steps: int
    examples: int | None  # examples per epoch (None: iterable data)
    world_size: int
    settings: dict[str, Any]  # the run-defining settings of the config
    scheduler: dict[str, Any]


def save(folder_root: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler, state: TrainingState, ctx: DistContext, keep: int) -> Path:
    """Write the checkpoint of `state.step` under `folder_root/checkpoints`; every process must call it."""
    folder = folder_root / CHECKPOINTS / f"step-{state.step:06d}"
    partial = folder.with_name(folder.name + ".partial")
    # Collective calls: every process takes part, the first one receives the whole state.
    model_state = get_model_state_dict(model, options=_FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(ctx)
    torch.save(_rng_state(), partial / f"rng-rank{ctx.rank}.pt")
    if ctx.is_main:
        save_file({n: t.contiguous() for n, t in model_state.items()}, partial / TRAINABLE,
                  metadata={"format": "pt"})
        torch.save(optimizer_state, partial / OPTIMIZER)
        record = {**state.__dict__, "scheduler": scheduler.state_dict()}
        (partial / TRAINER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    barrier(ctx)
    if ctx.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        _prune(folder_root / CHECKPOINTS, keep)
    barrier(ctx)
    return folder


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under `out_dir`, or None."""
    root = out_dir / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("step-*")
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / TRAINER).is_file()] if root.is_dir() else []
    return max(found)[1] if found else None


def resolve(resume: str | Path, out_dir: Path | None) -> Path:
    """The checkpoint folder that `resume` ("latest" or a folder) names."""
    if str(resume) == "latest":
        found = latest(out_dir) if out_dir is not None else None
        if found is None:
            raise FileNotFoundError(f"resume='latest', but {out_dir}/{CHECKPOINTS} holds no complete checkpoint")
        return found
    folder = Path(resume)
    if not (folder / TRAINER).is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {TRAINER})")
    return folder


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig,
         trainable: list[str], total_steps: int, examples: int | None, ctx: DistContext) -> TrainingState:
    """Restore model, optimizer, scheduler and RNG from `folder`; check it belongs to this run."""
    record = json.loads((folder / TRAINER).read_text(encoding="utf-8"))
    state = TrainingState(**record)
    differences = [f"{k}: checkpoint {state.settings.get(k)!r}, now {v!r}"
                   for k, v in run_settings(config).items() if state.settings.get(k) != v]
    if state.total_steps != total_steps:
        differences.append(f"total steps: checkpoint {state.total_steps}, now {total_steps}")
    if state.examples != examples:
        differences.append(f"examples per epoch: checkpoint {state.examples}, now {examples}")
    if differences:
        raise ValueError(f"{folder} was written by a different run, so resuming cannot continue it exactly: "
                         + "; ".join(differences))
    tensors = load_file(folder / TRAINABLE)
    if set(tensors) != set(trainable):
        odd = sorted(set(tensors) ^ set(trainable))[:5]
        raise ValueError(f"{folder / TRAINABLE} does not hold this run's trainable parameters (e.g. {odd})")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    optimizer_state = torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    scheduler.load_state_dict(state.scheduler)
    rng = folder / f"rng-rank{ctx.rank}.pt"
    if not rng.is_file():
        raise ValueError(f"{folder} has no RNG state for process {ctx.rank}: it was written by {state.world_size} "
                         f"process(es); resume with as many")
    _set_rng_state(torch.load(rng, weights_only=True))
    return state


def run_settings(config: TrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    return {k: d[k] for k in RUN_DEFINING}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]  # plain lists: loadable with weights_only


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
    for _, old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
