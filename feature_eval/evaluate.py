"""Linear-probe and KNN evaluation of a SimCLR checkpoint's frozen encoder, with PCA and random-init baselines.

    python -m feature_eval.evaluate --checkpoint runs/<name> --classifiers lbfgs,adam,knn --baselines pca,random

Fits on `train`, scores on `test`; writes `<run_dir>/eval/<checkpoint>_<dataset>.md`, `.json` and pictures
(docs/EVALUATION.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import startup  # standard library only

if __name__ == "__main__":  # as a command: the CPU policy goes into the environment before torch loads OpenMP
    startup.prepare_cpu(startup.device_from_argv(sys.argv[1:]), owner="feature_eval.evaluate")
    startup.exit_if_torch_is_broken()  # a mismatched torch/torchvision pair: one line, not a traceback

import numpy as np

from data_aug.view_grid import save_png
from data_aug.views import create_eval_resize
from feature_eval import baselines as baseline_features
from feature_eval.classifiers import (MIN_HOLDOUT_ITEMS, ClassifierResult, adam_probe, knn_classifier, lbfgs_probe,
                                      weighted_knn)
from feature_eval.context import (EvalContext, EvalError, RunOptions, open_context, option, parse_names, parse_options,
                                  run_cli, summary)
from feature_eval.features import FeatureSplit, encoder_features
from feature_eval.plots import confusion_counts, draw_neighbours, write_evaluation_plots
from feature_eval.results import (Row, current_rows, data_key, log_row, markdown_table, read_results, rewrite_command,
                                  table_caption, write_results)
from knn.neighbours import cosine_neighbours

CLASSIFIERS = ("lbfgs", "adam", "knn")
BASELINES = ("pca", "random")
DEFAULT_CLASSIFIERS = ("lbfgs", "knn")
# After training (`final_eval: true`): everything that takes seconds on small data sets.
RUN_CLASSIFIERS = ("lbfgs", "adam", "knn")
RUN_BASELINES = ("random", "pca")
TSNE_POINTS = 2000  # t-SNE of a seeded subsample of the test split: seconds, whatever the test set's size
NEIGHBOUR_QUERIES, NEIGHBOURS = 8, 8  # neighbours.png: seeded test images (rows), nearest train images of each
# The pictures next to a table (`<stem>_<key>.png`) and what the markdown says of each.
PICTURES = {"tsne": "t-SNE of the SimCLR test features, coloured by class",
            "confusion": "Confusion matrices of the SimCLR rows",
            "neighbours": "Test images and their nearest train images (cosine), SimCLR and random-init features"}


@dataclass(frozen=True, kw_only=True)
class EvalOptions(RunOptions):
    """`RunOptions` plus what the linear and KNN protocols are asked; `classifiers` and `baselines` (comma-separated
    or a tuple) become checked tuples of names."""

    classifiers: str | tuple[str, ...] = option(DEFAULT_CLASSIFIERS, "comma-separated, from lbfgs,adam,knn "
                                                "(default: lbfgs,knn); knn: the Euclidean and the weighted cosine KNN")
    baselines: str | tuple[str, ...] = option((), "comma-separated, from pca (raw pixels, PCA to model.out_dim) and "
                                                  "random (the encoder untrained), or none")
    batch_size: int = option(256, "images per forward pass (default 256; lower it on OOM)", bound=">= 1")
    num_workers: int = option(0, "decoding workers for image folders", bound=">= 0")
    cache: bool = option(True, "neither read nor write cached features")
    cache_dir: str | Path | None = option(None, "feature cache (default: <out-dir>/cache; runs/eval_cache/<package> "
                                          "for a package)")
    # C=1.0 and 1200 iterations: the original repository's logistic regression, so its numbers compare
    C: float = option(1.0, "L-BFGS logistic regression inverse L2 strength (default 1.0)", bound="> 0")
    max_iter: int = option(1200, "L-BFGS iterations (default 1200)", bound=">= 1")
    knn_k: int = option(10, "neighbours of the Euclidean KNN vote (default 10)", bound=">= 1")
    weighted_knn_k: int = option(200, "neighbours of the weighted KNN (default 200)", bound=">= 1")
    weighted_knn_temperature: float = option(0.1, "weighted KNN temperature (default 0.1)", bound="> 0")
    plots: bool = option(True, "draw no t-SNE, confusion-matrix and neighbours PNGs")

    def __post_init__(self):
        object.__setattr__(self, "classifiers", parse_names(self.classifiers, CLASSIFIERS, "--classifiers"))
        object.__setattr__(self, "baselines", parse_names(self.baselines, BASELINES, "--baselines"))
        if not self.classifiers:
            raise EvalError(f"--classifiers: name at least one of {', '.join(CLASSIFIERS)}")
        super().__post_init__()


@dataclass
class Evaluation:
    """What `evaluate` found; `features`: extractor -> (train, test), `outcomes`: (classifier, extractor) -> result."""

    results: dict
    rows: list[Row]
    table: str
    classes: list[str]
    features: dict[str, tuple[FeatureSplit, FeatureSplit]]
    outcomes: dict[tuple[str, str], ClassifierResult]
    paths: dict[str, Path] = field(default_factory=dict)


def evaluate(checkpoint: str | Path, options: EvalOptions | None = None, *, log: Callable[[str], None] = print,
             **fields) -> Evaluation:
    """Evaluate a checkpoint's frozen encoder (anything `open_context` opens): fit on `train`, report on `test`.
    `options` (`EvalOptions`) or its fields as keywords (`evaluate(run, classifiers="knn", device="cpu")`). Raises
    EvalError, CheckpointLoadError, DataError: user errors, in one line each."""
    started = time.perf_counter()
    o = EvalOptions.of("feature_eval.evaluate", checkpoint, options, **fields)
    ctx = open_context(checkpoint, o)
    if "adam" in o.classifiers and len(ctx.train_set) < MIN_HOLDOUT_ITEMS:
        raise EvalError(f"--classifiers adam: the train split has {len(ctx.train_set)} images, too few to tune on a "
                        f"hold-out (need {MIN_HOLDOUT_ITEMS}); use --classifiers lbfgs,knn")
    log(f"evaluating {ctx.checkpoint} on {ctx.dataset} (train {len(ctx.train_set):,}, test {len(ctx.test_set):,}, "
        f"{ctx.input_size}px) on {ctx.device}; classifiers {', '.join(o.classifiers)}; baselines "
        f"{', '.join(o.baselines) or 'none'}")
    timings: dict[str, float] = {}
    features, extractors = extract_all(ctx, o, timings, log)
    protocols = _protocols(ctx, o)  # `knn` asks for both KNN rows
    rows, outcomes = score(ctx, features, extractors, {key: protocol for key, protocol in protocols.items()
                                                       if key.replace("weighted_", "") in o.classifiers}, log)
    timings["total"] = round(time.perf_counter() - started, 3)
    results = ctx.record(o, {"fit": "train", "train": len(ctx.train_set), "test": len(ctx.test_set)},
                         o.recorded("classifiers", "baselines", "batch_size", "C", "max_iter", "knn_k",
                                    "weighted_knn_k", "weighted_knn_temperature"),
                         timings, baselines={name: extractors[name] for name in o.baselines})
    rows, notes, stem = [replace(row, evaluated=results["finished"]) for row in rows], [], ctx.results_stem()
    if o.write:  # into the table of the same file
        rows, notes = _add_to_table(ctx.out_dir / f"{stem}.json", results, rows,
                                    {key: protocol[2] for key, protocol in protocols.items()}, log)
    results["rows"] = [row.to_json() for row in rows]
    evaluation = Evaluation(results, rows, markdown_table(rows), ctx.classes, features, outcomes)
    if o.write:
        evaluation.paths = _write(evaluation, ctx, o, stem, notes, started, log)
    return evaluation


def extract_all(ctx: EvalContext, o: EvalOptions, timings: dict, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Extractor -> (train, test) FeatureSplit, and -> its facts (a row's columns; PCA's `pca`), for SimCLR and each
    baseline; `timings` gets their seconds."""
    model = ctx.config.model
    if o.cache_dir is not None:
        cache_dir, baseline_cache = Path(o.cache_dir), Path(o.cache_dir) / "baselines"
    else:  # a package holds no caches: its features go to runs/eval_cache/<package>
        package = ctx.checkpoint.resolve().parent.name if ctx.checkpoint.suffix == ".safetensors" else None
        cache_dir = Path("runs") / "eval_cache" / package if package is not None else ctx.out_dir / "cache"
        # Baselines do not depend on the checkpoint: their features are shared by every run on the same data.
        baseline_cache = baseline_features.BASELINE_CACHE
    cache_dir, baseline_cache = (cache_dir, baseline_cache) if o.cache else (None, None)
    tic = time.perf_counter()
    # no data root: the splits' content digests say which data (a copied or moved run reuses its cache)
    key = {"extractor": "simclr", "checkpoint_sha256": ctx.checkpoint_sha256, "dataset": ctx.dataset,
           "input_size": ctx.input_size}
    features = {"simclr": encoder_features(ctx.encoder, "SimCLR", key, {"train": ctx.train_set, "test": ctx.test_set},
                                           ctx.input_size, o.batch_size, ctx.device, o.num_workers, cache_dir, log)}
    timings["features_simclr"] = round(time.perf_counter() - tic, 3)
    extractors = {"simclr": {"architecture": ctx.architecture, "feature_dim": ctx.encoder.feature_dim,
                             "projection_dim": model.out_dim, "epochs": ctx.trained_epochs}}
    for baseline in o.baselines:
        tic = time.perf_counter()
        if baseline == "random":
            features["random"] = baseline_features.random_init_features(
                model.base_model, model.cifar_stem, o.seed, ctx.train_set, ctx.test_set, ctx.input_size,
                o.batch_size, ctx.device, o.num_workers, baseline_cache, log)
            extractors["random"] = {**extractors["simclr"], "projection_dim": None, "epochs": 0}
        else:
            train_pca, test_pca, info = baseline_features.pca_features(
                ctx.train_set, ctx.test_set, ctx.input_size, model.out_dim, o.batch_size, o.num_workers, o.seed,
                baseline_cache, log)
            features["pca"] = (train_pca, test_pca)
            extractors["pca"] = {"architecture": None, "feature_dim": info["n_components"], "projection_dim": None,
                                 "epochs": None, "pca": info}
        timings[f"features_{baseline}"] = round(time.perf_counter() - tic, 3)
    return features, extractors


