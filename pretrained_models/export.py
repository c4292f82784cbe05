"""Package a training run as a pretrained model: safetensors weights, config, evaluation results, model card.

    python -m pretrained_models.export runs/<name> --as resnet-18_40-epochs     # or a checkpoint .pt
    python -m pretrained_models.export --list                           # the packages present, as a table
    python -m pretrained_models.export --refresh resnet-18_40-epochs    # card from its eval/; no weights needed

The format, the results a package keeps, the names allowed: pretrained_models/README.md; statuses: docs/EXIT_CODES.md.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import startup  # standard library only

if __name__ == "__main__":  # a mismatched torch/torchvision pair: one line, not the traceback of the imports below
    startup.exit_if_torch_is_broken()

import torch
import yaml
from safetensors.torch import save

from models.loading import (RUNS_DIR, CheckpointLoadError, encoder_state_dict, file_sha256, read_weights,
                            resolve_checkpoint, run_dir_of)
from models.packages import (CARD_FILE, CONFIG_FILE, EVAL_DIR, FORMAT, FORMAT_VERSION, MANIFEST_FILE, PACKAGES_DIR,
                             WEIGHTS_FILE, is_package_dir, is_package_name, list_packages, read_manifest,
                             torchvision_file)
from feature_eval.results import Results, Row, current_rows, markdown_table, read_results, rewrite_command
from models.resnet_simclr import ARCHITECTURES, create_model
from simclr.config import Config, ConfigError, config_to_dict, saved_config

# No image counts: a run does not record how many images it trained on (a data set folder may hold a subset).
_PRETRAIN_SPLITS = {"stl10": "train + unlabeled", "cifar10": "train", "cifar100": "train",
                    "digits": "train (scikit-learn digits' 80%)", "imagefolder": "train + unlabeled"}


class ExportError(ValueError):
    """A user error (source, package name, destination); its message is one line that says how to fix it."""


def default_name(base_model: str, epochs: int | None) -> str:
    """`resnet-18_40-epochs`, `wide-resnet-50-2_40-epochs`: as the original repository (sthalles/SimCLR) named its."""
    arch = re.sub(r"(resnet|resnext)(\d+)", r"\1-\2", base_model).replace("_", "-")
    return f"{arch}_{epochs}-epochs" if epochs is not None else arch


def export_package(source: str | Path, name: str | None = None, *, root: str | Path | None = None,
                   force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write `<root>/<name>/` (default: `pretrained_models/<default_name>`) from a run or checkpoint `.pt` into a
    hidden folder, then rename it into place. Raises ExportError, CheckpointLoadError: one line each."""
    root = Path(root) if root is not None else PACKAGES_DIR
    source = read_source(source)
    name = name or default_name(source.config.model.base_model, source.epochs)
    dest = _check_destination(root, name, force)
    tmp, old = root / f".{name}.{os.getpid()}.tmp", root / f".{name}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export that had this process id
        tmp.mkdir(parents=True)
        evaluations = _write_package(tmp, dest, name, source, log)
        if dest.exists():  # the old package goes only once the new one is complete
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise ExportError(f"cannot write package {dest} ({err.strerror or err}): free space or pass "
                          "--packages-dir DIR") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place
    log(f"exported {source.file} -> {dest} ({', '.join(sorted(os.listdir(dest)))}); "
        f"{evaluations} evaluation result(s) copied")
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


def _write_package(tmp: Path, dest: Path, name: str, source: Source, log: Callable[[str], None]) -> int:
    """Write the package into `tmp`, with the run's and the replaced package's results of these weights."""
    manifest = _manifest(name, source, _write_weights(tmp, name, source))
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(source.config), sort_keys=False))
    replaced = {}
    with contextlib.suppress(CheckpointLoadError):  # a damaged one: nothing of it is kept
        replaced = read_manifest(dest)
    # A package of the same checkpoint holds these weights, though its model.safetensors has another sha256
    # (safetensors writes its metadata in a random order): its results stay, now and at each --refresh.
    if replaced.get("source", {}).get("checkpoint_sha256") == source.sha256:
        manifest["source"]["weights_sha256"] = sorted(_package_digests(replaced) - {source.sha256})
    for folder, skipped in ((dest / EVAL_DIR, "dropped (from the replaced package)"),
                            (source.run_dir / EVAL_DIR, "skipped")):  # the run's replace the package's of one name
        for file in evaluation_files(_matching_evaluations(folder, _package_digests(manifest), log, skipped)):
            (tmp / EVAL_DIR).mkdir(exist_ok=True)
            shutil.copy2(file, tmp / EVAL_DIR / file.name)
    return len(_write_card(tmp, manifest, log))


