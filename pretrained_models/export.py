"""Package a training run as a pretrained model: safetensors weights, config, evaluation results, model card.

    python -m pretrained_models.export runs/<name> --as resnet-18_40-epochs     # its checkpoints/last.pt
    python -m pretrained_models.export runs/<name>/checkpoints/best.pt --as my-encoder
    python -m pretrained_models.export --list
    python -m pretrained_models.export --refresh resnet-18_40-epochs    # card from its eval/; no weights needed

Writes `pretrained_models/<name>/` (see pretrained_models/README.md for the format) and refreshes the list
of packages in pretrained_models/INDEX.md. Both are gitignored: exporting never changes a tracked file, so the
runs that follow do not record a `-dirty` git commit. Evaluation results under `<run_dir>/eval/*.json`, and with
--force those in the replaced package's own `eval/`, are kept when they scored these exact weights (their
`checkpoint_sha256` is the checkpoint's or the new `model.safetensors`'); the others are named and left out. One
line on stderr for a bad name or destination (exit status 2) or a checkpoint that cannot be read (1):
docs/EXIT_CODES.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import startup  # standard library only

if __name__ == "__main__":  # a mismatched torch/torchvision pair: one line, not the traceback of the imports below
    startup.exit_if_torch_is_broken()

import torch
import yaml
from safetensors.torch import save_file

from models.loading import (RUNS_DIR, CheckpointLoadError, encoder_state_dict, file_sha256, read_weights,
                            resolve_checkpoint, run_dir_of)
from models.packages import (CARD_FILE, CONFIG_FILE, EVAL_DIR, FORMAT, FORMAT_VERSION, MANIFEST_FILE, PACKAGES_DIR,
                             WEIGHTS_FILE, find_package, is_package_dir, is_package_name, list_packages, read_manifest,
                             torchvision_file)
from feature_eval.results import Results, markdown_table, read_results, rewrite_command
from models.resnet_simclr import ARCHITECTURES, create_model
from simclr.config import Config, ConfigError, config_to_dict, saved_config

INDEX_FILE = "INDEX.md"  # generated, gitignored (as the package folders); README.md is tracked and never written
# No image counts: a run does not record how many images it trained on (a data set folder may hold a subset).
_PRETRAIN_SPLITS = {"stl10": "train + unlabeled", "cifar10": "train", "cifar100": "train",
                    "digits": "train (scikit-learn digits' 80% split)", "imagefolder": "train + unlabeled"}


class ExportError(ValueError):
    """A user error (source, package name, destination); its message is one line that says how to fix it."""


def default_name(base_model: str, epochs: int | None) -> str:
    """The repo's naming scheme, e.g. `resnet-18_40-epochs`: that of the original repository's (sthalles/SimCLR)
    pretrained models (`resnet-18_80-epochs`), so a config naming one of those finds its kind here; the other
    trunks alike (`wide-resnet-50-2_40-epochs`, `resnext-50-32x4d_40-epochs`), `_` left to separate the epochs."""
    arch = re.sub(r"(resnet|resnext)(\d+)", r"\1-\2", base_model).replace("_", "-")
    return f"{arch}_{epochs}-epochs" if epochs is not None else arch


def export_package(source: str | Path, name: str | None = None, *, root: str | Path | None = None,
                   force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the package `<root>/<name>/` from a run directory or a checkpoint `.pt`: staged in a temporary folder
    next to it, then renamed into place, so a package is never seen half-written.

    Args:
        source: a run directory or run name (its `checkpoints/last.pt`) or a checkpoint file
            (`models.loading.resolve_checkpoint`).
        name: package name (default: `resnet-18_<epochs>-epochs` style).
        root: packages folder (default: `pretrained_models/`); its generated INDEX.md is rewritten.
        force: replace an existing package of that name (never a file or a folder that is not a package); its
            `eval/` results of these same weights are kept.
    Returns:
        The package folder.
    Raises:
        ExportError, CheckpointLoadError: user errors, each with a one-line message.
    """
    root = Path(root) if root is not None else PACKAGES_DIR
    source = read_source(source)
    name = name or default_name(source.config.model.base_model, source.epochs)
    dest = _check_destination(root, name, force)
    tmp = _stage(root, name)
    try:
        evaluations = _write_package(tmp, dest, name, source, log)
        _replace(tmp, dest)
    except OSError as err:
        raise ExportError(f"cannot write package {dest} ({err.strerror or err}): free space or pass "
                          "--packages-dir DIR") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place
    update_index(root)
    log(f"exported {source.file} -> {dest} ({', '.join(sorted(os.listdir(dest)))}); "
        f"{len(evaluations)} evaluation result(s) copied")
    return dest


