"""Seconds per epoch, images/s and GPU busy % of a training run, from its run dir and a gpu_monitor CSV.

    python -m bench.run_summary runs/<name> --gpu-csv out/gpu.csv --json out/summary.json \\
        --target-epoch-seconds 10 --target-busy 90

Seconds per epoch are the `seconds` of the epoch records in `metrics.jsonl` (training plus validation, when
the run validates); images per epoch are steps x `batch_size` (the last step record of an epoch has
`step = steps - 1`). Each epoch's wall-clock window ends at the `wall_time` of its `epoch/seconds`
TensorBoard event and starts `seconds` before; the GPU busy % of an epoch is the mean `util_percent` of the
monitor's samples in that window. The first epoch pays for start-up (cuDNN autotuning, DataLoader workers,
compilation), so the steady-state figures are those of the later epochs.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

STL10_IMAGES = 105_000  # train + unlabeled: one STL10 pretraining epoch


class SummaryError(RuntimeError):
    """The run dir or the monitor CSV cannot be summarised; the message says which file and why."""


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The step and epoch records of `<run_dir>/metrics.jsonl` (lines that are not JSON objects are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SummaryError(f"{path} is missing: give the run dir of a run that finished at least one epoch")
    steps, epochs = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == "step":
            steps.append(record)
        elif isinstance(record, dict) and record.get("kind") == "epoch":
            epochs.append(record)
    if not steps and not epochs:
        raise SummaryError(f"{path} has no step or epoch record: the run stopped before its first log step")
    return steps, epochs


def epoch_end_times(run_dir: Path) -> dict[int, float]:
    """Global step -> wall time (Unix seconds) of the run's `epoch/seconds` TensorBoard events (latest wins)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        return {}
    ends = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == "epoch/seconds" for value in event.summary.value):
                ends[event.step] = max(event.wall_time, ends.get(event.step, 0.0))
    return ends


def read_gpu_csv(path: Path) -> tuple[list[tuple[float, float, float]], str]:
    """The monitor's samples `(time, util %, memory MiB)` and its note ('' or why there are none)."""
    if not path.is_file():
        raise SummaryError(f"{path} is missing: start python -m bench.gpu_monitor --csv {path} before the run")
    with open(path, newline="") as f:
        samples = [(float(r["time"]), float(r["util_percent"]), float(r["memory_used_mib"])) for r in csv.DictReader(f)]
    stats = path.with_suffix(".json")
    note = json.loads(stats.read_text()).get("note", "") if stats.is_file() else ""
    return samples, note or ("" if samples else "the monitor recorded no samples")


