"""Two gloo processes on the CPU give the loss and the optimiser step of one process on the whole batch.

One module-scoped spawn of two ranks computes everything (process start-up dominates the time); each
test compares one of its results with a single-process reference computed here.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from loss.nt_xent import NTXentLoss
from simclr.config import ConfigError, load_config
from simclr.dist import DistInfo, StopVote, all_reduce_mean, broadcast_object, init_distributed, resolve_sync_bn
from simclr.grad_cache import grad_cache_backward
from simclr.optim import create_optimizer

WORLD, N, D = 2, 8, 5  # global batch N image pairs, n = N / WORLD per rank
REPO = Path(__file__).resolve().parents[1]


class TinySimCLR(nn.Module):
    """Conv + BatchNorm encoder and MLP head; `forward(x)` returns `(h, z)` like ResNetSimCLR."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, D))

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


def _model(bn_train: bool) -> TinySimCLR:
    torch.manual_seed(0)
    model = TinySimCLR()
    with torch.no_grad():
        model.encoder[1].running_mean.uniform_(-0.5, 0.5)
        model.encoder[1].running_var.uniform_(0.5, 2.0)
    return model.train(bn_train)


def _data():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    x1, x2 = torch.rand(N, 3, 6, 6, generator=g), torch.rand(N, 3, 6, 6, generator=g)
    return z1, z2, x1, x2


class _NoScale:
    def scale(self, loss):
        return loss


def _step(model, optimizer_name, x1, x2, chunks=1):
    """One trainer-style step (`model(cat([x1, x2]))`, or gradient caching); returns the loss."""
    criterion = NTXentLoss(temperature=0.5)
    optimizer = create_optimizer(model, optimizer_name, 0.5, 1e-3, 0.9)
    if chunks > 1:
        loss, _ = grad_cache_backward(model, criterion, x1, x2, chunks, contextlib.nullcontext, _NoScale())
    else:
        _, z = model(torch.cat([x1, x2]))
        loss = criterion(z[:len(x1)], z[len(x1):])
        loss.backward()
    optimizer.step()
    return loss.detach()


