"""Read what training leaves: which file a name means, the state it holds (upgraded to the current format), the
frozen encoder, and the weights-only start of `fine_tune_from`. Checkpoints and packages are read alike."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

import models.packages as packages
from models.files import CheckpointLoadError, file_sha256  # noqa: F401 - every loader's error and digest, here too
from models.resnet_simclr import Encoder

RUNS_DIR = Path("runs")  # where run.py puts runs by default, relative to the working directory
CHECKPOINTS = "checkpoints"  # a run's checkpoints live in <run_dir>/checkpoints/
CHECKPOINT_VERSION = 1  # the format `version` simclr/checkpoint.py writes and `upgrade_checkpoint` reads

# The model section of a version-1 config, as the code that wrote it built the model: `head_layers` and `head_bn`
# came later (a file without them has the paper's 2-layer head without BatchNorm). The other keys are in every
# version-1 file; a config without them (written by hand) gets the original repository's (sthalles/SimCLR)
# model: ResNet-18 with the ImageNet stem and a 256-d projection. A package's weights file alone names its
# encoder in its metadata (models.packages) and gets the head keys from here.
_V1_MODEL = {"base_model": "resnet18", "out_dim": 256, "cifar_stem": False, "head_layers": 2, "head_bn": False}

# The original repository's pretrained models: its config.yaml names one, and it trained from scratch when the
# folder was missing. They are not shipped here, so a copy of that config warns and trains from scratch too.
SEED_PACKAGES = ("resnet-18_40-epochs", "resnet-18_80-epochs", "resnet-18_100-epochs", "resnet-50_40-epochs",
                 "resnet-50_80-epochs")


def run_dir_of(checkpoint: Path) -> Path:
    """The run dir a checkpoint belongs to: `<run>/checkpoints/last.pt` -> `<run>`; any other file -> its folder
    (a package's `model.safetensors` -> the package). Pass a resolved path where the file may be `./last.pt`."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


def resolve_checkpoint(source: str | Path) -> Path:
    """The weights file that `source` names: the one lookup of every loader (`fine_tune_from`, `load_encoder`,
    feature_eval, `pretrained_models.export`), in this order:

    1. an existing path: a checkpoint `.pt` or a package's `.safetensors` (that file), a run dir (its
       `checkpoints/last.pt`), a package dir (its `model.safetensors`);
    2. a bare name: the run `runs/<name>` or the package `pretrained_models/<name>`; a name that is both is an
       error naming both paths (pass the path of the one you mean);
    3. otherwise an error (for an unknown name, one that lists the packages present).

    Returns:
        A checkpoint `.pt` or a `model.safetensors`: `read_weights` reads both.
    Raises:
        CheckpointLoadError: nothing there, an ambiguous name, a run without `checkpoints/last.pt`, a package
            without its weights (the message says where to put a download).
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CHECKPOINTS / "last.pt").is_file():
            return path / CHECKPOINTS / "last.pt"
        if packages.is_package_dir(path):
            return packages.weights_file(path)
        raise CheckpointLoadError(f"run directory {path} has no checkpoints/last.pt: has it finished an epoch? "
                                  "(nor is it a pretrained package: no model.safetensors)")
    name = str(source)
    if not packages.is_package_name(name) and (RUNS_DIR / name).is_dir():  # a run name that no package could have
        return resolve_checkpoint(RUNS_DIR / name)
    if not packages.is_package_name(name):
        raise CheckpointLoadError(f"checkpoint {path} not found: pass a run directory (runs/<name>), a .pt file, "
                                  "a package dir or a package name (pretrained_models/<name>)")
    run, package = RUNS_DIR / name, packages.PACKAGES_DIR / name
    if run.is_dir() and packages.is_package_dir(package):
        raise CheckpointLoadError(f"{name!r} is both the run {run} and the package {package}: pass the path of the "
                                  "one you mean")
    if run.is_dir():
        return resolve_checkpoint(run)
    try:
        return packages.weights_file(packages.find_package(name))
    except CheckpointLoadError as err:
        raise CheckpointLoadError(str(err) if package.exists() else f"no run {run} and {err}") from None


def read_weights(path: str | Path, map_location="cpu") -> dict:
    """The weights, with what says how to rebuild them, of any weights file: a checkpoint `.pt`
    (`torch.load(weights_only=True)`) or a package's `.safetensors`, upgraded to the current format
    (`upgrade_checkpoint`), with one clear error for a damaged or unsafe file.

    Returns:
        dict with `model` (the full state dict), `config` (the training config dict, where the file has one) and
        `next_epoch`; a checkpoint's other training state (optimiser, ...) too, which only a resume reads
        (`simclr.checkpoint.read_resume_state`). A package is read by `models.packages.read_package` into the
        same shape; `map_location` is then ignored (its tensors are on the CPU).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return upgrade_checkpoint(packages.read_package(path), path)
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
    return upgrade_checkpoint(state, path)


def upgrade_checkpoint(state: dict, path: str | Path) -> dict:
    """`state` in the current format, whatever format `version` wrote it: the one place that knows old formats.

    Fills, in the saved `config`, the keys its version may lack, so that every reader after this (`load_encoder`,
    feature_eval, the exporter, a resume) reads fields strictly. The file itself is never changed.

    Raises:
        CheckpointLoadError: written by a newer version of this code.
    """
    version = state.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointLoadError(f"checkpoint {path} has format version {version!r}; this code reads up to "
                                  f"{CHECKPOINT_VERSION}: update the repository to load it")
    config = state.get("config")
    if not isinstance(config, dict):
        return state  # no training config (a bare weights file written by hand): nothing to upgrade
    return {**state, "config": {**config, "model": {**_V1_MODEL, **(config.get("model") or {})}}}


def trained_epochs(state: dict) -> int | None:
    """Epochs a checkpoint or package has trained: its `next_epoch` (None for a package exported without it)."""
    return state["next_epoch"] if "next_epoch" in state else (state.get("config") or {}).get("epochs")


def encoder_state_dict(model_state: dict) -> dict:
    """The encoder's part of a full SimCLR state dict (keys without the `encoder.` prefix)."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """The frozen encoder of a checkpoint: eval mode, no gradients, images in [0, 1] -> features `[B, D]`.

    Args:
        path: a checkpoint `.pt`, a run directory, a pretrained package directory or its `model.safetensors`,
            a run name (`runs/<name>`) or a package name (`pretrained_models/<name>`): see `resolve_checkpoint`.
    Returns:
        `Encoder` with `feature_dim`, `config` (the saved training config dict, upgraded), `checkpoint_path` and
        `trained_epochs` attributes.
    """
    file = resolve_checkpoint(path)
    return encoder_from_state(read_weights(file), file, device)


def encoder_from_state(state: dict, file: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """`load_encoder` of a state `read_weights(file)` returned (for a caller that reads more of it)."""
    if not isinstance(state.get("config"), dict):
        raise CheckpointLoadError(f"checkpoint {file} has no training config, so its architecture is unknown: is it "
                                  "a checkpoint of this repo?")
    model = state["config"]["model"]
    encoder = Encoder(model["base_model"], model["cifar_stem"])
    weights = encoder_state_dict(state["model"])
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError:
        missing = set(encoder.state_dict()) - set(weights)
        unexpected = set(weights) - set(encoder.state_dict())
        raise CheckpointLoadError(
            f"checkpoint {file} does not fit a {model['base_model']} encoder: {len(missing)} missing keys "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}), "
            f"{'shape mismatch' if not missing and not unexpected else ''}".rstrip(", ")) from None
    encoder.config = state["config"]
    encoder.checkpoint_path = str(file)
    encoder.trained_epochs = trained_epochs(state)
    return freeze(encoder).to(device)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """eval() and requires_grad_(False): BatchNorm in train mode would update the statistics of a frozen model."""
    module.eval()
    module.requires_grad_(False)
    return module


def load_weights_only(model: nn.Module, source: str, log) -> None:
    """Initialise `model` from a checkpoint or package (weights only: `fine_tune_from`); the whole head is kept
    fresh if its layout differs in any layer.

    Raises:
        CheckpointLoadError: `source` names nothing (except one of `SEED_PACKAGES`: a warning, then nothing is
            loaded), or its encoder does not fit `model`'s.
    """
    try:  # a path, a run name under runs/ or a package name, looked up as by every other loader
        path = resolve_checkpoint(source)
    except CheckpointLoadError as err:
        if (source in SEED_PACKAGES and not (RUNS_DIR / source).exists()
                and not (packages.PACKAGES_DIR / source).exists()):
            log(f"warning: fine_tune_from = {source!r} is one of the original repository's pretrained models, which "
                "are not shipped here (pretrained_models/README.md); training from scratch, as the original did "
                "without them. Set fine_tune_from: None to silence this.")
            return
        raise CheckpointLoadError(f"fine_tune_from = {source!r}: {err}") from None
    weights = read_weights(path)["model"]
    own = model.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    head = {k for k in own if k.startswith("head.")}
    if head != {k for k in weights if k.startswith("head.")} or not head <= usable.keys():
        # another head layout (head_layers, head_bn, out_dim): a layer whose shape happens to fit is another
        # layer, so all of the head stays fresh, never a mix
        usable = {k: v for k, v in usable.items() if not k.startswith("head.")}
    missing = [k for k in own if k not in usable]
    if any(k.startswith("encoder.") for k in missing):
        raise CheckpointLoadError(f"fine_tune_from = {source!r}: {path} does not fit this model's encoder "
                                  f"({len(missing)} keys missing or of another shape, e.g. {missing[:2]}); "
                                  "check model.base_model and model.cifar_stem")
    model.load_state_dict(usable, strict=False)
    log(f"initialised weights from {path}" + (" (projection head kept fresh: other shape)" if missing else ""))
