"""The run directory: resolved config, metadata, metrics.jsonl, TensorBoard events, and its lock."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from simclr.config import Config, config_to_dict


class RunDirBusy(RuntimeError):
    """Another live process is writing into this run directory."""


def default_run_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("runs") / f"{stamp}_{socket.gethostname()}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


STALE_SECONDS = 600


class RunLock:
    """An exclusive lock file `<run_dir>/.lock` holding the owner's host and pid.

    A lock left by a crashed process is taken over, so a crash never leaves the directory stuck: on the
    same host when its pid is gone, from another host (a requeued cluster job) when its owner has not
    refreshed it for `STALE_SECONDS` (the trainer refreshes it as it steps).
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False
        self._touched = 0.0

    def refresh(self, every: float = 30.0) -> None:
        """Mark the owner alive (at most once per `every` seconds: cheap to call each step)."""
        now = time.monotonic()
        if self.held and now - self._touched > every:
            os.utime(self.path)
            self._touched = now

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
                if _alive(owner, self.path):
                    raise RunDirBusy(f"run_dir {self.path.parent} is in use by process {owner!r}: wait for it, "
                                     "stop it, or choose another run_dir") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise RunDirBusy(f"could not take the lock {self.path}: remove it if no run is using {self.path.parent}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(owner: str, path: Path) -> bool:
    parts = owner.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():  # another machine's pid cannot be checked: go by the last refresh
        try:
            return time.time() - path.stat().st_mtime < STALE_SECONDS
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunWriter:
    """Writes the run's records. Create it only on the main process."""

    def __init__(self, run_dir: Path, config: Config, resume_step: int | None = None, resume_epoch: int = 0):
        """Record a start (or resume) of the run in `run_dir` and open its metrics and TensorBoard logs.

        Args:
            resume_step: optimiser steps done by the checkpoint being resumed (`next_epoch * steps_per_epoch
                + step_in_epoch`), 0 for a fresh start. Records of work after it (an attempt killed after its
                last checkpoint, or an earlier run into this folder when 0) are dropped from metrics.jsonl:
                it keeps step records with `global_step <= resume_step`, epoch records with
                `epoch < resume_epoch`, the `knn_reference` record when `resume_step > 0`, and no other line (nor
                a half-written one). TensorBoard hides events
                at steps `>= resume_step + 1` of earlier event files (`purge_step`, for every tag). None
                leaves both logs as they are and appends.
            resume_epoch: the checkpoint's `next_epoch` (0 for a fresh start).

        The trainer logs epoch tags at the global step where the epoch ends, so the purge treats them like
        the step tags: events of epochs past the checkpoint go, earlier ones stay.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        meta = {"git_commit": git_commit(), "command": _command_line(), "host": socket.gethostname(),
                "python": platform.python_version(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
        import torch

        meta["torch"] = torch.__version__
        # the CPU policy in force (run.py sets the OpenMP ones where the user did not; docs/CPU.md)
        meta["cpu"] = {"torch_threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        with open(run_dir / "meta.jsonl", "a") as f:  # one line per start, resumes included
            f.write(json.dumps(meta) + "\n")
        purge_step = None
        if resume_step is not None:
            _keep_records_until(run_dir / "metrics.jsonl", resume_step, resume_epoch)
            if any(run_dir.glob("events.out.tfevents.*")):  # a fresh start also hides step 0 (knn_reference)
                purge_step = resume_step + 1 if resume_step else 0
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(run_dir), purge_step=purge_step)

    def log(self, record: dict, step: int, prefix: str) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step", "global_step"):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.metrics.close()
        self.tensorboard.close()


def _command_line() -> str:
    """The command that started this process, quoted so that it can be pasted into a shell."""
    argv = sys.argv if sys.argv and sys.argv[0] else ["python"]
    return shlex.join((["python"] if argv[0].endswith(".py") else []) + argv)


def read_records(path: Path):
    """Yield `(line, record)` for each JSON object line of a metrics.jsonl; half-written or other lines are skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield line, record


def _keep_records_until(path: Path, step: int, epoch: int) -> None:
    """Rewrite metrics.jsonl atomically with the step records up to global step `step`, the epoch
    records of epochs before `epoch` and, unless `step` is 0 (a fresh start), the kNN monitor's `knn_reference`;
    any other line, a half-written one included, is dropped."""
    if not path.exists():
        return
    kept = []
    for line, record in read_records(path):
        if record.get("kind") == "step" and isinstance(record.get("global_step"), int):
            done = record["global_step"] <= step
        elif record.get("kind") == "epoch" and isinstance(record.get("epoch"), int):
            done = record["epoch"] < epoch
        elif record.get("kind") == "knn_reference":  # measured before the first step: kept by any resume
            done = step > 0
        else:
            done = False
        if done:
            kept.append(line.rstrip("\n") + "\n")
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per run dir: its lock is held
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
