"""Packaged trained encoders: the package format, lookup by name and reading (pretrained_models/README.md).

Reading a package belongs with reading a checkpoint (both end in the same state dict, config and epoch count),
so it lives here; `python -m pretrained_models.export` writes packages into `pretrained_models/`.

A package is a folder `pretrained_models/<name>/` holding

    model.safetensors                 full ResNetSimCLR state dict (`encoder.backbone.*`, `head.net.*`);
                                      its metadata names the architecture, so the file alone is enough
    torchvision_<arch>.safetensors    the encoder trunk with plain torchvision keys (`fc` absent)
    config.yaml                       the resolved training config
    package.json                      manifest: source run, epochs, sha256 and size of every weights file
    eval/                             evaluation results (JSON and markdown) of these exact weights, if any
    README.md                         the model card

Weights are safetensors, never pickle.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from models.files import CheckpointLoadError, file_sha256

# The packages folder of this checkout (not of the working directory, unlike runs/): a package is found by name
# from wherever a command runs.
PACKAGES_DIR = Path(__file__).resolve().parent.parent / "pretrained_models"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "package.json"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
EVAL_DIR = "eval"
FORMAT = "simclr-package"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A name with a file's suffix could replace a file of this folder (export.py, README.md) or pass for one.
_FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".yml", ".safetensors", ".pt", ".pth")


def torchvision_file(base_model: str) -> str:
    """File name of a package's plain torchvision weights, e.g. `torchvision_resnet18.safetensors`."""
    return f"torchvision_{base_model}.safetensors"


def is_package_name(text: str) -> bool:
    """Whether `text` could name a package: letters, digits, `.`, `_`, `-`, starting with a letter or digit
    (so never `.hidden`, `_private` or `__init__`), no path separator, no file suffix (`.py`, `.md`, `.json`, ...)."""
    return bool(_NAME.match(text)) and not text.lower().endswith(_FILE_SUFFIXES)


def is_package_dir(path: str | Path) -> bool:
    """Whether `path` is a folder laid out as a package (it has `model.safetensors` or `package.json`)."""
    path = Path(path)
    return path.is_dir() and ((path / WEIGHTS_FILE).is_file() or (path / MANIFEST_FILE).is_file())


def list_packages(root: str | Path | None = None) -> list[str]:
    """Names of the packages under `root` (default: `PACKAGES_DIR`), sorted."""
    root = Path(root) if root is not None else PACKAGES_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_package_dir(p))


def find_package(name: str, root: str | Path | None = None) -> Path:
    """The folder of the package called `name` under `root` (default: `PACKAGES_DIR`), with or without its weights
    (a clone has only the small files; `weights_file` says where downloaded weights go).

    Raises:
        CheckpointLoadError: no such package (the message lists the available ones).
    """
    root = Path(root) if root is not None else PACKAGES_DIR
    folder = root / name
    if is_package_name(name) and is_package_dir(folder):
        return folder
    available = list_packages(root)
    listing = ", ".join(available) if available else "none yet; make one with python -m pretrained_models.export " \
                                                      "runs/<run> --as <name>"
    raise CheckpointLoadError(f"no pretrained package {name!r} in {root} (available: {listing}); pass a package "
                              "name, a package dir, a run dir or a checkpoint file")


def weights_file(path: str | Path) -> Path:
    """The `model.safetensors` of a package folder (or the file itself); missing weights raise with a hint."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointLoadError(f"package {file.parent} has no {WEIGHTS_FILE}: the weights stay out of git; "
                                  f"download them (see {file.parent / CARD_FILE}) and put the file at {file}")
    return file


def read_manifest(folder: str | Path) -> dict:
    """`package.json` of a package folder, or `{}` where there is none."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointLoadError(f"{path} is unreadable ({err}): re-export the package") from None
    if not isinstance(manifest, dict):
        raise CheckpointLoadError(f"{path} is not a package manifest (a JSON object): re-export the package")
    return manifest


def read_package(path: str | Path) -> dict:
    """A package's weights and facts in the shape of a training checkpoint (so loaders treat both alike).

    Args:
        path: a package folder or its `model.safetensors` (a downloaded file alone is enough).
    Returns:
        dict with `model` (full ResNetSimCLR state dict, CPU tensors), `config` (the training config dict;
        at least its `model` section), `next_epoch` (epochs trained), `package` (the manifest, or `{}`).
    Raises:
        CheckpointLoadError: missing, damaged, altered (sha256 differs from the manifest) or foreign files.
    """
    file = weights_file(path)
    manifest = read_manifest(file.parent)
    expected = manifest.get("files", {}).get(file.name, {}).get("sha256")
    if expected and file_sha256(file) != expected:
        raise CheckpointLoadError(f"{file} differs from the sha256 in {file.parent / MANIFEST_FILE} "
                                  f"({expected[:12]}...): the download is incomplete or the file was replaced; "
                                  "download it again")
    try:
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointLoadError(f"{file} is damaged or not a safetensors file ({err}): download or export it again") \
            from None
    missing = [key for key in ("format", "base_model", "cifar_stem", "out_dim") if key not in metadata]
    if missing or metadata["format"] != FORMAT:
        torchvision_only = bool(state) and not any(k.startswith("encoder.") for k in state)
        raise CheckpointLoadError(
            f"{file} is not a SimCLR package's {WEIGHTS_FILE} (no '{FORMAT}' metadata"
            + ("; it holds plain torchvision weights: load them with torchvision.models.<arch>().load_state_dict"
               if torchvision_only else "") + "): pass a package folder or its model.safetensors")
    config = _read_config(file.parent)
    config["model"] = {**(config.get("model") or {}), "base_model": metadata["base_model"],
                       "cifar_stem": metadata["cifar_stem"] == "true", "out_dim": int(metadata["out_dim"])}
    epochs = metadata.get("epochs")
    return {"model": state, "config": config, "next_epoch": int(epochs) if epochs not in (None, "") else None,
            "package": manifest}


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointLoadError(f"{path} is unreadable ({str(err).splitlines()[0]}): re-export the package") from None
    return config if isinstance(config, dict) else {}
