"""Training checkpoints on disk, verified before use and loaded without pickle.

A checkpoint is a folder holding `checkpoint.pt` (model with its BatchNorm statistics,
optimiser state, the non-finite guard's counters, epoch, step, chosen head, every epoch's
metrics, config, input spec) and, written after it, `checkpoint.json` (epoch, size,
SHA-256): a folder whose file is missing, truncated or altered fails verification and is
passed over in favour of an older one. It is read back with `torch.load(weights_only=True)`.

One checkpoint resumes every rank: checkpoints are taken at epoch ends, when every rank holds
the same state (weights and optimiser by DDP, BatchNorm statistics broadcast from rank 0, the
guard's counters from the same flags), and the rest derives from (seed, rank, epoch): batch
order, augmentation draws. On resume rank 0 alone chooses, and hands the state to the others
(`agreed_resume_state`), so ranks that see different files still start from the same one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distcluster.common.errors import one_line
from distcluster.common.files import file_sha256
from distcluster.core import distributed as dist

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_META = "checkpoint.json"
# Checkpoints a run keeps (the newest ones), in-process and on Ray Train alike: the newest may
# be the one a crash damaged, and the one before it is then the way back.
KEEP_CHECKPOINTS = 2


class CorruptCheckpoint(Exception):
    """A checkpoint folder that fails verification."""


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


def agreed_resume_state(find: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """The state every rank resumes from: what `find()` returns on rank 0 (None: from scratch),
    broadcast to the other ranks, which never look for checkpoints of their own."""
    return dist.broadcast_object(find() if dist.rank() == 0 else None)
