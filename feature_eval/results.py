"""feature_eval's one results format, typed: a `Row` per (protocol, feature extractor), `Results` for one
evaluation's JSON read back (files of every version of this code), its writer and table, for evaluate, finetune and
the model card. A table is `current_rows` of the rows, each with the `settings` it depends on."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from feature_eval.context import EvalError

EXTRACTOR_NAMES = {"simclr": "SimCLR", "random": "Random init", "pca": "PCA"}
PROTOCOL_ORDER = ("lbfgs", "adam", "knn", "weighted_knn", "finetune")  # the protocols' order in a table
# The columns of the original repository's (sthalles/SimCLR) results table, which the linear/KNN table keeps.
COLUMNS = ("Classifier", "Feature extractor", "Architecture", "Feature dim", "Projection dim", "Epochs",
           "Top-1 %", "Top-5 %")


@dataclass(frozen=True)
class Row:
    """One row of a results table: a protocol (`classifier`: `lbfgs`, ..., `finetune`) on a feature `extractor`'s
    features (`simclr`, `random`, `pca`) and its facts, scored on test (top-1/top-5 %). `details`: what the protocol
    reports of itself; `settings`: what the number depends on, by option (`weights`, `data`, `--seed`, ...);
    `evaluated`: when (ISO time); `confusion`: test confusion counts `[C][C]` of a SimCLR row, for its picture."""

    classifier: str
    classifier_name: str
    extractor: str
    architecture: str | None
    feature_dim: int | None
    projection_dim: int | None
    epochs: int | None
    top1: float | None
    top5: float | None
    seconds: float | None = None
    details: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    evaluated: str | None = None
    confusion: list | None = None

    @property
    def extractor_name(self) -> str:
        return EXTRACTOR_NAMES.get(self.extractor, self.extractor)

    @property
    def name(self) -> str:
        """`KNN (k=10, Euclidean) / SimCLR`: how notes and logs name the row."""
        return f"{self.classifier_name} / {self.extractor_name}"

    def fits(self, settings: dict) -> bool:
        """Whether the row was made under `settings` (the settings its protocol has now)."""
        return all(self.settings.get(key) == value for key, value in settings.items())

    def to_json(self) -> dict:  # `extractor_name` too, for readers of the file
        return {"extractor_name": self.extractor_name, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, settings: dict, evaluated: str | None = None) -> Row:
        """A row as any version of this code wrote it: missing facts read as None, and a row written before rows
        carried their `settings` and date gets `settings` and `evaluated` (those of its evaluation)."""
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "details": values["details"] or {}, "settings": values["settings"] or settings,
                      "evaluated": values["evaluated"] or evaluated})


@dataclass(frozen=True)
class Results:
    """One evaluation's JSON as read back: the parts every reader needs, typed (None where a file does not say), and
    the whole `record`. `command` makes every row again; `pictures`: kind -> file name next to the JSON."""

    checkpoint_sha256: str | None
    dataset: str | None
    root: str | None
    input_size: int | None
    splits: dict
    command: str
    finished: str | None
    pictures: dict
    rows: tuple[Row, ...]
    record: dict

    @classmethod
    def from_json(cls, record) -> Results:
        """The one reader, for results JSON of every version of this code. Raises ValueError: not a results record."""
        if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
            raise ValueError("not a results file of feature_eval (no rows)")
        data, splits, options, pictures = (_dict(record.get(k)) for k in ("dataset", "splits", "options", "pictures"))
        settings = {"weights": record.get("checkpoint_sha256"),
                    "data": data_key(data.get("name"), data.get("root"), data.get("input_size"), splits.get("train"),
                                     splits.get("test")), "--seed": record.get("seed"),
                    **{f"--{k.replace('_', '-')}": v for k, v in options.items() if not isinstance(v, (list, dict))}}
        rows = tuple(Row.from_json(row, settings, record.get("finished")) for row in record["rows"]
                     if isinstance(row, dict) and "classifier" in row and "extractor" in row)
        return cls(record.get("checkpoint_sha256"), data.get("name"), data.get("root"), data.get("input_size"), splits,
                   record.get("command") or _command_of(record), record.get("finished"), pictures, rows, record)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def read_results(path: Path) -> Results:
    """The results JSON at `path`. Raises OSError (unreadable) or ValueError (not JSON, not a results record)."""
    return Results.from_json(json.loads(path.read_text()))


def _command_of(record: dict) -> str:
    """The evaluation command of a record from before commands were recorded, rebuilt from its options."""
    data, options = _dict(record.get("dataset")), _dict(record.get("options"))
    baselines = f" --baselines {','.join(options['baselines'])}" if options.get("baselines") else ""
    return (f"python -m feature_eval.evaluate --checkpoint {record.get('checkpoint', '<checkpoint>')} --dataset "
            f"{data.get('name')} --root {data.get('root')} --input-size {data.get('input_size')} --classifiers "
            f"{','.join(options.get('classifiers', []))}{baselines} --seed {record.get('seed', 0)}")


def data_key(name: str | None, root, input_size: int | None, train: int | None, test: int | None) -> list:
    """The `data` setting of a row: name, root as given (not resolved: rows stay comparable when the checkout moves),
    image size and split sizes."""
    return [name, str(Path(root)) if root else None, input_size, train, test]


def current_rows(rows: Iterable[Row], settings: dict[str, dict]) -> list[Row]:
    """The rows a table shows, from `rows` oldest first: per (protocol, extractor), the latest one made under the
    settings its protocol has now (`settings[classifier]`), in `PROTOCOL_ORDER`."""
    latest = {(row.classifier, row.extractor): row for row in rows if row.fits(settings.get(row.classifier, {}))}
    order = {protocol: place for place, protocol in enumerate(PROTOCOL_ORDER)}
    return sorted(latest.values(), key=lambda row: order.get(row.classifier, len(order)))


def rewrite_command(command: str | None, options: dict[str, str | None]) -> str | None:
    """`command` with each option of `options` (`--name value` or `--name=value`) given that value where it stood,
    or at the end; None takes the option out."""
    if not command:
        return command
    words, todo, skip = [], dict(options), False
    for word in shlex.split(command):
        option, joined, _ = word.partition("=")
        if skip:
            skip = False
        elif option in options:
            skip, value = not joined, todo.pop(option, None)  # a repeated option goes
            words += [option, value] if value is not None else []
        else:
            words.append(word)
    return shlex.join(words + [w for option, value in todo.items() if value is not None for w in (option, value)])


def log_row(log: Callable[[str], None], row: Row, note: str = "") -> None:
    """The progress line of a finished row: protocol, extractor, scores, then `note` and the seconds."""
    log(f"{row.classifier_name:<34} {row.extractor_name:<12} top-1 {row.top1:6.2f}%  top-5 {row.top5:6.2f}%  "
        f"({note}{row.seconds:.1f} s)")


# What each column shows of a row; the scores (`%`) with one decimal.
CELLS = {"Classifier": lambda row: row.classifier_name, "Feature extractor": lambda row: row.extractor_name,
         "Architecture": lambda row: row.architecture, "Feature dim": lambda row: row.feature_dim,
         "Projection dim": lambda row: row.projection_dim, "Epochs": lambda row: row.epochs,
         "Pretrain epochs": lambda row: row.epochs, "Fine-tune epochs": lambda row: row.details.get("finetune_epochs"),
         "Protocol": lambda row: row.classifier_name, "Top-1 %": lambda row: row.top1, "Top-5 %": lambda row: row.top5}


def markdown_table(rows: Sequence[Row], columns: Sequence[str] = COLUMNS) -> str:
    """The markdown table of `rows`, one column per name of `columns` (keys of `CELLS`)."""
    def cell(column: str, row: Row) -> str:
        value = CELLS[column](row)
        return "-" if value is None else f"{value:.1f}" if column.endswith("%") else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(column, row) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def table_caption(record: dict, subject: str, fit: str) -> str:
    """The line above a table: `subject` on which data, what was `fit`, then from `record` the test size, seed, time
    and the command that makes the table."""
    data, command = record["dataset"], record["command"]
    return (f"{subject} on {data['name']} ({data['input_size']}px): fit on {fit}; scored on test "
            f"({record['splits']['test']:,}); seed {record['seed']}, {record['timings_s']['total']:.0f} s on "
            f"{record['device']}." + (f" Command: `{command}`" if command else ""))


def write_results(record: dict, table: str, out_dir: Path, stem: str, caption: str,
                  notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write `<out_dir>/<stem>.md` (the caption, the table, then each note as a paragraph) and `<stem>.json`
    (`record`); returns `{"markdown": path, "json": path}`. Raises EvalError: the folder cannot be written."""
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths["markdown"].write_text("\n\n".join([caption, table, *notes]) + "\n")
        text = json.dumps(record, indent=2, allow_nan=False, default=_json_default)
        # a list of numbers on one line: a confusion matrix reads as rows, not as one number a line. Only a list that
        # json.dumps broke over lines ("[" then a newline, never inside a string) holding numbers alone is folded.
        text = re.sub(r"\[\n[\d.eE+\-,\s]*\]", lambda m: "[" + " ".join(m.group()[1:-1].split()) + "]", text)
        paths["json"].write_text(text + "\n")
    except OSError as err:
        raise EvalError(f"cannot write results to {out_dir} ({err.strerror or err}): pass --out-dir DIR") from None
    return paths


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