@dataclass
class Source:
    """A checkpoint being exported, read once: its file, digest, typed config, model and the run it came from."""

    file: Path
    sha256: str
    config: Config
    model: torch.nn.Module
    epochs: int | None
    run_dir: Path


def read_source(source: str | Path) -> Source:
    """The checkpoint `source` names, with its model rebuilt from its config and loaded strictly."""
    file = resolve_checkpoint(source)
    if file.suffix == ".safetensors":
        raise ExportError(f"{source} is already a package ({file}); export a run dir or a checkpoint .pt")
    state = read_weights(file)
    try:
        config = saved_config(state)
    except (KeyError, ConfigError) as err:
        raise CheckpointLoadError(f"checkpoint {file} has no training config this code reads ({err}): is it a "
                                  "checkpoint of this repo?") from None
    m = config.model
    model = create_model(m.base_model, m.out_dim, m.cifar_stem, m.head_layers, m.head_bn)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointLoadError(f"checkpoint {file} does not fit a {m.base_model} SimCLR model "
                                  f"({str(err).splitlines()[0][:160]}): is it a checkpoint of this repo?") from None
    return Source(file, file_sha256(file), config, model, state.get("next_epoch"), run_dir_of(file.resolve()))


def _check_destination(root: Path, name: str, force: bool) -> Path:
    """`<root>/<name>`, once the name is valid and what is there (if anything) may be replaced."""
    if not is_package_name(name):
        raise ExportError(f"--as {name!r}: a package name is letters, digits, '.', '_' and '-', starts with a letter "
                          "or digit and has no file suffix (.py, .md, .json, ...), e.g. resnet-18_40-epochs")
    dest = root / name
    if root.resolve() == PACKAGES_DIR.resolve() and (RUNS_DIR / name).is_dir() and not force:
        raise ExportError(f"--as {name!r}: {RUNS_DIR / name} is a run of that name, and a bare name would then mean "
                          "both (loaders refuse such a name); choose another name, or pass --force")
    if (dest.exists() or dest.is_symlink()) and not is_package_dir(dest):
        raise ExportError(f"--as {name!r}: {dest} exists and is not a package, so it is never replaced; "
                          "choose another --as name")
    if dest.exists() and not force:
        raise ExportError(f"package {dest} already exists: pass --force to replace it, or choose another --as name")
    return dest


def _stage(root: Path, name: str) -> Path:
    """A new temporary folder in `root` (hidden, same file system) to write the package into."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
        os.chmod(tmp, _mode(0o777))  # mkdtemp makes it private; a package is as readable as any file here
    except OSError as err:
        raise ExportError(f"cannot write into {root} ({err.strerror or err}): pass --packages-dir DIR") from None
    return tmp


def _write_package(tmp: Path, dest: Path, name: str, source: Source, log: Callable[[str], None]) -> list:
    """Write every file of the package into `tmp`: weights, config, the evaluations of these weights (returned as
    `(path, results)`), manifest, card."""
    files = _write_weights(tmp, name, source)
    config = config_to_dict(source.config)
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    # Results of the package being replaced (feature_eval run on it) stay when they scored these same weights:
    # the same source checkpoint (safetensors orders its metadata at random, so the file's sha256 differs).
    digests = {source.sha256, files[WEIGHTS_FILE]["sha256"]}
    try:
        replaced = read_manifest(dest)
    except CheckpointLoadError:  # missing or damaged: nothing of it is kept
        replaced = {}
    if replaced.get("source", {}).get("checkpoint_sha256") == source.sha256:
        digests |= _package_digests(replaced)
    evaluations = list({path.name: (path, results) for folder, skipped in (
        (dest / EVAL_DIR, "dropped (from the replaced package)"), (source.run_dir / EVAL_DIR, "skipped"))
        for path, results in _matching_evaluations(folder, digests, log, skipped)}.values())
    _write_card(tmp, _manifest(name, source, files, _copy_evaluations(tmp, evaluations)), config, evaluations)
    return evaluations


def _write_card(folder: Path, manifest: dict, config: dict, evaluations: list[tuple[Path, Results]]) -> None:
    """`package.json` and the model card (README.md) of `folder`."""
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / CARD_FILE).write_text(model_card(manifest, config, [results for _, results in evaluations]))


def torchvision_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder trunk of a full SimCLR state dict under plain torchvision keys (`conv1.weight`, ...; no `fc`):
    the package's torchvision file, and pretrained_models/README.md's recipe for older packages."""
    return {k.removeprefix("backbone."): v for k, v in encoder_state_dict(model_state).items()
            if k.startswith("backbone.")}


