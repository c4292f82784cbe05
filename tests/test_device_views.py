"""The batched device view pipeline against torchvision's functional ops, and its parameter laws (its batch
source: tests/test_batches.py).

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
from torchvision.transforms import v2

from data_aug import device_views as dv
from data_aug.batches import DeviceBatches
from data_aug.views import ViewSettings, blur_kernel_size, create_view_transform


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
    params = dv.sample_view_params(24, 48, 48, ViewSettings(32), generator=torch.Generator().manual_seed(8))
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
    return dv.sample_view_params(DRAWS, 96, 96, ViewSettings(32), generator=torch.Generator().manual_seed(0))


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
    batches = DeviceBatches(images, 64, ViewSettings(32, min_crop_scale=0.5), seed=0)
    params = dv.sample_view_params(DRAWS, 96, 96, ViewSettings(32, min_crop_scale=0.5),
                                   torch.Generator().manual_seed(0))
    area = params.boxes[:, 2] * params.boxes[:, 3] / 96**2
    assert area.min() >= (math.sqrt(0.5) - 0.5 / 96) ** 2 and area.min() < 0.52
    assert batches.make_batch(0, 0)[0].shape == (64, 3, 32, 32)
    with pytest.raises(ValueError, match="min_crop_scale"):
        ViewSettings(32, min_crop_scale=0)


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
    plain = ViewSettings(32, s=0.0, blur=False)
    params = dv.sample_view_params(500, 32, 32, plain, generator=torch.Generator().manual_seed(0))
    assert not params.blur.any()
    assert (params.factors == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    assert (params.factors[:, :3] >= 0).all()
    with pytest.raises(ValueError, match="s = 3"):
        ViewSettings(32, s=3)


def _uint8_images(count=96, side=24, seed=0):
    return (_images(count, side, side, seed) * 255).round().to(torch.uint8)


def test_view_statistics_match_the_pil_reference_pipeline():
    """End to end: per-view mean, contrast and colourfulness have the same distribution as the PIL pipeline."""
    images = _uint8_images(count=200, side=32, seed=9)
    device_views = torch.cat(DeviceBatches(images, 200, ViewSettings(32), seed=0).make_batch(0, 0))
    transform = create_view_transform(ViewSettings(32))
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
    plain = torch.cat(DeviceBatches(images, 200, ViewSettings(32, s=0.0, blur=False), seed=0).make_batch(0, 0))
    assert stats.ks_2samp(summary(plain)["colour"].numpy(), ref["colour"].numpy()).pvalue < 1e-3
