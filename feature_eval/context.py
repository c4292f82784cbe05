"""What both evaluation drivers (`feature_eval.evaluate`, `feature_eval.finetune`) share: `open_context` opens a
checkpoint into an `EvalContext`, raising every user error in one line before any long computation; `RunOptions`,
`parse_options` and `run_cli` make their options and command lines."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import startup  # standard library only
from data_aug.datasets import load_split
from data_aug.errors import DataError
from feature_eval.features import best_device
from models.loading import (CheckpointLoadError, encoder_from_state, file_sha256, read_weights,
                            resolve_checkpoint, run_dir_of, trained_epochs)
from models.resnet_simclr import ARCHITECTURES, Encoder
from simclr.config import Config, ConfigError, DatasetConfig, saved_config


class EvalError(ValueError):
    """A user error (option, data set, output folder); its message is one line that says how to fix it."""


def option(default=dataclasses.MISSING, help: str | None = None, **cli) -> dataclasses.Field:
    """A field of the drivers' options and, with `help`, its command-line option (`parse_options`): `cli` goes to
    argparse (`type`, `action`), except `bound`, a key of `BOUNDS` the value is held to."""
    return field(default=default, metadata={"help": help, **cli} if help else {})


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What every evaluation driver is asked (each field's help says what). `write` False writes nothing; `command`
    is recorded in the JSON (`run_cli` fills it; from Python, `of` rebuilds it)."""

    dataset: str | None = option(None, "data set name (default: the checkpoint's dataset.name)")
    root: str | Path | None = option(None, "data set folder (default: the checkpoint's dataset.root)")
    input_size: int | None = option(None, "image size (default: the checkpoint's input_shape)", type=int, bound=">= 8")
    device: str | torch.device = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    out_dir: str | Path | None = option(None, "table and JSON folder (default: <run_dir>/eval, or a package's eval/)")
    write: bool = True
    download: bool = option(False, "download the data set if it is missing")
    skip_bad_images: bool | None = option(None, "leave out image files that cannot be decoded, with a warning "
                                          "(default: the checkpoint's setting)", action=argparse.BooleanOptionalAction)
    seed: int = option(0, "every random choice of the protocol: baselines, hold-out, label subset, batches, views "
                                "(default 0)")
    command: str | None = None

    def __post_init__(self):
        for message in bound_errors(type(self), self):
            raise EvalError(message)

    @classmethod
    def of(cls, module: str, checkpoint: str | Path, options: RunOptions | None = None, **fields):
        """How a driver takes options from Python: `options` (or the defaults) with `fields` replaced, and a command."""
        o = dataclasses.replace(options, **fields) if options is not None else cls(**fields)
        return o if o.command else dataclasses.replace(o, command=o.command_line(module, checkpoint))

    def recorded(self, *names: str) -> dict:
        """The options `names` as a results JSON records them (a tuple as a list)."""
        return {name: list(value) if isinstance(value := getattr(self, name), tuple) else value for name in names}

    def command_line(self, module: str, checkpoint: str | Path) -> str:
        """The command that asks for these options, for an evaluation from Python: each option off its default."""
        words = ["python", "-m", module, "--checkpoint", str(checkpoint)]
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.metadata and value != f.default and value is not None:
                shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                    if isinstance(value, (tuple, list)) else str(value)
                words += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, shown]
        return shlex.join(words)


