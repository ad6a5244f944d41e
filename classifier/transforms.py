"""Transforms of the regular data path: what evaluation does to an image and how training augments one,
as torchvision v2 transforms of a uint8 CHW RGB tensor. Each is a `Pipeline` of two stages: the uint8
steps run image by image in the DataLoader workers, and the conversion to normalized float32 runs once
on the collated batch.

`preprocessing_spec` writes the evaluation preprocessing down as a dict that travels with every
checkpoint and export; `eval_resize_crop` and `eval_transform` build the transform from that dict, so a
consumer of the export and this trainer prepare images the same way. `train_transform` is the training
augmentation (crop, flip, auto-augment, colour jitter, random erasing). Those two take keyword
arguments only: passed by position, a swapped pair such as crop_scale/crop_ratio or mean/std would run,
silently wrong. `preprocessing_for` and `augmentation_for` call them with a run's DataConfig.

Reading files and datasets is data.py's job; the fast path augments whole batches in batch_augment.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from classifier import video_augment
from classifier.config import DataConfig

# The two auto-augment policies' magnitude scales have this many steps (torchvision's default for both).
NUM_MAGNITUDE_BINS = 31


@dataclass(frozen=True)
class Pipeline:
    """A transform in two stages, so that a DataLoader can run the second once per batch. `per_image` runs
    on one uint8 CHW image (in a worker, image by image); `per_batch` runs on the collated batch, or on
    one image, as data.ImageDataset.collate and __call__ do. The batch stage is ToDtype and Normalize,
    both elementwise, so a batch comes out bit for bit as its images one by one would; once per batch,
    they cost 0.003 ms an image instead of 0.06 (32 px Fashion-MNIST items, AVX2 EPYC)."""

    per_image: Callable[[torch.Tensor], torch.Tensor]
    per_batch: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One image through both stages: what the model sees for it."""
        return self.per_batch(self.per_image(image))