def score(ctx: EvalContext, features: dict, extractors: dict, protocols: dict,
          log: Callable[[str], None]) -> tuple[list[Row], dict]:
    """Each protocol (key -> (name, function, settings)) on each extractor's features: the rows, their outcomes."""
    rows, outcomes = [], {}
    for key, (name, protocol, settings) in protocols.items():
        for extractor, (train, test) in features.items():
            tic = time.perf_counter()
            outcome = outcomes[key, extractor] = protocol(train.features, train.labels, test.features, test.labels)
            # the SimCLR rows' confusion counts: their picture is redrawn when a later evaluation adds rows
            confusion = confusion_counts(test.labels.numpy(), outcome.predictions, len(ctx.classes)).tolist() \
                if extractor == "simclr" else None
            facts = {k: v for k, v in extractors[extractor].items() if k != "pca"}
            rows.append(Row(key, name, extractor, **facts, top1=outcome.top1, top5=outcome.top5,
                            seconds=round(time.perf_counter() - tic, 3), details=outcome.details,
                            settings=settings, confusion=confusion))
            log_row(log, rows[-1])
    return rows, outcomes


def _write(evaluation: Evaluation, ctx: EvalContext, o: EvalOptions, stem: str, notes: list[str], started: float,
           log: Callable[[str], None]) -> dict[str, Path]:
    """Draw the pictures, write table and JSON (`notes` under the table); returns the files written."""
    results, rows, pictures = evaluation.results, evaluation.rows, {}
    if o.plots:
        tic = time.perf_counter()
        pictures = write_pictures(rows, evaluation.features, ctx, stem, o.seed, log)
        results["timings_s"].update(pictures=round(time.perf_counter() - tic, 3),
                                    total=round(time.perf_counter() - started, 3))
    else:  # those of an earlier table need not match this one
        for path in (ctx.out_dir / f"{stem}_{key}.png" for key in PICTURES):
            if path.is_file():
                path.unlink()
                log(f"removed {path}: drawn for an earlier table (drop --no-plots to draw it again)")
    results["pictures"] = {key: path.name for key, path in pictures.items()}
    notes = [how_to_read({row.extractor for row in rows}), *notes,
             *(f"![{PICTURES[key]}]({path.name})" for key, path in pictures.items())]
    line = table_caption(results, f"Frozen features of `{results['checkpoint']}`",
                         f"train ({results['splits']['train']:,})")
    return {**write_results(results, evaluation.table, ctx.out_dir, stem, line, notes), **pictures}


