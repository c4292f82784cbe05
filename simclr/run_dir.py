"""The run directory: resolved config, metadata, metrics.jsonl, TensorBoard events, and its lock."""
from __future__ import annotations

import datetime
import json
import os
import platform
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

    def __init__(self, run_dir: Path, config: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        meta = {"git_commit": git_commit(), "command": " ".join(sys.argv), "host": socket.gethostname(),
                "python": platform.python_version(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
        import torch

        meta["torch"] = torch.__version__
        with open(run_dir / "meta.jsonl", "a") as f:  # one line per start, resumes included
            f.write(json.dumps(meta) + "\n")
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(run_dir))

    def log(self, record: dict, step: int, prefix: str) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step", "global_step"):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.metrics.close()
        self.tensorboard.close()
