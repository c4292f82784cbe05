"""Atomic checkpoint save, safe load, and the choice of checkpoint to resume from."""
from __future__ import annotations

import os
import secrets
import warnings
import zipfile
from pathlib import Path

import torch

from models.loading import CHECKPOINT_VERSION, CheckpointLoadError, read_weights

VERSION = CHECKPOINT_VERSION  # the format that models.loading.read_weights reads (and upgrades older ones to)
LAST, PREVIOUS, BEST = "last.pt", "last.prev.pt", "best.pt"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers, so saved keys carry no prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(path: str | Path, state: dict, keep_previous: bool = False, write=torch.save) -> None:
    """Write `state` to a temporary file in the same folder, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old or the new file complete. With `keep_previous`, the
    file being replaced is first renamed to `last.prev.pt`, so a damaged newest file has a fallback; a
    file being replaced that is itself damaged (the one `resume=auto` skipped) is moved aside to
    `<name>.damaged` instead, so it never takes the place of a good `last.prev.pt`.

    The file gets the permissions of any other file the run writes (0o666 less the umask), so others
    on a shared machine can read it as they read config.yaml.

    `write(obj, file)` puts the bytes into the open temporary file: `torch.save`, or in the tests a writer that
    fails as a full disk does or pauses half-way (tests/fault_runner.py, through `Trainer.write_checkpoint`).

    Raises:
        CheckpointWriteError: the write failed (full disk, quota, file size limit); the previous checkpoint is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _create_temp(path)
    except OSError as err:
        raise _write_error(path, err.strerror or str(err)) from None
    try:
        try:
            with open(tmp, "wb") as f:
                write({"version": VERSION, **state}, f)
                f.flush()
                os.fsync(f.fileno())
        except RuntimeError as err:
            # torch's zip writer reports a short write (full disk) as RuntimeError: "[enforce fail at
            # inline_container.cc:...] . unexpected pos ..."; anything else (a CUDA error while copying) still raises.
            if not any(sign in str(err) for sign in ("unexpected pos", "PytorchStreamWriter", "file write failed")):
                raise
            detail = str(err).splitlines()[0]
            raise _write_error(path, f"a short write, as on a full disk or over a quota; torch: {detail}") from None
        if keep_previous and path.exists():
            if is_complete_checkpoint(path):
                os.replace(path, path.parent / PREVIOUS)
            else:
                damaged = path.with_name(path.name + ".damaged")
                os.replace(path, damaged)
                kept = path.parent / PREVIOUS
                warnings.warn(f"{path} was damaged (not a complete checkpoint): moved it to {damaged}"
                              + (f" and kept {kept} as the fallback" if kept.exists() else ""), stacklevel=2)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err.strerror or str(err)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, reason: str) -> CheckpointWriteError:
    return CheckpointWriteError(f"could not write checkpoint {path} ({reason}); the previous checkpoint is intact: "
                                "free disk space or change run_dir, then resume")


def _create_temp(path: Path) -> str:
    """A new empty file `<name>.<random>.tmp` next to `path`.

    Created with mode 0o666 so that the kernel applies the umask (and a folder's default ACL), as for
    any `open()`; `tempfile.mkstemp` would make it 0o600, readable by its owner alone.
    """
    for _ in range(100):
        tmp = path.parent / f"{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"could not create a temporary file next to {path}")


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the `*.tmp` files that a process killed while saving left in `folder` (call only under the run's lock:
    another writer's temporary file would go too)."""
    for stale in folder.glob("*.tmp"):
        stale.unlink(missing_ok=True)


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a whole file written by `torch.save`, read without loading its tensors.

    torch.save writes a zip archive whose central directory is the last thing in the file, so a
    truncated, empty or overwritten file has none and fails to open; the pickle (`*/data.pkl`, a few
    kB) is then read in full, which checks its CRC-32 (torch.load itself does not). That covers what a
    crash, a full disk or a bad copy leave behind, for the cost of reading the directory and the
    pickle rather than every tensor (a full `torch.load` reads gigabytes for a large model's
    optimiser state, every epoch). Tensor bytes are not checked, as torch.load does not check them.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return False
            if archive.getinfo(pickles[0]).CRC:  # 0: written with torch's CRC-32 turned off, nothing to check
                archive.read(pickles[0])  # raises BadZipFile on a CRC mismatch
    except Exception:  # noqa: BLE001 - a damaged directory can raise nearly anything (zlib.error, NotImplementedError)
        return False
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_resume_state(path: str | Path) -> dict:
    """The whole state of a training checkpoint, what a resume restores (weights, optimiser, `next_epoch`, config),
    on the CPU with `weights_only=True`; damaged or unsafe files, and weights-only files (a package), raise."""
    state = read_weights(path)
    missing = [k for k in ("next_epoch", "optimizer", "config") if k not in state]
    if missing:
        raise CheckpointLoadError(f"checkpoint {path} lacks {', '.join(missing)}: it is not a training checkpoint "
                                  "(use fine_tune_from to start from weights only)")
    return state


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run dir that could be resumed from, newest first (never a `*.damaged` file set aside)."""
    folder = run_dir / "checkpoints"
    return [p for p in (folder / LAST, folder / PREVIOUS) if p.is_file()]


def find_resume_state(target: str | Path, auto: bool, log=print) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state.

    `target` is a run dir or a checkpoint file. With `auto`, a run dir without checkpoints gives None
    (start fresh) and a damaged newest checkpoint is skipped (reported) in favour of an older one;
    without it, a damaged checkpoint is an error naming the file and the others available.
    """
    target = Path(target)
    if target.is_file():
        return target, read_resume_state(target)
    if not target.is_dir():
        if auto:
            return None
        raise CheckpointLoadError(f"resume={target}: no such run directory or checkpoint file")
    found = candidates(target)
    if not found:
        if auto:
            return None
        raise CheckpointLoadError(f"resume={target}: the run directory has no checkpoints/{LAST} "
                                  f"(or {PREVIOUS}); it has not finished an epoch, start it afresh")
    errors = []
    for path in found:
        try:
            state = read_resume_state(path)
        except CheckpointLoadError as err:
            if not auto:
                others = [str(p) for p in found if p != path]
                raise CheckpointLoadError(f"{err}. Other checkpoints: {', '.join(others) or 'none'}; pass one "
                                          "with resume=PATH, or use resume=auto to take the newest readable") from None
            errors.append(str(err))
            continue
        for message in errors:
            log(f"resume: skipped a damaged checkpoint: {message}")
        return path, state
    raise CheckpointLoadError("resume: no readable checkpoint in " + str(target) + ": " + "; ".join(errors))