def summarize_run(run_dir: str | Path, gpu_csv: str | Path | None = None) -> dict:
    """Per-epoch seconds, images, images/s and GPU busy %, and their steady state (epochs after the first)."""
    run_dir = Path(run_dir)
    steps, epochs = read_records(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise SummaryError(f"{config_path} is missing: {run_dir} is not a run dir written by run.py")
    config = yaml.safe_load(config_path.read_text())
    batch = config["batch_size"]
    ends = epoch_end_times(run_dir)
    samples, gpu_note = read_gpu_csv(Path(gpu_csv)) if gpu_csv else ([], "no GPU monitor given")
    done_steps = 0
    rows = []
    for record in epochs:
        in_epoch = [r["step"] for r in steps if r["epoch"] == record["epoch"]]
        steps_per_epoch = max(in_epoch) + 1 if in_epoch else None
        row = {"epoch": record["epoch"] + 1, "seconds": record["seconds"],
               "images": steps_per_epoch * batch if steps_per_epoch else None, "validated": "valid_loss" in record}
        row["images_per_s"] = row["images"] / record["seconds"] if row["images"] else None
        if steps_per_epoch:
            done_steps = (record["epoch"] + 1) * steps_per_epoch
        end = ends.get(done_steps)
        if end is not None and samples:
            window = [s for s in samples if end - record["seconds"] <= s[0] <= end]
            if window:
                row["gpu_busy_percent"] = statistics.fmean(s[1] for s in window)
                row["gpu_samples"] = len(window)
                row["gpu_memory_max_mib"] = max(s[2] for s in window)
        rows.append(row)
    # images_per_s of step records: each covers the steps since the previous record; an epoch's first includes its start
    step_rates = [r["images_per_s"] for r in steps
                  if any(o["epoch"] == r["epoch"] and o["global_step"] < r["global_step"] for o in steps)]
    later = rows[1:] or rows
    steady = {"epochs": [r["epoch"] for r in later]}
    if later:
        steady["seconds"] = statistics.median(r["seconds"] for r in later)
        rates = [r["images_per_s"] for r in later if r["images_per_s"]]
        busy = [r["gpu_busy_percent"] for r in later if "gpu_busy_percent" in r]
    else:  # cut short before its first epoch ended: the step records and every sample are all there is
        rates = [statistics.median(step_rates or [r["images_per_s"] for r in steps])]
        busy = [statistics.fmean(s[1] for s in samples)] if samples else []
        steady["gpu_window"] = "the whole run (no epoch finished)"
    if rates:
        steady["images_per_s"] = statistics.median(rates)
        steady["stl10_epoch_seconds"] = STL10_IMAGES / steady["images_per_s"]
    if busy:
        steady["gpu_busy_percent"] = statistics.median(busy)
    summary = {"run_dir": str(run_dir), "batch_size": batch, "model": config["model"]["base_model"],
               "crop": config["dataset"]["input_shape"][0], "augment_on": config["dataset"]["augment_on"],
               "amp": {True: config["amp_dtype"], False: "none"}.get(config["fp16_precision"], "auto"),
               "device": config["device"],
               "epochs": rows, "steady": steady,
               "step_images_per_s_median": statistics.median(step_rates) if step_rates else None}
    if not busy:
        summary["gpu_note"] = gpu_note or ("no TensorBoard epoch events to place the epochs in time" if samples
                                           else "no samples")
    return summary


def format_summary(summary: dict, target_seconds: float | None = None, target_busy: float | None = None) -> str:
    """Human-readable lines: the run, one line per epoch, the steady state, and the targets met or missed."""
    s = summary
    lines = [f"run {s['run_dir']}: {s['model']}, batch {s['batch_size']}, {s['crop']} px, augment_on {s['augment_on']}, "
             f"amp {s['amp']}, device {s['device']}"]
    for r in s["epochs"]:
        rate = f"{r['images']:,} images, {r['images_per_s']:,.0f} img/s" if r["images"] else "images unknown"
        busy = (f"GPU busy {r['gpu_busy_percent']:.1f}% ({r['gpu_samples']} samples), GPU memory max "
                f"{r['gpu_memory_max_mib']:,.0f} MiB" if "gpu_busy_percent" in r else "GPU busy n/a")
        lines.append(f"epoch {r['epoch']}: {r['seconds']:.2f} s{' (with validation)' if r['validated'] else ''}, "
                     f"{rate}, {busy}")
    st = s["steady"]
    if not st["epochs"]:
        line = "no epoch finished; from the step records"
    elif len(st["epochs"]) > 1:
        line = f"steady state (epochs {st['epochs'][0]}-{st['epochs'][-1]}, median): {st['seconds']:.2f} s per epoch"
    else:
        first = ", the only one: includes the start-up" if st["epochs"] == [1] else ""
        line = f"steady state (epoch {st['epochs'][0]}{first}): {st['seconds']:.2f} s per epoch"
    if "images_per_s" in st:
        line += (f", {st['images_per_s']:,.0f} img/s; an STL10 epoch ({STL10_IMAGES:,} images) at this rate: "
                 f"{st['stl10_epoch_seconds']:,.1f} s")
    if "gpu_busy_percent" in st:
        line += f"; GPU busy {st['gpu_busy_percent']:.1f}%" + (f" over {st['gpu_window']}" if "gpu_window" in st else "")
    else:
        line += f"; GPU busy n/a ({s['gpu_note']})"
    lines.append(line)
    if s["step_images_per_s_median"]:
        lines.append(f"step records (median images_per_s, each epoch's first left out): "
                     f"{s['step_images_per_s_median']:,.0f} img/s")
    if target_seconds is not None and "stl10_epoch_seconds" in st:
        met = st["stl10_epoch_seconds"] <= target_seconds
        lines.append(f"target: an STL10 epoch <= {target_seconds:g} s: {'met' if met else 'MISSED'} "
                     f"({st['stl10_epoch_seconds']:,.1f} s)")
    if target_busy is not None:
        value = st.get("gpu_busy_percent")
        lines.append(f"target: GPU busy >= {target_busy:g}%: " + ("n/a (no GPU samples)" if value is None else
                                                                   f"{'met' if value >= target_busy else 'MISSED'} ({value:.1f}%)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--gpu-csv", type=Path, help="bench.gpu_monitor's CSV sampled during the run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--target-epoch-seconds", type=float, help="say whether an STL10 epoch takes at most this")
    parser.add_argument("--target-busy", type=float, help="say whether the GPU is busy at least this % of the epoch")
    args = parser.parse_args(argv)
    try:
        summary = summarize_run(args.run_dir, args.gpu_csv)
    except (SummaryError, OSError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary, args.target_epoch_seconds, args.target_busy))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
