"""An exported model: written from a checkpoint, loaded safely, and applied to images.

An exported model is a folder with `weights.safetensors` (tensors only; older
versions wrote `weights.pt`, read with `torch.load(weights_only=True)`) and
`config.json` (training config, chosen head, input channels, size and
normalisation, the weights' SHA-256). Nothing in it can run code while it
loads: the network is rebuilt by distcluster's own code. The folder may be the
MLflow model a run logs (its files are then under `artifacts/model/`).
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from distcluster.common.errors import RunFailed, UserError
from distcluster.common.files import file_sha256
from distcluster.config import Config, from_dict
from distcluster.core.networks import ClusterModel
from distcluster.data.augment import luma, normalize
from distcluster.engine.build import build_model
from distcluster.engine.checkpoint import CHECKPOINT_FILE

WEIGHTS_FILE = "weights.safetensors"
LEGACY_WEIGHTS_FILE = "weights.pt"  # written before safetensors; still loads
MODEL_CONFIG_FILE = "config.json"


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


MLFLOW_FILES = "artifacts/model"  # where an MLflow model (see pyfunc_model) keeps the two files


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


def _model_folder(folder: Path) -> Path:
    """A model folder, or an MLflow model, run output or checkpoint folder that holds one."""
    for candidate in (folder, folder / MLFLOW_FILES, folder / "model", folder / "model" / MLFLOW_FILES):
        weights = [candidate / WEIGHTS_FILE, candidate / LEGACY_WEIGHTS_FILE]
        if any(w.is_file() for w in weights) and (candidate / MODEL_CONFIG_FILE).is_file():
            return candidate
    if (folder / CHECKPOINT_FILE).is_file():
        return folder
    raise UserError(f"{folder}: no distcluster model here (expected {WEIGHTS_FILE} and {MODEL_CONFIG_FILE})")


def model_files(folder: Path) -> dict[str, bytes]:
    """The files of the model in `folder` (see load_model), by name: to build it elsewhere."""
    folder = _model_folder(Path(folder))
    names = [WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, MODEL_CONFIG_FILE, CHECKPOINT_FILE]
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def _safetensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a model's weights file, after its SHA-256 matched config.json's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    # Every export that wrote safetensors wrote the hash too: a config without it was edited.
    if file_sha256(path) != meta.get("weights_sha256"):
        raise UserError(f"{path}: refused to load: the file was changed after export (its SHA-256 "
                        f"does not match {MODEL_CONFIG_FILE})")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: unreadable model weights ({exc})") from None


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
            weights = _safetensors(folder / WEIGHTS_FILE, meta)
        elif (folder / LEGACY_WEIGHTS_FILE).is_file():
            meta = json.loads((folder / MODEL_CONFIG_FILE).read_text())
            weights = _safe_load(folder / LEGACY_WEIGHTS_FILE)
        else:  # a training checkpoint: the same fields, in one file
            meta = _safe_load(folder / CHECKPOINT_FILE)
            weights = meta["model"]
        cfg = from_dict(_upgraded(meta["config"]))
        spec = meta["input"]
        check_model_description(cfg, meta["head"], spec, folder)
        model = build_model(cfg, spec["channels"])
        model.load_state_dict(weights)
        model.eval()
        mean, std = (torch.tensor(spec[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
        return LoadedModel(model, int(meta["head"]), cfg.clusters, spec["channels"], tuple(spec["size"]),
                           mean, std, spec.get("class_names"))
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise UserError(f"{folder}: not a readable distcluster model ({type(exc).__name__}: {exc})") from None
    except RuntimeError as exc:
        raise UserError(f"{folder}: model config and weights do not match ({exc})") from None


def check_model_description(cfg: Config, head: object, spec: dict[str, Any], folder: Path) -> None:
    """Refuse, as a whole and in one line, a model whose description cannot be applied to images:
    a head the objective does not have, an input size or channel count no image has, or a
    normalisation that is not finite or divides by zero (it would give NaN for every image)."""
    subheads = getattr(getattr(cfg, cfg.objective), "subheads", 1)
    channels, size = spec["channels"], spec["size"]
    problems = [
        (_whole(head) and 0 <= head < subheads, f"head {head!r} (the objective has {subheads} sub-heads)"),
        (channels in (1, 3), f"input.channels {channels!r} (must be 1 or 3)"),
        (isinstance(size, list) and len(size) == 2 and all(_whole(s) and s >= 1 for s in size),
         f"input.size {size!r} (must be [height, width], both >= 1)"),
    ]
    for key in ("mean", "std"):
        values = spec[key]
        fine = (isinstance(values, list) and len(values) == channels
                and all(isinstance(v, int | float) and math.isfinite(v) for v in values))
        if key == "std":
            fine = fine and all(v > 0 for v in values)
        problems.append((fine, f"input.{key} {values!r} (must be {channels} finite numbers"
                               + (", all > 0)" if key == "std" else ")")))
    for ok, what in problems:
        if not ok:
            raise UserError(f"{folder / MODEL_CONFIG_FILE}: not a usable model: {what}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        x = luma(x)
    elif x.shape[1] == 1 and loaded.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != loaded.channels:
        raise UserError(f"the model takes {loaded.channels}-channel images, the data has {x.shape[1]}")
    if tuple(x.shape[2:]) != loaded.size:
        x = F.interpolate(x, size=loaded.size, mode="bilinear", antialias=True, align_corners=False)
    return normalize(x, loaded.mean, loaded.std)


@torch.no_grad()
def probabilities(loaded: LoadedModel, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, H, W) images -> (B, K) cluster probabilities of the model's head, on the CPU."""
    model = loaded.model.to(device)
    return model.cluster_probs(fit_input(images, loaded).to(device))[loaded.head].float().cpu()


def assignment_table(loaded: LoadedModel, images: np.ndarray, batch: int = 512) -> pd.DataFrame:
    """uint8 images (N, H, W, C), or (N, H, W) greyscale -> one row per image: `cluster`,
    `confidence` and the K probabilities `p0` ... `p{K-1}` (the pyfunc model's output)."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"images must be uint8 of shape (N, H, W, C) or (N, H, W), got {images.dtype} "
                        f"{images.shape}")
    tensor = torch.from_numpy(images if images.ndim == 4 else images[..., None]).permute(0, 3, 1, 2)
    probs = torch.cat([probabilities(loaded, part, torch.device("cpu")) for part in tensor.split(batch)])
    best = probs.max(1)
    table = pd.DataFrame({"cluster": best.indices.numpy().astype(np.int64),
                          "confidence": best.values.double().numpy()})
    columns = pd.DataFrame(probs.double().numpy(), columns=probability_columns(loaded.clusters))
    return pd.concat([table, columns], axis=1)


def probability_columns(clusters: int) -> list[str]:
    return [f"p{k}" for k in range(clusters)]