def _params(model):
    model = getattr(model, "module", model)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        z1, z2, x1, x2 = _data()
        local = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        res = {}
        criterion = NTXentLoss(temperature=0.5)
        a, b = z1[local].clone().requires_grad_(), z2[local].clone().requires_grad_()
        logits, targets = criterion.logits(a, b)
        res["per_anchor"] = F.cross_entropy(logits, targets, reduction="none").detach()
        loss = criterion(a, b)
        loss.backward()
        res["loss"], res["grad_z1"], res["grad_z2"] = loss.detach(), a.grad, b.grad
        res["loss_mean"] = all_reduce_mean(loss.detach())
        res["broadcast"] = broadcast_object(f"runs/named-by-rank-{rank}")
        vote = StopVote(DistInfo(rank, WORLD, rank, torch.device("cpu")))
        res["votes"] = [vote.ask(rank == 1 and call == 2) for call in range(5)]  # only rank 1 asks, at call 2
        res["vote_left"] = vote.collect()
        for name, bn_train, opt, chunks in [("sgd", False, "sgd", 1), ("lars", False, "lars", 1),
                                            ("sgd_bn_train", True, "sgd", 1), ("cached", False, "sgd", 2)]:
            ddp = nn.parallel.DistributedDataParallel(_model(bn_train))
            res[f"{name}_loss"] = all_reduce_mean(_step(ddp, opt, x1[local], x2[local], chunks))
            res[f"{name}_params"] = _params(ddp)
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
        try:
            sync(torch.randn(4, 3))
            res["sync_bn_train"] = "ran"
        except ValueError as err:
            res["sync_bn_train"] = str(err)
        plain = nn.BatchNorm1d(3).eval()
        sync.eval()
        x = torch.randn(4, 3)
        res["sync_bn_eval_equal"] = torch.equal(sync(x), plain(x))
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run `_worker` on WORLD forked ranks (fork: spawn would re-import torch twice, tripling the time)."""
    out = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two gloo ranks did not finish within 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_loss_equals_single_process_loss_on_concatenated_batch(ranks):
    z1, z2, _, _ = _data()
    criterion = NTXentLoss(temperature=0.5)
    logits, targets = criterion.logits(z1, z2)
    full = F.cross_entropy(logits, targets, reduction="none")  # (2N,) anchors: all z1, then all z2
    n = N // WORLD
    for rank, res in enumerate(ranks):
        # Each anchor's loss, against the negatives of every rank: wrong label offsets would show here.
        mine = torch.cat([full[rank * n:(rank + 1) * n], full[N + rank * n:N + (rank + 1) * n]])
        torch.testing.assert_close(res["per_anchor"], mine)
        torch.testing.assert_close(res["loss_mean"], full.mean())


def test_every_rank_agrees_to_stop_at_the_same_step_one_step_late(ranks):
    assert [r["votes"] for r in ranks] == [[False, False, False, True, False]] * WORLD
    assert [r["vote_left"] for r in ranks] == [False] * WORLD
    single = StopVote(DistInfo(0, 1, 0, torch.device("cpu")))
    assert [single.ask(flag) for flag in (False, True)] == [False, True]  # one process: at once, no group


def test_run_dir_name_comes_from_rank_0(ranks):
    assert [res["broadcast"] for res in ranks] == ["runs/named-by-rank-0"] * WORLD


def test_gather_sends_back_the_gradient_of_every_ranks_loss(ranks):
    z1, z2, _, _ = _data()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    NTXentLoss(temperature=0.5)(a, b).backward()
    n = N // WORLD
    for rank, res in enumerate(ranks):
        # Each rank gets d(sum of all ranks' losses)/dz, WORLD times the gradient of the global mean; DDP's
        # average of parameter gradients divides by WORLD again. A gather that returned only the local
        # rank's own gradient would give about 1/WORLD of this.
        torch.testing.assert_close(res["grad_z1"], WORLD * a.grad[rank * n:(rank + 1) * n])
        torch.testing.assert_close(res["grad_z2"], WORLD * b.grad[rank * n:(rank + 1) * n])


@pytest.mark.parametrize("name, optimizer", [("sgd", "sgd"), ("lars", "lars")])
def test_ddp_step_equals_one_process_on_the_whole_batch(ranks, name, optimizer):
    _, _, x1, x2 = _data()
    model = _model(bn_train=False)
    before = _params(model)
    loss = _step(model, optimizer, x1, x2)
    after = _params(model)
    for res in ranks:
        torch.testing.assert_close(res[f"{name}_loss"], loss)
        for key in after:
            torch.testing.assert_close(res[f"{name}_params"][key], after[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(before[k], after[k], atol=1e-4) for k in after)  # the step moved something


def test_ddp_with_train_mode_batchnorm_equals_per_rank_chunks(ranks):
    """Without SyncBatchNorm each rank normalises with its own statistics: one process with gradient caching
    over WORLD chunks (chunk r = rank r's images) computes exactly that."""
    _, _, x1, x2 = _data()
    model = _model(bn_train=True)
    loss = _step(model, "sgd", x1, x2, chunks=WORLD)
    for res in ranks:
        torch.testing.assert_close(res["sgd_bn_train_loss"], loss)
        for key, value in _params(model).items():
            torch.testing.assert_close(res["sgd_bn_train_params"][key], value, rtol=1e-5, atol=1e-6)


def test_gradient_caching_under_ddp_equals_one_process_on_the_whole_batch(ranks):
    _, _, x1, x2 = _data()
    model = _model(bn_train=False)
    loss = _step(model, "sgd", x1, x2)
    for res in ranks:
        torch.testing.assert_close(res["cached_loss"], loss)
        for key, value in _params(model).items():
            torch.testing.assert_close(res["cached_params"][key], value, rtol=1e-5, atol=1e-6)


def test_sync_batchnorm_on_cpu_is_what_pytorch_supports(ranks):
    """PyTorch's SyncBatchNorm refuses CPU tensors in train mode under a process group; in eval mode it
    is BatchNorm with running statistics. So auto keeps it off on CPU, and true there is a config error."""
    for res in ranks:
        assert res["sync_bn_train"] != "ran" and "GPU" in res["sync_bn_train"]
        assert res["sync_bn_eval_equal"]
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_sync_bn(None, DistInfo(0, 2, 0, cpu)) is False
    assert resolve_sync_bn(None, DistInfo(0, 2, 0, cuda)) is True
    assert resolve_sync_bn(False, DistInfo(0, 2, 0, cuda)) is False
    assert resolve_sync_bn(True, DistInfo(0, 1, 0, cuda)) is False  # one process: plain BatchNorm, no group
    with pytest.raises(ConfigError, match="model.sync_bn"):
        resolve_sync_bn(True, DistInfo(0, 2, 0, cpu))


def test_single_process_joins_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert not dist.is_initialized()
    z = torch.randn(4, D)
    torch.testing.assert_close(all_reduce_mean(z), z)


def test_batch_not_divisible_by_world_size_is_a_config_error():
    from simclr.trainer import create_batches

    config = load_config("configs/tiny.yaml" if Path("configs/tiny.yaml").exists() else REPO / "configs/tiny.yaml",
                         ["batch_size=15"])
    with pytest.raises(ConfigError, match="batch_size = 15: must be divisible by the number of processes"):
        create_batches(config, DistInfo(1, 2, 1, torch.device("cpu")))


def _tiny_run_args(data: Path) -> list[str]:
    """Overrides for a seconds-long run on 16 tiny STL10 images: 13 for training, 3 steps of 4 per epoch."""
    return ["--config", str(REPO / "tests" / "data" / "seed_config.yaml"), "fine_tune_from=None",
            f"dataset.root={data}", "dataset.name=stl10", "dataset.download=false", "dataset.input_shape=(32,32,3)",
            "batch_size=4", "model.out_dim=8", "dataset.valid_size=0.2", "log_every_n_steps=1", "device=cpu", "seed=0"]


@pytest.mark.slow
def test_torchrun_resumes_a_run_and_only_rank0_writes(tmp_path, capsys):
    """The real launcher end to end: one epoch in this process, then `torchrun --nproc_per_node=2` resumes
    the run for a second epoch (an epoch boundary, where the number of processes may change)."""
    import run
    from tests.conftest import write_stl10

    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_stl10(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run.main(_tiny_run_args(data) + [f"run_dir={run_dir}", "epochs=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["next_epoch"] == 1

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "run.py"),
           *_tiny_run_args(data), f"resume={run_dir}", "epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    # Only rank 0 prints: one resume line, one "training images" line, one final line.
    assert [done.stdout.count(s) for s in ("resuming from", "training images", "done: run dir")] == [1, 1, 1]
    assert "3 steps per epoch" in done.stdout  # batch_size=4 stays the global batch: 2 images per rank
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if r.get("kind") == "epoch"]
    assert epochs == [0, 1]  # one record per epoch: rank 1 wrote none, and the resume did not repeat epoch 0
    assert all("valid_loss" in r for r in records if r.get("kind") == "epoch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no run dir of rank 1's own


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=`rank`, once it exists."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_torchrun_process_stops_every_process_at_the_same_step(tmp_path):
    """SIGTERM reaches only rank 1: both ranks stop after the next step, rank 0 saves, and all exit 0."""
    import signal

    from tests.conftest import write_stl10

    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_stl10(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "run.py"),
           *_tiny_run_args(data), f"run_dir={run_dir}", "epochs=200", "log_every_n_steps=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists():  # an epoch done: both ranks are training
            assert launcher.poll() is None and time.monotonic() < deadline, "torchrun ended or hung before epoch 1"
            time.sleep(0.2)
        os.kill(_worker_pid(launcher, 1), signal.SIGTERM)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-2000:]
    assert out.count("stopped by a signal to another process") == 1 and "Continue with" in out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_epoch"] < 200  # stopped within a step (mid-epoch) or at the epoch's end, on both ranks