@dataclass
class EvalContext:
    """One checkpoint opened for evaluation by `open_context`: what every protocol reads, nothing it computes."""

    checkpoint: Path  # the weights file that the name given resolved to
    checkpoint_sha256: str
    encoder: Encoder  # frozen
    config: Config  # the training config, typed
    trained_data: DatasetConfig | None  # the data set it trained on; None where the file names none
    trained_epochs: int | None
    architecture: str  # `ResNet-18`, `ResNet-18 (CIFAR stem)`, ...: the tables' Architecture column
    dataset: str
    root: Path
    input_size: int
    train_set: object  # items (uint8 [3, H, W], label), with `labels` int64 [N]
    test_set: object
    classes: list[str]
    device: torch.device
    out_dir: Path

    def record(self, o: RunOptions, splits: dict, options: dict, timings: dict, **parts) -> dict:
        """A results JSON (`feature_eval.results.Results` reads it back); `splits`: `fit` (what was fit on), sizes."""
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {"command": o.command, "checkpoint": str(self.checkpoint), "checkpoint_sha256": self.checkpoint_sha256,
                "trained_epochs": self.trained_epochs,
                "dataset": {"name": self.dataset, "root": str(self.root), "input_size": self.input_size,
                            "classes": self.classes},
                "splits": {"report": "test", **splits}, "seed": o.seed, "device": str(self.device), "options": options,
                **parts, "timings_s": timings,
                "machine": {"host": platform.node(), "cpu_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu},
                "finished": datetime.datetime.now().isoformat(timespec="seconds")}

    def results_stem(self) -> str:
        """The results files' name, as `results_stem` makes it for this checkpoint and data."""
        return results_stem(self.checkpoint, self.dataset, self.root, self.input_size, self.trained_data)


def open_context(checkpoint: str | Path, options: RunOptions,
                 encoder_device: str | torch.device | None = None) -> EvalContext:
    """Open `checkpoint` (anything `models.loading.resolve_checkpoint` takes), its encoder on `encoder_device`
    (default: the evaluation's device). Raises EvalError, CheckpointLoadError or DataError, one line each."""
    device = check_device(options.device)
    file = resolve_checkpoint(checkpoint)
    state = read_weights(file)
    encoder = encoder_from_state(state, file, device if encoder_device is None else encoder_device)
    try:
        config = saved_config(state)
    except ConfigError as err:
        raise CheckpointLoadError(f"checkpoint {file} holds a training config this code does not read ({err})") \
            from None
    trained = config.dataset if "dataset" in state["config"] else None  # a lone package file names no data
    dataset = options.dataset or (trained.name if trained else None)
    root = Path(options.root if options.root is not None else trained.root if trained else "data")
    input_size = int(options.input_size or (trained.crop_size if trained else 0))
    if not dataset:
        raise EvalError(f"checkpoint {file} does not name its data set: pass --dataset NAME (and --root DIR)")
    if input_size < 8:
        raise EvalError(f"input size {input_size or 'unknown'}: pass --input-size N (N >= 8, e.g. 96 for STL10)")
    skip = bool(trained and trained.skip_bad_images) if options.skip_bad_images is None else options.skip_bad_images
    train_set, test_set = load_splits(dataset, root, options.download, skip)
    # a package's own `eval/`, from which `pretrained_models.export --refresh` builds the model card
    out_dir = Path(options.out_dir) if options.out_dir is not None else run_dir_of(file.resolve()) / "eval"
    if options.write:
        check_writable(out_dir)  # now, not after minutes of features or hours of fine-tuning
    classes = list(getattr(train_set, "classes", [])) or [str(i) for i in range(int(train_set.labels.max()) + 1)]
    model = config.model
    architecture = ARCHITECTURES.get(model.base_model, model.base_model) + (" (CIFAR stem)" if model.cifar_stem else "")
    return EvalContext(file, file_sha256(file), encoder, config, trained, trained_epochs(state), architecture, dataset,
                       root, input_size, train_set, test_set, classes, device, out_dir)


def option_advice(message: str) -> str:
    """A data loader's message, whose advice names the training config's keys, in this command's options."""
    for key, option in {"set dataset.download: true": "pass --download", "set dataset.root to": "pass --root",
                        "set dataset.skip_bad_images: true": "pass --skip-bad-images"}.items():
        message = message.replace(key, option)
    return message


def load_splits(dataset: str, root: Path, download: bool, skip_bad_images: bool = False):
    """The `train` and `test` splits of `dataset` under `root`, checked: test images to score, two classes to fit."""
    try:
        train_set = load_split(dataset, root, "train", download=download, skip_bad_images=skip_bad_images)
        test_set = load_split(dataset, root, "test", download=download, skip_bad_images=skip_bad_images)
    except ValueError as err:  # unknown data set name
        raise EvalError(f"--dataset {dataset}: {err}; choose stl10, cifar10, cifar100, imagefolder or digits") from None
    except DataError as err:
        raise DataError(option_advice(str(err))) from None
    if len(test_set) == 0:
        raise DataError(f"{dataset} under {root} has an empty test split")
    present = torch.unique(train_set.labels)
    if len(present) < 2 or int(present.min()) < 0:
        raise DataError(f"{dataset} under {root}: the train split needs labelled images of at least two classes "
                        f"(found {len(present)} label value(s))")
    return train_set, test_set


def check_device(device) -> torch.device:
    """The device named by a `--device` option (`auto`: the best one here); EvalError if it is not usable."""
    if device is None or str(device) == "auto":
        return best_device()
    try:
        device = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    for kind, backend in (("cuda", torch.cuda), ("mps", torch.backends.mps)):
        if device.type == kind and not backend.is_available():
            raise EvalError(f"--device {device}: {kind.upper()} is not available on this machine; use --device cpu "
                            "or auto")
    return device


def check_writable(folder: Path) -> None:
    """EvalError unless `folder` exists or can be made, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise EvalError(f"cannot write results to {folder} ({err.strerror or err}): pass --out-dir DIR") from None


def parse_names(text: str | tuple | list, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """`"a,b"` (or a sequence) -> `("a", "b")`, each checked against `allowed`; duplicates dropped."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise EvalError(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)} "
                        f"(comma-separated, e.g. {option} {','.join(allowed)})")
    return tuple(dict.fromkeys(names))


