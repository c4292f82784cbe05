"""What every command-line entry point does first: the CPU policy, set before torch starts, and one-line warnings.

`run.py`, `python -m feature_eval.evaluate`, `python -m feature_eval.finetune` and
`python -m pretrained_models.export` call these at the top of `main`; importing this module imports
nothing but the standard library (not torch), and changes nothing until a function is called. The exit
statuses every command keeps to (`EXIT_*`, docs/EXIT_CODES.md), the one table that says which errors are the
user's and how each ends (`ERROR_POLICY`, `report_error`) and the check of the torch/torchvision pair
(`torch_install_problem`) live here too, for the same reason: every command reads them, some before torch loads.

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
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"

# Exit statuses of every command (docs/EXIT_CODES.md has the table and the reasons).
EXIT_OK = 0  # finished what was asked (or found nothing left to do)
EXIT_ERROR = 1  # a runtime error: data, checkpoints, disk, memory, the install, or a failure after training
EXIT_USAGE = 2  # a config or usage error: an option or key unknown, ill-typed, out of range; nothing was started
EXIT_PREEMPTED = 75  # stopped by a signal after saving a checkpoint: resume it (sysexits.h EX_TEMPFAIL, "try again")
EXIT_INTERRUPTED = 130  # stopped at once (Ctrl-C, or a second signal), as a shell reports SIGINT (128 + 2)


class ErrorRule(NamedTuple):
    """How a command ends on one kind of error: its exit status, the label its line starts with (`<label>: ...`),
    and whether each torchrun process says it (`<label> (rank N): ...` on ranks other than 0) or rank 0 alone."""

    status: int
    label: str
    every_rank: bool = True


# The errors that are the user's to fix, each said in one line on stderr, for run.py, feature_eval's drivers
# (`context.run_cli`) and pretrained_models.export alike; any other error is a bug and keeps its traceback. Keyed by
# `<module>.<class>` (this module imports nothing of the project's; tests/test_exit_codes.py checks that each names a
# class) and looked up along an error's class hierarchy, so a subclass may have a row of its own.
ERROR_POLICY = {
    "simclr.config.ConfigError": ErrorRule(EXIT_USAGE, "config error", every_rank=False),  # the same on every rank
    "simclr.dist.DeviceError": ErrorRule(EXIT_USAGE, "config error"),  # a device this machine (rank) lacks
    "feature_eval.context.EvalError": ErrorRule(EXIT_USAGE, "error"),  # an evaluation option
    "pretrained_models.export.ExportError": ErrorRule(EXIT_USAGE, "error"),  # a package name or destination
    "data_aug.errors.DataError": ErrorRule(EXIT_ERROR, "error"),  # a data set missing or damaged
    "models.files.CheckpointLoadError": ErrorRule(EXIT_ERROR, "error"),  # missing, damaged, another model's
    "simclr.checkpoint.CheckpointWriteError": ErrorRule(EXIT_ERROR, "error"),  # the previous one is intact
    "simclr.trainer.TrainingError": ErrorRule(EXIT_ERROR, "error"),  # a non-finite loss, impossible sizes
    "simclr.run_dir.RunDirBusy": ErrorRule(EXIT_ERROR, "error"),  # another live process writes there
    "simclr.dist.StartError": ErrorRule(EXIT_ERROR, "error"),  # torchrun's processes did not all meet
    "torch.OutOfMemoryError": ErrorRule(EXIT_ERROR, "error"),  # torch.cuda.OutOfMemoryError
    "builtins.OSError": ErrorRule(EXIT_ERROR, "error"),  # a file or folder that cannot be made, read or written
    "builtins.KeyboardInterrupt": ErrorRule(EXIT_INTERRUPTED, "interrupted"),  # Ctrl-C, or a second signal
}


def error_rule(err: BaseException) -> ErrorRule | None:
    """`ERROR_POLICY`'s row for `err`: its class's, else the nearest base class's; None for an error it does not
    know (a bug)."""
    for cls in type(err).__mro__:
        rule = ERROR_POLICY.get(f"{_module_name(cls.__module__)}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def _module_name(module: str) -> str:
    """A module's importable name: under `python -m pretrained_models.export` its classes live in `__main__`, whose
    spec still names the module (a script run as `python run.py` has no spec and stays `__main__`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None) if module == "__main__" else None
    return spec.name if spec is not None else module


