"""Seconds per epoch, images/s, GPU busy % and the kNN monitor's share of a run: metrics.jsonl and nvidia-smi.

    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > gpu.csv &
    python run.py run_dir=runs/x ...; kill %1      # bench/gpu_check.sh does this for each of its runs
    python -m bench.run_summary runs/x --gpu-csv gpu.csv --json out/summary.json \\
        --target-epoch-seconds 10 --target-busy 90

An epoch's GPU busy % is the mean `utilization.gpu` (NVML's share of time a kernel ran, not how full the GPU is) of
the samples in the `seconds` before its record's `ended` time. The steady state is the median of the epochs after
the first (which pays for start-up); a run cut short before its first epoch ended, its step records.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import yaml

from simclr.run_dir import read_records

STL10_IMAGES = 105_000  # train + unlabeled: one STL10 pretraining epoch


class SummaryError(RuntimeError):
    """The run dir cannot be summarised; the message says which file and why."""


def read_run(run_dir: Path) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """The run's saved config (a dict) and the step, epoch and `knn_reference` records of its metrics.jsonl."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file():
        raise SummaryError(f"{metrics} is missing: give the run dir of a run that logged at least one step")
    if not config.is_file():
        raise SummaryError(f"{config} is missing: {run_dir} is not a run dir written by run.py")
    records = [record for _, record in read_records(metrics)]
    kinds = ("step", "epoch", "knn_reference")
    steps, epochs, references = ([r for r in records if r.get("kind") == kind] for kind in kinds)
    if not steps and not epochs:
        raise SummaryError(f"{metrics} has no step or epoch record: the run stopped before its first log step")
    return yaml.safe_load(config.read_text()), steps, epochs, references


def read_gpu_samples(path: Path) -> list[tuple[float, float, float]]:
    """`(Unix time, util %, memory MiB)` per line of nvidia-smi's CSV (`2026/11/30 10:01:02.345, 97, 20480`, local
    time); other lines (a header, `[N/A]`) are skipped."""
    samples = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        parts = [part.strip() for part in line.split(",")]
        try:
            when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((when, float(parts[1]), float(parts[2])))
        except (IndexError, ValueError):
            continue
    return samples


def gpu_stats(samples: list[tuple[float, float, float]]) -> dict:
    """The whole run's samples: count, seconds, utilisation mean, min and 10/50/90th percentiles, peak memory."""
    if not samples:
        return {"samples": 0}
    util = [s[1] for s in samples]
    deciles = statistics.quantiles(util, n=10, method="inclusive") if len(util) > 1 else util * 9
    return {"samples": len(samples), "seconds": samples[-1][0] - samples[0][0], "util_mean": statistics.fmean(util),
            "util_min": min(util), "util_p10": deciles[0], "util_p50": deciles[4], "util_p90": deciles[8],
            "memory_used_max_mib": max(s[2] for s in samples)}


def epoch_rows(steps: list[dict], epochs: list[dict], batch: int, samples: list) -> list[dict]:
    """One row per epoch record: seconds, images (steps x batch), images/s, and the GPU samples in its window."""
    rows = []
    for record in epochs:
        in_epoch = [r["step"] for r in steps if r["epoch"] == record["epoch"]]
        images = (max(in_epoch) + 1) * batch if in_epoch else None
        row = {"epoch": record["epoch"] + 1, "seconds": record["seconds"], "images": images,
               "images_per_s": images / record["seconds"] if images else None, "validated": "valid_loss" in record}
        end = datetime.datetime.fromisoformat(record["ended"]).timestamp() if "ended" in record else None
        window = [s for s in samples if end is not None and end - record["seconds"] <= s[0] <= end]
        if window:
            row.update(gpu_busy_percent=statistics.fmean(s[1] for s in window), gpu_samples=len(window),
                       gpu_memory_max_mib=max(s[2] for s in window))
        rows.append(row)
    return rows


def steady_state(rows: list[dict], step_rates: list[float], samples: list) -> dict:
    """Medians over the epochs after the first (the only one, if so); over `step_rates` and every sample when no
    epoch finished."""
    later = rows[1:] or rows
    steady = {"epochs": [r["epoch"] for r in later]}
    if later:
        steady["seconds"] = statistics.median(r["seconds"] for r in later)
        rates = [r["images_per_s"] for r in later if r["images_per_s"]]
        busy = [r["gpu_busy_percent"] for r in later if "gpu_busy_percent" in r]
    else:
        rates = step_rates
        busy = [statistics.fmean(s[1] for s in samples)] if samples else []
        steady["gpu_window"] = "the whole run (no epoch finished)"
    if rates:
        steady["images_per_s"] = statistics.median(rates)
        steady["stl10_epoch_seconds"] = STL10_IMAGES / steady["images_per_s"]
    if busy:
        steady["gpu_busy_percent"] = statistics.median(busy)
    return steady