def results_stem(checkpoint: Path, dataset: str, root: Path, input_size: int, trained: DatasetConfig | None) -> str:
    """`<checkpoint>_<dataset>`, then `_<root folder>` and `_<size>px` where data root and input size are not those
    the checkpoint `trained` on (None where it names no data): other data never overwrite its results."""
    stem = f"{checkpoint.stem}_{dataset}"
    if Path(root).resolve() != Path(trained and trained.root or "data").resolve():
        stem += "_" + (re.sub(r"[^A-Za-z0-9._-]+", "-", Path(root).resolve().name) or "root")
    if input_size != (trained.crop_size if trained else 0):
        stem += f"_{input_size}px"
    return stem


# The bounds an option can be held to (`option(..., bound=...)`): the test of its value and the words of the error.
BOUNDS = {">= 0": (lambda v: v >= 0, ">= 0"), ">= 1": (lambda v: v >= 1, "at least 1"),
          ">= 2": (lambda v: v >= 2, "at least 2"), "> 0": (lambda v: v > 0, "> 0"),
          ">= 8": (lambda v: v >= 8, "at least 8 (e.g. 96 for STL10)"),
          "(0, 1)": (lambda v: 0 < v < 1, "in (0, 1)"), "[0, 1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
          "[0, 1]": (lambda v: 0 <= v <= 1, "in [0, 1]"), "(0, 1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
          "all > 0": (lambda v: v and all(x > 0 and math.isfinite(x) for x in v),
                      "one or more positive numbers, e.g. 0.05,0.1,0.2")}


def bound_errors(options: type[RunOptions], values: RunOptions | argparse.Namespace):
    """`--option value: must be <bound>` for each field of `options` whose value in `values` is outside it."""
    for f in (f for f in dataclasses.fields(options) if "bound" in f.metadata):
        (inside, words), value = BOUNDS[f.metadata["bound"]], getattr(values, f.name)
        if value is not None and not inside(value):
            shown = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"
            yield f"--{f.name.replace('_', '-')} {shown}: must be {words}"


def parse_options(options: type[RunOptions], module: str, doc: str, argv: list[str]) -> argparse.Namespace:
    """A driver's command line: `--checkpoint`, then an option per field of `options` made with `option(..., help)`
    (`--no-<name>` for a field that defaults to True). A value out of its bound: one line, exit status 2."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run dir or name (runs/<name>), checkpoint .pt file, "
                        "package dir or package name (pretrained_models/<name>)")
    for f in (f for f in dataclasses.fields(options) if f.metadata):
        cli = {key: value for key, value in f.metadata.items() if key != "bound"}
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            cli["action"], flag = ("store_false", f"--no-{flag[2:]}") if f.default else ("store_true", flag)
        elif "action" not in cli and f.default is not None:  # a tuple: comma-separated, as a string
            cli.setdefault("type", str if isinstance(f.default, tuple) else type(f.default))
        parser.add_argument(flag, dest=f.name, default=f.default, **cli)
    args = parser.parse_args(argv)
    for message in bound_errors(options, args):
        parser.exit(startup.EXIT_USAGE, f"{parser.prog}: error: {message}\n")  # no usage: the line says it all
    return args


def run_cli(options: type[RunOptions], module: str, doc: str, argv: list[str] | None,
            run: Callable[[str, RunOptions], object]) -> int:
    """A driver's `main`: parse `argv`, `run(checkpoint, options)`, print `summary`; return the exit status, after one
    line on stderr for an error as `startup.ERROR_POLICY` says (docs/EXIT_CODES.md)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_options(options, module, doc, argv)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(options) if f.metadata}
    try:
        with startup.one_line_warnings():
            outcome = run(args.checkpoint, options(**fields, command=shlex.join(["python", "-m", module, *argv])))
    except BaseException as err:  # the loaders' advice names config keys: say this command's options instead
        stopped = f"{module} stopped; no results written (features already extracted stay cached)"
        return startup.report_error(err, text=stopped if isinstance(err, KeyboardInterrupt)
                                    else option_advice(startup.error_text(err)))
    print(summary(outcome))
    return startup.EXIT_OK


def summary(outcome) -> str:
    """The end of a driver's run (an `Evaluation` or `FineTuneResult`): the table, the files written, the time taken."""
    paths = outcome.paths
    pictures = ", ".join(str(paths[key]) for key in paths if key not in ("markdown", "json"))
    return (f"{outcome.table}\nwrote {paths['markdown']} and {paths['json']} "
            f"({outcome.results['timings_s']['total']:.1f} s)" + (f"\npictures: {pictures}" if pictures else ""))
