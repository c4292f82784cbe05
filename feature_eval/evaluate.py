"""Linear-probe and KNN evaluation of a SimCLR checkpoint, with PCA and random-init baselines.

    python -m feature_eval.evaluate --checkpoint runs/<name>            # or a .pt path
    python -m feature_eval.evaluate --checkpoint runs/<name> --classifiers lbfgs,adam,knn --baselines pca,random

The encoder is frozen; features of the `train` split (fit) and the `test` split (report) are extracted
once and cached; every classifier sees the same features. Writes `<run_dir>/eval/<checkpoint>_<dataset>.md`
and `.json`. Exit status 2 with one line on stderr for a bad checkpoint, data set or option.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import startup  # standard library only

if __name__ == "__main__":  # as a command: the CPU policy goes into the environment before torch loads OpenMP
    startup.prepare_cpu(startup.device_from_argv(sys.argv[1:]), owner="feature_eval.evaluate")

import numpy as np
import torch

from data_aug.datasets import load_split
from data_aug.stl10 import DataError
from feature_eval import baselines as baseline_features
from feature_eval.classifiers import (MIN_HOLDOUT_ITEMS, ClassifierResult, adam_probe, knn_classifier, lbfgs_probe,
                                      weighted_knn)
from feature_eval.features import FeatureSplit, best_device, cached_features, data_fingerprint, extract_features
from feature_eval.plots import confusion_counts, write_evaluation_plots
from models.loading import CheckpointLoadError, file_sha256, load_encoder, read_checkpoint, resolve_checkpoint

CLASSIFIERS = ("lbfgs", "adam", "knn")
BASELINES = ("pca", "random")
DEFAULT_CLASSIFIERS = ("lbfgs", "knn")
# After training (`final_eval: true`): everything that takes seconds on small data sets.
RUN_CLASSIFIERS = ("lbfgs", "adam", "knn")
RUN_BASELINES = ("random", "pca")
EXTRACTOR_NAMES = {"simclr": "SimCLR", "random": "Random init", "pca": "PCA"}
ARCHITECTURES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}
TSNE_POINTS = 2000  # t-SNE of a seeded subsample of the test split: seconds, whatever the test set's size
COLUMNS = ("Classifier", "Feature extractor", "Architecture", "Feature dim", "Projection dim", "Epochs",
           "Top-1 %", "Top-5 %")


# What each column shows of a result row: (value, decimals or None).
CELLS = {"Classifier": lambda row: (row["classifier_name"],), "Feature extractor": lambda row: (row["extractor_name"],),
         "Architecture": lambda row: (row["architecture"],), "Feature dim": lambda row: (row["feature_dim"],),
         "Projection dim": lambda row: (row["projection_dim"],), "Epochs": lambda row: (row["epochs"],),
         "Pretrain epochs": lambda row: (row["epochs"],),
         "Fine-tune epochs": lambda row: ((row.get("details") or {}).get("finetune_epochs"),),
         "Top-1 %": lambda row: (row["top1"], 1), "Top-5 %": lambda row: (row["top5"], 1)}


class EvalError(ValueError):
    """A user error (option, data set, output folder); its message is one line that says how to fix it."""


USER_ERRORS = (EvalError, CheckpointLoadError, DataError)


@dataclass
class Evaluation:
    """What `evaluate` found.

    Attributes:
        results: JSON-able record (rows, checkpoint, data set, split sizes, seed, options, timings).
        table: the markdown table of `results["rows"]`.
        classes: class names of the data set.
        features: extractor key (`simclr`, `random`, `pca`) -> (train, test) FeatureSplit.
        outcomes: (classifier key, extractor key) -> ClassifierResult, e.g. `("lbfgs", "simclr")`.
        paths: written files (`markdown`, `json`), empty when nothing was written.
    """

    results: dict
    table: str
    classes: list[str]
    features: dict[str, tuple[FeatureSplit, FeatureSplit]]
    outcomes: dict[tuple[str, str], ClassifierResult]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def test_labels(self) -> np.ndarray:
        """int64 `[M]` labels of the test split."""
        return next(iter(self.features.values()))[1].labels.numpy()


def parse_names(text: str | tuple | list, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """`"a,b"` (or a sequence) -> `("a", "b")`, each checked against `allowed`; duplicates dropped."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise EvalError(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)} "
                        f"(comma-separated, e.g. {option} {','.join(allowed)})")
    return tuple(dict.fromkeys(names))


