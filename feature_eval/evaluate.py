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

import numpy as np
import torch

from data_aug.datasets import load_split
from data_aug.stl10 import DataError
from feature_eval.baselines import pca_baseline, random_encoder
from feature_eval.classifiers import (MIN_HOLDOUT_ITEMS, ClassifierResult, adam_probe, knn_classifier, lbfgs_probe,
                                      weighted_knn)
from feature_eval.features import FeatureSplit, best_device, cached_features, data_fingerprint, extract_features
from models.loading import CheckpointLoadError, file_sha256, load_encoder, read_checkpoint, resolve_checkpoint

CLASSIFIERS = ("lbfgs", "adam", "knn")
BASELINES = ("pca", "random")
DEFAULT_CLASSIFIERS = ("lbfgs", "knn")
# After training (`final_eval: true`): everything that takes seconds on small data sets.
RUN_CLASSIFIERS = ("lbfgs", "adam", "knn")
RUN_BASELINES = ("random", "pca")
EXTRACTOR_NAMES = {"simclr": "SimCLR", "random": "Random init", "pca": "PCA"}
ARCHITECTURES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}
COLUMNS = ("Classifier", "Feature extractor", "Architecture", "Feature dim", "Projection dim", "Epochs",
           "Top-1 %", "Top-5 %")


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
             log: Callable[[str], None] = print) -> Evaluation:
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
            keyed by checkpoint content and split.
        seed: random-init weights, PCA, the Adam probe's hold-out split and batch order.
        C, max_iter: the L-BFGS logistic regression's (the seed's 1.0 and 1200).
        command: the command line that asked for this evaluation, recorded in the JSON (model cards quote it).
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
            model = random_encoder(base_model, cifar_stem, seed)
            features["random"] = encode("random", model, {"extractor": "random", "base_model": base_model,
                                                          "cifar_stem": cifar_stem, "seed": seed,
                                                          "torch": torch.__version__})
            extractors["random"] = {"architecture": architecture, "feature_dim": model.feature_dim,
                                    "projection_dim": None, "epochs": 0}
        else:
            train_pca, test_pca, info = pca_baseline(train_set, test_set, input_size, out_dim, batch_size,
                                                     num_workers, seed)
            features["pca"] = (train_pca, test_pca)
            timings["features_pca"] = round(time.perf_counter() - tic, 3)
            extractors["pca"] = {"architecture": None, "feature_dim": info["n_components"], "projection_dim": None,
                                 "epochs": None, "pca": info}

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
    table = markdown_table(rows)
    evaluation = Evaluation(results, table, classes, features, outcomes)
    if write:
        evaluation.paths = write_results(results, table, out_dir, results_stem(file, dataset, root, input_size,
                                                                              data_config))
    return evaluation


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


def markdown_table(rows: list[dict]) -> str:
    """The seed's columns: classifier, feature extractor, architecture, feature dim, projection dim, epochs, top-1/5."""
    def cell(value, digits: int | None = None) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if digits is not None else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row["classifier_name"], row["extractor_name"], cell(row["architecture"]),
                                        cell(row["feature_dim"]), cell(row["projection_dim"]), cell(row["epochs"]),
                                        cell(row["top1"], 1), cell(row["top5"], 1)]) + " |")
    return "\n".join(lines)


def write_results(results: dict, table: str, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `<out_dir>/<stem>.md` (a caption and the table) and `<out_dir>/<stem>.json`."""
    data = results["dataset"]
    caption = (f"Frozen features of `{results['checkpoint']}` on {data['name']} ({data['input_size']}px): fit on "
               f"train ({results['splits']['train']}), scored on test ({results['splits']['test']}); seed "
               f"{results['seed']}, {results['timings_s']['total']:.0f} s on {results['device']}.")
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths["markdown"].write_text(caption + "\n\n" + table + "\n")
        paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False, default=_json_default) + "\n")
    except OSError as err:
        raise EvalError(f"cannot write results to {out_dir} ({err.strerror or err}): pass --out-dir DIR") from None
    return paths


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
    log(f"final_eval: {evaluation.results['timings_s']['total']:.1f} s; wrote {evaluation.paths['markdown']} "
        f"and {evaluation.paths['json']}")
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
                        "runs/eval_cache/<package> for a package)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
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
        evaluation = evaluate(args.checkpoint, dataset=args.dataset, root=args.root, input_size=args.input_size,
                              classifiers=args.classifiers, baselines=args.baselines, batch_size=args.batch_size,
                              device=args.device, num_workers=args.num_workers, out_dir=args.out_dir,
                              cache=not args.no_cache, cache_dir=args.cache_dir, seed=args.seed, C=args.C,
                              max_iter=args.max_iter, knn_k=args.knn_k, weighted_knn_k=args.weighted_knn_k,
                              weighted_knn_temperature=args.weighted_knn_temperature, download=args.download,
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


if __name__ == "__main__":
    sys.exit(main())