def to_normalized_float(mean: Sequence[float], std: Sequence[float]) -> list[T.Transform]:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel; on one image or a batch of them."""
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


# --- evaluation ---------------------------------------------------------------------------------------


RESIZE_MODES = ("crop", "pad", "stretch")


def preprocessing_spec(
    *,
    image_size: int,
    resize_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
    resize_mode: str = "crop",
) -> dict:
    """Everything a consumer needs to prepare an image exactly as evaluation does. Travels with every
    checkpoint and export (labels_mapping.json, the ONNX metadata; README, "Export and evaluation";
    schemas/labels_mapping.schema.json describes every key), so nobody has to guess: a resize, crop or
    normalization unlike training's costs accuracy silently. The geometry keys depend on `resize_mode`;
    "resize" says the same in words, and the rest states each rule a port to another language needs:
    how a file is decoded, what happens to alpha, the resize kernel, how every computed size and offset
    is rounded, and the normalization as numbers."""
    side = image_size
    antialias = interpolation != "nearest"  # torchvision ignores antialias for nearest (no kernel to widen)
    if resize_mode == "crop":
        shorter = train_square_side(image_size, resize_size)
        geometry = {
            "resize": f"shorter side to {shorter}, then a centered {side}x{side} crop",
            "resize_shorter_side": shorter,
            "center_crop": side,
            # torchvision's _compute_resized_output_size: int(S * long / short), a floor in float64.
            "resized_size": (
                "S = resize_shorter_side; if width <= height: new_width = S, new_height = "
                "floor(S * height / width), else new_height = S, new_width = floor(S * width / height) "
                "(float64, the product first)"
            ),
            "longer_side_rounding": "floor",
            # torchvision's center_crop: int(round((size - crop) / 2.0)), Python's round: half to even,
            # so a difference of 3 starts the crop at 2, one of 5 at 2 too.
            "crop_offset": (
                "top = round_half_to_even((new_height - center_crop) / 2), "
                "left = round_half_to_even((new_width - center_crop) / 2)"
            ),
            "crop_offset_rounding": "half_to_even",
        }
        steps = ["resize", "center_crop"]
    elif resize_mode == "pad":
        geometry = {
            "resize": f"longer side to {side}, aspect kept, centered on a {side}x{side} square of pad_fill",
            "resize_longer_side": side,
            "pad_to_square": side,
            "pad_fill": pad_fill(mean),
            # to_square below: Python's round on width * (side / longer), in float64.
            "resized_size": (
                "scale = pad_to_square / max(height, width); new_height = max(1, "
                "round_half_to_even(height * scale)), new_width = max(1, round_half_to_even(width * scale)) "
                "(float64, the quotient first)"
            ),
            "longer_side_rounding": "half_to_even",
            "pad_offset": (
                "top = floor((pad_to_square - new_height) / 2), "
                "left = floor((pad_to_square - new_width) / 2): an odd leftover pixel goes below or right"
            ),
            "pad_offset_rounding": "floor",
        }
        steps = ["resize", "pad"]
    elif resize_mode == "stretch":
        geometry = {
            "resize": f"to {side}x{side}, aspect ratio not kept",
            "resize_to_square": side,
            "resized_size": "new_height = new_width = resize_to_square, whatever the aspect ratio",
        }
        steps = ["resize"]
    else:
        raise ValueError(f"--data.resize-mode {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    return {
        "color": "RGB",
        "channel_order": "RGB",
        "resize_mode": resize_mode,
        "order": ["decode", "to_rgb", *steps, "to_float", "normalize"],
        # classifier/images.py: load_image.
        "decode": {
            "library": "Pillow (PIL.Image.open)",
            "exif_orientation": "applied first (PIL.ImageOps.exif_transpose)",
            "jpeg": "libjpeg-turbo through Pillow with its defaults: fancy (smooth) chroma upsampling",
            "high_bit_depth_grey": (
                "16-bit grey (PIL modes I;16*) and 32-bit grey above 255 (mode I) become 8 bits as "
                "floor(value / 65535 * 255 + 0.5); mode I at most 255 keeps its values"
            ),
            "to_rgb": "PIL Image.convert('RGB'): grey copied to R, G and B; palette looked up; CMYK by PIL",
        },
        "alpha": "dropped",
        **geometry,
        "interpolation": interpolation,
        "resize_kernel": {
            "implementation": (
                "torchvision.transforms.v2.functional.resize on a uint8 CHW tensor: "
                "torch.nn.functional.interpolate with align_corners=False"
            ),
            "interpolation": interpolation,
            "antialias": antialias,
            # torchvision's _do_native_uint8_resize_on_cpu picks the kernel by CPU.
            "uint8": (
                "bilinear on x86 CPUs with AVX2 or AVX-512 and on arm64, bicubic on every CPU: torch's "
                "native uint8 kernel; bilinear elsewhere: float32, rounded half to even, cast to uint8 "
                "(at most 1 apart per value). Pillow's Image.resize with the same filter: at most 1 apart"
            ),
        },
        "value_range": [0, 255],
        "pixel_divisor": 255,
        "formula": "normalized[c] = (pixel[c] / pixel_divisor - mean[c]) / std[c], c in R, G, B order",
        "scale": "divide by 255 to [0, 1], then subtract mean and divide by std",
        "mean": list(mean),
        "std": list(std),
        "normalize_in_graph": False,
        "layout": "NCHW",
        "dtype": "float32",
    }


def pad_fill(mean: Sequence[float]) -> list[int]:
    """The letterbox colour: the normalization mean in 0-255, so padding is 0 after normalizing."""
    return [round(255 * m) for m in mean]


def resize_mode(spec: dict) -> str:
    """The spec's resize mode; a spec written before the modes existed only knew 'crop'."""
    return spec.get("resize_mode", "crop")


def input_side(spec: dict) -> int:
    """The side of the square image the model sees."""
    key = {"crop": "center_crop", "pad": "pad_to_square", "stretch": "resize_to_square"}[resize_mode(spec)]
    return spec[key]


def to_square(
    image: torch.Tensor, side: int, *, mode: str, fill: Sequence[int] | None, interpolation: str
) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, side, side) by 'pad' (the longer side to `side`, then centered on a
    square of `fill`) or 'stretch' (both sides to `side`). 'crop' is Resize + CenterCrop, done by the
    callers with torchvision's own transforms."""
    resample = InterpolationMode(interpolation)
    if mode == "stretch":
        return T.functional.resize(image, [side, side], interpolation=resample, antialias=True)
    if mode != "pad":
        raise ValueError(f"to_square: mode {mode!r} is not 'pad' or 'stretch'")
    height, width = image.shape[-2:]
    scale = side / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    image = T.functional.resize(image, [new_height, new_width], interpolation=resample, antialias=True)
    top, left = (side - new_height) // 2, (side - new_width) // 2  # an odd leftover pixel goes below/right
    square = torch.empty((image.shape[0], side, side), dtype=image.dtype)
    square[:] = torch.tensor(list(fill), dtype=image.dtype).view(-1, 1, 1)
    square[:, top : top + new_height, left : left + new_width] = image
    return square


