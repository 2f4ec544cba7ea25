"""Checkpoints and exported models on disk, written atomically and loaded without pickle.

A checkpoint is a folder holding `checkpoint.pt` (model, optimiser and
scheduler state, epoch, chosen head, config, input spec). An exported model
is a folder holding `weights.pt` (state dict only) and `config.json`.
Everything is read back with `torch.load(weights_only=True)`, which refuses
to unpickle arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from distcluster.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "weights.pt"
MODEL_CONFIG_FILE = "config.json"


def write_atomic_dir(target: Path, fill) -> Path:
    """Fill a temporary sibling folder with `fill(folder)`, then rename it to `target`.

    A reader never sees a half-written folder: either the old one or the new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(staging)
        if target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def save_checkpoint(state: dict[str, Any], folder: Path) -> None:
    torch.save(state, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"no checkpoint at {folder} (missing {CHECKPOINT_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def export_model(state: dict[str, Any], folder: Path) -> None:
    """Weights + JSON config: everything predict needs, nothing executable."""
    torch.save(state["model"], folder / WEIGHTS_FILE)
    meta = {"config": state["config"], "head": state["head"], "input": state["input"],
            "epoch": state["epoch"]}
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
