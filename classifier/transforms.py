"""Per-image transforms of the regular data path: what evaluation does to an image and how training
augments one, as torchvision v2 transforms of a uint8 CHW RGB tensor.

`preprocessing_spec` writes the evaluation preprocessing down as a dict that travels with every
checkpoint and export; `eval_resize_crop` and `eval_transform` build the transform from that dict, so a
consumer of the export and this trainer prepare images the same way. `train_transform` is the training
augmentation (crop, flip, auto-augment, colour jitter, random erasing). Those two take keyword
arguments only: passed by position, a swapped pair such as crop_scale/crop_ratio or mean/std would run,
silently wrong. `preprocessing_for` and `augmentation_for` call them with a run's DataConfig.

Reading files and datasets is data.py's job; the fast path augments whole batches in batch_augment.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from classifier.config import DataConfig

# The two auto-augment policies' magnitude scales have this many steps (torchvision's default for both).
NUM_MAGNITUDE_BINS = 31


# --- evaluation ---------------------------------------------------------------------------------------


def preprocessing_spec(
    *,
    image_size: int,
    resize_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
) -> dict:
    """Everything a consumer needs to prepare an image exactly as evaluation does. Travels with every
    checkpoint and export (labels_mapping.json, the ONNX metadata; README, "Export and evaluation"), so
    nobody has to guess: a resize, crop or normalization unlike training's costs accuracy silently."""
    return {
        "color": "RGB",
        "resize_shorter_side": resize_size or round(image_size * 256 / 224),
        "center_crop": image_size,
        "interpolation": interpolation,
        "scale": "divide by 255 to [0, 1], then subtract mean and divide by std",
        "mean": list(mean),
        "std": list(std),
        "layout": "NCHW",
        "dtype": "float32",
    }


def eval_resize_crop(spec: dict) -> T.Compose:
    """uint8 CHW RGB -> uint8 CHW of the crop size: the geometric half of the eval transform, which a
    consumer of a graph with baked-in normalization still does itself."""
    interpolation = InterpolationMode(spec["interpolation"])
    return T.Compose(
        [
            T.Resize(spec["resize_shorter_side"], interpolation=interpolation, antialias=True),
            T.CenterCrop(spec["center_crop"]),
        ]
    )


def eval_transform(spec: dict) -> T.Compose:
    """uint8 CHW RGB tensor -> normalized float32 tensor, exactly as `spec` says."""
    return T.Compose(
        [eval_resize_crop(spec), T.ToDtype(torch.float32, scale=True), T.Normalize(spec["mean"], spec["std"])]
    )


# --- training -----------------------------------------------------------------------------------------


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


def train_transform(
    *,
    image_size: int,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    hflip: bool,
    color_jitter: float,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
    auto_augment: str = "none",
    randaugment_num_ops: int = 2,
    randaugment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> T.Compose:
    """uint8 CHW RGB tensor -> augmented, normalized float32 tensor, in the order of torchvision's reference
    recipe (references/classification/presets.py): crop, flip, auto-augment (on uint8), [jitter], ToDtype,
    Normalize, random erasing. An option that is off adds no step, so the transform is exactly the one
    without it."""
    steps = [
        T.RandomResizedCrop(
            image_size,
            scale=crop_scale,
            ratio=crop_ratio,
            interpolation=InterpolationMode(interpolation),
            antialias=True,
        )
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if auto_augment != "none":
        steps.append(
            auto_augment_transform(
                auto_augment,
                num_ops=randaugment_num_ops,
                magnitude=randaugment_magnitude,
                interpolation=interpolation,
            )
        )
    if color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing))  # value 0 after Normalize: the mean colour
    return T.Compose(steps)


# --- from the run's DataConfig -------------------------------------------------------------------------


def preprocessing_for(cfg: DataConfig) -> dict:
    """The evaluation preprocessing that `cfg` describes, as preprocessing_spec writes it down."""
    return preprocessing_spec(
        image_size=cfg.image_size,
        resize_size=cfg.resize_size,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
    )


def augmentation_for(cfg: DataConfig) -> T.Compose:
    """The regular path's training transform that `cfg` describes (the fast path reads the same fields)."""
    return train_transform(
        image_size=cfg.image_size,
        crop_scale=cfg.crop_scale,
        crop_ratio=cfg.crop_ratio,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        auto_augment=cfg.auto_augment,
        randaugment_num_ops=cfg.randaugment_num_ops,
        randaugment_magnitude=cfg.randaugment_magnitude,
        random_erasing=cfg.random_erasing,
    )
