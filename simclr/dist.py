"""Device choice and torchrun process groups, in one place."""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from simclr.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class DeviceError(ConfigError):
    """The configured device is not usable here (a config error: exit 2); the message says what to set instead."""


class StartError(RuntimeError):
    """The processes of a torchrun attempt did not all meet within `START_TIMEOUT` (exit 1: torchrun may restart)."""


START_TIMEOUT = timedelta(minutes=5)  # every process of an attempt starts within this of the others


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this process's CUDA device if there is one, else the CPU; `cuda` -> cuda:<local rank>."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {setting} was asked for but no CUDA GPU is visible: use device: cpu or auto")
        if setting == "cuda":
            setting = f"cuda:{local_rank}"
        index = torch.device(setting).index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device: {setting} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(setting)


def init_distributed(device_setting: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (RANK set); a single process joins none.

    Args:
        device_setting: the config's `device` (auto, cpu, cuda, cuda:N).
    Returns:
        This process's `DistInfo`; the backend is nccl on CUDA and gloo on the CPU.
    """
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0, pick_device(device_setting))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size > 1 and device_setting.startswith("cuda:"):
        raise DeviceError(f"device: {device_setting} under torchrun would put every process on one GPU: use "
                          "device: cuda (or auto), and each process takes the GPU of its LOCAL_RANK")
    device = pick_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size))  # torchrun's MASTER_ADDR/PORT
        store = dist.PrefixStore(f"simclr/{attempt_token(store, rank, world_size)}", store)
        # device_id binds NCCL to this process's GPU (otherwise barrier() has to guess which one)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def attempt_token(store: dist.Store, rank: int, world_size: int, timeout: timedelta = START_TIMEOUT,
                  poll: float = 0.02) -> str:
    """A key prefix that every process of this start agrees on and that no earlier start of the job used.

    torchrun's agent keeps one TCPStore for the whole job and `--max-restarts` starts the new processes on it
    with the keys of the killed ones still there. Process groups publish each rank's address under fixed keys
    (`default_pg/0//cpu//0/<rank>` for the default group, `default_pg/0//1//...` for the next one), so a
    restarted rank that reads a peer's key before the peer rewrote it gets the dead process's address: Gloo
    then fails to connect ("Connection refused", the attempt is lost) or waits for a pair that never forms
    (a hang of the process-group timeout, 30 minutes); which one, or neither, depends on which rank reaches
    the key first. docs/RESUMING.md has the traces. Here rank 0 draws a random token and each other rank
    proves it read this start's token by echoing a nonce of its own, so a stale key can never be mistaken
    for a fresh one: every key a process group then writes lives under the token, new on every start.

    Args:
        store: the job's store (from torchrun's MASTER_ADDR/MASTER_PORT).
        rank, world_size: this process's place in the job.
        timeout: how long to wait for the other processes (then `StartError`, exit 1: torchrun restarts).
    Returns:
        The token (16 hex characters), the same on every rank.
    """
    deadline = time.monotonic() + timeout.total_seconds()

    def wait(what: str) -> None:
        if time.monotonic() > deadline:
            raise StartError(f"rank {rank}: {what} within {timeout.total_seconds():.0f} s of starting; check that "
                             "every process of the torchrun job started (torchrun restarts the job if --max-restarts "
                             "allows)")
        time.sleep(poll)

    def read(key: str) -> str | None:
        return store.get(key).decode() if store.check([key]) else None

    if rank == 0:
        token, waiting, echoed = secrets.token_hex(8), set(range(1, world_size)), {}
        while waiting:
            for r in sorted(waiting):
                if read(f"start/done/{r}") == token:
                    waiting.discard(r)
                elif (hello := read(f"start/hello/{r}")) not in (None, echoed.get(r)):  # maybe an earlier start's
                    store.set(f"start/ack/{r}", f"{hello}:{token}")  # echoed anyway; again only when it changes
                    echoed[r] = hello
            if waiting:
                wait(f"ranks {sorted(waiting)} did not answer")
        return token
    nonce = secrets.token_hex(8)
    store.set(f"start/hello/{rank}", nonce)
    while True:
        echoed, _, token = (read(f"start/ack/{rank}") or "").partition(":")
        if echoed == nonce:  # rank 0 answered this process: its token is this start's
            store.set(f"start/done/{rank}", token)
            return token
        wait("rank 0 did not answer")


def resolve_sync_bn(setting: bool | None, info: DistInfo) -> bool:
    """Whether to convert BatchNorm to SyncBatchNorm (`model.sync_bn`; None = auto).

    SyncBatchNorm computes BatchNorm statistics over the global batch, the paper's "Global BN" (Section
    2.2: with per-device statistics the two views of an image share a device, and the model can use
    that leak to solve the task without learning better representations). It only matters with
    several processes: in one process it is plain BatchNorm, so it is never used there (a single GPU
    runs without a process group). Auto turns it on for several CUDA processes. PyTorch implements it
    for GPUs only: with an initialised process group a CPU (gloo) forward in train mode raises, so on
    CPU auto leaves it off (per-process statistics) and an explicit `true` is a config error.

    Args:
        setting: `model.sync_bn`: True, False or None (auto).
        info: this process's rank, world size and device.
    Returns:
        True if the model should be converted with `nn.SyncBatchNorm.convert_sync_batchnorm`.
    """
    if not info.distributed:
        return False
    if setting is None:
        return info.device.type == "cuda"
    if setting and info.device.type != "cuda":
        raise ConfigError(f"model.sync_bn = true: PyTorch's SyncBatchNorm needs CUDA devices, this run uses "
                          f"{info.device.type}; set model.sync_bn: false (per-process BatchNorm statistics)")
    return bool(setting)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def broadcast_object(value):
    """Rank 0's `value` on every rank (e.g. a run-dir name built from the clock); itself in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class StopVote:
    """Whether any process asked to stop, agreed on by all processes one step later, without a device sync.

    `ask(flag)` starts an asynchronous all-reduce of this step's flag on a gloo (CPU) process group and
    returns the result of the previous call's, which has long arrived: every process gets the same answer
    at the same call, so all stop at the same step, and nothing waits for the GPU. In one process the
    flag is returned at once.
    """

    def __init__(self, info: DistInfo):
        self.distributed = info.distributed
        self.group = dist.new_group(backend="gloo") if self.distributed else None  # every rank creates it
        self.pending: tuple | None = None

    def ask(self, flag: bool) -> bool:
        """Send this step's flag; return whether any process had asked to stop at the previous call."""
        if not self.distributed:
            return flag
        previous = self.collect()
        value = torch.tensor([float(flag)])
        self.pending = (dist.all_reduce(value, group=self.group, async_op=True), value)
        return previous

    def collect(self) -> bool:
        """Wait for the exchange in flight, if any (call before leaving the step loop for good)."""
        if self.pending is None:
            return False
        work, value = self.pending
        self.pending = None
        work.wait()
        return value.item() > 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