def _add_to_table(path: Path, results: dict, rows: list[Row], settings: dict[str, dict],
                  log: Callable[[str], None]) -> tuple[list[Row], list[str]]:
    """The table of the earlier JSON at `path` with `rows` added (`current_rows`: a row made again replaces itself),
    and the notes naming the rows kept from earlier evaluations and those dropped as made under settings other than
    `settings` (the log says how many). Where rows are kept, `results`' options and command are made to cover them."""
    try:
        earlier = read_results(path) if path.is_file() else None
    except (OSError, ValueError):
        log(f"note: {path} was unreadable; this evaluation replaces it")
        earlier = None
    if earlier is None:  # `rows` come in the table's order, one per protocol and extractor
        return rows, []
    table = current_rows([*earlier.rows, *rows], settings)
    kept = [row for row in table if row not in rows]
    dropped = [row for row in earlier.rows if not row.fits(settings.get(row.classifier, {}))]
    changed = ", ".join(dict.fromkeys(key for row in dropped for key, value in settings[row.classifier].items()
                                      if row.settings.get(key) != value))
    log(f"added to the table of {path.name}: kept {len(kept)} earlier row(s), dropped {len(dropped)}"
        + (f" (made with other {changed})" if dropped else ""))
    if kept:  # the options and command cover every row, so the command makes this table again
        classifiers = list(dict.fromkeys("knn" if r.classifier == "weighted_knn" else r.classifier for r in table))
        baselines = list(dict.fromkeys(r.extractor for r in table if r.extractor != "simclr"))
        facts = {**(earlier.record.get("baselines") or {}), **results["baselines"]}
        results.update(options={**results["options"], "classifiers": classifiers, "baselines": baselines},
                       baselines={name: facts[name] for name in baselines if name in facts},
                       command=rewrite_command(results["command"], {"--classifiers": ",".join(classifiers),
                                                                    "--baselines": ",".join(baselines) or None}))
    return table, [f"{text}: {'; '.join(f'{row.name} ({row.evaluated})' for row in named)}." for text, named in (
        ("Kept from earlier evaluations (not redone by this one)", kept),
        (f"Dropped, as made with other {changed}", dropped)) if named]