def error_text(err: BaseException) -> str:
    """What an error's line says after its label: an OSError's reason and file (`Permission denied: /x/run`), else
    its message (from the last line of a DataLoader worker's traceback, where one wraps it)."""
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def report_error(err: BaseException, rank: int = 0, text: str | None = None) -> int:
    """Say `err` in one line on stderr as `ERROR_POLICY` says, once per run or once per rank; its exit status.

    Args:
        err: the error a command caught; one the table does not know is raised again, its traceback intact.
        rank: this process's torchrun rank (0 without torchrun).
        text: what follows the label, where the command words it its own way (default: `error_text(err)`).
    """
    rule = error_rule(err)
    if rule is None:
        raise err
    if rank == 0 or rule.every_rank:
        where = "" if rank == 0 else f" (rank {rank})"
        print(f"{rule.label}{where}: {error_text(err) if text is None else text}", file=sys.stderr)
    return rule.status


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


def torch_install_problem() -> str | None:
    """One line saying why torch or torchvision cannot be imported, with the command that fixes it; None if both do.

    A torchvision built for another torch (a CPU-only torch from one index and torchvision from another) fails
    as it loads with `operator torchvision::nms does not exist` and a 30-line traceback; this names both
    versions instead. It imports torch and torchvision: call it after `prepare_cpu`.
    """
    try:
        import torch
    except ImportError as err:
        return (f"cannot import torch ({err}): install PyTorch as README.md's 'Set up' says (pip install torch "
                "torchvision --index-url https://download.pytorch.org/whl/cpu on a machine without a GPU)")
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, AttributeError) as err:  # AttributeError: a second, partial import
        installed = _distribution_version("torchvision")
        reason = " ".join(str(err).split()) or type(err).__name__
        if installed is None:
            return f"torchvision is not installed ({reason}): {matching_pair_command(torch.__version__, None)}"
        return (f"torch {torch.__version__} and torchvision {installed} do not work together (importing "
                f"torchvision: {reason[:120]}); install a matching pair: "
                f"{matching_pair_command(torch.__version__, installed)}")
    return None


def exit_if_torch_is_broken() -> None:
    """`torch_install_problem`'s line on stderr and exit `EXIT_ERROR`, for a command's first lines (before the
    imports that would fail with a traceback)."""
    problem = torch_install_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release built for `torch_version` (`2.14.1+cpu` -> `0.29.1`), from PyTorch's compatibility
    table (torch 2.N.P pairs with torchvision 0.(N+15).P since 2.1; 2.0.0 and 2.0.1 with 0.15.1 and 0.15.2);
    None for versions outside it."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", torch_version)
    if not found:
        return None
    major, minor, patch = map(int, found.groups())
    if major != 2:
        return None
    return f"0.15.{patch + 1}" if minor == 0 else f"0.{minor + 15}.{patch}"


def matching_pair_command(torch_version: str, torchvision_version: str | None) -> str:
    """The pip command that installs torchvision matching `torch_version`, from the index the torch build came
    from (its local tag: `+cpu`, `+cu121`, ...); `--force-reinstall` when the numbers already match (then the
    builds differ)."""
    local = torch_version.partition("+")[2]
    index = f" --index-url https://download.pytorch.org/whl/{local}" if local else ""
    wanted = matching_torchvision(torch_version)
    if wanted is None:
        return f"pip install --force-reinstall torch torchvision{index} (both from the same index)"
    same = torchvision_version is not None and torchvision_version.partition("+")[0] == wanted
    return (f"pip install {'--force-reinstall ' if same else ''}torch=={torch_version.partition('+')[0]} "
            f"torchvision=={wanted}{index}")


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
