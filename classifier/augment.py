"""Per-image augmentations beyond crop/flip/jitter: RandAugment, TrivialAugmentWide and random erasing.

The regular path uses torchvision's v2 transforms as they are (built by `auto_augment_transform`). The fast
path augments whole batches, where a v2 op would give every image of the batch the same op, so
`BatchAutoAugment` and `random_erase` draw each image's own parameters from the batch's generator and
apply them batched. Crops, flips and colour jitter stay in data.py and fastdata.py.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2 as T

# The two policies' magnitude scales have this many steps (torchvision's default for both).
NUM_MAGNITUDE_BINS = 31


def auto_augment_transform(policy: str, *, num_ops: int, magnitude: int, interpolation: str) -> T.Transform:
    """v2.RandAugment or v2.TrivialAugmentWide for one uint8 image. Their tensor kernels rotate and shear
    with nearest or bilinear only, so any other interpolation (bicubic) becomes bilinear here."""
    if not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(f"--data.randaugment-magnitude must be 0..{NUM_MAGNITUDE_BINS - 1}, got {magnitude}")
    mode = T.InterpolationMode.NEAREST if interpolation == "nearest" else T.InterpolationMode.BILINEAR
    if policy == "randaugment":
        return T.RandAugment(
            num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=NUM_MAGNITUDE_BINS, interpolation=mode
        )
    if policy == "trivialaugment":
        return T.TrivialAugmentWide(num_magnitude_bins=NUM_MAGNITUDE_BINS, interpolation=mode)
    raise ValueError(f"unknown auto-augment policy {policy!r}: expected 'randaugment' or 'trivialaugment'")


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
        table = [
            fn(NUM_MAGNITUDE_BINS, height, width) for _, (fn, _) in self.space
        ]  # None: the op has no magnitude
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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without a sync point: a copy from ordinary (pageable) memory to a GPU waits for the GPU to
    finish its queue, so every per-batch copy goes through pinned memory, non-blocking."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
