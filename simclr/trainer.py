"""SimCLR pretraining: data, model, optimiser, the epoch loop, validation, checkpoints and resume."""
from __future__ import annotations

import contextlib
import datetime
import functools
import math
import shlex
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm import tqdm

from data_aug.batches import BatchSource, DeviceBatches, LoaderBatches, gather_to_device
from data_aug.datasets import decode_all, load_split, split_validation
from data_aug.views import TwoViews, ViewSettings, create_view_transform
from loss.nt_xent import NTXentLoss
from models.loading import CheckpointLoadError, load_weights_only, run_dir_of
from models.resnet_simclr import create_model
from simclr import checkpoint as ckpt
from simclr.config import Config, ConfigError, config_to_dict, saved_config
from simclr.dist import DistInfo, all_reduce_mean, barrier, broadcast_object, resolve_sync_bn
from simclr.grad_cache import grad_cache_backward
from simclr.guard import RunGuard
from simclr.monitor import KnnMonitor, MonitorUnavailable, load_monitor
from simclr.optim import create_optimizer, create_scheduler, match_state_layout, scaled_lr
from simclr.precision import choose_precision, read_cpuinfo
from simclr.run_dir import RunWriter, default_run_dir
from simclr.run_plots import validation_labels, views_picture, write_curves, write_views


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, impossible sizes); the message says what to change."""


def _check_batch_sizes(config: Config, info: DistInfo) -> None:
    if config.batch_size % info.world_size:
        raise ConfigError(f"batch_size = {config.batch_size}: must be divisible by the number of processes "
                          f"({info.world_size}); it is the global batch")
    if config.grad_cache_chunks > config.batch_size // info.world_size:
        raise ConfigError(f"grad_cache_chunks = {config.grad_cache_chunks}: more chunks than images per process "
                          f"({config.batch_size // info.world_size}); lower grad_cache_chunks")


def create_batches(config: Config, info: DistInfo) -> tuple[BatchSource, BatchSource | None]:
    """Training and validation batches (None: no hold-out), from the `pretrain` split minus a seeded validation
    hold-out, made where `dataset.augment_on` says."""
    d = config.dataset
    _check_batch_sizes(config, info)
    if d.download and info.distributed and d.name != "imagefolder":  # one download per machine; others wait
        if info.local_rank == 0:
            load_split(d.name, d.root, "test", download=True)
        barrier()
    data = load_split(d.name, d.root, "pretrain", download=d.download and not info.distributed,
                      skip_bad_images=d.skip_bad_images)
    train_idx, valid_idx = split_validation(len(data), d.valid_size, config.seed)
    if len(valid_idx) == 1:
        raise ConfigError(f"dataset.valid_size = {d.valid_size}: holds out 1 of {len(data)} images (NT-Xent needs "
                          "two to compare, and two must stay to train); with so few images set 0 (no validation)")
    if len(train_idx) < config.batch_size:
        raise ConfigError(f"batch_size = {config.batch_size}: larger than the training split ({len(train_idx)} "
                          f"images of {d.name} after holding out valid_size); lower batch_size")
    # validation batches only use fixed_batches(): one image per process is a batch size any split allows
    valid = _cpu_batches(data, valid_idx, info.world_size, config.seed + 1, config, info) if len(valid_idx) else None
    if d.augment_on == "cpu":
        return _cpu_batches(data, train_idx, config.batch_size, config.seed, config, info), valid
    if not hasattr(data, "images"):  # an image folder: decoded once, if its images share one size
        data = decode_all(data)
    train = _device_batches(data.images, train_idx, config.batch_size, config.seed, config, info, config.compile)
    if len(valid_idx) >= info.world_size:  # validation views made there too, the same at every epoch
        valid = _device_batches(data.images, valid_idx, info.world_size, config.seed + 1, config, info)
    return train, valid


def _cpu_batches(data, indices, batch_size: int, seed: int, config: Config, info: DistInfo) -> LoaderBatches:
    views = TwoViews(Subset(data, indices.tolist()), create_view_transform(ViewSettings.of(config.dataset)), seed)
    return LoaderBatches(views, batch_size, seed, info.rank, info.world_size, config.dataset.num_workers,
                         pin_memory=info.device.type == "cuda")


def _device_batches(images, indices, batch_size: int, seed: int, config: Config, info: DistInfo,
                    compile: bool = False) -> DeviceBatches:
    on_device = gather_to_device(images, indices, info.device)  # no second host copy of the split
    return DeviceBatches(on_device, batch_size, ViewSettings.of(config.dataset), seed, info.rank, info.world_size,
                         info.device, compile=compile)


def find_resume(config: Config, log=print) -> tuple[Path, dict] | None:
    """The checkpoint named by `config.resume` (a run dir, a file, or `auto` for run_dir's newest readable)."""
    auto = config.resume == "auto"
    if auto and not config.run_dir:
        raise ConfigError("resume = 'auto': needs run_dir set, so that a restarted job finds its own run")
    target = Path(config.run_dir if auto else config.resume)
    found = ckpt.find_resume_state(target, auto=auto, log=log)
    if found is None:
        log(f"resume=auto: no checkpoint in {target} yet, starting fresh")
    return found  # the caller says where it resumes, once the run's config gives the number of epochs


def describe_resume(checkpoint: Path, state: dict, epochs: int) -> tuple[bool, str]:
    """Whether a resume has anything left to train, and the line that says so; epochs counted from 1, as in every
    message (the checkpoint's `next_epoch` counts from 0: it is the number of epochs finished)."""
    done, step = state["next_epoch"], state.get("step_in_epoch", 0)
    if done >= epochs:
        run = shlex.quote(str(run_dir_of(checkpoint)))
        return False, (f"nothing to resume: {checkpoint} has already trained {done} epoch(s) (epochs={epochs}), so "
                       "the run is finished and its evaluation is not repeated. Train longer with python run.py "
                       f"resume={run} epochs=<more>; evaluate again with python -m feature_eval.evaluate "
                       f"--checkpoint {run}")
    where = f"at epoch {done + 1}, step {step}" if step else f"after epoch {done}" if done else "at epoch 1"
    return True, f"resuming from {checkpoint} {where} (epochs={epochs})"


def log_on_main(info: DistInfo, message: str) -> None:
    """A line of the run's log: written by the main process, under any progress bar; the others say nothing."""
    if info.is_main:
        tqdm.write(message)


class Trainer:
    """Owns the model, optimiser and loop; `fit()` runs the remaining epochs and returns the run dir."""

    # How a checkpoint's bytes are written (`save_checkpoint`'s `write`): tests/fault_runner.py's subclass pauses
    # half-way through, so that a test can kill the run there.
    write_checkpoint = staticmethod(torch.save)

    def __init__(self, config: Config, info: DistInfo, resume: tuple[Path, dict] | None = None,
                 on_event: Callable[[str], None] | None = None, start_note: str | None = None):
        """`resume` is `(checkpoint path, state)` from `find_resume`, or None for a fresh run; `on_event` goes to
        the run's `RunGuard` (where tests inject a signal or a crash at a chosen step); `start_note` is logged
        once the run has started, its lock held (run.py's CPU line: never before an error that stops the run)."""
        self.config, self.info, self.device = config, info, info.device
        self.start_note = start_note
        self.run_dir = self._choose_run_dir(resume[0] if resume else None)
        self.train_batches, self.valid_batches = create_batches(config, info)
        self.precision = choose_precision(config.fp16_precision, config.amp_dtype, self.device.type, read_cpuinfo(),
                                          self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.model = self._build_model(fine_tune=resume is None)
        self._build_optimizer()
        self._build_precision()
        self.criterion = NTXentLoss(config.loss.temperature, config.loss.use_cosine_similarity)
        self.train_model = self._wrap(self.model)
        self.monitor = self._build_monitor()
        self.next_epoch, self.start_step, self.best_valid = 0, 0, math.inf
        self.epoch_progress = (0.0, 0)  # (loss sum, steps) of an epoch stopped part-way, from its checkpoint
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        if resume is not None:
            self.restore(resume[1])
        # train_epoch and validate use it outside fit() too, where it holds no lock and never asks to stop; not
        # `self.log`: a bound method would keep a finished trainer's tensors alive until a garbage collection
        self.guard = RunGuard(self.run_dir, info, functools.partial(log_on_main, info), on_event)

    def _choose_run_dir(self, checkpoint: Path | None) -> Path:
        """`run_dir`, else the resumed checkpoint's run, else a new dated folder under runs/."""
        if self.config.run_dir:
            run_dir = Path(self.config.run_dir)
        elif checkpoint is not None:
            run_dir = run_dir_of(checkpoint)
        else:  # rank 0's clock names it: every rank must print and resume the same dir
            run_dir = Path(broadcast_object(str(default_run_dir())))
        if checkpoint is None and ckpt.candidates(run_dir):
            raise ConfigError(f"run_dir = {str(run_dir)!r}: already holds a run with checkpoints; continue it "
                              f"with resume={run_dir}, or choose another run_dir")
        return run_dir

    @property
    def stop_requested(self) -> str | None:
        """The signal that asked this run to stop, if one came (after `fit`, also one that came too late to
        stop training: the caller then skips what would come next, such as the final evaluation)."""
        return self.guard.signal

    def log(self, message: str) -> None:
        log_on_main(self.info, message)

    def _build_model(self, fine_tune: bool) -> nn.Module:
        c = self.config
        torch.manual_seed(c.seed)
        model = create_model(c.model.base_model, c.model.out_dim, c.model.cifar_stem, c.model.head_layers, c.model.head_bn)
        if c.fine_tune_from and fine_tune:  # a resumed run has its own weights
            load_weights_only(model, c.fine_tune_from, self.log)
        if resolve_sync_bn(c.model.sync_bn, self.info):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.precision.channels_last else model

    def _build_optimizer(self) -> None:
        c = self.config
        lr = scaled_lr(c.optimizer.lr, c.batch_size, c.optimizer.lr_scaling)
        if c.optimizer.name in ("sgd", "lars") and lr < 0.01:
            self.log(f"note: optimizer.name={c.optimizer.name} with learning rate {lr:g}, an Adam-sized rate; the "
                     "paper's LARS recipe is optimizer.lr=0.3 optimizer.lr_scaling=linear optimizer.warmup_epochs=10")
        self.optimizer = create_optimizer(self.model, c.optimizer.name, lr, c.weight_decay, c.optimizer.momentum)
        steps = self.train_batches.steps_per_epoch
        self.scheduler = create_scheduler(self.optimizer, c.epochs * steps, round(c.optimizer.warmup_epochs * steps),
                                          c.optimizer.cosine)

    def _build_precision(self) -> None:
        """`amp_dtype` (None: float32 throughout, `self.precision`'s choice) and the GradScaler, enabled only for
        float16."""
        self.amp_dtype = self.precision.amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_monitor(self) -> KnnMonitor | None:
        """The kNN monitor, on the main process only (the others wait for it at the epoch's barrier); None when
        `knn_monitor.enabled` is false or the data set has no labels to measure with (said in one line)."""
        c, d = self.config.knn_monitor, self.config.dataset
        if not (c.enabled and self.info.is_main):
            return None
        try:
            return load_monitor(d.name, d.root, d.skip_bad_images, d.crop_size, c.max_images, self.config.seed,
                                k=c.k, temperature=c.temperature, device=self.device)
        except MonitorUnavailable as err:
            self.log(f"kNN monitor off: {err} (it needs labels of two classes or more); training goes on")
            return None

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: DistributedDataParallel across processes, then compiled if asked."""
        if self.info.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if self.config.compile else model

    def restore(self, state: dict) -> None:
        """Continue from a training checkpoint's `state`: weights, optimiser, schedule, position and counters."""
        saved = saved_config(state).optimizer.name
        if saved != self.config.optimizer.name:
            raise CheckpointLoadError(f"optimizer.name = {self.config.optimizer.name!r}: the run being resumed used "
                                      f"{saved!r}, whose state cannot drive another optimiser; resume with "
                                      f"optimizer.name={saved}, or start a new run with fine_tune_from=<run dir>")
        try:
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            match_state_layout(self.optimizer)  # e.g. a CPU checkpoint resumed into a channels_last CUDA model
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler.is_enabled() and state["scaler"]:  # empty: saved without float16 (CPU, bfloat16)
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointLoadError(f"the resume checkpoint does not fit this model or optimiser "
                                      f"({str(err).splitlines()[0][:200]}): resume with the run's own config") from None
        self.next_epoch = state["next_epoch"]
        self.start_step = state.get("step_in_epoch", 0)
        saved_world = state.get("world_size", self.info.world_size)
        if self.start_step and saved_world != self.info.world_size and self.train_batches.order_depends_on_world_size:
            self.log(f"warning: this checkpoint was saved in the middle of epoch {self.next_epoch + 1} by {saved_world} "
                     f"process(es), and {self.info.world_size} continue it: the DataLoader's order depends on that "
                     "number, so the rest of this epoch visits some images twice and others not at all (exact again "
                     "from the next epoch; augment_on: device has no such limit)")
        self.epoch_progress = (state.get("epoch_loss_sum", 0.0), state.get("epoch_steps", 0))
        self.best_valid = state.get("best_valid_loss", math.inf)
        self.skipped_steps.fill_(state.get("skipped_steps", 0))
        torch.set_rng_state(state["rng_cpu"])

    def _state(self, next_epoch: int, step_in_epoch: int = 0) -> dict:
        return {"model": ckpt.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "next_epoch": next_epoch, "step_in_epoch": step_in_epoch, "best_valid_loss": self.best_valid,
                "skipped_steps": int(self.skipped_steps.item()),  # float16 overflow steps so far, whole run
                "world_size": self.info.world_size,
                "config": config_to_dict(self.config), "rng_cpu": torch.get_rng_state()}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of views moved to the device, in the model's memory layout: `train_step`'s input."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.precision.channels_last else x

    def train_step(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One optimiser step on a batch of view pairs; returns the loss and accuracy as device tensors."""
        n = x1.shape[0]
        if self.config.grad_cache_chunks > 1:
            loss, acc = grad_cache_backward(self.train_model, self.criterion, x1, x2, self.config.grad_cache_chunks,
                                            self._autocast, self.scaler)
        else:
            with self._autocast():
                _, z = self.train_model(torch.cat([x1, x2]))  # both views in one pass: BatchNorm sees all 2n
                loss, acc = self.criterion.loss_and_accuracy(z[:n], z[n:])
            self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            # GradScaler skips steps whose gradients overflow; count them on the device (no host sync).
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            self.skipped_steps += ~torch.isfinite(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach(), acc

    def _check_finite(self, loss: float, epoch: int, step: int) -> None:
        """TrainingError for a NaN/Inf `loss`, found at 0-based (epoch, step): the loss is read only at log steps."""
        if not math.isfinite(loss):
            lr = self.optimizer.param_groups[0]["lr"]
            kept = ckpt.candidates(self.run_dir)
            where = (f"the last good checkpoint is kept: {kept[0]}" if kept else "no checkpoint was written (it went "
                     "wrong in the first epoch)")
            raise TrainingError(f"non-finite loss ({loss}) found at epoch {epoch + 1}, step {step + 1} (the loss is "
                                f"checked every log_every_n_steps={self.config.log_every_n_steps} steps), lr {lr:.3g}: "
                                "lower optimizer.lr, raise loss.temperature, or use amp_dtype: bfloat16; " + where)

    def train_epoch(self, epoch: int, writer: RunWriter | None = None) -> float:
        """Run the steps of one epoch from `self.start_step`; return the mean training loss over all processes.

        When the guard says a signal asked the run to stop, the position is saved and `Preempted` raised.
        """
        steps = self.train_batches.steps_per_epoch
        self.train_model.train()
        loss_sum, count = self.epoch_progress if self.start_step else (0.0, 0)  # steps done before a preemption
        total = torch.tensor(loss_sum, device=self.device)
        bar = tqdm(total=steps, initial=self.start_step, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   disable=None if self.info.is_main else True, dynamic_ncols=True, leave=False)
        rate = ImageRate()
        for step, (x1, x2) in enumerate(self.train_batches.batches(epoch, self.start_step), start=self.start_step):
            lr = self.optimizer.param_groups[0]["lr"]  # this step's rate: the scheduler moves it after the step
            loss, acc = self.train_step(self.to_device(x1), self.to_device(x2))
            total += loss
            count += 1
            rate.add(x1.shape[0] * self.info.world_size)
            bar.update(1)
            if (epoch * steps + step + 1) % self.config.log_every_n_steps == 0 or step + 1 == steps:
                self._log_step(writer, bar, epoch, step, loss, acc, lr, rate.read())
                rate.restart()  # the time spent logging is not the step's
            if self.guard.should_stop():
                bar.close()
                self._save_and_stop(epoch, step + 1, loss, total, count)
        bar.close()
        self.start_step = 0
        mean = (all_reduce_mean(total) / max(count, 1)).item()
        if not self.scaler.is_enabled():
            self._check_finite(mean, epoch, steps - 1)
        return mean

    def _log_step(self, writer: RunWriter | None, bar: tqdm, epoch: int, step: int, loss: torch.Tensor, acc: dict,
                  lr: float, speed: float) -> None:
        """Check the loss, show it, and write the step's record: the only host syncs of the step loop."""
        loss_value = loss.item()
        if not self.scaler.is_enabled():  # under float16 a GradScaler skips overflowing steps instead
            self._check_finite(loss_value, epoch, step)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
        if writer is None:
            return
        global_step = epoch * self.train_batches.steps_per_epoch + step + 1
        record = {"kind": "step", "epoch": epoch, "step": step, "global_step": global_step, "loss": loss_value,
                  "lr": lr, "top1": acc["top1"].item(), "top5": acc["top5"].item(), "images_per_s": speed}
        if self.scaler.is_enabled():
            record["skipped_steps"] = int(self.skipped_steps.item())  # float16 overflow, not fatal
        writer.log(record, global_step, "train")

    def _save_and_stop(self, epoch: int, steps_done: int, loss: torch.Tensor, total: torch.Tensor, count: int):
        """Save the position inside `epoch`, with the loss summed so far (the epoch's mean survives the stop), and
        raise `Preempted`."""
        if not self.scaler.is_enabled():  # never save weights after a NaN step, on any rank
            self._check_finite(all_reduce_mean(loss.detach().float()).item(), epoch, steps_done - 1)
        loss_sum = all_reduce_mean(total).item()  # every rank resumes from the same partial sum
        if self.info.is_main:
            state = self._state(epoch, steps_done)
            state.update(epoch_loss_sum=loss_sum, epoch_steps=count)
            ckpt.save_checkpoint(self.run_dir / "checkpoints" / ckpt.LAST, state, self._keep_previous,
                                 self.write_checkpoint)
        barrier()
        raise self.guard.preempted(f"at epoch {epoch + 1}, step {steps_done}")

    @torch.no_grad()
    def validate(self) -> dict:
        """NT-Xent and contrastive accuracy on the held-out views (fixed across epochs), averaged over ranks.

        In batches of the training batch size where the hold-out has that many images; a smaller hold-out is one
        batch, whose loss is scaled to the training batch's 2N - 2 negatives (`NTXentLoss.loss_and_accuracy`), so
        that it compares with the training loss; its top-k stays among its own candidates (`describe_validation`).
        """
        self.train_model.eval()
        valid, world = self.valid_batches, self.info.world_size
        local = self.validation_batch() // world  # the same on every rank
        negatives = 2 * self.config.batch_size - 2
        batches = tqdm(valid.fixed_batches(local), total=valid.fixed_batch_count(local), desc="validation",
                       disable=None if self.info.is_main else True, leave=False)
        sums, count = torch.zeros(3, device=self.device), 0
        for x1, x2 in self.guard.watch(batches, "validate"):
            if x1.shape[0] < 2 and not self.info.distributed:
                continue
            with self._autocast():
                _, z = self.train_model(torch.cat([self.to_device(x1), self.to_device(x2)]))
                loss, acc = self.criterion.loss_and_accuracy(z[:x1.shape[0]], z[x1.shape[0]:], negatives=negatives)
            sums += torch.stack([loss.float(), acc["top1"], acc["top5"]])
            count += 1
        sums = all_reduce_mean(sums / max(count, 1))
        return {"valid_loss": sums[0].item(), "valid_top1": sums[1].item(), "valid_top5": sums[2].item()}

    def validation_batch(self) -> int:
        """Images in a validation batch, over all processes: the training batch size, or the whole hold-out
        where it is smaller (at least 2 per process)."""
        world = self.info.world_size
        return world * max(2, min(self.config.batch_size // world, self.valid_batches.num_images // world))

    def _measure_knn(self) -> dict:
        """The kNN monitor's top-1 of the backbone now, and its seconds (main process; the others wait)."""
        start = time.perf_counter()
        top1 = self.monitor.measure(self.model.encoder, self._autocast, lambda b: self.guard.watch(b, "monitor"))
        return {"knn_top1": top1, "knn_seconds": time.perf_counter() - start}

    def _log_knn_reference(self, writer: RunWriter | None) -> None:
        """The monitor before the first step (random-init weights, or `fine_tune_from`'s): curves.png's reference
        line. Written once per run: a resumed run keeps the one its start wrote."""
        if self.monitor is not None:
            record = {"kind": "knn_reference", "epoch": 0, "global_step": 0, **self._measure_knn()}
            writer.log(record, 0, "epoch")  # TensorBoard's epoch/knn_top1 at step 0
            self.log(f"kNN monitor: knn_top1 {record['knn_top1']:.1f}% before training ({self.monitor.describe()}; "
                     f"{record['knn_seconds']:.1f} s)")
        barrier()

    def fit(self) -> Path:
        """Train the remaining epochs; return the run dir. Raises `Preempted` after SIGTERM/SIGINT."""
        epochs = self.config.epochs
        with self.guard, flushed_denormals(), self._open_writer() as writer:
            if self.next_epoch == 0 and self.start_step == 0:
                self._log_knn_reference(writer)
            for epoch in range(self.next_epoch, epochs):
                self._end_epoch(epoch, self._run_epoch(epoch, writer), writer)
                # a signal during the epoch's last step or its validation, on any process: this epoch's
                # checkpoint is the place to stop, no step wasted
                if self.guard.agree_to_stop() and epoch + 1 < epochs:
                    raise self.guard.preempted(f"after epoch {epoch + 1}")
        return self.run_dir

    def _run_epoch(self, epoch: int, writer: RunWriter | None) -> dict:
        """Train one epoch, then validate when due; the epoch's record."""
        c = self.config
        start = time.perf_counter()
        record = {"kind": "epoch", "epoch": epoch, "train_loss": self.train_epoch(epoch, writer)}
        if self.valid_batches is not None and ((epoch + 1) % c.eval_every_n_epochs == 0 or epoch + 1 == c.epochs):
            record.update(self.validate())
        every = c.knn_monitor.every_n_epochs or c.eval_every_n_epochs
        if self.monitor is not None and ((epoch + 1) % every == 0 or epoch + 1 == c.epochs):
            record.update(self._measure_knn())
        record["seconds"] = time.perf_counter() - start
        record["ended"] = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")  # for GPU samples
        return record

    def _end_epoch(self, epoch: int, record: dict, writer: RunWriter | None) -> None:
        """Log the epoch's record, save its checkpoint (and `best.pt` when validation improved), then wait for all."""
        is_best = record.get("valid_loss", math.inf) < self.best_valid
        if is_best:
            self.best_valid = record["valid_loss"]
        if self.info.is_main:
            # the record first: killed before the checkpoint, the resume drops it and logs the rerun epoch
            writer.log(record, self.scheduler.last_epoch, "epoch")  # on the train tags' (global step) axis
            folder = self.run_dir / "checkpoints"
            state = self._state(epoch + 1)
            ckpt.save_checkpoint(folder / ckpt.LAST, state, self._keep_previous, self.write_checkpoint)
            if is_best and self.config.keep_checkpoints != "last":
                ckpt.save_checkpoint(folder / ckpt.BEST, state, write=self.write_checkpoint)
            self.log(f"epoch {epoch + 1}/{self.config.epochs}: {epoch_summary(record)}")
            self._write_curves()
        barrier()

    @property
    def _keep_previous(self) -> bool:
        """Whether a new last.pt moves the one it replaces to last.prev.pt (`keep_checkpoints: all`): a fallback for a
        last.pt damaged after it was written (bad disk, bad copy); the atomic write covers a crash without it."""
        return self.config.keep_checkpoints == "all"

    @contextlib.contextmanager
    def _open_writer(self):
        """The run's `RunWriter` on the main process (None on the others), once the run's first lines are out."""
        if not self.info.is_main:
            yield None
            return
        # drop records of work done after the checkpoint being resumed (a killed attempt's), none when fresh
        writer = RunWriter(self.run_dir, self.config, resume_epoch=self.next_epoch,
                           resume_step=self.scheduler.last_epoch)  # optimiser steps done, as saved
        try:
            self.log(f"run dir {self.run_dir}: {self.train_batches.num_images} training images, "
                     f"{self.train_batches.steps_per_epoch} steps per epoch, device {self.device}")
            if self.start_note:
                self.log(self.start_note)
            self.log(self.precision.describe())
            self._write_views(writer)  # before the first step: what the views do to this data
            if self.valid_batches is not None:  # what the validation numbers are measured among, in words
                writer.tensorboard.add_text("validation", describe_validation(
                    self.valid_batches.num_images, self.validation_batch(), self.config.batch_size),
                    self.scheduler.last_epoch)
            yield writer
        finally:
            writer.close()

    def _write_views(self, writer: RunWriter) -> None:
        """`views.png` and the TensorBoard image `views`: training images next to views this run's pipeline makes."""
        picture = views_picture(self.train_batches.images, self.config.dataset, self.config.seed)
        try:  # pictures are for reading: never worth stopping the run for
            write_views(self.run_dir / "views.png", picture, writer.tensorboard, self.scheduler.last_epoch)
        except OSError as err:
            self.log(f"warning: could not write {self.run_dir / 'views.png'} ({err.strerror or err})")

    def _write_curves(self) -> None:
        try:
            labels = None if self.valid_batches is None else validation_labels(self.validation_batch(),
                                                                                self.config.batch_size)
            write_curves(self.run_dir, self.config.epochs, labels)
        except OSError as err:
            self.log(f"warning: could not write {self.run_dir / 'curves.png'} ({err.strerror or err})")


def describe_validation(hold_out: int, valid_batch: int, batch_size: int) -> str:
    """TensorBoard's text `validation`: what `epoch/valid_*` are measured on and among (`Trainer.validate`)."""
    text = (f"epoch/valid_loss, valid_top1 and valid_top5: NT-Xent and contrastive top-k of the model in eval mode "
            f"on the {hold_out} held-out images (dataset.valid_size), with views fixed across epochs. ")
    if valid_batch >= batch_size:
        return text + (f"In batches of {batch_size} as in training (images past the last whole batch left out), "
                       "so that they compare with the training loss and top-k.")
    ratio = (2 * batch_size - 2) / (2 * valid_batch - 2)
    return text + (f"They are fewer than one training batch ({batch_size}), so they make one batch of {valid_batch}. "
                   f"valid_loss is scaled to the training batch's {2 * batch_size - 2} negatives (each anchor's sum "
                   f"of exp(logit) over "
                   f"its {2 * valid_batch - 2} negatives times {ratio:.3f}: in expectation the sum over "
                   f"{2 * batch_size - 2}; docs/PICTURES.md), so that it compares with the training loss. valid_top1 "
                   f"and valid_top5 are among the batch's own {2 * valid_batch - 1} candidates (training: "
                   f"{2 * batch_size - 1}), so they read higher than the training top-k would at equal quality.")


@contextlib.contextmanager
def flushed_denormals():
    """Denormal floats read as 0 inside the block.

    Adam's second moments of tiny gradients underflow into denormal floats, which x86 CPUs handle 5-10x
    slower: on a 2-core CPU a ResNet-18 step went from about 1 s to 0.15-0.25 s (32 px views, batch 64).
    Values below 1e-38 become 0 while training (CUDA kernels flush them anyway); the process's other
    code gets IEEE floats back afterwards.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class ImageRate:
    """Images per second since the last (re)start: the progress bar's and the step records' speed."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def epoch_summary(record: dict) -> str:
    """An epoch record as people read it: losses to 4 decimals, accuracies in % to 1, the time in whole tenths
    of a second (metrics.jsonl keeps the full values)."""
    shown = [f"{k} {v:.1f}%" if k.endswith(("top1", "top5")) else f"{k} {v:.4f}"
             for k, v in record.items() if k not in ("kind", "epoch", "seconds", "knn_seconds", "ended")]
    return ", ".join(shown) + (f" ({record['seconds']:.1f} s)" if "seconds" in record else "")