def knn_share(epochs: list[dict], references: list[dict]) -> dict | None:
    """The kNN monitor's calls, seconds (in all and a call) and their percent of the training seconds: the epochs'
    (their calls included) and the reference call's, made before epoch 1's clock starts. None where it never ran."""
    calls = [r["knn_seconds"] for r in references + epochs if "knn_seconds" in r]
    if not calls:
        return None
    training = sum(r["seconds"] for r in epochs) + sum(r["knn_seconds"] for r in references)
    return {"calls": len(calls), "seconds": sum(calls), "seconds_per_call": sum(calls) / len(calls),
            "training_seconds": training, "percent": 100 * sum(calls) / training if training else 0.0}


def summarize_run(run_dir: str | Path, gpu_csv: str | Path | None = None) -> dict:
    """Per-epoch seconds, images, images/s and GPU busy %, and their steady state (epochs after the first)."""
    config, steps, epochs, references = read_run(Path(run_dir))
    samples = read_gpu_samples(Path(gpu_csv)) if gpu_csv else []
    rows = epoch_rows(steps, epochs, config["batch_size"], samples)
    # each step record's images_per_s covers the steps since the previous record; an epoch's first, its start too
    step_rates = [r["images_per_s"] for r in steps
                  if any(o["epoch"] == r["epoch"] and o["global_step"] < r["global_step"] for o in steps)]
    steady = steady_state(rows, step_rates or [r["images_per_s"] for r in steps], samples)
    summary = {"run_dir": str(run_dir), "batch_size": config["batch_size"], "model": config["model"]["base_model"],
               "crop": config["dataset"]["input_shape"][0], "augment_on": config["dataset"]["augment_on"],
               "amp": {True: config["amp_dtype"], False: "none"}.get(config["fp16_precision"], "auto"),
               "device": config["device"], "epochs": rows, "steady": steady, "gpu": gpu_stats(samples),
               "step_images_per_s_median": statistics.median(step_rates) if step_rates else None,
               "knn_monitor": knn_share(epochs, references)}
    if "gpu_busy_percent" not in steady:
        summary["gpu_note"] = ("no 'ended' time in the epoch records to place the epochs in time" if samples else
                               f"no GPU samples in {gpu_csv}" if gpu_csv else "no --gpu-csv given")
    return summary


def format_summary(summary: dict, target_seconds: float | None = None, target_busy: float | None = None) -> str:
    """Human-readable lines: the run, one line per epoch, the steady state, and the targets met or missed."""
    s, st = summary, summary["steady"]
    lines = [f"run {s['run_dir']}: {s['model']}, batch {s['batch_size']}, {s['crop']} px, augment_on "
             f"{s['augment_on']}, amp {s['amp']}, device {s['device']}"]
    for r in s["epochs"]:
        rate = f"{r['images']:,} images, {r['images_per_s']:,.0f} img/s" if r["images"] else "images unknown"
        busy = (f"GPU busy {r['gpu_busy_percent']:.1f}% ({r['gpu_samples']} samples), GPU memory max "
                f"{r['gpu_memory_max_mib']:,.0f} MiB" if "gpu_busy_percent" in r else "GPU busy n/a")
        lines.append(f"epoch {r['epoch']}: {r['seconds']:.2f} s{' (with validation)' if r['validated'] else ''}, "
                     f"{rate}, {busy}")
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
    line += (f"; GPU busy {st['gpu_busy_percent']:.1f}%" + (f" over {st['gpu_window']}" if "gpu_window" in st else "")
             if "gpu_busy_percent" in st else f"; GPU busy n/a ({s['gpu_note']})")
    lines.append(line)
    if s["step_images_per_s_median"]:
        lines.append(f"step records (median images_per_s, each epoch's first left out): "
                     f"{s['step_images_per_s_median']:,.0f} img/s")
    if k := s["knn_monitor"]:
        lines.append(f"kNN monitor: {k['calls']} calls, {k['seconds']:.1f} s ({k['seconds_per_call']:.2f} s a call), "
                     f"{k['percent']:.1f} % of the training seconds (epochs + reference: {k['training_seconds']:.1f} s)")
    if target_seconds is not None and "stl10_epoch_seconds" in st:
        lines.append(f"target: an STL10 epoch <= {target_seconds:g} s: "
                     f"{'met' if st['stl10_epoch_seconds'] <= target_seconds else 'MISSED'} "
                     f"({st['stl10_epoch_seconds']:,.1f} s)")
    if target_busy is not None:
        busy = st.get("gpu_busy_percent")
        lines.append(f"target: GPU busy >= {target_busy:g}%: " + ("n/a (no GPU samples)" if busy is None else
                     f"{'met' if busy >= target_busy else 'MISSED'} ({busy:.1f}%)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--gpu-csv", type=Path, help="nvidia-smi's samples during the run (the command above)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--target-epoch-seconds", type=float, help="say whether an STL10 epoch takes at most this")
    parser.add_argument("--target-busy", type=float, help="say whether the GPU is busy at least this %% of the epoch")
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
