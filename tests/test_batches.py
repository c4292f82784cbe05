"""The two batch sources: one interface (resume mid-epoch, fixed validation batches, equal shares per rank),
and the device source's own guarantees (a pure function of seed, epoch and step; ranks split the global batch)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

from data_aug import device_views as dv
from data_aug.batches import DeviceBatches, LoaderBatches, gather_to_device
from data_aug.views import TwoViews, ViewSettings, create_view_transform
from tests.test_device_views import _images, _uint8_images  # noqa: F401 - _images: the CUDA test's sources

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(kind: str, images: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
    views = ViewSettings(16)
    if kind == "device":
        return DeviceBatches(images, batch_size, views, seed=0, rank=rank, world_size=world_size)
    data = TwoViews([(image, 0) for image in images], create_view_transform(views), seed=0)
    return LoaderBatches(data, batch_size, seed=0, rank=rank, world_size=world_size)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.mark.parametrize("kind", ["loader", "device"])
def test_both_sources_resume_mid_epoch_and_repeat_their_fixed_batches(kind):
    images = _uint8_images(count=10, side=20)
    source = _source(kind, images, 4)
    assert (source.num_images, source.steps_per_epoch) == (10, 2)  # the last partial batch is dropped
    full, resumed = list(source.batches(1)), list(source.batches(1, start_step=1))
    assert len(full) == 2 and full[0][0].shape == (4, 3, 16, 16) and _same(full[1:], resumed)
    assert not torch.equal(full[0][0], list(source.batches(2))[0][0])  # another epoch, other views
    assert source.order_depends_on_world_size == (kind == "loader")
    for world, local in ((1, 4), (2, 2), (3, 8)):  # 8: a share smaller than one batch gives one short batch
        ranks = [_source(kind, images, world, rank, world) for rank in range(world)]
        fixed = [list(r.fixed_batches(local)) for r in ranks]
        assert [len(f) for f in fixed] == [r.fixed_batch_count(local) for r in ranks] == [len(fixed[0])] * world
        assert len({f[0][0].shape for f in fixed}) == 1  # equal batches on every rank
        assert _same(fixed[0], list(ranks[0].fixed_batches(local)))  # the same views at every call


def test_batches_shape_range_and_views_differ():
    batches = DeviceBatches(_uint8_images(), 16, ViewSettings(20), seed=0)
    assert batches.steps_per_epoch == 6 and batches.num_images == 96
    x1, x2 = batches.make_batch(0, 0)
    assert x1.shape == x2.shape == (16, 3, 20, 20) and x1.dtype == torch.float32
    assert x1.min() >= 0 and x1.max() <= 1
    assert (x1 - x2).abs().mean() > 0.02  # two independent views of the same images


def test_batches_are_a_pure_function_of_seed_epoch_step():
    images = _uint8_images()
    state = torch.get_rng_state()
    full = list(DeviceBatches(images, 16, ViewSettings(20), seed=3).batches(epoch=2))
    resumed = list(DeviceBatches(images, 16, ViewSettings(20), seed=3).batches(epoch=2, start_step=4))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never used
    assert len(full) == 6 and len(resumed) == 2
    for (a1, a2), (b1, b2) in zip(full[4:], resumed):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    other_epoch = DeviceBatches(images, 16, ViewSettings(20), seed=3).make_batch(3, 4)
    other_seed = DeviceBatches(images, 16, ViewSettings(20), seed=4).make_batch(2, 4)
    assert not torch.equal(other_epoch[0], full[4][0]) and not torch.equal(other_seed[0], full[4][0])


def test_each_epoch_visits_each_image_at_most_once_and_ranks_split_the_global_batch():
    images = _uint8_images(count=100)
    single = DeviceBatches(images, 16, ViewSettings(20), seed=1, chunk=5)
    ranks = [DeviceBatches(images, 16, ViewSettings(20), seed=1, rank=r, world_size=4) for r in range(4)]
    assert single.steps_per_epoch == 6  # 100 // 16: the last partial batch is dropped
    seen = torch.cat([single.indices(0, t) for t in range(6)])
    assert len(seen.unique()) == 96
    for step in (0, 5):
        parts = [r.indices(0, step) for r in ranks]
        assert all(len(p) == 4 for p in parts)
        assert torch.equal(torch.cat(parts), single.indices(0, step))  # disjoint slices of the same batch
        views = [r.make_batch(0, step) for r in ranks]
        x1, x2 = single.make_batch(0, step)
        torch.testing.assert_close(torch.cat([v[0] for v in views]), x1, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.cat([v[1] for v in views]), x2, atol=1e-6, rtol=0)
    assert not torch.equal(single.permutation(0), single.permutation(1))


def test_gather_to_device_equals_indexing_in_any_chunking():
    images = torch.randint(0, 256, (11, 3, 4, 5), dtype=torch.uint8)
    indices = torch.randperm(11)[:9]
    for chunk in (1, 4, 9, 100):
        assert torch.equal(gather_to_device(images, indices, "cpu", chunk=chunk), images[indices])


def test_fixed_batches_repeat_and_take_this_ranks_share_in_order():
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    plain = ViewSettings(16, s=0.0, blur=False, min_crop_scale=1.0)
    batches = DeviceBatches(images, 2, plain, seed=3, rank=1, world_size=2)
    first, again = list(batches.fixed_batches(2)), list(batches.fixed_batches(2))
    assert len(first) == batches.fixed_batch_count(2) == 2  # rank 1's share: images 1, 3, 5, 7, 9 -> 2 full batches
    assert all(torch.equal(a, b) for pa, pb in zip(first, again) for a, b in zip(pa, pb))
    assert not torch.equal(first[0][0], first[0][1])  # two different views of each image
    expected = images[[1, 3, 5, 7]].float() / 255
    gray = dv._luma(expected).expand(-1, 3, -1, -1)  # full-image crops, no jitter or blur: only flip and grayscale
    for view in torch.cat([first[0][0], first[1][0]]), torch.cat([first[0][1], first[1][1]]):
        for v, x, g in zip(view, expected, gray):
            assert any(torch.allclose(v, c, atol=1e-5) for c in (x, x.flip(-1), g, g.flip(-1)))
    assert len(list(DeviceBatches(images, 2, ViewSettings(16), seed=0, world_size=2).fixed_batches(8))) == 1
    for world in (1, 3, 4, 10):  # the same shares as DistributedSampler, padding included
        for rank in range(world):
            mine = DeviceBatches(images, world, ViewSettings(16), seed=0, rank=rank, world_size=world)
            assert mine.share().tolist() == list(DistributedSampler(range(10), world, rank, shuffle=False))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(torch.zeros(32, 3, 8, 8), 16, ViewSettings(8), 0)
    with pytest.raises(ValueError, match="divisible"):
        DeviceBatches(_uint8_images(), 15, ViewSettings(20), 0, world_size=2)
    with pytest.raises(ValueError, match="larger"):
        DeviceBatches(_uint8_images(count=8), 16, ViewSettings(20), 0)


def test_trainer_takes_two_steps_on_the_device_path(tmp_path):
    from simclr.config import load_config
    from simclr.dist import DistInfo
    from simclr.trainer import Trainer

    config = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "batch_size=32",
                                               "dataset.augment_on=device"])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
    batches = trainer.train_batches
    assert isinstance(batches, DeviceBatches) and batches.steps_per_epoch == batches.num_images // 32
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step, (x1, x2) in zip(range(2), batches.batches(0)):
        assert x1.shape == (32, 3, 32, 32)
        loss, _ = trainer.train_step(x1, x2)
        assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()) if a.ndim > 1)
    assert isinstance(trainer.valid_batches, DeviceBatches)  # validation views are made on the device too
    first = trainer.validate()  # outside fit(): no lock, no signal handlers needed
    assert first == trainer.validate() and set(first) == {"valid_loss", "valid_top1", "valid_top5"}


@pytest.mark.cuda
def test_cuda_batches_never_sync_with_the_host_and_match_the_cpu_ops():
    images = _uint8_images(count=256, side=96)
    batches = DeviceBatches(images, 128, ViewSettings(96), seed=0, device="cuda")
    batches.make_batch(0, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x1, x2 = batches.make_batch(0, 1)
        batches.make_batch(1, 0)  # a new epoch: its permutation is drawn on the GPU too
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x1.is_cuda and x1.is_contiguous(memory_format=torch.channels_last)
    params = dv.sample_view_params(64, 96, 96, ViewSettings(96), torch.Generator(device="cuda").manual_seed(0))
    source = _images(64, 96, 96).cuda()
    on_gpu = dv.make_views(source, params, 96, 11)
    on_cpu = dv.make_views(source.cpu(), dv.ViewParams(**{k: v.cpu() for k, v in vars(params).items()}), 96, 11)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=0)  # TF32 matmuls, if enabled, round more


@pytest.mark.cuda
def test_cuda_training_step_never_syncs_with_the_host(tmp_path):
    """The trainer's whole step (device views, bf16 forward, NT-Xent, backward, fused Adam, schedule)."""
    from simclr.config import load_config
    from simclr.dist import DistInfo
    from simclr.trainer import Trainer

    config = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "device=cuda", "batch_size=32",
                                               "dataset.augment_on=device", "fp16_precision=true",
                                               "amp_dtype=bfloat16"])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cuda")))
    batches = trainer.train_batches.batches(0)
    for _ in range(2):  # the first steps allocate optimiser state
        trainer.train_step(*next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, acc = trainer.train_step(*next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.is_cuda and torch.isfinite(loss) and acc["top1"].is_cuda


@pytest.mark.cuda  # not on the CPU: compiling there takes minutes
def test_compiled_view_ops_match_eager_on_cuda():
    images = _uint8_images(count=128, side=96)
    eager = DeviceBatches(images, 64, ViewSettings(96), seed=0, device="cuda").make_batch(0, 1)
    compiled = DeviceBatches(images, 64, ViewSettings(96), seed=0, device="cuda", compile=True).make_batch(0, 1)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hflip", [0.0, 0.3, 1.0])
def test_hflip_is_the_share_of_mirrored_views_on_both_pipelines(hflip):
    from data_aug.device_views import sample_view_params

    params = sample_view_params(4000, 20, 20, ViewSettings(16, hflip=hflip), torch.Generator().manual_seed(0))
    assert abs(params.flip.float().mean().item() - hflip) < 0.03
    flips = [step for step in create_view_transform(ViewSettings(16, hflip=hflip)).transforms
             if isinstance(step, v2.RandomHorizontalFlip)]
    assert len(flips) == 1 and flips[0].p == hflip


def test_a_view_without_flip_and_full_crop_keeps_the_image_unmirrored():
    """hflip 0 on the device pipeline: a left-right asymmetric image is never mirrored (its left half stays
    the brighter one in every view)."""
    images = torch.zeros(1, 3, 20, 20, dtype=torch.uint8)
    images[..., :10] = 255
    views = ViewSettings(20, s=0.0, blur=False, min_crop_scale=1.0, hflip=0.0)
    for seed in range(5):
        x1, x2 = DeviceBatches(images.repeat(4, 1, 1, 1), 4, views, seed=seed).make_batch(0, 0)
        for view in torch.cat([x1, x2]):
            assert view[:, :, :8].mean() > view[:, :, -8:].mean()
