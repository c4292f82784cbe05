"""Typed, frozen configuration: `config.yaml` plus `key=value` overrides, validated once.

Every key of the original repository's (sthalles/SimCLR) config.yaml keeps its meaning, so that file runs
verbatim. Values are parsed, never evaluated: YAML goes through `yaml.safe_load`, and strings such as `10e-6`
or `(96,96,3)` are converted by explicit rules. Every user error raises `ConfigError` with one line naming the
key, the value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# torchvision's ResNet family (models.resnet_simclr.FEATURE_DIMS holds the same names with their feature sizes)
BASE_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
               "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
DATASETS = ("stl10", "cifar10", "cifar100", "imagefolder", "digits")
OPTIMIZERS = ("adam", "sgd", "lars")
LR_SCALINGS = ("none", "linear", "sqrt")
AMP_DTYPES = ("float16", "bfloat16")
AUGMENT_ON = ("cpu", "device")
KEEP_CHECKPOINTS = ("all", "last_and_best", "last")  # checkpoints/: last.pt always; last.prev.pt; best.pt
_MAX_INT = 2**31 - 1


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line meant for the user."""


@dataclass(frozen=True)
class ModelConfig:
    out_dim: int = 256
    base_model: str = "resnet18"
    cifar_stem: bool = False
    head_layers: int = 2
    head_bn: bool = False
    sync_bn: typing.Optional[bool] = None  # None (or "auto"): on when several CUDA processes train


@dataclass(frozen=True)
class DatasetConfig:
    s: float = 1.0
    input_shape: tuple = (96, 96, 3)
    num_workers: int = 0
    valid_size: float = 0.05
    name: str = "stl10"
    root: str = "data"
    download: bool = True
    blur: bool = True
    min_crop_scale: float = 0.08
    hflip: float = 0.5
    augment_on: str = "cpu"
    skip_bad_images: bool = False

    @property
    def crop_size(self) -> int:
        return self.input_shape[0]


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.5
    use_cosine_similarity: bool = True


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    lr: float = 3e-4
    momentum: float = 0.9
    lr_scaling: str = "none"
    warmup_epochs: float = 0.0
    cosine: bool = True


@dataclass(frozen=True)
class KnnMonitorConfig:
    enabled: bool = True
    every_n_epochs: typing.Optional[int] = None  # None: every eval_every_n_epochs
    max_images: int = 5000
    k: int = 200
    temperature: float = 0.1


@dataclass(frozen=True)
class Config:
    batch_size: int = 512
    epochs: int = 40
    eval_every_n_epochs: int = 1
    fine_tune_from: typing.Optional[str] = None
    log_every_n_steps: int = 50
    weight_decay: float = 1e-5
    fp16_precision: typing.Union[bool, str] = False  # True, False or "auto" (simclr.precision)
    amp_dtype: str = "float16"
    seed: int = 0
    device: str = "auto"
    run_dir: typing.Optional[str] = None
    resume: typing.Optional[str] = None
    grad_cache_chunks: int = 1
    compile: bool = False
    final_eval: bool = False
    keep_checkpoints: str = "all"
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    knn_monitor: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                base: dict | None = None) -> Config:
    """Read a YAML file (or start from `base`, or the defaults), apply `key=value` overrides, validate."""
    raw: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    try:
        config = _build(Config, raw, prefix="")
        validate(config)
    except ConfigError as err:  # a mistake in the file names the file; one in a key=value typed just now needs not
        if path is None or (overrides and _reads(path)):
            raise
        raise ConfigError(f"in {path}: {err}") from None
    return config


def _reads(path: str | Path) -> bool:
    try:
        load_config(path)
    except ConfigError:
        return False
    return True


def config_to_dict(config) -> dict:
    """A plain, YAML/JSON-safe dict of a config (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `config_to_dict` output (as stored in checkpoints), validated."""
    config = _build(Config, data, prefix="")
    validate(config)
    return config


def saved_config(state: dict) -> Config:
    """The typed Config of a checkpoint or package, from the state `models.loading.read_weights` returns.

    That reader has already upgraded older formats (filling the keys their version lacked), so the saved dict is
    read here as written, strictly: a key this version does not know, or a value its rules refuse, is an error.
    Raises:
        ConfigError: naming the key.
    """
    return config_from_dict(state["config"])


