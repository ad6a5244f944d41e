"""Augmentation of whole batches for the fast path (`--data.fast-path`): uint8 (B, 3, H, W) batches in,
normalized float32 batches out, on the batch's device, with the random numbers drawn on the CPU from one
generator per batch.

`BatchAugment` does what transforms.train_transform does to one image (random resized crop, flip,
auto-augment, colour jitter, normalization, random erasing), vectorized: crop boxes from
`random_resized_boxes`, auto-augment with its own ops for every image in `BatchAutoAugment`, erasing in
`random_erase`. `BatchEval` is transforms.eval_transform for a batch cached with the eval crop. Where the
results differ from the per-image transforms is listed at the top of fastdata.py, which holds the cache
and the loader that call these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from classifier import video_augment
from classifier.transforms import NUM_MAGNITUDE_BINS, auto_augment_transform

# --- crops, flips and colour ------------------------------------------------------------------------


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> torch.Tensor:
    """(n, 4) crop boxes (x1, y1, x2, y2) in pixels, drawn as v2.RandomResizedCrop draws one: area a
    uniform fraction of the image in `scale`, log-uniform aspect in `ratio`, the first of 10 attempts
    that fits, else the largest centered box with the ratio clamped. Vectorized over all n at once."""
    attempts = 10
    area = height * width * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    aspect = (
        torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    )
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback when no attempt fits.
    if width / height < min(ratio):
        fallback_w, fallback_h = width, width / min(ratio)
    elif width / height > max(ratio):
        fallback_w, fallback_h = height * max(ratio), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    # Drawn for every box, so the stream never depends on `found`.
    position = torch.rand(n, 2, generator=generator)
    w = torch.where(found, w, torch.tensor(float(fallback_w)))
    h = torch.where(found, h, torch.tensor(float(fallback_h)))
    x1 = torch.where(found, position[:, 0] * (width - w), (width - w) / 2)
    y1 = torch.where(found, position[:, 1] * (height - h), (height - h) / 2)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma, with the weights torchvision's rgb_to_grayscale uses."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


# --- auto-augment and random erasing, each image its own draw ---------------------------------------


class BatchAutoAugment:
    """uint8 (B, C, H, W) -> uint8 (B, C, H, W): v2.RandAugment / TrivialAugmentWide with its own ops for
    every image, drawn from `generator`, on the batch's device.

    Each image draws what the v2 transform draws for one image (op; TrivialAugment: magnitude bin; sign),
    in that order, so a batch of one with generator seed s equals the v2 transform under
    torch.manual_seed(s). Images that drew the same (op, magnitude, sign) are then transformed together:
    at most 23 calls per round for RandAugment (9 signed ops x 2 + 5), not one per image. The ops are
    torchvision's (its `_AUGMENTATION_SPACE` table and `_apply_image_or_video_transform`, private names;
    tests/test_augment.py compares the result with the public transforms, so a change there fails a test).
    """

    def __init__(self, policy: str, *, num_ops: int, magnitude: int, interpolation: str):
        self.transform = auto_augment_transform(
            policy, num_ops=num_ops, magnitude=magnitude, interpolation=interpolation
        )
        self.trivial = policy == "trivialaugment"
        self.rounds = 1 if self.trivial else num_ops
        self.magnitude = magnitude
        self.space = list(self.transform._AUGMENTATION_SPACE.items())  # [(name, (magnitudes_fn, signed))]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        # Each op's magnitudes over the bins; None: the op has no magnitude.
        table = [fn(NUM_MAGNITUDE_BINS, height, width) for _, (fn, _) in self.space]
        has_magnitude = torch.tensor([magnitudes is not None for magnitudes in table])
        signed = torch.tensor([is_signed for _, (_, is_signed) in self.space])
        for _ in range(self.rounds):
            ops = torch.randint(len(self.space), (n,), generator=generator)
            if self.trivial:
                bins = torch.randint(NUM_MAGNITUDE_BINS, (n,), generator=generator)
            else:
                bins = torch.full((n,), self.magnitude)
            negative = torch.rand(n, generator=generator) <= 0.5  # v2: `torch.rand(()) <= 0.5` flips the sign
            # One key per distinct transform: ops without a magnitude ignore the bin, unsigned ops the sign.
            bins = torch.where(has_magnitude[ops], bins, 0)
            negative = negative & signed[ops] & has_magnitude[ops]
            keys = (ops * NUM_MAGNITUDE_BINS + bins) * 2 + negative.long()
            order = torch.argsort(keys, stable=True)
            groups, counts = torch.unique_consecutive(keys[order], return_counts=True)
            order = to_device(order, images.device)
            pieces = []
            for key, piece in zip(groups.tolist(), images[order].split(counts.tolist()), strict=True):
                op, rest = divmod(key, NUM_MAGNITUDE_BINS * 2)
                level, flip_sign = divmod(rest, 2)
                name, magnitudes = self.space[op][0], table[op]
                magnitude = (
                    0.0 if magnitudes is None else float(magnitudes[level]) * (-1.0 if flip_sign else 1.0)
                )
                pieces.append(
                    self.transform._apply_image_or_video_transform(
                        piece,
                        name,
                        magnitude,
                        interpolation=self.transform.interpolation,
                        fill=self.transform._fill,
                    )
                )
            images = torch.empty_like(images).index_copy_(0, order, torch.cat(pieces))
        return images


def random_erase(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """v2.RandomErasing(p) (value 0) for each image of a float (B, C, H, W) batch, vectorized: with
    probability p a rectangle of a uniform fraction `scale` of the area and log-uniform aspect `ratio`,
    the first of 10 attempts that fits (none fits: no erasing), is set to 0. Draws come from `generator`
    on the CPU; only the (B, 5) parameters travel to the batch's device."""
    n, _, height, width = x.shape
    attempts = 10
    erase = torch.rand(n, generator=generator) < p
    area = height * width * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    aspect = (
        torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    )
    h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # v2 rounds to whole pixels too
    fits = (h < height) & (w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    erase &= fits.any(dim=1)
    position = torch.rand(n, 2, generator=generator)  # uniform over the top-left corners where it fits
    top = (position[:, 0] * (height - h + 1)).floor()
    left = (position[:, 1] * (width - w + 1)).floor()
    params = to_device(torch.stack([erase.float(), top, left, h, w], dim=1), x.device)
    erase, top, left, h, w = (column.view(n, 1, 1, 1) for column in params.unbind(dim=1))
    rows = torch.arange(height, device=x.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, 1, width)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & (erase > 0)
    return x.masked_fill(inside, 0.0)


# --- the batch transforms ---------------------------------------------------------------------------


class BatchAugment(nn.Module):
    """uint8 (B, 3, H, W) batch -> augmented, normalized float32 (B, 3, size, size), on the batch's device.

    Random resized crop (roi_align: boxes in pixel coordinates read like RandomResizedCrop's, a full box
    returns the image exactly, and it averages samples when shrinking; affine_grid + grid_sample would
    need normalized [-1, 1] coordinates and never averages), horizontal flip, brightness/contrast/
    saturation jitter, then ToDtype(scale=True) + Normalize. The random numbers are drawn on the CPU from
    `generator`, so one seed gives the same crops on CPU and GPU; every draw happens whatever the options,
    so turning flip or jitter off leaves the crops unchanged. Optional, in transforms.train_transform's order:
    auto-augment per image on the uint8 crops after the flip (BatchAutoAugment), random erasing after
    Normalize (random_erase), the video degradations on the uncropped squares (video_augment.degrade_batch).
    They draw after everything else and only when on: off, the stream and the
    output are exactly those without them; on, the crops, flips and jitter are unchanged.
    """

    def __init__(
        self,
        size: int,
        *,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        hflip: bool,
        color_jitter: float,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = False,
        auto_augment: str = "none",
        randaugment_num_ops: int = 2,
        randaugment_magnitude: int = 9,
        interpolation: str = "bilinear",
        random_erasing: float = 0.0,
        video: dict[str, float] | None = None,
    ):
        super().__init__()
        self.video = video if video and video_augment.any_enabled(**video) else None
        self.size, self.crop_scale, self.crop_ratio = size, crop_scale, crop_ratio
        self.hflip, self.color_jitter, self.channels_last = hflip, color_jitter, channels_last
        self.auto_augment = (
            None
            if auto_augment == "none"
            else BatchAutoAugment(
                auto_augment,
                num_ops=randaugment_num_ops,
                magnitude=randaugment_magnitude,
                interpolation=interpolation,
            )
        )
        self.random_erasing = random_erasing
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        boxes = random_resized_boxes(n, height, width, self.crop_scale, self.crop_ratio, generator)
        flip = torch.rand(n, generator=generator) < 0.5
        low = max(0.0, 1 - self.color_jitter)  # v2.ColorJitter's factor range
        factors = torch.empty(n, 3).uniform_(low, 1 + self.color_jitter, generator=generator)
        # One small host-to-device copy per batch: roi_align's (batch index, box) rows, flip, jitter.
        params = torch.cat(
            [torch.arange(n).unsqueeze(1).float(), boxes, flip.unsqueeze(1).float(), factors], dim=1
        )
        params = to_device(params, images.device)
        rois, flip, factors = params[:, :5], params[:, 5].bool(), params[:, 6:].view(n, 3, 1, 1, 1)
        if self.video is not None:  # on the uint8 squares before the crop, as the regular path does
            images = video_augment.degrade_batch(images, **self.video, generator=generator)

        # sampling_ratio=-1: ceil(box side / output side) bilinear samples per output pixel, averaged;
        # aligned=True: pixel i covers [i, i + 1), so the full box reproduces the image exactly.
        x = roi_align(
            images.float(), rois, output_size=self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        if self.hflip:
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        if self.auto_augment is not None:  # its ops want uint8, as v2's do after an antialiased resize
            x = self.auto_augment(x.round_().to(torch.uint8), generator).float()
        x = x.mul_(1.0 / 255)  # v2.ToDtype(float32, scale=True)'s scaling
        if self.color_jitter > 0:
            brightness, contrast, saturation = factors.unbind(dim=1)
            x = (x * brightness).clamp_(0, 1)
            x = (contrast * x + (1 - contrast) * grayscale(x).mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)
            x = (saturation * x + (1 - saturation) * grayscale(x)).clamp_(0, 1)
        x = (x - self.mean).div_(self.std)
        if self.random_erasing > 0:
            x = random_erase(x, self.random_erasing, generator)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class BatchEval(nn.Module):
    """uint8 (B, 3, H, W) batch -> normalized float32 (B, 3, size, size): transforms.eval_transform, batched.

    Give it a cache built with crop=size (fastdata.decode_split does the eval resize and center crop) and the
    result equals eval_transform's. A larger square is center-cropped first, as v2.CenterCrop would.
    Takes (and ignores) a generator so that fastdata.TensorLoader calls both transforms alike."""

    def __init__(
        self, size: int, *, mean: Sequence[float], std: Sequence[float], channels_last: bool = False
    ):
        super().__init__()
        self.size, self.channels_last = size, channels_last
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.center_crop(images, [self.size, self.size])
        x = F.to_dtype(x, torch.float32, scale=True)
        x = (x - self.mean).div_(self.std)  # v2.Normalize's arithmetic, with mean/std already on the device
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without a sync point: a copy from ordinary (pageable) memory to a GPU waits for the GPU to
    finish its queue, so every per-batch copy goes through pinned memory, non-blocking."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