def _write_weights(tmp: Path, name: str, source: Source) -> dict[str, dict]:
    """`model.safetensors` (full state dict, its architecture in the metadata) and the plain torchvision trunk;
    the manifest's `files` (file name -> `{"sha256", "bytes"}`)."""
    m, encoder = source.config.model, source.model.encoder
    weights = {k: v.detach().cpu().contiguous() for k, v in source.model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata={
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "name": name, "base_model": m.base_model,
        "cifar_stem": str(m.cifar_stem).lower(), "out_dim": str(m.out_dim), "feature_dim": str(encoder.feature_dim),
        "epochs": "" if source.epochs is None else str(source.epochs)})
    save_file(torchvision_state_dict(weights), str(tmp / torchvision_file(m.base_model)), metadata={
        "format": "torchvision", "base_model": m.base_model, "cifar_stem": str(m.cifar_stem).lower(),
        "input": "float RGB in [0, 1], normalised with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"})
    names = (WEIGHTS_FILE, torchvision_file(m.base_model))
    for weights_name in names:
        os.chmod(tmp / weights_name, _mode(0o666))
    return {f: {"sha256": file_sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in names}


def _copy_evaluations(tmp: Path, evaluations: list[tuple[Path, Results]]) -> list[str]:
    """Copy each evaluation's files (JSON, table, pictures) into `tmp/eval/`; their package-relative paths."""
    copied = evaluation_files(evaluations)
    for companion in copied:
        (tmp / EVAL_DIR).mkdir(exist_ok=True)
        shutil.copy2(companion, tmp / EVAL_DIR / companion.name)
    return [f"{EVAL_DIR}/{companion.name}" for companion in copied]


def _manifest(name: str, source: Source, files: dict, eval_files: list[str]) -> dict:
    """`package.json`: what the package is, where it came from, and the digest of every weights file."""
    m = source.config.model
    meta = (_records(source.run_dir / "meta.jsonl") or [{}])[0]
    last = ([r for r in _records(source.run_dir / "metrics.jsonl") if r.get("kind") == "epoch"] or [{}])[-1]
    return {
        "name": name, "format": FORMAT, "format_version": FORMAT_VERSION,
        "base_model": m.base_model, "cifar_stem": m.cifar_stem, "feature_dim": source.model.encoder.feature_dim,
        "out_dim": m.out_dim, "epochs": source.epochs, "configured_epochs": source.config.epochs,
        "source": {"checkpoint": str(source.file), "checkpoint_sha256": source.sha256,
                   "run_dir": str(source.run_dir), "git_commit": meta.get("git_commit"),
                   "command": meta.get("command"),
                   "final_epoch_metrics": {k: v for k, v in last.items()
                                           if k in ("epoch", "train_loss", "valid_loss", "valid_top1", "valid_top5")}},
        "files": files, "evaluations": eval_files,
        "exported": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _mode(bits: int) -> int:
    """`bits` less the process's umask: a package is as readable as any file written here."""
    mask = os.umask(0)
    os.umask(mask)
    return bits & ~mask


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished package into place; an old one is removed only after the new one is complete."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refresh_package(folder: str | Path, log: Callable[[str], None] = print) -> Path:
    """Rebuild a package's model card and manifest from the evaluation results in its own `eval/` folder.

    Results count when they scored the package's weights or its source checkpoint (same sha256), e.g.
    after `python -m feature_eval.evaluate --checkpoint <name>`, which writes into the package's `eval/`.
    Only `package.json`, `config.yaml` and `eval/` are read: the weights may be absent (as after a clone).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest:
        raise ExportError(f"{folder} has no {MANIFEST_FILE}: it is not a package made by this exporter")
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ExportError(f"{folder / CONFIG_FILE} is unreadable ({err}): re-export the package") from None
    evaluations = _matching_evaluations(folder / EVAL_DIR, _package_digests(manifest), log)
    manifest["evaluations"] = [f"{EVAL_DIR}/{file.name}" for file in evaluation_files(evaluations)]
    _write_card(folder, manifest, config, evaluations)
    update_index(folder.parent)
    log(f"refreshed {folder / CARD_FILE}: {len(evaluations)} evaluation result(s)")
    return folder


def _package_digests(manifest: dict) -> set[str]:
    """The sha256s that identify a package's weights: its source checkpoint's and each of its weights files'."""
    return ({manifest.get("source", {}).get("checkpoint_sha256")}
            | {f.get("sha256") for f in manifest.get("files", {}).values()}) - {None}


def _matching_evaluations(folder: Path, digests: set[str], log,
                          skipped: str = "skipped") -> list[tuple[Path, Results]]:
    """`(path, results)` of the evaluation JSON files in `folder` that scored weights with one of these sha256s
    (their `checkpoint_sha256`); each other one is logged as `skipped`."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            results = read_results(path)
        except (OSError, ValueError) as err:
            log(f"skipped {path}: not a readable results file ({err})")
            continue
        if results.checkpoint_sha256 not in digests:
            log(f"{skipped} {path}: it scored other weights (checkpoint sha256 differs); evaluate again to include it")
            continue
        found.append((path, results))
    return found


def evaluation_files(evaluations: list[tuple[Path, Results]]) -> list[Path]:
    """Each evaluation's JSON, its markdown table and the pictures the table shows, those of them that exist."""
    return [file for path, results in evaluations for file in (
        path, path.with_suffix(".md"), *(path.with_name(Path(str(name)).name) for name in results.pictures.values()))
        if file.is_file()]


def _records(path: Path) -> list[dict]:
    """The objects of a run's JSON-lines file (meta.jsonl, metrics.jsonl) up to a damaged line (a crash can cut
    the last one short); none where it is missing."""
    records = []
    try:
        for line in path.read_text().splitlines():
            records.append(json.loads(line))
    except (OSError, ValueError):
        pass
    return [record for record in records if isinstance(record, dict)]


# The model card. `$`-fields are filled by `model_card`: the saved config's as `section_key` (`$optimizer_lr`, see
# `_flat_config`); the blocks in capitals are lines it builds (each ends in a newline, so an empty block leaves no
# blank line behind).
MODEL_CARD = string.Template("""\
# $name

A SimCLR $arch encoder and its projection head, trained by this repository (`python run.py`), packaged by \
`python -m pretrained_models.export`.

| | |
|---|---|
| Data | $dataset_name (`$dataset_root`), pretrained on its $pretrain_split split, ${size}x${size} px, \
$dataset_valid_size of it held out for validation$counted |
| Epochs | $epochs (of $configured_epochs configured) |
| Batch | $batch_size (global) |
| Recipe | $optimizer_name lr $optimizer_lr (scaling $optimizer_lr_scaling, warmup $optimizer_warmup_epochs epochs, \
cosine $optimizer_cosine), weight decay $weight_decay, NT-Xent temperature $loss_temperature, colour strength \
s=$dataset_s, blur $dataset_blur, mixed precision $fp16_precision, seed $seed |
| Model | $arch, feature dim $feature_dim, projection dim $out_dim |
${SOURCE_ROWS}
Full training config: [config.yaml](config.yaml).

## Evaluation

${EVALUATIONS}## Files

| File | Bytes | sha256 |
|---|---|---|
${FILE_ROWS}
The weights are not in git (`.gitignore`: `pretrained_models/*/*.safetensors`). With downloaded weights, put \
`$weights` (and, for plain torchvision use, `$torchvision`) in `pretrained_models/$name/`, next to this card, and \
check `sha256sum $weights` against the table: loading refuses a file whose sha256 differs from package.json.

## Use

```bash
python run.py fine_tune_from=$name                   # continue pretraining from these weights
python -m feature_eval.evaluate --checkpoint $name     # linear / KNN evaluation
python -m feature_eval.finetune --checkpoint $name --label-fraction 0.01
```

```python
import models
encoder = models.load_encoder("pretrained_models/$name")  # frozen; images in [0, 1], normalised inside
```

Plain torchvision (normalise with ImageNet mean/std yourself):

```python
import torch, torchvision
from safetensors.torch import load_file

net = torchvision.models.$base_model()
${CIFAR_STEM}missing, unexpected = net.load_state_dict(load_file("pretrained_models/$name/$torchvision"), strict=False)
# missing == ['fc.weight', 'fc.bias']: add your own classifier, or net.fc = torch.nn.Identity()
```
""")
NO_EVALUATION = """\
No evaluation results were found for these exact weights. Produce them with

```
python -m feature_eval.evaluate --checkpoint $name --classifiers lbfgs,adam,knn
```

"""
CIFAR_STEM_LINES = """\
net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # this encoder's CIFAR stem
net.maxpool = torch.nn.Identity()
"""
# What a config written before these keys existed meant by their absence.
CONFIG_DEFAULTS = {"optimizer_lr_scaling": "none", "optimizer_warmup_epochs": 0, "optimizer_cosine": True,
                   "fp16_precision": False}
CARD_COLUMNS = ("Protocol", "Feature extractor", "Top-1 %", "Top-5 %")


class _Lenient(dict):
    """The card's fields: a config key that the package's version of this code did not write reads as `?`."""

    def __missing__(self, key):
        return "?"


def _flat_config(config: dict) -> dict:
    """A saved training config (config.yaml) as `section_key` -> value (`optimizer_lr`, `dataset_name`,
    `batch_size`), over `CONFIG_DEFAULTS`: a card is rebuilt from whatever version of this code wrote the file."""
    flat = dict(CONFIG_DEFAULTS)
    for key, value in (config if isinstance(config, dict) else {}).items():
        flat.update({f"{key}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def model_card(manifest: dict, config: dict, evaluations: list[Results]) -> str:
    """The package's README.md (`MODEL_CARD`): data, epochs, batch, recipe, evaluation numbers with their commands,
    sha256, usage. `config` is the saved training config dict (config.yaml), read by `_flat_config`."""
    name, base_model, flat = manifest["name"], manifest["base_model"], _flat_config(config)
    counted = next((r.splits for r in evaluations if _counts_split(r, flat)), None)
    evaluated = "".join(_evaluation_block(results, name) for results in evaluations)
    if manifest.get("evaluations"):
        evaluated += "Result files: " + ", ".join(f"[{f}]({f})" for f in manifest["evaluations"]) + ".\n\n"
    return MODEL_CARD.substitute(_Lenient(
        flat, name=name, base_model=base_model, weights=WEIGHTS_FILE, torchvision=torchvision_file(base_model),
        arch=ARCHITECTURES.get(base_model, base_model) + (" (CIFAR stem: 3x3 conv1, no max-pool)"
                                                          if manifest["cifar_stem"] else ""),
        pretrain_split=_PRETRAIN_SPLITS.get(flat.get("dataset_name"), "pretrain"),
        size=(flat.get("dataset_input_shape") or ["?"])[0],
        counted=f"; the evaluation below counted {counted['train']:,} labelled train and {counted['test']:,} test "
                "images" if counted else "",
        epochs=manifest.get("epochs"), configured_epochs=manifest.get("configured_epochs"),
        feature_dim=manifest["feature_dim"], out_dim=manifest["out_dim"], SOURCE_ROWS=_source_rows(manifest),
        EVALUATIONS=evaluated or string.Template(NO_EVALUATION).substitute(name=name),
        FILE_ROWS="".join(f"| {file} | {info['bytes']} | `{info['sha256']}` |\n"
                          for file, info in manifest["files"].items()),
        CIFAR_STEM=CIFAR_STEM_LINES if manifest["cifar_stem"] else ""))


def _source_rows(manifest: dict) -> str:
    """The card's table rows after Model: the last epoch's metrics, the source checkpoint, the training command."""
    source, rows = manifest.get("source", {}), ""
    if source.get("final_epoch_metrics"):
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in source["final_epoch_metrics"].items() if k != "epoch")
        rows += f"| Last epoch | {metrics} |\n"
    rows += (f"| Source | `{source.get('checkpoint')}` (git {source.get('git_commit') or 'unknown'}), "
             f"exported {manifest.get('exported')} |\n")
    if source.get("command"):
        rows += f"| Training command | `{source['command']}` |\n"
    return rows


def _evaluation_block(results: Results, name: str) -> str:
    """One evaluation on the card: its data and splits, its rows, and the commands that produce it (the second
    on this package, its results into the package's own eval/)."""
    splits = results.splits
    fit = splits.get("fit", "train")
    if fit == "train" and isinstance(splits.get("train"), int):
        fit = f"train ({splits['train']:,} images)"
    here = rewrite_command(results.command, {"--checkpoint": name, "--out-dir": None})
    return (f"On {results.dataset} ({results.input_size} px), fit on {fit}, scored on test ({splits.get('test', '?')} "
            f"images):\n\n{markdown_table(results.rows, CARD_COLUMNS)}\n\nProduced by `{results.command}`; from this "
            f"package: `{here}`.\n\n")


def _counts_split(results: Results, config: dict) -> bool:
    """Whether an evaluation counted the labelled train and test images of the training data set (same name and
    root); `config` is `_flat_config`'s."""
    return (results.dataset == config.get("dataset_name") and results.root is not None
            and Path(str(results.root)) == Path(str(config.get("dataset_root")))
            and all(isinstance(results.splits.get(k), int) for k in ("train", "test")))


def package_summary(folder: Path) -> dict:
    """One row of the packages list: name, architecture, data, epochs, batch, linear/KNN top-1, weights present."""
    manifest = read_manifest(folder)
    try:
        config = _flat_config(yaml.safe_load((folder / CONFIG_FILE).read_text()))
    except (OSError, yaml.YAMLError):
        config = {}
    top1 = {}  # protocol -> top-1 of its first SimCLR row
    for entry in (e for e in manifest.get("evaluations", []) if e.endswith(".json")):
        try:
            rows = read_results(folder / entry).rows
        except (OSError, ValueError):
            continue
        for row in (row for row in rows if row.extractor == "simclr"):
            top1.setdefault(row.classifier, row.top1)
    base_model = manifest.get("base_model")
    return {"name": folder.name, "architecture": ARCHITECTURES.get(base_model, base_model),
            "data": config.get("dataset_name"), "epochs": manifest.get("epochs"), "batch": config.get("batch_size"),
            "linear_top1": top1.get("lbfgs"), "knn_top1": top1.get("knn"), "weights": (folder / WEIGHTS_FILE).is_file()}


def update_index(root: Path) -> Path:
    """Write the packages list to `<root>/INDEX.md` (generated, gitignored: never a tracked file); return its path."""
    rows = [package_summary(root / name) for name in list_packages(root)]

    def cell(value, digits=None):
        return "-" if value is None else (f"{value:.1f}" if digits else str(value))

    lines = ["| Package | Architecture | Data | Epochs | Batch | Linear top-1 % | KNN top-1 % | Weights here |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| [{r['name']}]({r['name']}/README.md) | {cell(r['architecture'])} | {cell(r['data'])} | "
              f"{cell(r['epochs'])} | {cell(r['batch'])} | {cell(r['linear_top1'], 1)} | {cell(r['knn_top1'], 1)} | "
              f"{'yes' if r['weights'] else 'no (download)'} |" for r in rows]
    body = "\n".join(lines) if rows else "None yet: nothing has been packaged here."
    index = root / INDEX_FILE
    index.write_text(f"# Packages in {root}\n\nGenerated by `python -m pretrained_models.export` (also printed by "
                     f"`--list`); not in git. The format: pretrained_models/README.md.\n\n{body}\n")
    return index


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrained_models.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", help="run directory or run name (runs/<name>), or checkpoint .pt file")
    parser.add_argument("--as", dest="name", help="package name (default: e.g. resnet-18_40-epochs)")
    parser.add_argument("--packages-dir", help="where packages live (default: pretrained_models/)")
    parser.add_argument("--force", action="store_true", help="replace an existing package of that name")
    parser.add_argument("--list", action="store_true", help="list the packages present and exit")
    parser.add_argument("--refresh", metavar="NAME",
                        help="rebuild package NAME's model card from the results in its eval/ folder and exit")
    args = parser.parse_args(argv)
    if not args.list and not args.refresh and not args.source:
        parser.error("pass a run directory or checkpoint to export (or --list, or --refresh NAME)")
    return args


def print_list(root: Path) -> None:
    """`--list`: a line per package in `root`."""
    rows = [package_summary(root / name) for name in list_packages(root)]
    for r in rows:
        top1 = "-" if r["linear_top1"] is None else f"{r['linear_top1']:.1f}%"
        print(f"{r['name']}: {r['architecture']}, {r['data']}, {r['epochs']} epochs, batch {r['batch']}, "
              f"linear top-1 {top1}, weights {'present' if r['weights'] else 'missing'}")
    if not rows:
        print(f"no packages in {root}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.packages_dir) if args.packages_dir else PACKAGES_DIR
    try:
        with startup.one_line_warnings():  # no CPU policy: exporting computes nothing in parallel
            if args.list:
                print_list(root)
            elif args.refresh:
                refresh_package(find_package(args.refresh, root))
            else:
                export_package(args.source, args.name, root=root, force=args.force)
    except BaseException as err:  # one line and its status, as startup.ERROR_POLICY says; a bug is raised again
        stopped = ("stopped; no package is left half-written (each is staged in a temporary folder, then renamed "
                   "into place)")
        return startup.report_error(err, text=stopped if isinstance(err, KeyboardInterrupt) else None)
    return startup.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
