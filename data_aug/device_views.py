"""The paper's view pipeline (Appendix A) in batch form, on the training device (`data_aug.batches.DeviceBatches`
uses it).

`data_aug.views.create_view_transform` makes one view at a time with PIL on the CPU; here a whole batch of
views is made at once, with tensor ops, on the device that holds the uint8 images (a GPU, or the CPU).
Every image gets its own random parameters, drawn from the same laws as torchvision's transforms:

    RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bilinear, antialias) -> RandomHorizontalFlip(hflip)
    -> RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8), the four ops in a random order per image
    -> RandomGrayscale(0.2) -> RandomApply(GaussianBlur(kernel ~10% of the side, sigma 0.1-2), p=0.5)

Each op is written to match torchvision's tensor functional op (`torchvision.transforms.v2.functional`) on
every image with the same parameters (tests/test_device_views.py states the tolerances). The resized crop
and the blur are separable linear maps, so they run as batched matrix products with per-image matrices:
the crop's matrices hold exactly the weights of torchvision's antialiased bilinear resize, the flip reverses
them, and the blur's hold the Gaussian taps with reflect padding. (`torchvision.ops.roi_align` would
also crop in batch, but near a crop's edge it samples pixels outside the crop, where resized_crop
repeats the edge, and it has no antialiasing weights; the matrices reproduce resized_crop exactly and
run as GEMMs.) The colour ops are element-wise.
Nothing here reads a tensor back to the host, so the step never waits for the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from data_aug.views import ViewSettings

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)  # ColorJitter's op ids, as in its fn_idx


@dataclass(frozen=True)
class ViewParams:
    """Random parameters of M views, one row per view (all tensors on the sampling device).

    Attributes:
        boxes: `[M, 4]` float crop boxes `(top, left, height, width)` in source pixels (whole numbers).
        flip: `[M]` bool, mirror left-right.
        jitter: `[M]` bool, apply the colour jitter.
        factors: `[M, 4]` float brightness, contrast, saturation and hue factors (used where `jitter`).
        order: `[M, 4]` int64, a permutation of 0-3: `order[m, k]` is the k-th jitter op applied to view m.
        gray: `[M]` bool, convert to grayscale.
        blur: `[M]` bool, apply the Gaussian blur.
        sigma: `[M]` float blur sigma (used where `blur`).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def __getitem__(self, rows) -> "ViewParams":
        """The parameters of the views in `rows` (a slice or an index tensor)."""
        return ViewParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def sample_crop_boxes(count: int, height: int, width: int, generator: torch.Generator,
                      scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop's box law, drawn for `count` images at once.

    As torchvision: up to `tries` draws of an area fraction uniform in `scale` and an aspect ratio
    log-uniform in `ratio`, keeping the first whose rounded box fits, else the central crop of the
    closest allowed ratio; the corner is then uniform over the positions where the box fits.

    Args:
        count: number of boxes M.
        height, width: source image size.
        generator: the random stream (its device is where the boxes are made).
    Returns:
        `[M, 4]` float `(top, left, height, width)`, whole numbers.
    """
    device = generator.device
    target = (height * width) * torch.empty(count, tries, device=device).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                   generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
    corner = torch.rand(count, 2, device=device, generator=generator)
    top = torch.minimum(torch.floor(corner[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(corner[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fallback_h) // 2))
    left = torch.where(found, left, float((width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def jitter_ranges(s: float) -> list[tuple[float, float]]:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)'s factor ranges: brightness, contrast, saturation, hue (`ViewSettings`
    checks that s is in [0, 2.5])."""
    return [(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]


def sample_view_params(count: int, height: int, width: int, views: ViewSettings,
                       generator: torch.Generator) -> ViewParams:
    """Independent random parameters of `count` views of `height` x `width` images (laws as the module doc).

    Args:
        count: number of views M.
        height, width: source image size.
        views: the pipeline's settings (`views.blur` False: `blur` is all False).
        generator: the random stream; its device is where the parameters are made.
    Returns:
        ViewParams with M rows.
    """
    device = generator.device

    def uniform(*shape, low=0.0, high=1.0):
        return torch.empty(*shape, device=device).uniform_(low, high, generator=generator)

    boxes = sample_crop_boxes(count, height, width, generator, scale=(views.min_crop_scale, 1.0))
    flip = uniform(count) < views.hflip
    jitter = uniform(count) < 0.8
    factors = torch.stack([uniform(count, low=low, high=high) for low, high in jitter_ranges(views.s)], dim=1)
    order = torch.argsort(uniform(count, 4), dim=1)  # a uniform random permutation per view, like randperm(4)
    gray = uniform(count) < 0.2
    blurred = (uniform(count) < 0.5) & views.blur
    sigma = uniform(count, low=0.1, high=2.0)
    return ViewParams(boxes, flip, jitter, factors, order, gray, blurred, sigma)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, source: int) -> torch.Tensor:
    """Per-image matrices of torchvision's antialiased bilinear resize of `[start, start + length)` to `size`.

    Row i holds the normalised triangle-filter weights that torch's `interpolate(antialias=True)` gives
    output pixel i over the crop's source pixels (support widened by the scale when shrinking); for an
    enlargement these are exactly plain bilinear weights (align_corners=False, edge pixels repeated).

    Args:
        start, length: `[M]` float crop start and length along one axis (whole numbers).
        size: output length; source: full source length along the axis.
    Returns:
        `[M, size, source]` float weights, zero outside the crop.
    """
    scale = (length / size)[:, None, None]  # (M, 1, 1) source pixels per output pixel
    center = scale * (torch.arange(size, device=start.device, dtype=torch.float32)[None, :, None] + 0.5)
    inv_scale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    k = torch.arange(source, device=start.device, dtype=torch.float32)[None, None, :] - start[:, None, None]
    weights = (1 - ((k + 0.5 - center) * inv_scale).abs()).clamp_(min=0)
    weights = weights * ((k >= 0) & (k < length[:, None, None]))
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Crop each image to its box and resize it to `size` x `size` (bilinear, antialiased), optionally mirrored.

    Matches `torchvision.transforms.v2.functional.resized_crop(image, top, left, height, width, [size, size],
    antialias=True)` on every image (then `horizontal_flip` where `flip`).

    Args:
        images: `[M, C, H, W]` float.
        boxes: `[M, 4]` float `(top, left, height, width)`, whole numbers, inside the image.
        size: output side.
        flip: `[M]` bool or None.
    Returns:
        `[M, C, size, size]` float.
    """
    rows = _resize_weights(boxes[:, 0], boxes[:, 2], size, images.shape[-2])  # (M, size, H)
    cols = _resize_weights(boxes[:, 1], boxes[:, 3], size, images.shape[-1])  # (M, size, W)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)  # mirroring = reversing the output columns
    return _separable(images, rows, cols)


def _separable(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`rows[m] @ images[m, c] @ cols[m].T` for every image m and channel c, as two batched matrix products.

    Args:
        images: `[M, C, H, W]`; rows: `[M, P, H]`; cols: `[M, Q, W]`.
    Returns:
        `[M, C, P, Q]` (a permuted view: channels are the second-fastest axis).
    """
    m, c, h, w = images.shape
    across = images.reshape(m, c * h, w) @ cols.transpose(1, 2)  # (M, C*H, Q)
    across = across.view(m, c, h, -1).transpose(1, 2).reshape(m, h, -1)  # (M, H, C*Q)
    return (rows @ across).view(m, rows.shape[1], c, -1).transpose(1, 2)  # (M, C, P, Q)


def horizontal_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images `[M, C, H, W]` where `flip` `[M]` is True."""
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """`[M, 1, H, W]` grayscale of RGB `[M, 3, H, W]`, torchvision's weights, no clamping."""
    r, g, b = images.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend`: `factor * images + (1 - factor) * other`, clamped to [0, 1]; factor `[M]`."""
    f = factor[:, None, None, None]
    return torch.addcmul(other * (1 - f), images, f).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-image brightness: images `[M, 3, H, W]` in [0, 1] times factor `[M]`, clamped."""
    return _blend(images, torch.zeros_like(images[:, :1]), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-image contrast: blend `[M, 3, H, W]` with the mean of its grayscale, factor `[M]`."""
    return _blend(images, _luma(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-image saturation: blend `[M, 3, H, W]` with its grayscale, factor `[M]`."""
    return _blend(images, _luma(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-image hue shift in HSV space by `factor` `[M]` turns (in [-0.5, 0.5]); images `[M, 3, H, W]` in [0, 1].

    The same map as torchvision's `adjust_hue` (RGB -> HSV, shift H, back), written without the HSV
    stack: max and min are kept, and with the shifted hue h in sixths of a turn each channel is
    `min + (max - min) * clamp(2 - |3 - |h - c||, 0, 1)`, c = 3, 5, 1 for R, G, B (the textbook HSV -> RGB
    in terms of the circular distance between h and each channel's sector).
    """
    r, g, b = images.unbind(dim=1)
    high = torch.maximum(torch.maximum(r, g), b)  # (M, H, W); faster than aminmax over a channel axis
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = high - low
    inverse = chroma.clamp(min=1e-12).reciprocal_()  # zero chroma: the difference below is zero too
    is_r, is_g = high == r, high == g  # ties go to red, then green, as in torchvision
    difference = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0)) + 6 * factor[:, None, None]
    hue6 = torch.remainder(torch.addcmul(sector, difference, inverse), 6)  # shifted hue in [0, 6)
    # 3, 5, 1 made on the device: torch.tensor([...], device="cuda") would wait for the queued GPU work
    centre = torch.arange(3.0, 9.0, 2.0, device=images.device).remainder_(6)[None, :, None, None]
    weight = (hue6[:, None] - centre).abs_().sub_(3).abs_().neg_().add_(2).clamp_(0, 1)  # (M, 3, H, W)
    return torch.addcmul(low[:, None], chroma[:, None], weight)


def _blend_op(images: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation per image (`op` `[M]` in 0-2) in one pass; factor 1 is identity.

    All three are `_blend(images, other, factor)` with `other` = 0, the grayscale's mean, or the grayscale.
    """
    f = factor[:, None, None, None]
    op = op[:, None, None, None]
    gray = _luma(images)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    rest = 1 - f
    other = torch.addcmul(mean * (rest * (op == _CONTRAST)), gray, rest * (op == _SATURATION))  # (1 - f) * other
    return torch.addcmul(other, images, f).clamp_(0, 1)


def color_jitter(images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
                 ) -> torch.Tensor:
    """ColorJitter on each image where `apply`, its four ops in that image's own order.

    Matches, per image, applying torchvision's adjust_brightness/contrast/saturation/hue in `order`.
    Brightness, contrast and saturation share one form (a clamped blend), so each image's three non-hue
    ops run as three blend passes before the hue shift and three after, each image active in exactly the
    three that its order puts there: the costly hue shift runs once per image, not once per position.

    Args:
        images: `[M, 3, H, W]` float in [0, 1].
        apply: `[M]` bool.
        factors: `[M, 4]` brightness, contrast, saturation, hue factors.
        order: `[M, 4]` int64 permutations of 0-3 (ColorJitter's fn_idx).
    Returns:
        `[M, 3, H, W]` float in [0, 1].
    """
    is_hue = order == _HUE
    hue_position = is_hue.to(torch.uint8).argmax(dim=1)  # (M,)
    others = order.gather(1, torch.argsort(is_hue.to(torch.uint8), dim=1, stable=True))[:, :3]  # hue moved last
    one = torch.ones_like(factors[:, 0])
    for before_hue in (True, False):
        if not before_hue:
            shifted = adjust_hue(images, factors[:, _HUE])
            images = torch.lerp(images, shifted, apply.to(images.dtype)[:, None, None, None])  # exact for 0 / 1
        for k in range(3):
            active = apply & ((k < hue_position) if before_hue else (k >= hue_position))
            op = others[:, k]
            images = _blend_op(images, op, torch.where(active, factors.gather(1, op[:, None]).squeeze(1), one))
    return images


def rgb_to_grayscale(images: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """Replace each image `[M, 3, H, W]` where `gray` `[M]` by its grayscale on all three channels."""
    return torch.lerp(images, _luma(images), gray.to(images.dtype)[:, None, None, None])  # exact for 0 / 1


def _blur_weights(sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int, size: int) -> torch.Tensor:
    """`[M, size, size]` matrices of torchvision's 1-D Gaussian blur, reflect padding; identity where not `apply`."""
    radius = kernel_size // 2
    if radius >= size:
        raise ValueError(f"blur kernel {kernel_size} is too large for {size}-pixel views (reflect padding)")
    device = sigma.device
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))  # torchvision's formula: softmax(-(x / sigma)^2)
    x = torch.linspace(-lim, lim, kernel_size, device=device)
    taps = torch.softmax(-(x[None, :] / sigma[:, None]).pow(2), dim=1)  # (M, k)
    identity = (torch.arange(kernel_size, device=device) == radius).to(taps.dtype)
    taps = torch.where(apply[:, None], taps, identity[None, :])
    source = torch.arange(size, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None, :]
    source = torch.where(source < 0, -source, torch.where(source >= size, 2 * (size - 1) - source, source))  # reflect
    weights = torch.zeros(sigma.shape[0], size, size, device=device)
    return weights.scatter_add_(2, source.expand(sigma.shape[0], -1, -1),
                                taps[:, None, :].expand(-1, size, -1).contiguous())


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                  apply: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian blur of each square image `[M, C, S, S]` with its own sigma `[M]` (where `apply`, `[M]` bool).

    Matches torchvision's `gaussian_blur(image, [kernel_size, kernel_size], [sigma, sigma])`: the same taps,
    reflect padding, applied as one matrix product per axis.
    """
    if apply is None:
        apply = torch.ones_like(sigma, dtype=torch.bool)
    weights = _blur_weights(sigma, apply, kernel_size, images.shape[-1])  # (M, S, S)
    return _separable(images, weights, weights)


def make_views(images: torch.Tensor, params: ViewParams, size: int, kernel_size: int) -> torch.Tensor:
    """One view of each image with its own parameters: crop+flip, jitter, grayscale, blur.

    Args:
        images: `[M, 3, H, W]` float in [0, 1] (row m is the source of view m).
        params: ViewParams with M rows, on the images' device.
        size: view side.
        kernel_size: blur kernel side (odd).
    Returns:
        `[M, 3, size, size]` float32 in [0, 1].
    """
    views = resized_crop(images, params.boxes, size, params.flip)
    views = color_jitter(views, params.jitter, params.factors, params.order)
    views = rgb_to_grayscale(views, params.gray)
    views = gaussian_blur(views, params.sigma, kernel_size, params.blur)
    return views.clamp(0, 1).contiguous()  # matrix products can leave values a rounding error outside [0, 1]
