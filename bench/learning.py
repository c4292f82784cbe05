"""Recipe study: short pretraining runs (seeds x config variants), each scored against random-init and PCA.

Each variant (the base config, `--set`, then its `key=value` overrides) is trained once per seed; each encoder is
scored by L-BFGS and KNN (k=10) next to a random-init encoder of its architecture and seed and PCA on raw pixels,
fitted on 80% of the labelled `train` split and scored on the other 20%: the test split is never read here (a chosen
recipe's test numbers: `feature_eval.evaluate` on its runs). docs/RECIPE.md shows the commands and the findings.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import startup  # standard library only

if __name__ == "__main__":  # a mismatched torch/torchvision pair: one line, not the traceback of the imports below
    startup.exit_if_torch_is_broken()

import torch

from bench import REPO, add_record_args, command_line, describe_machine, print_and_record
from data_aug.datasets import load_split, subset
from data_aug.errors import DataError
from feature_eval import baselines
from feature_eval.classifiers import holdout_split, knn_classifier, lbfgs_probe
from feature_eval.features import FeatureSplit, extract_features
from models.loading import load_encoder
from simclr.config import ConfigError, load_config
from simclr.dist import init_distributed
from simclr.trainer import Trainer

CLASSIFIERS = ("lbfgs", "knn")
COLUMNS = ("lbfgs", "lbfgs margin", "knn", "knn margin", "seconds")  # of a SimCLR row: a value per seed each
HOLDOUT_FRACTION, HOLDOUT_SEED = 0.2, 0
BASE = "base"
START, END = "<!-- bench/learning.py: start -->", "<!-- bench/learning.py: end -->"
# The study behind configs/quickstart.yaml: one knob at a time around its recipe.
DEFAULT_VARIANTS = ("model.head_bn=false model.head_layers=2",  # the original repository's head
                    "model.head_layers=2", "batch_size=64", "batch_size=256", "loss.temperature=0.5",
                    "optimizer.lr=3e-3", "dataset.s=1.0")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"),
                        help="base config of every run (default: configs/quickstart.yaml)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help='variants, each a quoted string of key=value overrides ("loss.temperature=0.5 '
                             'model.head_bn=true"); the base config is studied too (default: DEFAULT_VARIANTS)')
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every variant")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. dataset.name=imagefolder dataset.root=/data/x epochs=50")
    parser.add_argument("--out-dir", help="where the runs go (default: runs/learning/<date>_<time>)")
    add_record_args(parser, "the study appended to its section")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, variant: str, seed: int, out_dir: Path):
    """One run's config: base, `--set`, the variant, its seed and run dir; a bad variant's ConfigError names it."""
    slug = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in variant)[:80] or BASE
    overrides = [*args.set, "final_eval=false", "resume=None", "fine_tune_from=None",
                 *([] if variant == BASE else shlex.split(variant)), f"seed={seed}",
                 f"run_dir={out_dir / f'{slug}_seed{seed}'}"]
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        raise ConfigError(f"variant {variant!r}: {err}") from None


def split_for_report(config):
    """(fit set, report set) of labelled images: a fixed stratified hold-out of `train`."""
    d = config.dataset
    train = load_split(d.name, d.root, "train", download=d.download)
    fit, held = holdout_split(train.labels.numpy(), HOLDOUT_FRACTION, HOLDOUT_SEED)
    return subset(train, fit), subset(train, held)


def score(fit: FeatureSplit, report: FeatureSplit, device: torch.device) -> dict[str, float]:
    return {"lbfgs": lbfgs_probe(fit.features, fit.labels, report.features, report.labels).top1,
            "knn": knn_classifier(fit.features, fit.labels, report.features, report.labels, k=10, device=device).top1}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:  # one seed: no spread to show
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def study(args: argparse.Namespace, trainer_class=Trainer) -> str:
    """Train and score every variant with every seed (`trainer_class`: a test may pass a subclass); the table. Every
    config is built first: a bad variant fails before any training."""
    variants = [BASE, *(DEFAULT_VARIANTS if args.variants is None else args.variants)]
    out_dir = Path(args.out_dir or Path("runs") / "learning" / datetime.datetime.now().strftime("%Y%m%d_%H%M%S"))
    runs = {(v, s): run_config(args, v, s, out_dir) for v in variants for s in args.seeds}
    scores: dict[tuple[str, int], dict[str, float]] = {}  # (variant or baseline, seed) -> its COLUMNS
    splits: dict[tuple, tuple] = {}
    for i, ((variant, seed), config) in enumerate(runs.items(), start=1):
        print(f"[{i}/{len(runs)}] {variant} seed {seed} -> {config.run_dir}", flush=True)
        info = init_distributed(config.device)
        tic = time.perf_counter()
        trainer_class(config, info).fit()
        seconds = time.perf_counter() - tic
        data = (config.dataset.name, config.dataset.root, config.dataset.crop_size)
        if data not in splits:
            splits[data] = split_for_report(config)
        found = scores[variant, seed] = {**score_run(config, seed, splits[data], info.device, scores),
                                         "seconds": seconds}
        print(f"[{i}/{len(runs)}] {variant} seed {seed}: L-BFGS {found['lbfgs']:.1f} (margin "
              f"{found['lbfgs margin']:+.1f}), KNN {found['knn']:.1f} (margin {found['knn margin']:+.1f}), "
              f"pretraining {seconds:.0f} s", flush=True)
    return render(args, variants, scores, next(iter(splits.values())))


def score_run(config, seed: int, data: tuple, device: torch.device, scores: dict) -> dict[str, float]:
    """Top-1 per classifier of the run's encoder, and its margin over the better baseline of its seed (each baseline
    scored once per seed, into `scores`: the same for every variant with this seed, data and size)."""
    fit, report = data
    m, size, cache = config.model, config.dataset.crop_size, baselines.BASELINE_CACHE
    encoder = load_encoder(config.run_dir, device)
    found = score(*(extract_features(encoder, part, size, device=device, desc=f"SimCLR features ({name})")
                    for name, part in (("fit", fit), ("report", report))), device)
    extractors = {  # both at the run's eval size, their features cached across runs
        f"Random init ({m.base_model}{', CIFAR stem' if m.cifar_stem else ''}, {size}px)":
            lambda: baselines.random_init_features(m.base_model, m.cifar_stem, seed, fit, report, size,
                                                   device=device, cache_dir=cache),
        f"PCA ({m.out_dim} components, {size}px)":
            lambda: baselines.pca_features(fit, report, size, m.out_dim, seed=seed, cache_dir=cache)[:2]}
    for name, compute in extractors.items():
        if (name, seed) not in scores:
            scores[name, seed] = score(*compute(), device)
    best = {c: max(scores[name, seed][c] for name in extractors) for c in CLASSIFIERS}
    return {**found, **{f"{c} margin": found[c] - best[c] for c in CLASSIFIERS}}


def render(args, variants: list[str], scores: dict, data: tuple) -> str:
    """The study's markdown table: a row per variant (mean ± sd over seeds), then a row per baseline."""
    fit, report = data
    where = "fitted on 80% of the labelled train split, scored on the other 20% (seeded, stratified)"
    lines = [f"Top-1 % {where}: {len(fit)} fit / {len(report)} scored images; mean ± sd over seeds "
             f"{', '.join(map(str, args.seeds))}; margin = SimCLR minus the better of random init and PCA, same seed.",
             "", "| Feature extractor | L-BFGS top-1 | L-BFGS margin | KNN (k=10) top-1 | KNN margin | pretraining s |",
             "|---|---|---|---|---|---|"]
    for name in sorted(dict.fromkeys(name for name, _ in scores), key=lambda name: name not in variants):
        per_seed = [found for (n, _), found in scores.items() if n == name]
        label = name if name not in variants else "SimCLR, base config" if name == BASE else f"SimCLR, `{name}`"
        lines.append(f"| {label} | " + " | ".join(mean_sd([s[c] for s in per_seed if c in s]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, trainer_class=Trainer) -> int:
    """The study's command; `trainer_class` is `study`'s."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    try:
        table = study(args, trainer_class)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return startup.EXIT_USAGE if isinstance(err, ConfigError) else startup.EXIT_ERROR
    import sklearn

    minutes, gpu = (time.perf_counter() - started) / 60, torch.cuda.is_available()
    machine = f"{'' if gpu else 'no GPU; '}{describe_machine('cuda' if gpu else 'cpu')}"
    block = (f"### {datetime.date.today().isoformat()}\n\n`{command_line('bench.learning', argv)}` ({minutes:.0f} "
             f"min)\n\nMachine: {machine}, scikit-learn {sklearn.__version__}.\n\n{table}")
    print_and_record(args, block, START, END, "## Recipe study (bench/learning.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
