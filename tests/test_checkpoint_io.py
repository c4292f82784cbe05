"""Checkpoint and run-dir files on disk: a real full disk, a damaged last.pt, permissions, logs after restarts."""
import errno
import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from simclr import checkpoint as ckpt
from simclr.checkpoint import CheckpointWriteError, candidates, find_resume_state, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_torch_write_error_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "next_epoch": 1})

    def short_write(obj, f, *args, **kwargs):  # what torch's zip writer raises when the disk is full
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.torch, "save", short_write)
    with pytest.raises(CheckpointWriteError, match="unexpected pos.*previous checkpoint is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "next_epoch": 2}, keep_previous=True)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["next_epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_file_size_limit_is_a_checkpoint_write_error(tmp_path):
    """A real short write: the process may not grow a file past 64 kB (SIGXFSZ ignored, so write() fails)."""
    path = tmp_path / "checkpoints" / "last.pt"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import torch
        sys.path.insert(0, {str(ROOT)!r})
        from simclr.checkpoint import CheckpointWriteError, save_checkpoint
        save_checkpoint({str(path)!r}, {{"model": {{"w": torch.ones(3)}}, "next_epoch": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            save_checkpoint({str(path)!r}, {{"model": {{"w": torch.zeros(1 << 16)}}, "next_epoch": 2}}, keep_previous=True)
        except CheckpointWriteError as err:
            print("ERROR", err)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ERROR could not write checkpoint {path}") and "previous checkpoint is intact" in out.stdout
    assert torch.load(path, weights_only=True)["next_epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    """Readable by the group and others as config.yaml is (0o666 less the umask), not private 0o600."""
    old = os.umask(umask)
    try:
        path = tmp_path / "last.pt"
        save_checkpoint(path, {"model": {}, "next_epoch": 1})
        save_checkpoint(path, {"model": {}, "next_epoch": 2}, keep_previous=True)
        other = tmp_path / "other"
        other.write_text("")
    finally:
        os.umask(old)
    for name in ("last.pt", "last.prev.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(other.stat().st_mode)


def test_unwritable_folder_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {}, "next_epoch": 1})

    def refuse(*args, **kwargs):  # as in a folder of another user (root, running these tests, ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt.os, "open", refuse)
    with pytest.raises(CheckpointWriteError, match="Permission denied.*previous checkpoint is intact"):
        save_checkpoint(path, {"model": {}, "next_epoch": 2}, keep_previous=True)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["next_epoch"] == 1