def replace(config: Config, **changes) -> Config:
    """`dataclasses.replace` that accepts dotted keys (`dataset.root`), re-validated."""
    data = config_to_dict(config)
    for key, value in changes.items():
        _set_dotted(data, key.replace("__", "."), value)
    return config_from_dict(data)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory: pass a YAML file with --config PATH")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing file with --config PATH")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKey as err:
        raise ConfigError(f"config file {path}: {err}: keep one (the last would silently replace the first)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML{_yaml_problem(err, text)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


class DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error: PyYAML keeps the last, so a second
    `dataset:` section would silently replace the whole first one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # a list or mapping as a key: super() says what is wrong with it
            if key in seen:
                lines = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                raise DuplicateKey(f"key {key} appears twice ({lines})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """` at line L, column C: <problem> (<context> started at line N); <advice>` from a YAML error, on one line."""
    mark = getattr(err, "problem_mark", None)
    line = column = None
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1  # yaml counts from 0, editors from 1
    elif isinstance(getattr(err, "position", None), int):  # a ReaderError: a character YAML does not allow
        before = text[:err.position]
        line, column = before.count("\n") + 1, err.position - (before.rfind("\n") + 1) + 1
    problem = getattr(err, "problem", None) or type(err).__name__
    if getattr(err, "reason", None):
        character = getattr(err, "character", None)  # a code point (an int) when the text was a str
        problem = err.reason + (f" (found U+{character:04X})" if isinstance(character, int) else "")
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark.line + 1 != line:
        problem = f"{problem} ({context} started at line {context_mark.line + 1})"
    elif context:
        problem = f"{problem} ({context})"
    problem = " ".join(str(problem).split())
    advice = "fix that line" if line is not None else "fix the file"
    if "mapping values are not allowed" in problem:
        advice += " (quote a value that holds ': ')"
    elif "'\\t'" in problem:
        advice += " (indent with spaces, not tabs)"
    return (f" at line {line}, column {column}" if line is not None else "") + f": {problem}; {advice}"


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value or section.key=value, e.g. epochs=80")
    key, text = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override {item!r}: {key!r} is not a key name; use key=value or section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = text  # not YAML: keep the raw string and let the type check decide
    return key, value


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        section = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{section} = {_show(raw)}: expected a section of key: value lines")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if not isinstance(key, str) or key not in known:
            allowed = ", ".join(sorted(known))
            shown = key if isinstance(key, str) and key.isprintable() else _show(key)  # one line, whatever the key
            hint = _suggest(cls, key, prefix) if isinstance(key, str) else None
            raise ConfigError(f"unknown key {prefix}{shown}: " + (f"did you mean {hint}? " if hint else "")
                              + f"allowed keys here are {allowed}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        name = prefix + f.name
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, raw[f.name], prefix=name + ".")
        else:
            values[f.name] = _coerce(name, raw[f.name], hint)
    return cls(**values)


def _suggest(cls, key: str, prefix: str) -> str | None:
    """The known key closest to a misspelt `key` (`batch_sise` -> `batch_size`), or the section holding that exact
    key (`temperature` at the top level -> `loss.temperature`); None when nothing is close."""
    fields = dataclasses.fields(cls)
    close = difflib.get_close_matches(key, [f.name for f in fields], n=1, cutoff=0.75)
    if close:
        return prefix + close[0]
    for f in fields:
        section = f.default_factory
        if dataclasses.is_dataclass(section) and key in {g.name for g in dataclasses.fields(section)}:
            return f"{prefix}{f.name}.{key}"
    return None


def _coerce(name: str, value, hint):
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none", "null", "Null")):
            return None
        if typing.get_args(hint)[0] is bool and value == "auto":
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint == typing.Union[bool, str]:  # fp16_precision: the original's true/false, or auto
        if isinstance(value, bool) or value == "auto":
            return value
        raise ConfigError(f"{name} = {_show(value)}: expected true, false or auto (bfloat16 where the hardware "
                          "computes it natively, float32 elsewhere)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {_show(value)}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT:
            return value
        raise ConfigError(f"{name} = {_show(value)}: expected a whole number such as 512")
    if hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())  # YAML 1.1 reads 10e-6 (no dot) as a string
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            number = float(number)
            if math.isfinite(number):
                return number
        raise ConfigError(f"{name} = {_show(value)}: expected a finite number such as 0.5 or 1e-5")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} = {_show(value)}: expected a string")
    if hint is tuple:
        return _parse_shape(name, value)
    raise TypeError(f"unsupported config type {hint} for {name}")  # a bug in this module, not user error


def _parse_shape(name: str, value) -> tuple:
    items = value
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[(\[]?\s*\d+\s*(,\s*\d+\s*)*,?\s*[)\]]?", text):
            items = None
        else:
            items = [int(x) for x in re.findall(r"\d+", text)]
    if isinstance(items, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        if len(items) == 3 and items[2] == 3 and 8 <= items[0] <= 4096 and items[0] == items[1]:
            return tuple(items)
    raise ConfigError(f"{name} = {_show(value)}: expected H,W,3 with H == W in [8, 4096], such as (96,96,3)")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {_show(value)}: {allowed}")


def _choices(value, allowed: tuple[str, ...]) -> str:
    """`allowed: a, b, c`, led by `did you mean b?` when `value` is a near miss (`resnet05`, `ResNet50`) or the
    start of one choice only (`resnext50` -> `resnext50_32x4d`)."""
    text = str(value).lower()
    close = [a for a in allowed if a.startswith(text)] if text else []
    close = close if len(close) == 1 else difflib.get_close_matches(text, allowed, n=1, cutoff=0.75)
    return (f"did you mean {close[0]}? " if close else "") + f"allowed: {', '.join(allowed)}"


def validate(config: Config) -> None:
    """Check the values that types alone cannot; raise ConfigError naming the key."""
    c, m, d, o = config, config.model, config.dataset, config.optimizer
    _require(c.batch_size >= 2, "batch_size", c.batch_size, "must be at least 2 (one positive pair needs a negative)")
    _require(c.epochs >= 1, "epochs", c.epochs, "must be at least 1")
    _require(c.eval_every_n_epochs >= 1, "eval_every_n_epochs", c.eval_every_n_epochs, "must be at least 1")
    _require(c.log_every_n_steps >= 1, "log_every_n_steps", c.log_every_n_steps, "must be at least 1")
    _require(c.weight_decay >= 0, "weight_decay", c.weight_decay, "must be >= 0")
    _require(c.amp_dtype in AMP_DTYPES, "amp_dtype", c.amp_dtype, f"allowed: {', '.join(AMP_DTYPES)}")
    _require(c.keep_checkpoints in KEEP_CHECKPOINTS, "keep_checkpoints", c.keep_checkpoints,
             f"allowed: {', '.join(KEEP_CHECKPOINTS)} (last.pt is always kept: resume needs it)")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device) is not None, "device", c.device,
             "allowed: auto, cpu, cuda, cuda:N")
    _require(c.grad_cache_chunks >= 1, "grad_cache_chunks", c.grad_cache_chunks, "must be at least 1 (1 = off)")
    _require(c.batch_size % c.grad_cache_chunks == 0, "grad_cache_chunks", c.grad_cache_chunks,
             f"must divide batch_size ({c.batch_size})")
    _require(m.base_model in BASE_MODELS, "model.base_model", m.base_model, _choices(m.base_model, BASE_MODELS))
    _require(1 <= m.out_dim <= 65536, "model.out_dim", m.out_dim, "must be in [1, 65536] (paper: 128)")
    _require(1 <= m.head_layers <= 4, "model.head_layers", m.head_layers,
             "must be in [1, 4] linear layers (paper and original repo: 2; SimCLR v2: 3)")
    _require(d.name in DATASETS, "dataset.name", d.name, f"allowed: {', '.join(DATASETS)}")
    _require(0 <= d.valid_size < 1, "dataset.valid_size", d.valid_size, "must be in [0, 1)")
    _require(0 <= d.s <= 2.5, "dataset.s", d.s, "colour-jitter strength must be in [0, 2.5] (hue 0.2s <= 0.5; "
             "paper: 1.0)")
    _require(0 < d.min_crop_scale <= 1, "dataset.min_crop_scale", d.min_crop_scale,
             "must be in (0, 1] (paper: 0.08, the smallest crop's share of the image area)")
    _require(0 <= d.hflip <= 1, "dataset.hflip", d.hflip,
             "must be in [0, 1], the probability of mirroring a view (paper: 0.5; 0 for digits and text)")
    _require(0 <= d.num_workers <= 256, "dataset.num_workers", d.num_workers, "must be in [0, 256]")
    _require(d.augment_on in AUGMENT_ON, "dataset.augment_on", d.augment_on, f"allowed: {', '.join(AUGMENT_ON)}")
    _require(c.loss.temperature > 0, "loss.temperature", c.loss.temperature, "must be > 0 (paper: 0.1 to 1.0)")
    _require(o.name in OPTIMIZERS, "optimizer.name", o.name, f"allowed: {', '.join(OPTIMIZERS)}")
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _require(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "must be in [0, 1)")
    _require(o.lr_scaling in LR_SCALINGS, "optimizer.lr_scaling", o.lr_scaling, f"allowed: {', '.join(LR_SCALINGS)}")
    _require(0 <= o.warmup_epochs <= c.epochs, "optimizer.warmup_epochs", o.warmup_epochs,
             f"must be in [0, epochs={c.epochs}]")
    k = c.knn_monitor
    _require(k.every_n_epochs is None or k.every_n_epochs >= 1, "knn_monitor.every_n_epochs", k.every_n_epochs,
             "must be at least 1, or None to follow eval_every_n_epochs")
    _require(k.max_images >= 10, "knn_monitor.max_images", k.max_images,
             "must be at least 10 (80 % fit, 20 % scored); 5000 holds STL10's labelled train split")
    _require(k.k >= 1, "knn_monitor.k", k.k, "must be at least 1 (Wu et al. and solo-learn: 200)")
    _require(k.temperature > 0, "knn_monitor.temperature", k.temperature, "must be > 0 (Wu et al.: 0.1)")