def torchvision_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder trunk of a full SimCLR state dict under plain torchvision keys (`conv1.weight`, ...; no `fc`),
    contiguous: a checkpoint holds channels-last weights, which safetensors refuses to save."""
    return {k.removeprefix("backbone."): v.contiguous() for k, v in encoder_state_dict(model_state).items()
            if k.startswith("backbone.")}


def _write_weights(tmp: Path, name: str, source: Source) -> dict[str, dict]:
    """The full state dict (its metadata names the architecture) and the torchvision trunk; the manifest's `files`."""
    m, stem = source.config.model, str(source.config.model.cifar_stem).lower()
    weights = {k: v.detach().cpu().contiguous() for k, v in source.model.state_dict().items()}
    files = {WEIGHTS_FILE: save(weights, metadata={
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "name": name, "base_model": m.base_model,
        "cifar_stem": stem, "out_dim": str(m.out_dim), "feature_dim": str(source.model.encoder.feature_dim),
        "epochs": "" if source.epochs is None else str(source.epochs)}),
        torchvision_file(m.base_model): save(torchvision_state_dict(weights), metadata={
            "format": "torchvision", "base_model": m.base_model, "cifar_stem": stem,
            "input": "float RGB in [0, 1], normalised with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"})}
    for file, data in files.items():  # written here, not by save_file, whose files are private (mode 0600)
        (tmp / file).write_bytes(data)
    return {file: {"sha256": file_sha256(tmp / file), "bytes": len(data)} for file, data in files.items()}


def _manifest(name: str, source: Source, files: dict) -> dict:
    """`package.json`: what the package is, where it came from, and the digest of every weights file."""
    m = source.config.model
    meta = (_records(source.run_dir / "meta.jsonl") or [{}])[0]
    last = ([r for r in _records(source.run_dir / "metrics.jsonl") if r.get("kind") == "epoch"] or [{}])[-1]
    metrics = ("epoch", "train_loss", "valid_loss", "valid_top1", "valid_top5")
    return {"name": name, "format": FORMAT, "format_version": FORMAT_VERSION, "base_model": m.base_model,
            "cifar_stem": m.cifar_stem, "feature_dim": source.model.encoder.feature_dim, "out_dim": m.out_dim,
            "epochs": source.epochs, "configured_epochs": source.config.epochs,
            "source": {"checkpoint": str(source.file), "checkpoint_sha256": source.sha256,
                       "run_dir": str(source.run_dir), "git_commit": meta.get("git_commit"),
                       "command": meta.get("command"),
                       "final_epoch_metrics": {k: v for k, v in last.items() if k in metrics}},
            "files": files, "exported": datetime.datetime.now().isoformat(timespec="seconds")}


def _records(path: Path) -> list[dict]:
    """The objects of a run's meta.jsonl or metrics.jsonl, up to a line a crash cut short; none if it is missing."""
    records = []
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            records.append(json.loads(line))
    return [record for record in records if isinstance(record, dict)]


def refresh_package(folder: str | Path, log: Callable[[str], None] = print) -> Path:
    """Rebuild a package's card and manifest from its eval/ (`feature_eval.evaluate --checkpoint <name>` writes
    there); the weights may be absent."""
    folder = Path(folder)
    if not is_package_dir(folder):
        present = ", ".join(list_packages(folder.parent))
        advice = "python -m pretrained_models.export --list describes each" if present else \
            "make one with python -m pretrained_models.export runs/<run>"
        raise CheckpointLoadError(f"--refresh {folder.name!r}: no package of that name in {folder.parent} (present: "
                                  f"{present or 'none'}); {advice}")
    manifest = read_manifest(folder)
    if not manifest:
        raise ExportError(f"{folder} has no {MANIFEST_FILE}: it is not a package made by this exporter")
    log(f"refreshed {folder / CARD_FILE}: {len(_write_card(folder, manifest, log))} evaluation result(s)")
    return folder


