"""Where training and validation batches of two views come from: one interface, two sources.

`LoaderBatches` makes views per image on the CPU in DataLoader workers (`dataset.augment_on: cpu`);
`DeviceBatches` makes a whole batch at once with tensor ops on the device that holds the images
(`augment_on: device`, `data_aug.device_views`). Both are a pure function of (seed, epoch, step), so a
resumed run sees the batches an uninterrupted run would, and both give validation a fixed set of batches.
"""
from __future__ import annotations

import hashlib
import math
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from data_aug.device_views import ViewParams, make_views, sample_view_params
from data_aug.views import TwoViews, ViewSettings, blur_kernel_size

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource:
    """What the trainer reads from a source of view pairs, whichever makes them.

    Attributes:
        num_images: images in the split.
        steps_per_epoch: whole global batches per epoch (a last partial batch is dropped).
        images: the split's images, indexable (a uint8 `[3, H, W]` tensor or an `(image, label)` pair per item),
            for the picture of the views.
        order_depends_on_world_size: whether an epoch's order changes with the number of processes (a
            mid-epoch resume by another number then visits some images twice).
    """

    order_depends_on_world_size = False

    def __init__(self, num_images: int, batch_size: int, rank: int, world_size: int):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.num_images, self.batch_size, self.local_batch = num_images, batch_size, batch_size // world_size
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_images // batch_size

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield this rank's `(x1, x2)` for steps `start_step ..` of `epoch`: the same whatever the start."""
        raise NotImplementedError

    def fixed_batches(self, local_batch: int) -> Iterator[Batch]:
        """This rank's share of all images, in order, as `(x1, x2)` batches that are the same at every call.

        For validation: ranks get equal shares (DistributedSampler's, padded by repeating images), cut into
        batches of `local_batch` (a shorter last batch only when the share is smaller than one batch).
        """
        raise NotImplementedError

    def fixed_batch_count(self, local_batch: int) -> int:
        """How many batches `fixed_batches(local_batch)` yields."""
        return len(_fixed_starts(math.ceil(self.num_images / self.world_size), local_batch))


