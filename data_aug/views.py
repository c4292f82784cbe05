"""The paper's view pipeline (Appendix A) on the CPU, per image, its settings, and the two-view data set."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torchvision.transforms import v2


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (Appendix A), at least 3."""
    size = max(3, int(round(0.1 * crop_size)))
    return size if size % 2 else size + 1


@dataclass(frozen=True)
class ViewSettings:
    """What the view pipeline does, the same for the CPU (`create_view_transform`) and the device
    (`data_aug.device_views`) pipelines; built from the config with `ViewSettings.of(config.dataset)`.

    Attributes:
        crop_size: view side in pixels.
        s: colour distortion strength, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8 (paper: 1.0).
        blur: whether a view is blurred with p=0.5 (sigma 0.1-2, kernel about 10% of the side).
        min_crop_scale: smallest crop area fraction of the random resized crop (paper: 0.08).
        hflip: probability of mirroring a view left-right (paper: 0.5; 0 where mirror images are other
            symbols, as for digits and text).
    """

    crop_size: int
    s: float = 1.0
    blur: bool = True
    min_crop_scale: float = 0.08
    hflip: float = 0.5

    def __post_init__(self):
        if not 0 <= 0.2 * self.s <= 0.5:
            raise ValueError(f"colour distortion strength s = {self.s}: must be in [0, 2.5] (hue shift 0.2s <= 0.5)")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale {self.min_crop_scale} must be in (0, 1]")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip {self.hflip} must be a probability in [0, 1]")

    @classmethod
    def of(cls, source) -> "ViewSettings":
        """The settings read from the attributes of the same names on `source` (the config's `dataset` section),
        so that a new field here is read from the config without another line."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


def create_view_transform(views: ViewSettings) -> v2.Compose:
    """One random view of a uint8 `[3, H, W]` image as float `[3, crop, crop]` in [0, 1].

    Random resized crop (area fraction `min_crop_scale`-1), horizontal flip (p=`hflip`), colour jitter (0.8s, 0.8s, 0.8s,
    0.2s) with p=0.8, grayscale with p=0.2 and, when `blur`, Gaussian blur (sigma 0.1-2.0) with p=0.5.
    Randomness comes from torch's global generator, which `TwoViews` seeds per image.
    """
    s = views.s
    steps = [
        v2.ToPILImage(),  # PIL's colour ops are several times faster than tensor ops per image on the CPU
        v2.RandomResizedCrop(views.crop_size, scale=(views.min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(p=views.hflip),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if views.blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(views.crop_size), sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def create_eval_resize(crop_size: int) -> v2.Compose:
    """The evaluation view's geometry, uint8 in and out: resize the short side and centre-crop to `crop_size`
    (kept apart so that images can be stored at that size, as the kNN monitor does, and scaled later)."""
    return v2.Compose([v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)])


def create_eval_transform(crop_size: int) -> v2.Compose:
    """Deterministic view for evaluation: resize the short side and centre-crop to `crop_size`, as float in [0, 1]."""
    return v2.Compose([create_eval_resize(crop_size), v2.ToDtype(torch.float32, scale=True)])


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed for each (run seed, epoch, image): reproducible on resume, whatever the workers."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + index) & (2**63 - 1)


class TwoViews(torch.utils.data.Dataset):
    """Pairs of independent random views of each image.

    The random stream of image `i` in epoch `e` is seeded from (seed, e, i), so DataLoader workers never
    replay each other's stream and a resumed run sees exactly the views an uninterrupted run would.
    Call `set_epoch` before iterating (the DataLoader must not use persistent workers).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.epoch, index))
            return self.transform(image), self.transform(image)


class Transformed(torch.utils.data.Dataset):
    """A labelled data set with a deterministic transform applied to each image."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), label
