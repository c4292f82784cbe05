"""The paper's view pipeline (Appendix A) on the CPU, per image, and the two-view data set."""
from __future__ import annotations

import torch
from torchvision.transforms import v2


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side (Appendix A), at least 3."""
    size = max(3, int(round(0.1 * crop_size)))
    return size if size % 2 else size + 1


def create_view_transform(crop_size: int, s: float = 1.0, blur: bool = True, min_scale: float = 0.08) -> v2.Compose:
    """One random view of a uint8 `[3, H, W]` image as float `[3, crop, crop]` in [0, 1].

    Random resized crop (area fraction `min_scale`-1, paper 0.08), horizontal flip, colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with
    p=0.8, grayscale with p=0.2 and, when `blur`, Gaussian blur (sigma 0.1-2.0) with p=0.5.
    Randomness comes from torch's global generator, which `TwoViews` seeds per image.
    """
    steps = [
        v2.ToPILImage(),  # PIL's colour ops are several times faster than tensor ops per image on the CPU
        v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(crop_size), sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def create_eval_transform(crop_size: int) -> v2.Compose:
    """Deterministic view for evaluation: resize the short side and centre-crop to `crop_size`."""
    return v2.Compose([v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size),
                       v2.ToDtype(torch.float32, scale=True)])


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
