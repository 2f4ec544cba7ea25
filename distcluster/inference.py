"""Load an exported model safely and assign images to clusters.

An exported model is a folder with `weights.pt` (a state dict, read with
`torch.load(weights_only=True)`: no code can run while loading) and
`config.json` (training config, chosen head, input channels, size and
normalisation). The network is rebuilt by distcluster's own code.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distcluster.build import build_model
from distcluster.checkpoint import CHECKPOINT_FILE, MODEL_CONFIG_FILE, WEIGHTS_FILE
from distcluster.config import from_dict
from distcluster.errors import UserError
from distcluster.models import ClusterModel

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


@dataclass
class LoadedModel:
    model: ClusterModel
    head: int
    clusters: int
    channels: int
    size: tuple[int, int]
    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str] | None


def _model_folder(folder: Path) -> Path:
    """A model folder, or a run output / checkpoint folder that holds one."""
    for candidate in (folder, folder / "model"):
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / MODEL_CONFIG_FILE).is_file():
            return candidate
    if (folder / CHECKPOINT_FILE).is_file():
        return folder
    raise UserError(f"{folder}: no distcluster model here (expected {WEIGHTS_FILE} and {MODEL_CONFIG_FILE})")


def _safe_load(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused to load: not a plain tensor file, it would need to run code "
                        f"({str(exc).splitlines()[0][:160]})") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: unreadable model weights ({exc})") from None


def load_model(folder: Path) -> LoadedModel:
    folder = _model_folder(Path(folder))
    try:
        if (folder / WEIGHTS_FILE).is_file():
            meta = json.loads((folder / MODEL_CONFIG_FILE).read_text())
            weights = _safe_load(folder / WEIGHTS_FILE)
        else:  # a training checkpoint: the same fields, in one file
            meta = _safe_load(folder / CHECKPOINT_FILE)
            weights = meta["model"]
        cfg = from_dict(_upgraded(meta["config"]))
        spec = meta["input"]
        model = build_model(cfg, spec["channels"])
        model.load_state_dict(weights)
        model.eval()
        mean, std = (torch.tensor(spec[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        return LoadedModel(model, int(meta["head"]), cfg.clusters, spec["channels"], tuple(spec["size"]),
                           mean, std, spec.get("class_names"))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise UserError(f"{folder}: not a readable distcluster model ({type(exc).__name__}: {exc})") from None
    except RuntimeError as exc:
        raise UserError(f"{folder}: model config and weights do not match ({exc})") from None


def _upgraded(values: dict) -> dict:
    """A model config written by an older distcluster, with the settings it was trained with:
    before `imc_swav.projection_nonlinear` existed the projection had BN + ReLU, and
    `crlc.projection_dim` was called `crlc.feature_dim`."""
    imc, crlc = values.get("imc_swav", {}), dict(values.get("crlc", {}))
    if values.get("objective") == "imc_swav" and "projection_nonlinear" not in imc:
        values = {**values, "imc_swav": {**imc, "projection_nonlinear": True}}
    if "feature_dim" in crlc:
        crlc["projection_dim"] = crlc.pop("feature_dim")
        values = {**values, "crlc": crlc}
    return values


def fit_input(images: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """uint8 (B, C, H, W) -> the model's normalised input: RGB <-> grey, resized to its size."""
    x = images.float().div(255)
    if x.shape[1] == 3 and loaded.channels == 1:
        x = (x * _LUMA).sum(1, keepdim=True)
    elif x.shape[1] == 1 and loaded.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != loaded.channels:
        raise UserError(f"the model takes {loaded.channels}-channel images, the data has {x.shape[1]}")
    if tuple(x.shape[2:]) != loaded.size:
        x = F.interpolate(x, size=loaded.size, mode="bilinear", antialias=True, align_corners=False)
    return (x - loaded.mean) / loaded.std


@torch.no_grad()
def assign(loaded: LoadedModel, batches: Iterator[torch.Tensor], total: int, device: torch.device,
           progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cluster and confidence (the cluster's probability) of every image."""
    model = loaded.model.to(device)
    clusters, confidence = [], []
    with tqdm(total=total, desc="assigning", unit="img", disable=not progress) as bar:
        for images in batches:
            probs = model.cluster_probs(fit_input(images, loaded).to(device))[loaded.head].float().cpu()
            best = probs.max(1)
            clusters.append(best.indices.numpy())
            confidence.append(best.values.numpy())
            bar.update(len(images))
    return np.concatenate(clusters), np.concatenate(confidence)
