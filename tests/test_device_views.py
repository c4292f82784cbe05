"""The batched device view pipeline against torchvision's functional ops, its parameter laws, and its batches.

Tolerances (float32 images in [0, 1]):
- resized crop vs `resized_crop(antialias=True)`, any scale, and vs `antialias=False` for enlargements: 1e-5
  (same weights; only the summation order differs). For reductions the non-antialiased op samples two
  pixels where the antialiased one averages all under the filter, so it is not a reference there.
- brightness, contrast, saturation, grayscale, flip: 1e-6 (the same arithmetic; contrast's mean may sum in
  another order). Hue: 1e-5 (same HSV map written without the HSV stack: a few float32 ulps).
- blur: 1e-5 (the same taps, as two 1-D products instead of one 2-D convolution).
- the whole pipeline, chaining the above: 1e-4.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

from data_aug import device_views as dv
from data_aug.views import blur_kernel_size, create_view_transform


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (low-res noise upsampled) plus fine noise, float [count, 3, H, W] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(2, height // 8), max(2, width // 8), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(count, 3, height, width, generator=g)).clamp(0, 1)


def _per_image(fn, images, *args):
    """Apply a torchvision functional op image by image, with the m-th value of each per-image argument."""
    return torch.stack([fn(images[m], *[a[m] for a in args]) for m in range(images.shape[0])])


def _boxes(count, height, width, seed=0):
    return dv.sample_crop_boxes(count, height, width, torch.Generator().manual_seed(seed))


# ---------- each batched op against torchvision's functional op, fixed parameters ----------

@pytest.mark.parametrize("size", [24, 40, 96])
def test_resized_crop_matches_torchvision_antialiased(size):
    images = _images(12, 48, 64)
    boxes = _boxes(12, 48, 64)
    boxes[0] = torch.tensor([0, 0, 48, 64])  # whole image
    boxes[1] = torch.tensor([5, 7, 1, 1])  # a single pixel
    ours = dv.resized_crop(images, boxes, size)
    ref = torch.stack([TF.resized_crop(images[m], *[int(v) for v in boxes[m]], [size, size], antialias=True)
                       for m in range(12)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_resized_crop_matches_plain_bilinear_when_enlarging():
    images = _images(16, 96, 96, seed=1)
    boxes = _boxes(16, 96, 96, seed=1)  # every crop of a 96-pixel image to 96 pixels is an enlargement
    ours = dv.resized_crop(images, boxes, 96)
    ref = torch.stack([TF.resized_crop(images[m], *[int(v) for v in boxes[m]], [96, 96], antialias=False)
                       for m in range(16)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_flip_alone_and_folded_into_the_crop_match_torchvision():
    images = _images(10, 32, 40, seed=2)
    flip = torch.tensor([True, False] * 5)
    expected = torch.stack([TF.horizontal_flip(x) if f else x for x, f in zip(images, flip)])
    torch.testing.assert_close(dv.horizontal_flip(images, flip), expected, atol=0, rtol=0)
    boxes = _boxes(10, 32, 40, seed=2)
    crops = dv.resized_crop(images, boxes, 28)
    torch.testing.assert_close(dv.resized_crop(images, boxes, 28, flip), dv.horizontal_flip(crops, flip),
                               atol=1e-6, rtol=0)
    assert not torch.allclose(crops[0], crops[0].flip(-1))  # the flip is not a no-op on these images


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_torchvision(name):
    images = _images(16, 20, 24, seed=3)
    factor = torch.linspace(0.0, 1.8, 16)  # includes 0 (black / gray mean / grayscale) and > 1 (clamping)
    ours = getattr(dv, f"adjust_{name}")(images, factor)
    ref = _per_image(lambda x, f: getattr(TF, f"adjust_{name}")(x, float(f)), images, factor)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (ours - images).abs().max() > 0.1


def test_hue_matches_torchvision_including_gray_and_saturated_pixels():
    images = _images(16, 20, 24, seed=4)
    images[0] = images[0, :1].expand(3, -1, -1)  # gray: zero chroma
    images[1, 0], images[1, 1], images[1, 2] = 1.0, 0.0, 0.5  # pure colours, equal channels, extremes
    images[2, :, :10] = torch.tensor([1.0, 1.0, 0.0])[:, None, None]  # max shared by R and G
    factor = torch.linspace(-0.5, 0.5, 16)
    ref = _per_image(lambda x, f: TF.adjust_hue(x, float(f)), images, factor)
    torch.testing.assert_close(dv.adjust_hue(images, factor), ref, atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision():
    images = _images(6, 16, 16, seed=5)
    gray = torch.tensor([True, False, True, True, False, False])
    expected = torch.stack([TF.rgb_to_grayscale(x, num_output_channels=3) if g else x for x, g in zip(images, gray)])
    torch.testing.assert_close(dv.rgb_to_grayscale(images, gray), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [32, 96])
def test_blur_matches_torchvision(size):
    kernel = blur_kernel_size(size)
    images = _images(8, size, size, seed=6)
    sigma = torch.linspace(0.1, 2.0, 8)
    apply = torch.tensor([True] * 7 + [False])
    ref = torch.stack([TF.gaussian_blur(images[m], [kernel, kernel], [float(sigma[m])] * 2) if apply[m] else images[m]
                       for m in range(8)])
    torch.testing.assert_close(dv.gaussian_blur(images, sigma, kernel, apply), ref, atol=1e-5, rtol=0)


def test_color_jitter_matches_torchvision_in_every_order():
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24
    count = orders.shape[0] + 2
    images = _images(count, 16, 16, seed=7)
    g = torch.Generator().manual_seed(7)
    factors = torch.stack([torch.empty(count).uniform_(0.2, 1.8, generator=g) for _ in range(3)]
                          + [torch.empty(count).uniform_(-0.2, 0.2, generator=g)], dim=1)
    order = torch.cat([orders, orders[:2]])
    apply = torch.ones(count, dtype=torch.bool)
    apply[-2:] = False
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for m in range(count):
        x = images[m]
        if apply[m]:
            for op in order[m]:
                x = ops[op](x, float(factors[m, op]))
        expected.append(x)
    ours = dv.color_jitter(images, apply, factors, order)
    torch.testing.assert_close(ours, torch.stack(expected), atol=2e-5, rtol=0)
    torch.testing.assert_close(ours[-2:], images[-2:], atol=0, rtol=0)


def test_make_views_matches_torchvision_pipeline_with_the_same_parameters():
    images = _images(24, 48, 48, seed=8)
    params = dv.sample_view_params(24, 48, 48, s=1.0, blur=True, generator=torch.Generator().manual_seed(8))
    size, kernel = 32, blur_kernel_size(32)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for m in range(24):
        x = TF.resized_crop(images[m], *[int(v) for v in params.boxes[m]], [size, size], antialias=True)
        if params.flip[m]:
            x = TF.horizontal_flip(x)
        if params.jitter[m]:
            for op in params.order[m]:
                x = ops[op](x, float(params.factors[m, op]))
        if params.gray[m]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params.blur[m]:
            x = TF.gaussian_blur(x, [kernel, kernel], [float(params.sigma[m])] * 2)
        expected.append(x)
    torch.testing.assert_close(dv.make_views(images, params, size, kernel), torch.stack(expected), atol=1e-4, rtol=0)


# ---------- the sampled parameters follow the intended laws ----------

DRAWS = 4000


@pytest.fixture(scope="module")
def params():
    return dv.sample_view_params(DRAWS, 96, 96, s=1.0, blur=True, generator=torch.Generator().manual_seed(0))


def _torchvision_boxes(count, height, width, seed):
    crop = v2.RandomResizedCrop(16, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    image = torch.zeros(3, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [crop.make_params([image]) for _ in range(count)]
    return torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes], dtype=torch.float32)


@pytest.mark.parametrize("height,width", [(96, 96), (32, 48)])
def test_crop_boxes_follow_torchvision_law(params, height, width):
    ours = params.boxes if (height, width) == (96, 96) else _boxes(DRAWS, height, width, seed=1)
    ref = _torchvision_boxes(DRAWS, height, width, seed=2)
    top, left, h, w = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (ours == ours.round()).all()
    area = h * w / (height * width)
    log_ratio = torch.log(w / h)
    # the law before rounding to whole pixels: area in [0.08, 1], ratio in [3/4, 4/3]; rounding moves each side
    # by at most half a pixel
    slack_area = (math.sqrt(0.08 * height * width) - 0.5) ** 2 / (height * width)
    assert area.min() >= slack_area and area.max() <= 1
    assert area.min() < 0.1 and area.max() > 0.85  # the whole range is used (a 32x48 image allows up to 0.875)
    side = math.sqrt(0.08 * height * width)
    assert log_ratio.abs().max() <= math.log(4 / 3) + math.log((side + 0.5) / (side - 0.5)) + 1e-6
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    for a, b in [(area, ref_area), (log_ratio, torch.log(ref[:, 3] / ref[:, 2])),
                 ((top + h / 2) / height, (ref[:, 0] + ref[:, 2] / 2) / height),
                 ((left + w / 2) / width, (ref[:, 1] + ref[:, 3] / 2) / width)]:
        assert stats.ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3


def test_crop_law_before_rejection_is_uniform_area_and_log_uniform_ratio():
    # On a huge image rounding is negligible, and with ratio 1 every area fits: the area is then uniform
    generator = torch.Generator().manual_seed(3)
    boxes = dv.sample_crop_boxes(DRAWS, 4000, 4000, generator, ratio=(1.0, 1.0))
    area = boxes[:, 2] * boxes[:, 3] / 4000**2
    assert stats.kstest(area.numpy(), stats.uniform(0.08, 0.92).cdf).pvalue > 1e-3
    # with area fixed at 0.25 every ratio in [3/4, 4/3] fits: log(w/h) is uniform
    boxes = dv.sample_crop_boxes(DRAWS, 4000, 4000, generator, scale=(0.25, 0.25))
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2])
    assert stats.kstest(log_ratio.numpy(), stats.uniform(math.log(3 / 4), math.log(16 / 9)).cdf).pvalue > 1e-3


def test_min_crop_scale_bounds_the_crop_area():
    images = _uint8_images(count=64, side=96)
    batches = dv.DeviceBatches(images, 64, 32, 1.0, True, seed=0, min_crop_scale=0.5)
    params = dv.sample_view_params(DRAWS, 96, 96, 1.0, True, torch.Generator().manual_seed(0), min_crop_scale=0.5)
    area = params.boxes[:, 2] * params.boxes[:, 3] / 96**2
    assert area.min() >= (math.sqrt(0.5) - 0.5 / 96) ** 2 and area.min() < 0.52
    assert batches.make_batch(0, 0)[0].shape == (64, 3, 32, 32)
    with pytest.raises(ValueError, match="min_crop_scale"):
        dv.DeviceBatches(images, 64, 32, 1.0, True, seed=0, min_crop_scale=0)


def test_crop_falls_back_to_the_central_crop_when_nothing_fits():
    # a 1x50 image: no box of ratio in [3/4, 4/3] fits, as in torchvision the crop is central with ratio 4/3
    boxes = dv.sample_crop_boxes(20, 1, 50, torch.Generator().manual_seed(0))
    ref = _torchvision_boxes(1, 1, 50, seed=0)
    assert (boxes == ref).all()


@pytest.mark.parametrize("field,p", [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)])
def test_coin_frequencies(params, field, p):
    frequency = getattr(params, field).float().mean().item()
    assert abs(frequency - p) < 4.5 * math.sqrt(p * (1 - p) / DRAWS)


def test_coins_are_independent_per_view(params):
    both = (params.jitter & params.gray).float().mean().item()
    assert abs(both - 0.8 * 0.2) < 4.5 * math.sqrt(0.16 * 0.84 / DRAWS)


def test_jitter_factors_sigma_and_order_laws(params):
    s = 1.0
    for column, (low, high) in enumerate([(1 - 0.8 * s, 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]):
        values = params.factors[:, column].numpy()
        assert values.min() >= low and values.max() <= high
        assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    sigma = params.sigma.numpy()
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()  # each row is a permutation
    counts = torch.unique(params.order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_strength_zero_no_blur_and_bad_strength():
    params = dv.sample_view_params(500, 32, 32, s=0.0, blur=False, generator=torch.Generator().manual_seed(0))
    assert not params.blur.any()
    assert (params.factors == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    assert (params.factors[:, :3] >= 0).all()
    with pytest.raises(ValueError, match="s = 3"):
        dv.jitter_ranges(3)


# ---------- the batch source ----------

def _uint8_images(count=96, side=24, seed=0):
    return (_images(count, side, side, seed) * 255).round().to(torch.uint8)


def test_batches_shape_range_and_views_differ():
    batches = dv.DeviceBatches(_uint8_images(), 16, 20, 1.0, True, seed=0)
    assert batches.steps_per_epoch == 6 and batches.num_images == 96
    x1, x2 = batches.make_batch(0, 0)
    assert x1.shape == x2.shape == (16, 3, 20, 20) and x1.dtype == torch.float32
    assert x1.min() >= 0 and x1.max() <= 1
    assert (x1 - x2).abs().mean() > 0.02  # two independent views of the same images


def test_batches_are_a_pure_function_of_seed_epoch_step():
    images = _uint8_images()
    state = torch.get_rng_state()
    full = list(dv.DeviceBatches(images, 16, 20, 1.0, True, seed=3).batches(epoch=2))
    resumed = list(dv.DeviceBatches(images, 16, 20, 1.0, True, seed=3).batches(epoch=2, start_step=4))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never used
    assert len(full) == 6 and len(resumed) == 2
    for (a1, a2), (b1, b2) in zip(full[4:], resumed):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    other_epoch = dv.DeviceBatches(images, 16, 20, 1.0, True, seed=3).make_batch(3, 4)
    other_seed = dv.DeviceBatches(images, 16, 20, 1.0, True, seed=4).make_batch(2, 4)
    assert not torch.equal(other_epoch[0], full[4][0]) and not torch.equal(other_seed[0], full[4][0])


def test_each_epoch_visits_each_image_at_most_once_and_ranks_split_the_global_batch():
    images = _uint8_images(count=100)
    single = dv.DeviceBatches(images, 16, 20, 1.0, True, seed=1, chunk=5)
    ranks = [dv.DeviceBatches(images, 16, 20, 1.0, True, seed=1, rank=r, world_size=4) for r in range(4)]
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
        assert torch.equal(dv.gather_to_device(images, indices, "cpu", chunk=chunk), images[indices])


def test_fixed_batches_repeat_and_take_this_ranks_share_in_order():
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    batches = dv.DeviceBatches(images, 2, 16, 0.0, False, seed=3, rank=1, world_size=2, min_crop_scale=1.0)
    first, again = list(batches.fixed_batches(2)), list(batches.fixed_batches(2))
    assert len(first) == batches.fixed_batch_count(2) == 2  # rank 1's share: images 1, 3, 5, 7, 9 -> 2 full batches
    assert all(torch.equal(a, b) for pa, pb in zip(first, again) for a, b in zip(pa, pb))
    assert not torch.equal(first[0][0], first[0][1])  # two different views of each image
    expected = images[[1, 3, 5, 7]].float() / 255
    gray = dv._luma(expected).expand(-1, 3, -1, -1)  # full-image crops, no jitter or blur: only flip and grayscale
    for view in torch.cat([first[0][0], first[1][0]]), torch.cat([first[0][1], first[1][1]]):
        for v, x, g in zip(view, expected, gray):
            assert any(torch.allclose(v, c, atol=1e-5) for c in (x, x.flip(-1), g, g.flip(-1)))
    assert len(list(dv.DeviceBatches(images, 2, 16, 1.0, True, seed=0, world_size=2).fixed_batches(8))) == 1
    for world in (1, 3, 4, 10):  # the same shares as DistributedSampler, padding included
        for rank in range(world):
            mine = dv.DeviceBatches(images, world, 16, 0.0, False, seed=0, rank=rank, world_size=world)
            assert mine.share().tolist() == list(DistributedSampler(range(10), world, rank, shuffle=False))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="uint8"):
        dv.DeviceBatches(torch.zeros(32, 3, 8, 8), 16, 8, 1.0, True, 0)
    with pytest.raises(ValueError, match="divisible"):
        dv.DeviceBatches(_uint8_images(), 15, 20, 1.0, True, 0, world_size=2)
    with pytest.raises(ValueError, match="larger"):
        dv.DeviceBatches(_uint8_images(count=8), 16, 20, 1.0, True, 0)


def test_view_statistics_match_the_pil_reference_pipeline():
    """End to end: per-view mean, contrast and colourfulness have the same distribution as the PIL pipeline."""
    images = _uint8_images(count=200, side=32, seed=9)
    device_views = torch.cat(dv.DeviceBatches(images, 200, 32, 1.0, True, seed=0).make_batch(0, 0))
    transform = create_view_transform(32, 1.0, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pil_views = torch.stack([transform(images[i % 200]) for i in range(400)])

    def summary(views):
        gray = views.mean(dim=1)
        return {"mean": views.mean(dim=(1, 2, 3)), "contrast": gray.std(dim=(1, 2)),
                "colour": (views - views.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3)),
                "edges": (views[..., 1:] - views[..., :-1]).abs().mean(dim=(1, 2, 3))}

    ours, ref = summary(device_views), summary(pil_views)
    for key in ours:
        assert stats.ks_2samp(ours[key].numpy(), ref[key].numpy()).pvalue > 1e-3, key
    # the same statistics do tell pipelines apart: without colour jitter or blur they shift
    plain = torch.cat(dv.DeviceBatches(images, 200, 32, 0.0, False, seed=0).make_batch(0, 0))
    assert stats.ks_2samp(summary(plain)["colour"].numpy(), ref["colour"].numpy()).pvalue < 1e-3


def test_trainer_takes_two_steps_on_the_device_path(tmp_path):
    from simclr.config import load_config
    from simclr.dist import DistInfo
    from simclr.run_dir import RunLock
    from simclr.trainer import Trainer

    config = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "batch_size=32",
                                               "dataset.augment_on=device"])
    trainer = Trainer(config, DistInfo(0, 1, 0, torch.device("cpu")))
    batches = trainer.train_batches
    assert isinstance(batches, dv.DeviceBatches) and batches.steps_per_epoch == batches.num_images // 32
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step, (x1, x2) in zip(range(2), batches.batches(0)):
        assert x1.shape == (32, 3, 32, 32)
        loss, _ = trainer.train_step(x1, x2)
        assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()) if a.ndim > 1)
    assert isinstance(trainer.valid_views, dv.DeviceBatches)  # validation views are made on the device too
    trainer.lock = RunLock(tmp_path / "run")
    first = trainer.validate()
    assert first == trainer.validate() and set(first) == {"valid_loss", "valid_top1", "valid_top5"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_never_sync_with_the_host_and_match_the_cpu_ops():
    images = _uint8_images(count=256, side=96)
    batches = dv.DeviceBatches(images, 128, 96, 1.0, True, seed=0, device="cuda")
    batches.make_batch(0, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x1, x2 = batches.make_batch(0, 1)
        batches.make_batch(1, 0)  # a new epoch: its permutation is drawn on the GPU too
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x1.is_cuda and x1.is_contiguous(memory_format=torch.channels_last)
    params = dv.sample_view_params(64, 96, 96, 1.0, True, torch.Generator(device="cuda").manual_seed(0))
    source = _images(64, 96, 96).cuda()
    on_gpu = dv.make_views(source, params, 96, 11)
    on_cpu = dv.make_views(source.cpu(), dv.ViewParams(**{k: v.cpu() for k, v in vars(params).items()}), 96, 11)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=0)  # TF32 matmuls, if enabled, round more


# ---------- the throughput benchmark ----------

def test_benchmark_appends_runs_to_its_own_section(tmp_path):
    from bench import throughput

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- other: start -->\nother table\n<!-- other: end -->\n")
    throughput.append_run("### run one", path)
    throughput.append_run("### run two", path)
    text = path.read_text()
    assert text.count(throughput.START) == 1 and text.count("## Training throughput") == 1
    assert "other table" in text and text.index("### run one") < text.index("### run two") < text.index(throughput.END)


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    from bench import throughput

    out = tmp_path / "BENCHMARKS.md"
    assert throughput.main(["--device", "cpu", "--crop", "32", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                            "--workers", "0", "--per-core-views", "16", "--output", str(out)]) == 0
    text = out.read_text()
    for row in ("model alone on pre-made views", "full step, CPU pipeline", "full step, device pipeline",
                "CPU pipeline alone", "device pipeline alone", "per core", "torch " + torch.__version__):
        assert row in text
    assert "appended to" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiling on the CPU takes minutes)")
def test_compiled_view_ops_match_eager_on_cuda():
    images = _uint8_images(count=128, side=96)
    eager = dv.DeviceBatches(images, 64, 96, 1.0, True, seed=0, device="cuda").make_batch(0, 1)
    compiled = dv.DeviceBatches(images, 64, 96, 1.0, True, seed=0, device="cuda", compile=True).make_batch(0, 1)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", ["gpu", "mps"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_benchmarks_refuse_a_bad_device_in_one_line(device, capsys):
    from bench import loss_scaling, throughput

    for bench in (throughput, loss_scaling):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--device", device, "--no-write"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"--device: {device!r}" in err and "Traceback" not in err
