"""Load a trained encoder, frozen, from a checkpoint file, a run directory or a pretrained package."""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from models.resnet_simclr import Encoder


class CheckpointLoadError(RuntimeError):
    """A checkpoint is missing, unreadable or does not hold what was asked; the message says which file."""


RUNS_DIR = Path("runs")  # where run.py puts runs by default, relative to the working directory


def resolve_checkpoint(source: str | Path) -> Path:
    """The weights file that `source` names: the one lookup of every loader (`fine_tune_from`, `load_encoder`,
    feature_eval, `pretrained_models.export`), in this order:

    1. an existing path: a checkpoint `.pt` or a package's `.safetensors` (that file), a run dir (its
       `checkpoints/last.pt`), a package dir (its `model.safetensors`);
    2. a bare name: the run `runs/<name>` or the package `pretrained_models/<name>`; a name that is both is an
       error naming both paths (pass the path of the one you mean);
    3. otherwise an error (for an unknown name, one that lists the packages present).

    Returns:
        A checkpoint `.pt` or a `model.safetensors`: `read_checkpoint` reads both (`read_package_weights`
        reads the second).
    Raises:
        CheckpointLoadError: nothing there, an ambiguous name, a run without `checkpoints/last.pt`, a package
            without its weights (the message says where to put a download).
    """
    # The package format belongs to pretrained_models/, which imports this module: imported here, when needed.
    from pretrained_models import PACKAGES_DIR, find_package, is_package_dir, is_package_name, weights_file

    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "checkpoints" / "last.pt").is_file():
            return path / "checkpoints" / "last.pt"
        if is_package_dir(path):
            return weights_file(path)
        raise CheckpointLoadError(f"run directory {path} has no checkpoints/last.pt: has it finished an epoch? "
                                  "(nor is it a pretrained package: no model.safetensors)")
    name = str(source)
    if not is_package_name(name) and (RUNS_DIR / name).is_dir():  # a run name that no package could have
        return resolve_checkpoint(RUNS_DIR / name)
    if not is_package_name(name):
        raise CheckpointLoadError(f"checkpoint {path} not found: pass a run directory (runs/<name>), a .pt file, "
                                  "a package dir or a package name (pretrained_models/<name>)")
    run, package = RUNS_DIR / name, PACKAGES_DIR / name
    if run.is_dir() and is_package_dir(package):
        raise CheckpointLoadError(f"{name!r} is both the run {run} and the package {package}: pass the path of the "
                                  "one you mean")
    if run.is_dir():
        return resolve_checkpoint(run)
    try:
        return weights_file(find_package(name))
    except CheckpointLoadError as err:
        raise CheckpointLoadError(str(err) if package.exists() else f"no run {run} and {err}") from None


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """`torch.load(path, weights_only=True)` with one clear error for a damaged or unsafe file.

    A package's `.safetensors` is read by `pretrained_models.read_package` into the same shape
    (`model`, `config`, `next_epoch`); `map_location` is then ignored (its tensors are on the CPU).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from pretrained_models import read_package

        return read_package(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointLoadError(f"checkpoint {path} not found") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointLoadError(f"checkpoint {path} was refused: it holds a pickled object ({found.group(1) or found.group(2)}) "
                                      "that could run code; only weights are loaded (weights_only=True)") from None
        raise CheckpointLoadError(f"checkpoint {path} is damaged or not a checkpoint (unreadable pickle data): "
                                  "use another checkpoint") from None
    except Exception as err:  # noqa: BLE001 - garbage bytes fail the (legacy) unpickler in any way: KeyError, ...
        raise CheckpointLoadError(f"checkpoint {path} is damaged or not a checkpoint "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointLoadError(f"checkpoint {path} has no 'model' weights: is it a checkpoint of this repo?")
    return state


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's content (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_state_dict(model_state: dict) -> dict:
    """The encoder's part of a full SimCLR state dict (keys without the `encoder.` prefix)."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """The frozen encoder of a checkpoint: eval mode, no gradients, images in [0, 1] -> features `[B, D]`.

    Args:
        path: a checkpoint `.pt`, a run directory, a pretrained package directory or its `model.safetensors`,
            a run name (`runs/<name>`) or a package name (`pretrained_models/<name>`): see `resolve_checkpoint`.
    Returns:
        `Encoder` with `feature_dim` and `config` (the training config dict) attributes.
    """
    file = resolve_checkpoint(path)
    state = read_checkpoint(file)
    model_config = state.get("config", {}).get("model", {})
    base_model = model_config.get("base_model", "resnet18")
    encoder = Encoder(base_model, bool(model_config.get("cifar_stem", False)))
    weights = encoder_state_dict(state["model"])
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError:
        missing = set(encoder.state_dict()) - set(weights)
        unexpected = set(weights) - set(encoder.state_dict())
        raise CheckpointLoadError(
            f"checkpoint {file} does not fit a {base_model} encoder: {len(missing)} missing keys "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}), "
            f"{'shape mismatch' if not missing and not unexpected else ''}".rstrip(", ")) from None
    encoder.config = state.get("config", {})
    encoder.checkpoint_path = str(file)
    return freeze(encoder).to(device)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """eval() and requires_grad_(False): BatchNorm in train mode would update the statistics of a frozen model."""
    module.eval()
    module.requires_grad_(False)
    return module
