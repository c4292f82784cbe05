"""Checkpoint and run-dir files on disk: a real full disk, a damaged last.pt, permissions, logs after restarts."""
import errno
import json
import os
import re
import shlex
import stat
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from simclr import checkpoint as ckpt
from simclr.checkpoint import CheckpointWriteError, candidates, find_resume_state, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_torch_write_error_is_a_checkpoint_write_error(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "next_epoch": 1})

    def short_write(obj, f):  # what torch's zip writer raises when the disk is full
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(CheckpointWriteError, match="unexpected pos.*previous checkpoint is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "next_epoch": 2}, keep_previous=True, write=short_write)
    assert torch.load(path, weights_only=True)["next_epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


@pytest.mark.slow
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


def _training_state(next_epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), float(next_epoch))}, "next_epoch": next_epoch, "optimizer": {}, "config": {}}


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "pickle_bitflip"])
def test_damaged_last_never_replaces_a_good_previous(tmp_path, damage):
    """resume=auto skipped a damaged last.pt for last.prev.pt: the next save keeps last.prev.pt."""
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "last.pt", _training_state(1))
    save_checkpoint(folder / "last.pt", _training_state(2), keep_previous=True)
    last = folder / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "pickle_bitflip":  # the file's structure is whole, its pickle is not (torch.load may not notice)
        with zipfile.ZipFile(last) as archive:
            header = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl")).header_offset
        name_len, extra_len = struct.unpack("<HH", data[header + 26:header + 30])  # zip local file header
        data[header + 30 + name_len + extra_len + 2] ^= 0x01
    last.write_bytes({"truncate": bytes(data[: len(data) // 2]), "empty": b"", "garbage": os.urandom(5000),
                      "pickle_bitflip": bytes(data)}[damage])
    damaged = last.read_bytes()
    if damage != "pickle_bitflip":
        path, state = find_resume_state(tmp_path, auto=True, log=lambda message: None)
        assert path == folder / "last.prev.pt" and state["next_epoch"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_checkpoint(last, _training_state(3), keep_previous=True)
    assert torch.load(folder / "last.prev.pt", weights_only=True)["next_epoch"] == 1
    assert torch.load(last, weights_only=True)["next_epoch"] == 3
    assert (folder / "last.pt.damaged").read_bytes() == damaged
    assert len(caught) == 1 and re.search("last.pt was damaged.*last.pt.damaged.*last.prev.pt", str(caught[0].message))
    assert candidates(tmp_path) == [last, folder / "last.prev.pt"]
    # the next save rotates as usual: the complete last.pt becomes the fallback
    save_checkpoint(last, _training_state(4), keep_previous=True)
    assert torch.load(folder / "last.prev.pt", weights_only=True)["next_epoch"] == 3


def test_complete_checkpoint_is_rotated(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _training_state(1))
    assert ckpt.is_complete_checkpoint(path)
    save_checkpoint(path, _training_state(2), keep_previous=True)
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["next_epoch"] == 1
    assert not (tmp_path / "last.pt.damaged").exists()


@pytest.mark.parametrize("method, flags", [(99, 0), (0, 1), (8, 0)])  # unknown, encrypted, deflate on stored data
def test_a_damaged_zip_directory_is_incomplete_not_an_exception(tmp_path, method, flags):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _training_state(1))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(i.filename for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    entry = data.index(b"PK\x01\x02")  # the central directory's first entry
    while data[entry + 46:entry + 46 + len(name)] != name.encode():
        entry = data.index(b"PK\x01\x02", entry + 4)
    struct.pack_into("<HH", data, entry + 8, flags, method)  # general purpose flags, compression method
    path.write_bytes(bytes(data))
    assert ckpt.is_complete_checkpoint(path) is False


def test_other_runtime_errors_while_saving_are_not_called_a_full_disk(tmp_path):
    def cuda_failure(obj, f):
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        save_checkpoint(tmp_path / "last.pt", _training_state(1), write=cuda_failure)
    assert not list(tmp_path.iterdir())  # the temporary file is gone


def test_damaged_files_aside_are_not_resumed_from(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    save_checkpoint(folder / "last.pt.damaged", _training_state(5))  # even a readable one is never a candidate
    assert candidates(tmp_path) == []
    assert find_resume_state(tmp_path, auto=True) is None
    with pytest.raises(ckpt.CheckpointLoadError, match="has no checkpoints/last.pt"):
        find_resume_state(tmp_path, auto=False)
    save_checkpoint(folder / "last.prev.pt", _training_state(1))
    path, state = find_resume_state(tmp_path, auto=True)
    assert path == folder / "last.prev.pt" and state["next_epoch"] == 1


STEPS_PER_EPOCH = 4


def _attempt(run_dir: Path, resume: tuple[int, int] | None, until_step: int, monkeypatch) -> None:
    """One training attempt's logs as trainer.py writes them: step records every step, epoch records (at
    TensorBoard step epoch + 1) when an epoch ends, from the resumed position (next_epoch, step_in_epoch)
    to `until_step`; the process then dies (the writer is left unclosed, its last line half-written)."""
    from simclr.config import load_config
    from simclr.run_dir import RunWriter

    next_epoch, step_in_epoch = resume or (0, 0)
    done = next_epoch * STEPS_PER_EPOCH + step_in_epoch
    monkeypatch.setattr(sys, "argv", ["run.py", f"run_dir={run_dir}"])
    writer = RunWriter(run_dir, load_config(None), resume_step=done, resume_epoch=next_epoch)
    for global_step in range(done + 1, until_step + 1):
        epoch, step = divmod(global_step - 1, STEPS_PER_EPOCH)
        writer.log({"kind": "step", "epoch": epoch, "step": step, "global_step": global_step, "loss": 1.0 / global_step},
                   global_step, "train")
        if step + 1 == STEPS_PER_EPOCH:
            writer.log({"kind": "epoch", "epoch": epoch, "train_loss": 1.0 / (epoch + 1)}, epoch + 1, "epoch")
    writer.metrics.write('{"kind": "step", "epoch": 9, "glo')  # SIGKILL in the middle of a line
    writer.metrics.flush()
    writer.tensorboard.flush()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_after_restarts_are_those_of_one_uninterrupted_run(tmp_path, monkeypatch):
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    _attempt(straight, None, 3 * STEPS_PER_EPOCH, monkeypatch)
    _attempt(restarted, None, 6, monkeypatch)  # killed in epoch 1 at step 6; its checkpoint: epoch 1 done (4 steps)
    _attempt(restarted, (1, 0), 11, monkeypatch)  # preempted at step 10 (checkpoint), killed at 11
    _attempt(restarted, (2, 2), 3 * STEPS_PER_EPOCH, monkeypatch)
    # only the half-written line of the last attempt is left (as the kill left it); earlier ones are dropped
    assert (restarted / "metrics.jsonl").read_text().count('"epoch": 9, "glo') == 1
    lines = (restarted / "metrics.jsonl").read_text().splitlines()[:-1]
    assert lines == (straight / "metrics.jsonl").read_text().splitlines()[:-1]
    assert [r["global_step"] for r in map(json.loads, lines) if r["kind"] == "step"] == list(range(1, 13))
    assert [r["epoch"] for r in map(json.loads, lines) if r["kind"] == "epoch"] == [0, 1, 2]


def test_fresh_start_drops_the_metrics_of_an_earlier_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _attempt(run_dir, None, 5, monkeypatch)  # killed before any checkpoint
    _attempt(run_dir, None, 2, monkeypatch)
    assert [r["global_step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()[:-1])] \
        == [1, 2]


def test_without_resume_step_the_metrics_are_appended_to(tmp_path):
    from simclr.config import load_config
    from simclr.run_dir import RunWriter

    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "global_step": 7}\n')
    RunWriter(tmp_path, load_config(None)).close()
    assert _records(tmp_path) == [{"kind": "step", "global_step": 7}]


def test_tensorboard_hides_the_steps_of_killed_attempts(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _attempt(run_dir, None, 6, monkeypatch)
    _attempt(run_dir, (1, 0), 11, monkeypatch)
    _attempt(run_dir, (2, 2), 3 * STEPS_PER_EPOCH, monkeypatch)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))
    assert [e.value for e in loss] == pytest.approx([1.0 / s for s in range(1, 13)])
    assert [e.step for e in events.Scalars("epoch/train_loss")] == [1, 2, 3]


def test_meta_command_can_be_pasted_into_a_shell(tmp_path, monkeypatch):
    from simclr.config import load_config
    from simclr.run_dir import RunWriter

    argv = ["run.py", f"run_dir={tmp_path / 'my runs' / 'a'}", "dataset.root=it's here"]
    monkeypatch.setattr(sys, "argv", argv)
    RunWriter(tmp_path, load_config(None), resume_step=0).close()
    command = json.loads((tmp_path / "meta.jsonl").read_text().splitlines()[-1])["command"]
    assert shlex.split(command) == ["python", *argv]