def write_pictures(rows: list[Row], features: dict, ctx: EvalContext, stem: str, seed: int,
                   log: Callable[[str], None] = print) -> dict[str, Path]:
    """`<stem>_tsne.png`, `<stem>_confusion.png` (a panel per SimCLR row of the table) and `<stem>_neighbours.png`,
    unless the table keeps random-init rows this evaluation has no features for: their comparison then stays."""
    test = features["simclr"][1]
    confusions = [(f"{row.classifier_name}: top-1 {row.top1:.1f}%", np.asarray(row.confusion))
                  for row in rows if row.extractor == "simclr" and row.confusion is not None]
    neighbours = ctx.out_dir / f"{stem}_neighbours.png"
    try:
        pictures = write_evaluation_plots(ctx.out_dir, stem, test.features.numpy(), test.labels.numpy(), ctx.classes,
                                          confusions, max_points=TSNE_POINTS, seed=seed)
        if "random" not in features and any(row.extractor == "random" for row in rows) and neighbours.is_file():
            log(f"kept {neighbours}, drawn by an earlier evaluation: this one has no random-init features for the "
                "table's random-init rows (--baselines random draws it again)")
        else:
            queries, labels, panels = neighbour_panels(features, ctx.train_set, ctx.test_set, ctx.input_size, seed)
            missing = "" if len(panels) > 1 else " (evaluate with --baselines random for the random-init panel)"
            save_png(draw_neighbours(queries, labels, panels, ctx.classes, f"{ctx.dataset}: test images (left) and "
                                     f"their nearest train images by cosine similarity of the features{missing}"),
                     neighbours)
        return {**pictures, "neighbours": neighbours}
    except OSError as err:
        raise EvalError(f"cannot write pictures to {ctx.out_dir} ({err.strerror or err}): pass --out-dir DIR, "
                        "or --no-plots") from None


