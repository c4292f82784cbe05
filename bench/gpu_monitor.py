"""Sample GPU utilisation and memory in the background: a CSV of samples and a JSON of mean and percentiles.

    python -m bench.gpu_monitor --csv out/gpu.csv &      # samples every 0.2 s until SIGTERM or SIGINT
    with GpuMonitor("out/gpu.csv"): train()              # the same from Python

Reads NVML through `pynvml` (the nvidia-ml-py package) when it imports and finds the GPU, else streams
`nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used -lms <ms>`. Without either (no GPU) it records no
samples and says why in the JSON instead of failing. `utilization.gpu` is NVML's share of the last sample
period in which at least one kernel ran: "GPU busy", not how full the GPU is. NVML numbers GPUs by PCI
order, not by `CUDA_VISIBLE_DEVICES`.

Writes `<csv>` (`time,util_percent,memory_used_mib`, time in Unix seconds, the clock TensorBoard's
`wall_time` uses) and `<csv minus .csv>.json`.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

QUERY = "timestamp,utilization.gpu,memory.used"  # its own timestamp: right even if its output is buffered


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: list[tuple[float, float, float]]) -> dict:
    """Mean, min and percentiles of utilisation and the peak memory of `(time, util, memory)` samples."""
    if not samples:
        return {"samples": 0}
    util = [s[1] for s in samples]
    return {"samples": len(samples), "seconds": samples[-1][0] - samples[0][0],
            "util_mean": sum(util) / len(util), "util_min": min(util),
            **{f"util_p{q}": percentile(util, q) for q in (10, 50, 90)},
            "memory_used_max_mib": max(s[2] for s in samples)}


def _open_nvml(gpu: int):
    """A function returning `(util %, memory MiB)` of `gpu` through pynvml, or None with the reason."""
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
    except Exception as err:  # pynvml.NVMLError: no driver, no such GPU
        return None, f"NVML could not open GPU {gpu} ({err})"

    def read() -> tuple[float, float]:
        return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
    return read, ""


def _parse_smi_line(line: str) -> tuple[float, float, float] | None:
    """`(Unix time, util %, memory MiB)` from a line such as `2026/11/30 10:01:02.345, 97, 20480`, else None.

    A timestamp in another format is replaced by the time the line is read."""
    parts = [p.strip() for p in line.split(",")]
    try:
        util, memory = float(parts[1]), float(parts[2])
    except (IndexError, ValueError):  # a header, a blank line or "[N/A]"
        return None
    try:
        when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time
    except ValueError:
        when = time.time()
    return when, util, memory


class GpuMonitor:
    """Samples one GPU every `interval` seconds in a background thread until `stop()`."""

    def __init__(self, csv_path: str | Path, interval: float = 0.2, gpu: int = 0):
        self.csv_path, self.interval, self.gpu = Path(csv_path), interval, gpu
        self.samples: list[tuple[float, float, float]] = []
        self.source, self.note = "none", ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> "GpuMonitor":
        read, why_not_nvml = _open_nvml(self.gpu)
        if read is not None:
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._poll, args=(read,), daemon=True)
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-i", str(self.gpu),
                 "-lms", str(max(1, round(self.interval * 1000)))],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._stream, daemon=True)
        else:
            self.note = f"no GPU: {why_not_nvml} and nvidia-smi is not on PATH; no samples"
        if self._thread is not None:
            self._thread.start()
        return self

    def _poll(self, read) -> None:
        while not self._stop.is_set():
            tick = time.time()
            try:
                util, memory = read()
            except Exception as err:  # the driver went away mid-run: keep what was sampled
                self.note = f"NVML stopped answering ({err})"
                return
            self.samples.append((tick, util, memory))
            self._stop.wait(max(0.0, self.interval - (time.time() - tick)))

    def _stream(self) -> None:
        for line in self._process.stdout:
            parsed = _parse_smi_line(line)
            if parsed is not None:
                self.samples.append(parsed)

    def stop(self) -> dict:
        """Stop sampling, write the CSV and the JSON summary; returns the summary."""
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)  # the stream thread reads what nvidia-smi wrote before it stopped
        if self._process is not None and not self.samples:
            error = self._process.stderr.read().strip()
            self.note = (f"nvidia-smi gave no samples (exit {self._process.returncode}"
                         + (f": {error.splitlines()[-1]}" if error else "") + ")")
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["time", "util_percent", "memory_used_mib"])
            out.writerows((f"{t:.3f}", f"{u:g}", f"{m:.0f}") for t, u, m in list(self.samples))
        stats = {"source": self.source, "gpu": self.gpu, "interval_s": self.interval, **summarize(self.samples)}
        if self.note:
            stats["note"] = self.note
        self.csv_path.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n")
        return stats

    def __enter__(self) -> "GpuMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="samples go here; the summary beside it (.json)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        print("error: --interval must be > 0 seconds", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    monitor = GpuMonitor(args.csv, args.interval, args.gpu).start()
    print(f"gpu_monitor: sampling with {monitor.source}" + (f" ({monitor.note})" if monitor.note else ""), flush=True)
    while not done.wait(1.0):
        pass
    stats = monitor.stop()
    print("gpu_monitor: " + json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
