"""Checkpoints and exported models on disk, written atomically and loaded without pickle.

A checkpoint is a folder holding `checkpoint.pt` (model, optimiser and
scheduler state, epoch, step, chosen head, config, input spec) and, written
after it, `checkpoint.json` (epoch, size, SHA-256): a folder whose file is
missing, truncated or altered fails verification and is passed over in
favour of an older one. An exported model is a folder holding
`weights.safetensors` (tensors only) and `config.json` (with the weights'
SHA-256); older versions wrote `weights.pt` (a state dict). Everything is read
back without unpickling objects: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distcluster.errors import RunFailed, one_line

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_META = "checkpoint.json"
WEIGHTS_FILE = "weights.safetensors"
LEGACY_WEIGHTS_FILE = "weights.pt"  # written before safetensors; still loads
MODEL_CONFIG_FILE = "config.json"


def write_atomic_dir(target: Path, fill: Callable[[Path], object]) -> Path:
    """Fill a temporary sibling folder with `fill(folder)`, then rename it to `target`.

    A reader never sees a half-written folder: either the old one or the new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(staging)
        if target.exists():
            # an empty folder of our own, under an unpredictable name: renaming over it cannot
            # follow a link someone planted at a fixed name
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # the process's umask: reading it means setting it, so set it straight back


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A new temporary file beside `path` (unpredictable name, created with O_EXCL, so no
    planted link is ever followed) to write into; renamed to `path` when the block ends
    without an error, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result reads like any file written here
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_json_atomic(path: Path, value: Any) -> None:
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(value, indent=2) + "\n")


class CorruptCheckpoint(Exception):
    """A checkpoint folder that fails verification."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], folder: Path) -> None:
    path = Path(folder) / CHECKPOINT_FILE
    torch.save(state, path)
    meta = {"epoch": state.get("epoch"), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (Path(folder) / CHECKPOINT_META).write_text(json.dumps(meta) + "\n")


def checkpoint_epoch(folder: Path) -> int | None:
    """The epoch a checkpoint folder claims, or None when it has no readable metadata."""
    try:
        return int(json.loads((Path(folder) / CHECKPOINT_META).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verified_checkpoint(folder: Path) -> dict[str, Any]:
    """Load a checkpoint whose file matches its recorded size and hash; else CorruptCheckpoint."""
    path = Path(folder) / CHECKPOINT_FILE
    try:
        meta = json.loads((Path(folder) / CHECKPOINT_META).read_text())
        if path.stat().st_size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
            raise CorruptCheckpoint(f"{path}: size or hash differs from {CHECKPOINT_META}")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever fails to load (a refused pickle too) is unusable
        raise CorruptCheckpoint(f"{folder}: {one_line(str(exc), 200)}") from None


def newest_valid_checkpoint(folders: list[Path],
                            warn: Callable[[str], object] = print) -> tuple[dict[str, Any], Path] | None:
    """The newest (by recorded epoch) checkpoint that verifies, warning about the ones that don't."""
    ranked = sorted((f for f in folders if checkpoint_epoch(f) is not None), key=checkpoint_epoch,
                    reverse=True)
    for folder in ranked:
        try:
            return verified_checkpoint(folder), folder
        except CorruptCheckpoint as exc:
            warn(f"warning: skipping damaged checkpoint {exc}")
    return None


def export_model(state: dict[str, Any], folder: Path) -> None:
    """Weights (safetensors) + JSON config: everything predict needs, nothing executable.
    Weights that are not all finite are never exported (RunFailed): a model of NaNs would
    sort nothing."""
    from safetensors.torch import save_file

    broken = [name for name, tensor in state["model"].items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise RunFailed(f"the trained weights are not finite ({len(broken)} tensors, e.g. {broken[0]}); "
                        "nothing was exported. Lower optim.lr or check the data.")
    save_file({name: t.contiguous() for name, t in state["model"].items()}, folder / WEIGHTS_FILE)
    meta = {"config": state["config"], "head": state["head"], "input": state["input"],
            "epoch": state["epoch"], "weights_sha256": file_sha256(folder / WEIGHTS_FILE)}
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