def default_out_dir(checkpoint_file: Path) -> Path:
    """`<run_dir>/eval` for `<run_dir>/checkpoints/<file>.pt`, else `eval/` next to the file (for a pretrained
    package, its own `eval/`, from which `pretrained_models.export --refresh` builds the model card)."""
    parent = checkpoint_file.resolve().parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def default_cache_dir(checkpoint_file: Path, out_dir: Path) -> Path:
    """`<out_dir>/cache`; for a pretrained package `runs/eval_cache/<package>`, so packages hold no caches."""
    if checkpoint_file.suffix == ".safetensors":
        return Path("runs") / "eval_cache" / checkpoint_file.resolve().parent.name
    return out_dir / "cache"


def evaluate(checkpoint: str | Path, *, dataset: str | None = None, root: str | Path | None = None,
             input_size: int | None = None, classifiers=DEFAULT_CLASSIFIERS, baselines=(), batch_size: int = 256,
             device: str | torch.device | None = None, num_workers: int = 0, out_dir: str | Path | None = None,
             write: bool = True, cache: bool = True, cache_dir: str | Path | None = None, seed: int = 0,
             C: float = 1.0, max_iter: int = 1200, knn_k: int = 10, weighted_knn_k: int = 200,
             weighted_knn_temperature: float = 0.1, download: bool = False, command: str | None = None,
             plots: bool = True, log: Callable[[str], None] = print) -> Evaluation:
    """Evaluate a checkpoint's frozen encoder: fit on the `train` split, report on `test`.

    Args:
        checkpoint: a run directory (its `checkpoints/last.pt`), a `.pt` file, or a pretrained package
            (name, folder or `model.safetensors`; see `models.loading.resolve_checkpoint`).
        dataset, root, input_size: default to the checkpoint's training config (`dataset.name`,
            `dataset.root`, `dataset.input_shape[0]`).
        classifiers: subset of `lbfgs`, `adam`, `knn` (`knn` gives two rows: the seed's k=10 Euclidean
            vote and the weighted cosine KNN); a comma-separated string works too.
        baselines: subset of `pca` (raw pixels, PCA to `model.out_dim`) and `random` (random-init encoder).
        device: where features are extracted and the Adam/KNN classifiers run (default: the best one).
        out_dir: where the table and JSON go (default `<run_dir>/eval`, or the package's `eval/`); nothing is
            written when `write` is False.
        cache, cache_dir: feature cache (default `<out_dir>/cache`, `runs/eval_cache/<package>` for a package),
            keyed by checkpoint content and split; baseline features go to `runs/eval_cache/baselines`
            (`<cache_dir>/baselines` when given), shared by every checkpoint evaluated on the same data.
        seed: random-init weights, PCA, the Adam probe's hold-out split and batch order.
        C, max_iter: the L-BFGS logistic regression's (the seed's 1.0 and 1200).
        command: the command line that asked for this evaluation, recorded in the JSON (model cards quote it).
        plots: with `write`, also draw `<stem>_tsne.png` and `<stem>_confusion.png` next to the table.

    Written results keep the rows of an earlier evaluation of the same weights, data and options in the same
    file that this one did not redo (`merge_earlier`); `Evaluation.results` and `.table` are then the merged ones.
    Returns:
        Evaluation (results dict, markdown table, features, per-row ClassifierResults, written paths).
    Raises:
        EvalError, CheckpointLoadError, DataError: user errors, each with a one-line message.
    """
    started = time.perf_counter()
    classifiers = parse_names(classifiers, CLASSIFIERS, "--classifiers")
    baselines = parse_names(baselines, BASELINES, "--baselines")
    if not classifiers:
        raise EvalError(f"--classifiers: name at least one of {', '.join(CLASSIFIERS)}")
    device = check_device(device)
    file = resolve_checkpoint(checkpoint)
    encoder = load_encoder(file, device)
    config = encoder.config if isinstance(encoder.config, dict) else {}
    data_config, model_config = config.get("dataset", {}) or {}, config.get("model", {}) or {}
    dataset = dataset or data_config.get("name")
    root = Path(root if root is not None else data_config.get("root", "data"))
    trained_size = int((data_config.get("input_shape") or [0])[0])
    input_size = int(input_size or trained_size)
    if not dataset:
        raise EvalError(f"checkpoint {file} does not name its data set: pass --dataset NAME (and --root DIR)")
    if input_size < 8:
        raise EvalError(f"input size {input_size or 'unknown'}: pass --input-size N (N >= 8, e.g. 96 for STL10)")
    train_set, test_set = _load_splits(dataset, root, download)
    if "adam" in classifiers and len(train_set) < MIN_HOLDOUT_ITEMS:
        raise EvalError(f"--classifiers adam: the train split has {len(train_set)} images, too few to tune on a "
                        f"hold-out (need {MIN_HOLDOUT_ITEMS}); use --classifiers lbfgs,knn")
    classes = list(getattr(train_set, "classes", [])) or [str(i) for i in range(int(train_set.labels.max()) + 1)]

    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(file)
    if write:
        check_writable(out_dir)  # now, not after minutes of feature extraction
    # Baselines do not depend on the checkpoint: their features are shared by every run on the same data.
    baseline_cache = ((Path(cache_dir) / "baselines" if cache_dir is not None else baseline_features.BASELINE_CACHE)
                      if cache else None)
    cache_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir(file, out_dir)) if cache else None
    digest = file_sha256(file)
    trained_epochs = read_checkpoint(file).get("next_epoch", config.get("epochs"))
    base_model = model_config.get("base_model", "resnet18")
    cifar_stem = bool(model_config.get("cifar_stem", False))
    out_dim = int(model_config.get("out_dim", 256))
    architecture = ARCHITECTURES.get(base_model, base_model) + (" (CIFAR stem)" if cifar_stem else "")
    log(f"evaluating {file} on {dataset} (train {len(train_set)}, test {len(test_set)}, {input_size}px) "
        f"on {device}; classifiers {', '.join(classifiers)}; baselines {', '.join(baselines) or 'none'}")

    timings: dict[str, float] = {}
    data_key = {"dataset": dataset, "root": str(root.resolve()), "input_size": input_size}
    fingerprints = {"train": data_fingerprint(train_set), "test": data_fingerprint(test_set)} if cache_dir else {}

    def encode(extractor: str, model: torch.nn.Module, key: dict) -> tuple[FeatureSplit, FeatureSplit]:
        tic = time.perf_counter()
        splits = tuple(cached_features(cache_dir, {**key, **data_key, "split": split, "data": fingerprints.get(split)},
                                       lambda data=data, split=split: extract_features(
                                           model, data, input_size, batch_size, device, num_workers,
                                           f"{EXTRACTOR_NAMES[extractor]} features ({split})"), log)
                       for split, data in (("train", train_set), ("test", test_set)))
        timings[f"features_{extractor}"] = round(time.perf_counter() - tic, 3)
        return splits

    features = {"simclr": encode("simclr", encoder, {"extractor": "simclr", "checkpoint_sha256": digest})}
    extractors = {"simclr": {"architecture": architecture, "feature_dim": encoder.feature_dim,
                             "projection_dim": out_dim, "epochs": trained_epochs}}
    for baseline in baselines:
        tic = time.perf_counter()
        if baseline == "random":
            features["random"] = baseline_features.random_init_features(
                base_model, cifar_stem, seed, train_set, test_set, input_size, batch_size, device, num_workers,
                baseline_cache, log)
            extractors["random"] = {"architecture": architecture, "feature_dim": encoder.feature_dim,
                                    "projection_dim": None, "epochs": 0}
        else:
            train_pca, test_pca, info = baseline_features.pca_features(
                train_set, test_set, input_size, out_dim, batch_size, num_workers, seed, baseline_cache, log)
            features["pca"] = (train_pca, test_pca)
            extractors["pca"] = {"architecture": None, "feature_dim": info["n_components"], "projection_dim": None,
                                 "epochs": None, "pca": info}
        timings[f"features_{baseline}"] = round(time.perf_counter() - tic, 3)

    protocols = _protocols(classifiers, device, len(classes), seed, C, max_iter, knn_k, weighted_knn_k,
                           weighted_knn_temperature)
    rows, outcomes = [], {}
    for key, name, protocol in protocols:
        for extractor, (train, test) in features.items():
            tic = time.perf_counter()
            outcome = protocol(train.features, train.labels, test.features, test.labels)
            seconds = round(time.perf_counter() - tic, 3)
            outcomes[key, extractor] = outcome
            facts = {k: v for k, v in extractors[extractor].items() if k != "pca"}
            rows.append({"classifier": key, "classifier_name": name, "extractor": extractor,
                         "extractor_name": EXTRACTOR_NAMES[extractor], **facts, "top1": outcome.top1,
                         "top5": outcome.top5, "seconds": seconds, "details": outcome.details})
            if extractor == "simclr":  # for the confusion picture, which is redrawn when rows are merged
                rows[-1]["confusion"] = confusion_counts(test.labels.numpy(), outcome.predictions,
                                                         len(classes)).tolist()
            log(f"{name:<34} {EXTRACTOR_NAMES[extractor]:<12} top-1 {outcome.top1:6.2f}%  top-5 "
                f"{outcome.top5:6.2f}%  ({seconds:.1f} s)")

    timings["total"] = round(time.perf_counter() - started, 3)
    results = {
        "command": command, "checkpoint": str(file), "checkpoint_sha256": digest, "trained_epochs": trained_epochs,
        "dataset": {"name": dataset, "root": str(root), "input_size": input_size, "classes": classes},
        "splits": {"fit": "train", "report": "test", "train": len(train_set), "test": len(test_set)},
        "seed": seed, "device": str(device),
        "options": {"classifiers": list(classifiers), "baselines": list(baselines), "batch_size": batch_size,
                    "C": C, "max_iter": max_iter, "knn_k": knn_k, "weighted_knn_k": weighted_knn_k,
                    "weighted_knn_temperature": weighted_knn_temperature},
        "baselines": {name: extractors[name] for name in baselines},
        "rows": rows, "timings_s": timings,
        "machine": {"host": platform.node(), "cpu_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    for row in rows:
        row["evaluated"] = results["finished"]
    evaluation = Evaluation(results, markdown_table(rows), classes, features, outcomes)
    if write:
        stem = results_stem(file, dataset, root, input_size, data_config)
        results = merge_earlier(out_dir / f"{stem}.json", results, log)
        pictures = {}
        if plots:
            tic = time.perf_counter()
            pictures = write_pictures(results, features["simclr"][1], classes, out_dir, stem, seed)
            timings["pictures"] = round(time.perf_counter() - tic, 3)
            timings["total"] = round(time.perf_counter() - started, 3)
        else:
            remove_pictures(out_dir, stem, log)
        results["pictures"] = {key: path.name for key, path in pictures.items()}
        evaluation.results, evaluation.table = results, markdown_table(results["rows"])
        evaluation.paths = {**write_results(results, evaluation.table, out_dir, stem), **pictures}
    return evaluation


# Rows of two evaluations stand in one table only when every number could have come from one run: the same
# weights, data and seed, and the same options of the row's classifier.
COMPARED = {"checkpoint_sha256": "weights (checkpoint sha256)", "data": "data (name, root, size, split sizes)",
            "seed": "--seed", "C": "--C", "max_iter": "--max-iter", "knn_k": "--knn-k",
            "weighted_knn_k": "--weighted-knn-k", "weighted_knn_temperature": "--weighted-knn-temperature"}
ROW_OPTIONS = {"lbfgs": ("C", "max_iter"), "adam": (), "knn": ("knn_k",),
               "weighted_knn": ("weighted_knn_k", "weighted_knn_temperature")}
ROW_ORDER = tuple(ROW_OPTIONS)  # the protocols' order in a table; extractors: SimCLR first, then the baselines


def _comparable(results: dict) -> dict:
    data, splits, options = results.get("dataset", {}), results.get("splits", {}), results.get("options", {})
    root = str(Path(data["root"]).resolve()) if data.get("root") else None
    return {"checkpoint_sha256": results.get("checkpoint_sha256"), "seed": results.get("seed"),
            "data": [data.get("name"), root, data.get("input_size"), splits.get("train"), splits.get("test")],
            **{k: options.get(k) for k in ("C", "max_iter", "knn_k", "weighted_knn_k", "weighted_knn_temperature")}}


def merge_earlier(path: Path, results: dict, log: Callable[[str], None] = print) -> dict:
    """`results` plus the rows of the earlier evaluation in `path` that this one did not redo.

    A row is a (classifier, feature extractor) pair: one evaluated again replaces the earlier one, and the
    others are kept when they were made with the same weights, data and seed and the same options of their
    classifier (`ROW_OPTIONS`); any other earlier row is dropped, as it could not stand beside these. Kept rows
    carry the date they were `evaluated`; `options`, `baselines` and `command` then describe all the rows (the
    command reproduces them all). `results["earlier"]` and the log say what was kept, replaced and dropped.
    """
    if not path.is_file():
        return results
    try:
        earlier = json.loads(path.read_text())
        earlier_rows = [r for r in earlier["rows"] if isinstance(r, dict) and "classifier" in r and "extractor" in r]
    except (OSError, ValueError, KeyError, TypeError):
        log(f"note: {path} was unreadable; this evaluation replaces it")
        return results
    when = earlier.get("finished")
    old, new = _comparable(earlier), _comparable(results)
    everywhere = [COMPARED[k] for k in ("checkpoint_sha256", "data", "seed") if old[k] != new[k]]
    done = {(r["classifier"], r["extractor"]) for r in results["rows"]}
    kept, redone, dropped, reasons = [], [], [], []
    for row in earlier_rows:
        changed = everywhere or [COMPARED[k] for k in ROW_OPTIONS.get(row["classifier"], ()) if old[k] != new[k]]
        if (row["classifier"], row["extractor"]) in done:
            redone.append(row)
        elif changed:
            dropped.append(row)
            reasons += [c for c in changed if c not in reasons]
        else:
            kept.append(row)
    reason = f"other {', '.join(reasons)}" if reasons else None
    told = [f"kept {len(kept)}: {'; '.join(_row_names(kept))}" if kept else "",
            f"replaced {len(redone)} evaluated again: {'; '.join(_row_names(redone))}" if redone else "",
            f"dropped {len(dropped)} made with {reason}: {'; '.join(_row_names(dropped))}" if dropped else ""]
    log(f"earlier evaluation in {path} ({when}), {len(earlier_rows)} row(s): " + "; ".join(t for t in told if t))
    record = {"finished": when, "kept": _row_names(kept), "replaced": _row_names(redone),
              "dropped": _row_names(dropped), "reason": reason}
    if not kept:
        return {**results, "earlier": record}
    for row in kept:
        row.setdefault("evaluated", when)
    earlier_options = earlier.get("options", {})
    classifiers = list(dict.fromkeys([*earlier_options.get("classifiers", []), *results["options"]["classifiers"]]))
    baselines = list(dict.fromkeys([*earlier_options.get("baselines", []), *results["options"]["baselines"]]))
    present = {r["classifier"] for r in kept + results["rows"]} | {r["extractor"] for r in kept + results["rows"]}
    classifiers = [c for c in classifiers if c in present or (c == "knn" and "weighted_knn" in present)]
    baselines = [b for b in baselines if b in present]
    extractors = ["simclr", *baselines]

    def place(row: dict) -> tuple:
        return (ROW_ORDER.index(row["classifier"]) if row["classifier"] in ROW_ORDER else len(ROW_ORDER),
                extractors.index(row["extractor"]) if row["extractor"] in extractors else len(extractors))

    return {**results, "rows": sorted(kept + results["rows"], key=place),
            "options": {**results["options"], "classifiers": classifiers, "baselines": baselines},
            "baselines": {k: v for k, v in {**earlier.get("baselines", {}), **results["baselines"]}.items()
                          if k in baselines},
            "command": _command_for(results.get("command"), classifiers, baselines), "earlier": record}


def _row_names(rows: list[dict]) -> list[str]:
    return [f"{r.get('classifier_name')} / {r.get('extractor_name')}" for r in rows]


def _command_for(command: str | None, classifiers: list[str], baselines: list[str]) -> str | None:
    """`command` with its --classifiers and --baselines replaced by these."""
    if not command:
        return command
    words, skip = [], False
    for word in shlex.split(command):
        if skip:
            skip = False
        elif word in ("--classifiers", "--baselines"):
            skip = True
        elif not word.startswith(("--classifiers=", "--baselines=")):
            words.append(word)
    words += ["--classifiers", ",".join(classifiers)] + (["--baselines", ",".join(baselines)] if baselines else [])
    return shlex.join(words)


def write_pictures(results: dict, test: FeatureSplit, classes: list[str], out_dir: Path, stem: str,
                   seed: int) -> dict[str, Path]:
    """`<stem>_tsne.png` (SimCLR test features, at most `TSNE_POINTS`, seeded) and `<stem>_confusion.png`
    (a panel per SimCLR row of `results`, merged rows included)."""
    confusions = [(f"{row['classifier_name']}: top-1 {row['top1']:.1f}%", np.asarray(row["confusion"]))
                  for row in results["rows"] if row["extractor"] == "simclr" and row.get("confusion") is not None]
    try:
        return write_evaluation_plots(out_dir, stem, test.features.numpy(), test.labels.numpy(), classes, confusions,
                                      max_points=TSNE_POINTS, seed=seed)
    except OSError as err:
        raise EvalError(f"cannot write pictures to {out_dir} ({err.strerror or err}): pass --out-dir DIR, "
                        "or --no-plots") from None


def remove_pictures(out_dir: Path, stem: str, log: Callable[[str], None] = print) -> None:
    """Remove pictures an earlier evaluation drew for this table: they need not match it any more."""
    for name in (f"{stem}_tsne.png", f"{stem}_confusion.png"):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            log(f"removed {out_dir / name}: drawn for an earlier table (drop --no-plots to draw it again)")


def results_stem(checkpoint_file: Path, dataset: str, root: Path, input_size: int, trained: dict) -> str:
    """`<checkpoint>_<dataset>`, then `_<root folder>` when the data's root is not the one trained on and
    `_<size>px` when the input size is not: other data or another size never overwrite the training data's
    results. `trained` is the checkpoint's `dataset` config (`root`, `input_shape`)."""
    stem = f"{checkpoint_file.stem}_{dataset}"
    if Path(root).resolve() != Path(trained.get("root") or "data").resolve():
        stem += "_" + (re.sub(r"[^A-Za-z0-9._-]+", "-", Path(root).resolve().name) or "root")
    if input_size != int((trained.get("input_shape") or [0])[0]):
        stem += f"_{input_size}px"
    return stem


def check_writable(folder: Path) -> None:
    """EvalError unless `folder` exists or can be made, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise EvalError(f"cannot write results to {folder} ({err.strerror or err}): pass --out-dir DIR") from None


def check_device(device) -> torch.device:
    """The device named by a `--device` option (`auto`: the best one here); EvalError if it is not usable."""
    if device is None or str(device) == "auto":
        return best_device()
    try:
        device = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")
    return device


def _load_splits(dataset: str, root: Path, download: bool):
    try:
        train_set = load_split(dataset, root, "train", download=download)
        test_set = load_split(dataset, root, "test", download=download)
    except ValueError as err:  # unknown data set name
        raise EvalError(f"--dataset {dataset}: {err}; choose stl10, cifar10, cifar100, imagefolder or digits") from None
    except DataError as err:  # the loaders speak of the training config's key; here it is an option
        raise DataError(str(err).replace("set dataset.download: true", "pass --download")) from None
    if len(test_set) == 0:
        raise EvalError(f"{dataset} under {root} has an empty test split")
    present = torch.unique(train_set.labels)
    if len(present) < 2 or int(present.min()) < 0:
        raise EvalError(f"{dataset} under {root}: the train split needs labelled images of at least two classes "
                        f"(found {len(present)} label value(s))")
    return train_set, test_set


def _protocols(classifiers, device, num_classes, seed, C, max_iter, knn_k, weighted_k, temperature) -> list:
    """(key, display name, function(train_x, train_y, test_x, test_y) -> ClassifierResult) for each row."""
    rows = []
    for name in classifiers:
        if name == "lbfgs":
            rows.append(("lbfgs", "Logistic regression (L-BFGS)",
                         lambda a, b, c, d: lbfgs_probe(a, b, c, d, num_classes=num_classes, C=C, max_iter=max_iter,
                                                        seed=seed)))
        elif name == "adam":
            rows.append(("adam", "Linear (Adam, hold-out tuned)",
                         lambda a, b, c, d: adam_probe(a, b, c, d, num_classes=num_classes, seed=seed, device=device)))
        elif name == "knn":
            rows.append(("knn", f"KNN (k={knn_k}, Euclidean)",
                         lambda a, b, c, d: knn_classifier(a, b, c, d, num_classes=num_classes, k=knn_k,
                                                           device=device)))
            rows.append(("weighted_knn", f"Weighted KNN (k={weighted_k}, T={temperature:g})",
                         lambda a, b, c, d: weighted_knn(a, b, c, d, num_classes=num_classes, k=weighted_k,
                                                         temperature=temperature, device=device)))
    return rows


def markdown_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """The seed's columns (classifier, feature extractor, architecture, feature dim, projection dim, epochs,
    top-1/5), or `columns` named in `CELLS` (fine-tuning shows pretraining and fine-tuning epochs apart)."""
    def cell(value, digits: int | None = None) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if digits is not None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(*CELLS[column](row)) for column in columns) + " |")
    return "\n".join(lines)


def write_results(results: dict, table: str, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `<out_dir>/<stem>.md` (a caption and the table) and `<out_dir>/<stem>.json`."""
    data = results["dataset"]
    caption = (f"Frozen features of `{results['checkpoint']}` on {data['name']} ({data['input_size']}px): fit on "
               f"train ({results['splits']['train']}), scored on test ({results['splits']['test']}); seed "
               f"{results['seed']}, {results['timings_s']['total']:.0f} s on {results['device']}.")
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json"}
    notes = [how_to_read(results["rows"])]
    earlier = results.get("earlier") or {}
    if earlier.get("kept"):
        notes.append(f"Kept from the evaluation of {earlier['finished']} (not redone by this one, whose rows are "
                     f"dated {results['finished']} in the JSON): {'; '.join(earlier['kept'])}.")
    if earlier.get("dropped"):
        notes.append(f"Dropped from the evaluation of {earlier['finished']}, as made with {earlier['reason']}: "
                     f"{'; '.join(earlier['dropped'])}.")
    pictures = results.get("pictures") or {}
    if pictures.get("tsne"):
        notes.append(f"![t-SNE of the SimCLR test features, coloured by class]({pictures['tsne']})")
    if pictures.get("confusion"):
        notes.append(f"![Confusion matrices of the SimCLR rows]({pictures['confusion']})")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths["markdown"].write_text(caption + "\n\n" + table + "\n\n" + "\n\n".join(notes) + "\n")
        text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
        # a list of numbers on one line: a confusion matrix reads as rows, not as one number a line
        text = re.sub(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]",
                      lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        paths["json"].write_text(text + "\n")
    except OSError as err:
        raise EvalError(f"cannot write results to {out_dir} ({err.strerror or err}): pass --out-dir DIR") from None
    return paths


def how_to_read(rows: list[dict]) -> str:
    """One sentence on reading the SimCLR rows against the baselines in `rows` (or on adding them)."""
    present = {row["extractor"] for row in rows}
    parts = []
    if "random" in present:
        parts.append("*Random init* is this network untrained (the gap to it is what pretraining learned)")
    if "pca" in present:
        parts.append("*PCA* of the raw pixels is a floor that useful features must clear")
    if not parts:
        return ("How to read it: with no baselines these numbers stand alone; add `--baselines random,pca` to see "
                "what pretraining adds over the untrained network and over raw pixels.")
    return "How to read it: compare each SimCLR row with the rows of the same classifier under it: " + \
        "; ".join(parts) + "."


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def evaluate_run(run_dir: str | Path, log: Callable[[str], None] = print) -> Evaluation | None:
    """The evaluation `run.py` runs after training (`final_eval: true`): all classifiers, random and PCA baselines.

    Prints the table and writes it to `<run_dir>/eval/`. A user error (data set missing, ...) is printed
    as one line and gives None: the training run itself has succeeded.
    """
    try:
        command = (f"python -m feature_eval.evaluate --checkpoint {shlex.quote(str(run_dir))} --classifiers "
                   f"{','.join(RUN_CLASSIFIERS)} --baselines {','.join(RUN_BASELINES)}")
        evaluation = evaluate(run_dir, classifiers=RUN_CLASSIFIERS, baselines=RUN_BASELINES, command=command, log=log)
    except USER_ERRORS as err:
        print(f"final_eval: error: {err}", file=sys.stderr)
        return None
    log(evaluation.table)
    pictures = [str(evaluation.paths[key]) for key in ("tsne", "confusion") if key in evaluation.paths]
    log(f"final_eval: {evaluation.results['timings_s']['total']:.1f} s; wrote {evaluation.paths['markdown']} "
        f"and {evaluation.paths['json']}" + (f"; pictures {' and '.join(pictures)}" if pictures else ""))
    return evaluation


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m feature_eval.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (runs/<name>), checkpoint .pt file, or pretrained package name/folder")
    parser.add_argument("--classifiers", default=",".join(DEFAULT_CLASSIFIERS),
                        help=f"comma-separated, from {','.join(CLASSIFIERS)} (default: %(default)s)")
    parser.add_argument("--baselines", default="none",
                        help="comma-separated, from pca,random, or none (default); pca is slow on large images")
    parser.add_argument("--dataset", help="data set name (default: the checkpoint's dataset.name)")
    parser.add_argument("--root", help="data set folder (default: the checkpoint's dataset.root)")
    parser.add_argument("--input-size", type=int, help="eval crop size (default: the checkpoint's input_shape)")
    parser.add_argument("--download", action="store_true", help="download the data set if it is missing")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (lower it on OOM)")
    parser.add_argument("--num-workers", type=int, default=0, help="decoding workers for image folders")
    parser.add_argument("--out-dir", help="where to write the table and JSON (default: <run_dir>/eval)")
    parser.add_argument("--cache-dir", help="feature cache folder (default: <out-dir>/cache; "
                        "runs/eval_cache/<package> for a package; baselines: runs/eval_cache/baselines, shared by "
                        "every run on the same data)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    parser.add_argument("--no-plots", action="store_true", help="draw no t-SNE and confusion-matrix PNGs (the "
                        "t-SNE takes seconds: it embeds at most 2,000 test images)")
    parser.add_argument("--seed", type=int, default=0, help="random-init weights, PCA, Adam hold-out and batches")
    parser.add_argument("--C", type=float, default=1.0, help="L-BFGS logistic regression inverse L2 strength")
    parser.add_argument("--max-iter", type=int, default=1200, help="L-BFGS iterations (the seed's 1200)")
    parser.add_argument("--knn-k", type=int, default=10, help="neighbours of the seed's KNN (default 10)")
    parser.add_argument("--weighted-knn-k", type=int, default=200, help="neighbours of the weighted KNN")
    parser.add_argument("--weighted-knn-temperature", type=float, default=0.1, help="weighted KNN temperature")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_iter", "knn_k", "weighted_knn_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.input_size is not None and args.input_size < 8:
        parser.error("--input-size must be at least 8 (e.g. 96 for STL10)")
    if args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    if not args.C > 0 or not args.weighted_knn_temperature > 0:
        parser.error("--C and --weighted-knn-temperature must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        with startup.one_line_warnings():
            evaluation = evaluate(args.checkpoint, dataset=args.dataset, root=args.root, input_size=args.input_size,
                                  classifiers=args.classifiers, baselines=args.baselines, batch_size=args.batch_size,
                                  device=args.device, num_workers=args.num_workers, out_dir=args.out_dir,
                                  cache=not args.no_cache, cache_dir=args.cache_dir, seed=args.seed, C=args.C,
                                  max_iter=args.max_iter, knn_k=args.knn_k, weighted_knn_k=args.weighted_knn_k,
                                  weighted_knn_temperature=args.weighted_knn_temperature, download=args.download,
                                  plots=not args.no_plots,
                                  command=shlex.join(["python", "-m", "feature_eval.evaluate", *argv]))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_written(evaluation.table, evaluation.paths, evaluation.results)
    return 0


def print_written(table: str, paths: dict[str, Path], results: dict) -> None:
    """The end of a CLI run (here and in feature_eval.finetune): the table, the files written, the time taken."""
    print(table)
    print(f"wrote {paths['markdown']} and {paths['json']} ({results['timings_s']['total']:.1f} s)")
    pictures = [str(paths[key]) for key in ("tsne", "confusion") if key in paths]
    if pictures:
        print(f"pictures: {' and '.join(pictures)}")


if __name__ == "__main__":
    sys.exit(main())