def _write_card(folder: Path, manifest: dict, log: Callable[[str], None]) -> list[tuple[Path, Results]]:
    """Write `package.json` and the card of `folder` from the results in its eval/ of its weights; return those."""
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ExportError(f"{folder / CONFIG_FILE} is unreadable ({err}): re-export the package") from None
    evaluations = _matching_evaluations(folder / EVAL_DIR, _package_digests(manifest), log)
    for path, results in evaluations:
        _name_the_package(path.with_suffix(".md"), results, manifest["name"])
    manifest["evaluations"] = [f"{EVAL_DIR}/{file.name}" for file in evaluation_files(evaluations)]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / CARD_FILE).write_text(model_card(manifest, config, [results for _, results in evaluations]))
    return evaluations


def _name_the_package(markdown: Path, results: Results, name: str) -> None:
    """Make the caption of a package's results table name the package (`name`) and the command that makes the table
    from it, not the checkpoint path and command as run where it was evaluated: its JSON keeps those as evidence."""
    if not markdown.is_file():
        return
    text = markdown.read_text().replace(f"`{results.command}`", f"`{_package_command(results.command, name)}`")
    checkpoint = results.record.get("checkpoint")
    markdown.write_text(text.replace(f"`{checkpoint}`", f"`{name}`") if checkpoint else text)


def _package_digests(manifest: dict) -> set[str]:
    """The sha256s of a package's weights: its source checkpoint's, its files' and its earlier exports' files'."""
    source = manifest.get("source", {})
    return ({source.get("checkpoint_sha256"), *source.get("weights_sha256", [])}
            | {f.get("sha256") for f in manifest.get("files", {}).values()}) - {None}


def _matching_evaluations(folder: Path, digests: set[str], log, skipped="skipped") -> list[tuple[Path, Results]]:
    """`(path, results)` of the results in `folder` that scored weights of these sha256s; others logged as `skipped`."""
    found = []
    for path in sorted(folder.glob("*.json")):
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


# The model card, markdown with `$`-fields: the saved config's as `section_key` (`$optimizer_lr`: `_flat_config`)
# and those `model_card` names; a field in capitals is lines it builds, each ending in a newline.
MODEL_CARD = string.Template((Path(__file__).parent / "model_card_template.md").read_text())
NO_EVALUATION = ("No evaluation results were found for these exact weights. Produce them with\n\n```\n"
                 "python -m feature_eval.evaluate --checkpoint {name} --classifiers lbfgs,adam,knn\n```\n\n")
CIFAR_STEM_LINES = ("net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # this encoder's CIFAR stem\n"
                    "net.maxpool = torch.nn.Identity()\n")
# What a config written before these keys existed meant by their absence.
CONFIG_DEFAULTS = {"optimizer_lr_scaling": "none", "optimizer_warmup_epochs": 0, "optimizer_cosine": True,
                   "fp16_precision": False}
CARD_COLUMNS = ("Protocol", "Feature extractor", "Top-1 %", "Top-5 %")
FINETUNE_CARD_COLUMNS = ("Protocol", "Feature extractor", "Fine-tune epochs", "Top-1 %", "Top-5 %")