def neighbour_panels(features: dict, train_set, test_set, input_size: int, seed: int) -> tuple:
    """Seeded test images and their nearest train images (cosine, as the weighted KNN) under the SimCLR and, when
    evaluated, the random-init features, at the evaluation view: `draw_neighbours`' arguments."""
    resize = create_eval_resize(input_size)

    def images(dataset, index) -> np.ndarray:
        return np.stack([resize(dataset[int(i)][0]).numpy() for i in index])

    test_labels = features["simclr"][1].labels
    rows = np.sort(np.random.default_rng(seed).permutation(len(test_labels))[:NEIGHBOUR_QUERIES])
    panels = []
    for key, name in (("simclr", "SimCLR"), ("random", "random init")):
        if key in features:
            train, test = features[key]
            _, index = cosine_neighbours(train.features, test.features[rows], NEIGHBOURS)  # (Q, k)
            found = images(train_set, index.flatten()).reshape(*index.shape, 3, input_size, input_size)
            panels.append((name, found, train.labels[index].numpy()))
    return images(test_set, rows), test_labels[rows].numpy(), panels


def _protocols(ctx: EvalContext, o: EvalOptions) -> dict[str, tuple[str, Callable, dict]]:
    """Each row's protocol: key -> (display name, function(train_x, train_y, test_x, test_y) -> ClassifierResult,
    the settings its numbers depend on: the same weights, data and seed, and the options of its protocol)."""
    n, device, k, t = len(ctx.classes), ctx.device, o.weighted_knn_k, o.weighted_knn_temperature
    same = {"weights": ctx.checkpoint_sha256, "--seed": o.seed,
            "data": data_key(ctx.dataset, ctx.root, ctx.input_size, len(ctx.train_set), len(ctx.test_set))}
    return {"lbfgs": ("Logistic regression (L-BFGS)", partial(lbfgs_probe, num_classes=n, C=o.C, max_iter=o.max_iter,
                      seed=o.seed), {**same, "--C": o.C, "--max-iter": o.max_iter}),
            "adam": ("Linear (Adam, hold-out tuned)", partial(adam_probe, num_classes=n, seed=o.seed, device=device),
                     same),
            "knn": (f"KNN (k={o.knn_k}, Euclidean)", partial(knn_classifier, num_classes=n, k=o.knn_k, device=device),
                    {**same, "--knn-k": o.knn_k}),
            "weighted_knn": (f"Weighted KNN (k={k}, T={t:g})", partial(weighted_knn, num_classes=n, k=k, temperature=t,
                             device=device), {**same, "--weighted-knn-k": k, "--weighted-knn-temperature": t})}


def how_to_read(present: set[str]) -> str:
    """One sentence on reading the SimCLR rows against the baselines `present` (or on adding them)."""
    parts = [text for key, text in (
        ("random", "*Random init* is this network untrained (the gap to it is what pretraining learned)"),
        ("pca", "*PCA* of the raw pixels is a floor that useful features must clear")) if key in present]
    return ("How to read it: compare each SimCLR row with the rows of the same classifier under it: " +
            "; ".join(parts) + "." if parts else "How to read it: with no baselines these numbers stand alone; add "
            "`--baselines random,pca` to see what pretraining adds over the untrained network and over raw pixels.")


def rerun_command(run_dir: str | Path) -> str:
    """The command of `evaluate_run`'s evaluation of `run_dir` (run.py prints it when that evaluation fails)."""
    options = EvalOptions(classifiers=RUN_CLASSIFIERS, baselines=RUN_BASELINES)
    return options.command_line("feature_eval.evaluate", run_dir)


def evaluate_run(run_dir: str | Path, log: Callable[[str], None] = print) -> Evaluation:
    """The evaluation `run.py` runs after training (`final_eval: true`): every classifier and baseline, on the run's
    data; logs the table. Errors are raised: run.py reports them in one line with `rerun_command`."""
    evaluation = evaluate(run_dir, classifiers=RUN_CLASSIFIERS, baselines=RUN_BASELINES, log=log)
    log(summary(evaluation))
    return evaluation


def parse_args(argv: list[str]) -> argparse.Namespace:
    return parse_options(EvalOptions, "feature_eval.evaluate", __doc__, argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(EvalOptions, "feature_eval.evaluate", __doc__, argv, evaluate)


if __name__ == "__main__":
    sys.exit(main())