class ToSquare(torch.nn.Module):
    """to_square as a transform step (pad or stretch modes)."""

    def __init__(self, side: int, *, mode: str, fill: Sequence[int] | None, interpolation: str):
        super().__init__()
        self.side, self.mode, self.fill, self.interpolation = side, mode, fill, interpolation

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return to_square(image, self.side, mode=self.mode, fill=self.fill, interpolation=self.interpolation)


def eval_resize_crop(spec: dict) -> T.Compose:
    """uint8 CHW RGB -> uint8 CHW of the model's input size: the geometric half of the eval transform,
    which a consumer of a graph with baked-in normalization still does itself."""
    mode = resize_mode(spec)
    if mode != "crop":
        fill = spec["pad_fill"] if mode == "pad" else None
        return T.Compose(
            [ToSquare(input_side(spec), mode=mode, fill=fill, interpolation=spec["interpolation"])]
        )
    interpolation = InterpolationMode(spec["interpolation"])
    return T.Compose(
        [
            T.Resize(spec["resize_shorter_side"], interpolation=interpolation, antialias=True),
            T.CenterCrop(spec["center_crop"]),
        ]
    )


def eval_transform(spec: dict) -> Pipeline:
    """uint8 CHW RGB tensor -> normalized float32 tensor, exactly as `spec` says: the resize and crop per
    image, the normalization per batch."""
    return Pipeline(eval_resize_crop(spec), T.Compose(to_normalized_float(spec["mean"], spec["std"])))


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
    resize_mode: str = "crop",
    square_side: int | None = None,
    video: dict[str, float] | None = None,
) -> Pipeline:
    """uint8 CHW RGB tensor -> augmented, normalized float32 tensor, in the order of torchvision's reference
    recipe (references/classification/presets.py): crop, flip, auto-augment (on uint8), [jitter], ToDtype,
    Normalize, random erasing. Before the crop: the video degradations (`video`: probabilities by name,
    video_augment.VideoDegrade) and, in 'pad' and 'stretch' modes, the image made a `square_side` square
    the crop is cut from, as evaluation makes it (in 'crop' mode the crop is cut from the image itself).
    An option that is off adds no step, so the transform is exactly the one without it.
    The uint8 steps are the per-image stage and ToDtype, Normalize the batch stage; random erasing comes
    after Normalize and draws per image, so with it on every step runs per image."""
    steps = []
    if video and video_augment.any_enabled(**video):
        steps.append(video_augment.VideoDegrade(**video))
    if resize_mode != "crop":
        fill = pad_fill(mean) if resize_mode == "pad" else None
        steps.append(ToSquare(square_side, mode=resize_mode, fill=fill, interpolation=interpolation))
    steps += [
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
    if random_erasing > 0:
        erase = T.RandomErasing(p=random_erasing)  # value 0 after Normalize: the mean colour
        return Pipeline(T.Compose([*steps, *to_normalized_float(mean, std), erase]), T.Identity())
    return Pipeline(T.Compose(steps), T.Compose(to_normalized_float(mean, std)))


# --- from the run's DataConfig -------------------------------------------------------------------------


def preprocessing_for(cfg: DataConfig) -> dict:
    """The evaluation preprocessing that `cfg` describes, as preprocessing_spec writes it down."""
    return preprocessing_spec(
        image_size=cfg.image_size,
        resize_size=cfg.resize_size,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        resize_mode=cfg.resize_mode,
    )


def augmentation_for(cfg: DataConfig) -> Pipeline:
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
        resize_mode=cfg.resize_mode,
        square_side=train_square_side(cfg.image_size, cfg.resize_size),
        video=video_degradations(cfg),
    )


def train_square_side(image_size: int, resize_size: int | None) -> int:
    """The side of the square a training crop is cut from, in 'pad' and 'stretch' modes and in the fast
    path's cache: the eval resize (the shorter side's, in 'crop' mode)."""
    return resize_size or round(image_size * 256 / 224)


def video_degradations(cfg: DataConfig) -> dict[str, float]:
    """The four video degradations' probabilities, by the names VideoDegrade and degrade_batch take."""
    return {
        "motion_blur": cfg.motion_blur,
        "low_resolution": cfg.low_resolution,
        "jpeg": cfg.jpeg,
        "occlusion": cfg.occlusion,
    }