def _flat_config(config: dict) -> dict:
    """config.yaml, of any version of this code, as `section_key` -> value (`optimizer_lr`) over `CONFIG_DEFAULTS`."""
    flat = dict(CONFIG_DEFAULTS)
    for key, value in (config if isinstance(config, dict) else {}).items():
        flat.update({f"{key}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _yaml_spelling(value):
    """A config value as config.yaml spells it where Python's spelling differs: `true`, `false`, `null`."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else value


def model_card(manifest: dict, config: dict, evaluations: list[Results]) -> str:
    """The package's README.md (`MODEL_CARD`); `config` is the saved training config (config.yaml's dict)."""
    name, base_model, flat = manifest["name"], manifest["base_model"], _flat_config(config)
    source = manifest.get("source", {})
    evaluated = "".join(_evaluation_block(group, name) for group in _by_data(evaluations))
    if manifest.get("evaluations"):
        evaluated += "Result files: " + ", ".join(f"[{f}]({f})" for f in manifest["evaluations"]) + ".\n\n"
    counted = next((r.splits for r in evaluations if r.dataset == flat.get("dataset_name") and r.root is not None
                    and Path(str(r.root)) == Path(str(flat.get("dataset_root")))  # the labelled data trained on
                    and all(isinstance(r.splits.get(k), int) for k in ("train", "test"))), None)
    last = source.get("final_epoch_metrics")
    metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (last or {}).items()
                        if k != "epoch")
    # as config.yaml spells them; a key an older version of the config lacks reads as ?
    fields = collections.defaultdict(lambda: "?", {key: _yaml_spelling(value) for key, value in flat.items()})
    fields.update(
        name=name, base_model=base_model, weights=WEIGHTS_FILE, torchvision=torchvision_file(base_model),
        arch=ARCHITECTURES.get(base_model, base_model) + (" (CIFAR stem: 3x3 conv1, no max-pool)"
                                                          if manifest["cifar_stem"] else ""),
        pretrain_split=_PRETRAIN_SPLITS.get(flat.get("dataset_name"), "pretrain"),
        size=(flat.get("dataset_input_shape") or ["?"])[0],
        counted=f"; the evaluation below counted {counted['train']:,} labelled train and {counted['test']:,} test "
                "images" if counted else "",
        **{key: "unknown" if manifest.get(key) is None else manifest[key] for key in ("epochs", "configured_epochs")},
        feature_dim=manifest["feature_dim"], out_dim=manifest["out_dim"],
        LAST_EPOCH=f"| Last epoch | {metrics} |\n" if last else "", source_checkpoint=source.get("checkpoint"),
        source_commit=source.get("git_commit") or "unknown", exported=manifest.get("exported"),
        COMMAND=(f"| Training command (as run on the training machine) | `{source['command']}` |\n"
                 if source.get("command") else ""),
        EVALUATIONS=evaluated or NO_EVALUATION.format(name=name),
        FILE_ROWS="".join(f"| {file} | {info['bytes']} | `{info['sha256']}` |\n"
                          for file, info in manifest["files"].items()),
        CIFAR_STEM=CIFAR_STEM_LINES if manifest["cifar_stem"] else "")
    return MODEL_CARD.substitute(fields)


def _by_data(evaluations: list[Results]) -> list[list[Results]]:
    """The evaluations by data, size and splits, oldest first: a card section each, so that the run's results
    (`last_<data>.json`) and the package's own (`model_<data>.json`) of the same weights share one."""
    groups: dict[str, list[Results]] = {}
    for results in sorted(evaluations, key=lambda r: r.finished or ""):
        key = json.dumps([results.dataset, results.root, results.input_size, results.splits], default=str)
        groups.setdefault(key, []).append(results)
    return list(groups.values())


def _latest_rows(evaluations: list[Results]) -> list[Row]:
    """The latest row of each (protocol, extractor) of these evaluations (oldest first), by the date of each row
    (else its file's), in the order of the newest file."""
    latest = dict.fromkeys((row.classifier, row.extractor) for r in reversed(evaluations) for row in r.rows)
    for _, row in sorted(((row.evaluated or r.finished or "", row) for r in evaluations for row in r.rows),
                         key=lambda pair: pair[0]):
        latest[row.classifier, row.extractor] = row
    return current_rows(latest.values(), {})


def _evaluation_block(group: list[Results], name: str) -> str:
    """A card section: data, splits, the latest rows of the `group`, their commands, and those on this package."""
    splits, rows = group[-1].splits, _latest_rows(group)
    fit = splits.get("fit", "train")
    if fit == "train" and isinstance(splits.get("train"), int):
        fit = f"train ({splits['train']} images)"
    # a fine-tuned row's score depends on its fine-tuning epochs too, as in the fine-tune results' own table
    columns = CARD_COLUMNS if all(row.classifier != "finetune" for row in rows) else FINETUNE_CARD_COLUMNS
    commands = [r.command for r in group if any(row in rows for row in r.rows)] or [r.command for r in group]
    here = [_package_command(command, name) for command in commands]
    made, again = (" and ".join(f"`{command}`" for command in dict.fromkeys(each)) for each in (commands, here))
    return (f"On {group[-1].dataset} ({group[-1].input_size} px), fit on {_thousands(fit)}, scored on test "
            f"({_thousands(splits.get('test', '?'))} images):\n\n{markdown_table(rows, columns)}\n\nProduced by "
            f"{made}; from this package: {again}.\n\n")


def _thousands(text) -> str:
    """`text` with each whole number of four digits or more spelled `1,437`, as the card spells every image count
    (results files written before 2026-12-05 spell `1437`)."""
    return re.sub(r"(?<![\d.])\d{4,}(?!\d|\.\d)", lambda number: f"{int(number[0]):,}", str(text))


def _package_command(command: str, name: str) -> str:
    """`command` as it reads for the package `name`: its results go to the package's eval/, not to `--out-dir`."""
    return rewrite_command(command, {"--checkpoint": name, "--out-dir": None})


LIST_COLUMNS = ("Package", "Architecture", "Data", "Epochs", "Batch", "Linear top-1 %", "KNN top-1 %", "Weights here")


def package_table(root: Path) -> str:
    """`--list`: the packages in `root` as a markdown table (`LIST_COLUMNS`), or a line saying there are none; a
    package's top-1s are its card's (the latest SimCLR rows of its eval/)."""
    lines = [f"| {' | '.join(LIST_COLUMNS)} |", "|---" * len(LIST_COLUMNS) + "|"]
    for folder in [root / name for name in list_packages(root)]:
        manifest = read_manifest(folder)
        config = {}
        with contextlib.suppress(OSError, yaml.YAMLError):
            config = _flat_config(yaml.safe_load((folder / CONFIG_FILE).read_text()))
        evaluations = _matching_evaluations(folder / EVAL_DIR, _package_digests(manifest), lambda _: None)
        top1 = {row.classifier: f"{row.top1:.1f}" for row in _latest_rows([results for _, results in evaluations])
                if row.extractor == "simclr" and row.top1 is not None}
        base_model = manifest.get("base_model")
        cells = (folder.name, ARCHITECTURES.get(base_model, base_model), config.get("dataset_name"),
                 manifest.get("epochs"), config.get("batch_size"), top1.get("lbfgs"), top1.get("knn"),
                 "yes" if (folder / WEIGHTS_FILE).is_file() else "no (download)")
        lines.append("| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else f"no packages in {root}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrained_models.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", help="run directory or run name (runs/<name>), or checkpoint .pt file")
    parser.add_argument("--as", dest="name", help="package name (default: e.g. resnet-18_40-epochs)")
    parser.add_argument("--packages-dir", help="where packages live (default: pretrained_models/)")
    parser.add_argument("--force", action="store_true", help="replace an existing package of that name")
    parser.add_argument("--list", action="store_true", help="print the packages present as a table and exit")
    parser.add_argument("--refresh", metavar="NAME",
                        help="rebuild package NAME's model card from the results in its eval/ folder and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.list and not args.refresh and not args.source:
        parser.error("pass a run directory or checkpoint to export (or --list, or --refresh NAME)")
    root = Path(args.packages_dir) if args.packages_dir else PACKAGES_DIR
    try:
        with startup.one_line_warnings():  # no CPU policy: exporting computes nothing in parallel
            if args.list:
                print(package_table(root))
            elif args.refresh:
                refresh_package(root / args.refresh)
            else:
                export_package(args.source, args.name, root=root, force=args.force)
    except BaseException as err:  # one line and its status, as startup.ERROR_POLICY says; a bug is raised again
        stopped = "stopped; no package is left half-written (each is staged in a hidden folder, then renamed)"
        return startup.report_error(err, text=stopped if isinstance(err, KeyboardInterrupt) else None)
    return startup.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