def _fixed_starts(share: int, local_batch: int) -> range:
    """Batch starts in a share: whole batches only, or one short batch when the share is smaller than one."""
    return range(0, share - share % local_batch if share >= local_batch else share, local_batch)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SIGTERM/SIGINT sent to the whole process group (SLURM, Ctrl-C) are the main
    process's to handle; a worker killed by them would crash the step that is finishing before the checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LoaderBatches(BatchSource):
    """Batches of two views from a DataLoader in the order of a seeded, resumable DistributedSampler.

    Args:
        views: the two-view data set (`set_epoch` chooses an epoch's views).
        batch_size: the global batch; each rank loads `batch_size / world_size` images per step.
        seed: the sampler's shuffle seed.
        rank, world_size: this process and the number of processes.
        num_workers: DataLoader worker processes (not persistent: `TwoViews.set_epoch` must reach them).
        pin_memory: page-locked host batches, for a quick copy to a CUDA device.
    """

    order_depends_on_world_size = True  # DistributedSampler deals the shuffled order out round-robin

    def __init__(self, views: TwoViews, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        super().__init__(len(views), batch_size, rank, world_size)
        self.views, self.images = views, views.dataset
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = DistributedSampler(views, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        self.views.set_epoch(epoch)
        order = list(self.sampler)[start_step * self.local_batch:self.steps_per_epoch * self.local_batch]
        yield from self._loader(order, self.local_batch, drop_last=True)

    def fixed_batches(self, local_batch: int) -> Iterator[Batch]:
        self.views.set_epoch(0)  # the views of epoch 0, at every call
        sampler = DistributedSampler(self.views, num_replicas=self.world_size, rank=self.rank, shuffle=False)
        yield from self._loader(sampler, local_batch, drop_last=len(sampler) >= local_batch)

    def _loader(self, order, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(self.views, batch_size=batch_size, sampler=order, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, worker_init_fn=ignore_stop_signals)


def stream_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed for the random stream of (run seed, epoch, step); step -1 is the epoch's permutation."""
    digest = hashlib.blake2b(f"device_views/{seed}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def gather_to_device(images: torch.Tensor, indices: torch.Tensor, device: torch.device | str,
                     chunk: int = 8192) -> torch.Tensor:
    """`images[indices]` made on `device` a chunk at a time, so the host never holds a second full copy."""
    out = torch.empty((len(indices), *images.shape[1:]), dtype=images.dtype, device=device)
    for start in range(0, len(indices), chunk):
        out[start:start + chunk] = images[indices[start:start + chunk]].to(device)
    return out


class DeviceBatches(BatchSource):
    """Batches of two views made on the training device from a uint8 image tensor held there once.

    Each epoch is one seeded permutation of all images; global step t takes positions
    `[t * batch_size, (t + 1) * batch_size)` of it (the last partial batch is dropped) and rank r its
    r-th slice of `batch_size / world_size` images. The views' parameters are drawn for the whole global
    batch from a generator on the device seeded by (seed, epoch, step), so batches are a pure function of
    (seed, epoch, step): a resumed run sees the same views, and the ranks' slices together are exactly
    the batch a single process would make.

    Args:
        images: `[N, 3, H, W]` uint8 training images (moved to `device` once).
        batch_size: global batch size (divisible by `world_size`).
        views: the view pipeline's settings.
        seed: run seed.
        rank, world_size: this process and the number of processes.
        device: where images live and views are made.
        chunk: views made per pass on the CPU (cache-sized work); None: the whole batch at once (GPU default).
        compile: run the view-making ops through `torch.compile` (fullgraph), which fuses the element-wise
            colour ops into a few kernels; the first batch then takes a minute or more to compile.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, views: ViewSettings, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", chunk: int | None = None,
                 compile: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the {images.shape[0]} images")
        super().__init__(images.shape[0], batch_size, rank, world_size)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.views, self.seed = views, seed
        self.kernel_size = blur_kernel_size(views.crop_size)
        self.chunk = chunk if chunk is not None else (32 if self.device.type == "cpu" else None)
        self._permutation: tuple[int, torch.Tensor] | None = None
        self._make_views = torch.compile(make_views, fullgraph=True, dynamic=False) if compile else make_views

    def _generator(self, epoch: int, step: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(stream_seed(self.seed, epoch, step))
        return generator

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all N images, `[N]` int64 on the device (cached for the current epoch)."""
        if self._permutation is None or self._permutation[0] != epoch:
            order = torch.randperm(self.num_images, generator=self._generator(epoch, -1), device=self.device)
            self._permutation = (epoch, order)
        return self._permutation[1]

    def indices(self, epoch: int, step: int) -> torch.Tensor:
        """This rank's image indices `[batch_size / world_size]` for a step."""
        start = step * self.batch_size + self.rank * self.local_batch
        return self.permutation(epoch)[start:start + self.local_batch]

    def make_batch(self, epoch: int, step: int) -> Batch:
        """The two views `(x1, x2)` of this rank's images at a step, each `[batch/world, 3, crop, crop]` float32."""
        height, width = self.images.shape[-2:]
        params = sample_view_params(2 * self.batch_size, height, width, self.views, self._generator(epoch, step))
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        first, second = params[:self.batch_size][mine], params[self.batch_size:][mine]
        return self._pair(self.indices(epoch, step), first, second)

    def _pair(self, indices: torch.Tensor, first: ViewParams, second: ViewParams) -> Batch:
        """Two views of `self.images[indices]`, one per parameter set, made `chunk` images at a time."""
        images = self.images[indices].float().mul_(1 / 255)  # as to_dtype(scale=True)
        chunk, size = self.chunk or len(indices), self.views.crop_size
        pair = []
        for view_params in (first, second):
            parts = [self._make_views(images[i:i + chunk], view_params[i:i + chunk], size, self.kernel_size)
                     for i in range(0, len(indices), chunk)]
            view = parts[0] if len(parts) == 1 else torch.cat(parts)
            if self.device.type == "cuda":
                view = view.contiguous(memory_format=torch.channels_last)  # the layout the model runs in
            pair.append(view)
        return pair[0], pair[1]

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.make_batch(epoch, step)

    def fixed_batches(self, local_batch: int) -> Iterator[Batch]:
        """As `BatchSource.fixed_batches`; batch k's views are drawn from a stream seeded by (seed, rank, k), not by
        the epoch."""
        order = self.share()
        height, width = self.images.shape[-2:]
        for k, start in enumerate(_fixed_starts(len(order), local_batch)):
            indices = order[start:start + local_batch]
            params = sample_view_params(2 * len(indices), height, width, self.views, self._generator(-1 - self.rank, k))
            yield self._pair(indices, params[:len(indices)], params[len(indices):])

    def share(self) -> torch.Tensor:
        """This rank's image indices in DistributedSampler's unshuffled order (padded by wrapping), on the device."""
        total = math.ceil(self.num_images / self.world_size) * self.world_size
        return torch.arange(self.rank, total, self.world_size, device=self.device) % self.num_images
