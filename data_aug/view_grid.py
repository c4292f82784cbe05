"""A picture of what the view pipeline does: a few images, each next to several of its random views.

The views come from the pipelines training uses, with the same settings: `create_view_transform` (PIL, per
image) for `augment_on: cpu`, `sample_view_params` + `make_views` (batched tensor ops) for `augment_on: device`.
Both are drawn on the CPU from their own seeded stream, so drawing never moves the training's random state.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data_aug.device_views import make_views, sample_view_params
from data_aug.views import ViewSettings, blur_kernel_size, create_view_transform


def pick_images(dataset, count: int, seed: int) -> list[torch.Tensor]:
    """`count` images drawn without replacement by a seeded permutation (an ImageFolder is sorted by class:
    its first images would all be of one class).

    Args:
        dataset: indexable; an item is a uint8 `[3, H, W]` tensor or an `(image, label)` pair.
    Returns:
        uint8 `[3, H, W]` CPU tensors (sizes may differ), in index order.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    images = []
    for index in order.tolist():
        item = dataset[index]
        images.append((item[0] if isinstance(item, (tuple, list)) else item).cpu())
    return images


def sample_views(images: Sequence[torch.Tensor], num_views: int, views: ViewSettings, *, augment_on: str,
                 seed: int) -> torch.Tensor:
    """`num_views` random views of each image, from the pipeline `augment_on` names.

    Args:
        images: K uint8 `[3, H, W]` tensors (of one size for `device`: ValueError otherwise).
        views: the view settings.
        augment_on: `cpu` (per-image PIL transform) or `device` (batched tensor ops, here on the CPU).
        seed: the views' random stream.
    Returns:
        float `[K, num_views, 3, crop_size, crop_size]` in [0, 1].
    """
    if augment_on == "cpu":
        transform = create_view_transform(views)
        with torch.random.fork_rng(devices=[]):  # the transform draws from the global generator
            torch.manual_seed(seed)
            return torch.stack([torch.stack([transform(image) for _ in range(num_views)]) for image in images])
    if augment_on != "device":
        raise ValueError(f"augment_on {augment_on!r}: expected cpu or device")
    sizes = sorted({f"{image.shape[2]}x{image.shape[1]}" for image in images})
    if len(sizes) > 1:
        raise ValueError(f"dataset.augment_on = 'device' needs images of one size, these are {', '.join(sizes)}: "
                         "resize them to one size, or use dataset.augment_on: cpu")
    batch = torch.stack(list(images)).float().mul_(1 / 255)  # as DeviceBatches: to_dtype(scale=True)
    height, width = batch.shape[-2:]
    params = sample_view_params(len(images) * num_views, height, width, views, torch.Generator().manual_seed(seed))
    made = make_views(batch.repeat_interleave(num_views, dim=0), params, views.crop_size,
                      blur_kernel_size(views.crop_size))
    return made.reshape(len(images), num_views, *made.shape[1:])


def draw_view_grid(images: Sequence[torch.Tensor], views: torch.Tensor, title: str) -> np.ndarray:
    """One row per image: the image (framed), then its views, each scaled to one cell without smoothing when
    enlarged, so a 16 px view shows its own pixels.

    Args:
        images: K uint8 `[3, H, W]` tensors.
        views: float `[K, V, 3, c, c]` in [0, 1].
        title: a line above the grid (wrapped to its width), e.g. the view settings.
    Returns:
        the picture, uint8 `[height, width, 3]` (write it with `save_png`, log it with TensorBoard's add_image).
    """
    from PIL import Image, ImageDraw

    rows, num_views, crop = len(images), views.shape[1], views.shape[-1]
    side = min(crop, 160) if crop >= 96 else crop * max(1, round(96 / crop))  # about 96-160 px a cell
    gap, frame, pad = 6, 2, 10
    columns = num_views + 1
    width = 2 * pad + columns * side + (columns - 1) * gap + 2 * gap  # a wider gap after the image column
    title_font, label_font = _font(14), _font(12)
    canvas = Image.new("RGB", (width, 1), "white")
    lines = _wrap(ImageDraw.Draw(canvas), title, title_font, width - 2 * pad)
    line_height, label_height = 18, 18
    top = pad + line_height * len(lines) + 6 + label_height
    canvas = Image.new("RGB", (width, top + rows * side + (rows - 1) * gap + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((width / 2, pad + index * line_height), line, fill="black", font=title_font, anchor="mt")
    lefts = [pad + column * (side + gap) + (2 * gap if column else 0) for column in range(columns)]
    for column, left in enumerate(lefts):
        draw.text((left + side / 2, top - 4), "image" if column == 0 else f"view {column}", fill="black",
                  font=label_font, anchor="md")
    views = (views.clamp(0, 1) * 255).round().to(torch.uint8)
    for row, image in enumerate(images):
        y = top + row * (side + gap)
        canvas.paste(_fit(image, side), (lefts[0], y))
        draw.rectangle((lefts[0] - frame, y - frame, lefts[0] + side + frame - 1, y + side + frame - 1),
                       outline=(31, 119, 180), width=frame)  # the source framed apart from its views
        for column in range(num_views):
            canvas.paste(_fit(views[row, column], side), (lefts[column + 1], y))
    return np.asarray(canvas).copy()


def _fit(image: torch.Tensor, side: int):
    """A uint8 `[3, H, W]` image scaled to fit a `side` x `side` white cell, aspect kept (nearest when enlarged)."""
    from PIL import Image

    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (side, side), "white")
    cell.paste(picture, ((side - size[0]) // 2, (side - size[1]) // 2))
    return cell


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font: Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """`text` cut at spaces into lines no wider than `width` pixels."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def describe_views(views: ViewSettings, augment_on: str) -> str:
    """One line naming the settings a grid shows, with the config keys that change them."""
    return (f"{views.crop_size} px views (dataset.input_shape), crop {views.min_crop_scale:g}-1 of the area "
            f"(dataset.min_crop_scale), flip p={views.hflip:g} (dataset.hflip), colour strength s={views.s:g} "
            f"(dataset.s), blur {'on' if views.blur else 'off'} (dataset.blur), made on {augment_on} (dataset.augment_on)")


def save_png(picture: np.ndarray, path) -> None:
    """Write a uint8 `[H, W, 3]` picture as a PNG."""
    from PIL import Image

    Image.fromarray(picture).save(path, format="PNG")
