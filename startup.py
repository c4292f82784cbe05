"""What every command-line entry point does first: the CPU policy, set before torch starts, and one-line warnings.

`run.py`, `python -m feature_eval.evaluate`, `python -m feature_eval.finetune` and
`python -m pretrained_models.export` call these at the top of `main`; importing this module imports
nothing but the standard library (not torch), and changes nothing until a function is called.

The CPU policy, from the measurements in docs/CPU.md (a 2-core machine, idle and shared):

- `OMP_WAIT_POLICY=PASSIVE`: OpenMP threads that wait for work sleep instead of spinning. Spinning is
  a little faster on an idle machine, but when another process competes for the cores every
  multi-threaded torch op waits for a descheduled spinner, and epochs take several times longer. OpenMP
  reads the variable once, when torch loads it, so it must be in the environment before `import torch`.
- torch's threads: one per core this process may use (its CPU affinity and, in a container, its cgroup
  CPU quota, which torch does not look at).

Each is chosen only where the user has not set it (`OMP_WAIT_POLICY`, `OMP_NUM_THREADS`), and only for a
process that computes on the CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity, lowered to a cgroup CPU quota (rounded up) where there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def may_use_cpu(device: str) -> bool:
    """Whether a process given `device` (`auto`, `cpu`, `cuda`, `cuda:N`) computes on the CPU: `auto` does where
    no NVIDIA GPU is visible (checked without importing torch)."""
    if device == "cpu":
        return True
    if device.startswith(("cuda", "mps")):
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return True
    return not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir())


def device_from_argv(argv: list[str], default: str = "auto") -> str:
    """The value of a `--device X` or `--device=X` option, read before argparse runs (and before torch loads)."""
    for i, word in enumerate(argv):
        if word == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--device="):
            return word.split("=", 1)[1]
    return default


def prepare_cpu(device: str, owner: str) -> dict:
    """Set the CPU policy for a process about to import torch; return what is in force, for the run's record.

    Args:
        device: the device the command was given (`auto`, `cpu`, `cuda`, `cuda:N`).
        owner: the command, named in the record (`run.py`, `feature_eval.evaluate`, ...).
    Returns:
        `{"omp_wait_policy": ..., "omp_num_threads": ..., "set_by": ...}`: the values in force and who chose
        them (`owner`, `you` (already in the environment), or a reason nothing was set).
    """
    record = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if "torch" in sys.modules:  # too late: OpenMP has read its environment (a test, a notebook)
        return {**record, "set_by": "nobody: torch was already imported"}
    if not may_use_cpu(device):
        return {**record, "set_by": "nobody: the GPU computes"}
    chosen = []
    if record["omp_wait_policy"] is None:
        os.environ["OMP_WAIT_POLICY"] = record["omp_wait_policy"] = "PASSIVE"
        chosen.append("OMP_WAIT_POLICY")
    if record["omp_num_threads"] is None:
        os.environ["OMP_NUM_THREADS"] = record["omp_num_threads"] = str(available_cpus())
        chosen.append("OMP_NUM_THREADS")
    return {**record, "set_by": f"{owner} ({', '.join(chosen)})" if chosen else "you"}


def describe_cpu(record: dict, threads: int) -> str:
    """One line for the log: `CPU: 2 threads, OMP_WAIT_POLICY=PASSIVE (set by run.py (...))`."""
    return (f"CPU: {threads} torch thread(s), OMP_WAIT_POLICY={record.get('omp_wait_policy') or 'unset'} (set by "
            f"{record.get('set_by')}; docs/CPU.md says when to change them)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    kind = "" if category is UserWarning else f" [{category.__name__}]"
    stream = file if file is not None else sys.stderr
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr must not turn a warning into a crash
            stream.write(f"warning: {text}{kind}\n")


@contextlib.contextmanager
def one_line_warnings():
    """Print warnings as one line, `warning: <message>` (Python's default adds the file, line and source line)."""
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous
