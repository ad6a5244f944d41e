"""Video degradations for training on crops from game video: motion blur, low resolution, JPEG
re-compression and an occluding patch, each with its own probability, always in that order.

`degrade_batch` does it to a uint8 batch (the fast path, before BatchAugment's crop); `VideoDegrade` to one
decoded image (the regular path, before RandomResizedCrop). Both draw the same numbers the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torchvision.io import decode_jpeg, encode_jpeg

# Strengths scale with the image, never fixed pixels: the regular path degrades the raw crop (say 40x90)
# and the fast path its cached square (say 73x73), and one setting must do the same to the jersey on both.
# Lengths are fractions of the side, the low resolution a number of samples across it. "Side" is the
# shorter side: the random resized crop that follows is at most about that wide.
# Motion blur: a line kernel 4-12% of the side long (3-9 px on a 73 px square): a player running or a
# panning camera smears a number by a stroke's width or so; longer makes a digit unreadable.
BLUR_LENGTH_FRACTION = (0.04, 0.12)
# Low resolution: the image shrunk until its shorter side is 12-28 px, then stretched back: a far-away
# player whose number spans a few pixels (12 px: digits about 5 px tall, the edge of legible). A pixel
# count, not a fraction of the side, is what is relative: the shrunk samples are side/12 to side/28
# apart, the same stretch of jersey on a 40x90 raw crop and on its 73x73 cached square, whereas a
# factor of the side would keep more samples of the same content on the larger of the two. An image
# already at or under the drawn side is left as it is (it is that low-resolution already).
LOW_RESOLUTION_SIDE_PX = (12, 28)
# JPEG quality 20-60: broadcast and phone video keyframes look like 30-60; 20 adds heavy 8x8 blocking.
# The blocks are 8 pixels whatever the image's size: the one strength that is not relative.
JPEG_QUALITY = (20, 60)
# Occlusion: 10-35% of the area, a rectangle entering from one edge (an arm or another player's jersey)
# that spans 40-100% of that edge; beyond about a third a two-digit number loses a whole digit.
OCCLUSION_AREA_FRACTION = (0.10, 0.35)
OCCLUSION_EDGE_FRACTION = (0.4, 1.0)
EDGES = ("left", "right", "top", "bottom")
OCCLUSION_KEYS = ("edge", "area_fraction", "span_fraction", "position")  # draw_parameters' keys for the box
# The flag behind each probability, for error messages; also the order the degradations run in.
FLAGS = {
    "motion_blur": "--data.motion-blur",
    "low_resolution": "--data.low-resolution",
    "jpeg": "--data.jpeg",
    "occlusion": "--data.occlusion",
}


def check_probabilities(**probabilities: float) -> None:
    """ValueError naming the flag of any probability outside [0, 1] (NaN included)."""
    for name, p in probabilities.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{FLAGS[name]} must be a probability in [0, 1], got {p}")


def any_enabled(motion_blur: float, low_resolution: float, jpeg: float, occlusion: float) -> bool:
    """Whether any degradation is on. An all-zero setting must add no step to a pipeline at all.
    Checks the values first, so a negative probability is an error rather than 'off'."""
    check_probabilities(
        motion_blur=motion_blur, low_resolution=low_resolution, jpeg=jpeg, occlusion=occlusion
    )
    return max(motion_blur, low_resolution, jpeg, occlusion) > 0


def draw_parameters(n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Every random number of n images, on the CPU, as one (n, 15) uniform draw: the same amount whatever
    the probabilities, so turning one degradation off leaves the others' draws unchanged. Columns:
    4 uniforms compared with the probabilities, then blur length and angle, shrunk side, JPEG
    quality, occlusion edge, area, edge span, position along the edge and colour (R, G, B)."""
    u = torch.rand(n, 15, generator=generator, dtype=torch.float64)

    def between(column: int, bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * u[:, column]

    low_quality, high_quality = JPEG_QUALITY
    return {
        "uniform": u[:, :4],
        "blur_fraction": between(4, BLUR_LENGTH_FRACTION),
        "blur_angle": u[:, 5] * math.pi,  # a line at angle a is the line at a + pi
        "low_side_px": between(6, LOW_RESOLUTION_SIDE_PX),
        "quality": (low_quality + u[:, 7] * (high_quality - low_quality + 1)).long(),
        "edge": (u[:, 8] * len(EDGES)).long(),
        "area_fraction": between(9, OCCLUSION_AREA_FRACTION),
        "span_fraction": between(10, OCCLUSION_EDGE_FRACTION),
        "position": u[:, 11],
        "colour": (u[:, 12:15] * 256).long(),
    }


# --- the four degradations, each on the images that drew it -------------------------------------------


def line_kernels(lengths_px: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(n, k, k) float32 kernels summing to 1: a centred line segment of each length (pixels) at each angle
    (radians). A pixel's weight is how much of its 1 px extent along the line the segment covers, times a
    1 px tent across the line: a horizontal line of length 4 is the box [0.5, 1, 1, 1, 0.5] / 4, a
    diagonal one spreads over the pixels it passes between, and one under 1 px barely blurs.
    One k for all: the longest line fits, and zeros around a shorter line change nothing."""
    radius = math.ceil(float(lengths_px.max()) / 2 + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    y, x = offsets.view(1, -1, 1), offsets.view(1, 1, -1)
    cos, sin = angles.cos().view(-1, 1, 1), angles.sin().view(-1, 1, 1)
    half = (lengths_px / 2).view(-1, 1, 1)
    along, across = x * cos + y * sin, y * cos - x * sin  # pixel centre in the line's frame
    covered = (torch.minimum(along + 0.5, half) - torch.maximum(along - 0.5, -half)).clamp(0, 1)
    weights = covered * (1 - across.abs()).clamp(min=0)
    return (weights / weights.sum(dim=(1, 2), keepdim=True)).float()


def blur_along_lines(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W), each image convolved with its own (k, k) kernel: one depthwise convolution with
    a group per channel of every image. Edges are padded by repeating them: zeros would darken them."""
    n, channels, height, width = images.shape
    k = kernels.shape[-1]
    weight = kernels.to(images.device).repeat_interleave(channels, dim=0).unsqueeze(1)  # (n*C, 1, k, k)
    x = nnf.pad(images.float().view(1, n * channels, height, width), [k // 2] * 4, mode="replicate")
    blurred = nnf.conv2d(x, weight, groups=n * channels)
    return blurred.view(n, channels, height, width).round_().clamp_(0, 255).to(torch.uint8)


def downscale_upscale(images: torch.Tensor, down_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """uint8 (n, C, H, W), image i shrunk to down_sizes[i] (antialiased) and stretched back (bilinear).
    Images that shrink to the same size go through together; one not shrunk comes back exactly."""
    height, width = images.shape[-2:]
    out = torch.empty_like(images)
    for size in sorted(set(down_sizes)):
        group = torch.tensor([i for i, s in enumerate(down_sizes) if s == size], device=images.device)
        x = nnf.interpolate(images[group].float(), size=size, mode="bilinear", antialias=True)
        x = nnf.interpolate(x, size=(height, width), mode="bilinear", antialias=True)
        out[group] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def recompress_jpeg(images: torch.Tensor, qualities: list[int]) -> torch.Tensor:
    """uint8 (n, 3, H, W), image i encoded and decoded as JPEG at qualities[i], one at a time through
    libjpeg on the CPU (one device-to-host copy for all of them), so CPU and GPU runs give the same bytes."""
    cpu_images = images.cpu()
    decoded = [
        decode_jpeg(encode_jpeg(image, quality=quality))
        for image, quality in zip(cpu_images, qualities, strict=True)
    ]
    return torch.stack(decoded).to(images.device)


def occlusion_boxes(height: int, width: int, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, box height, box width) in pixels: a rectangle of the drawn area
    fraction spanning the drawn fraction of one edge, flush with that edge, at a uniform position along it."""
    span = parameters["span_fraction"]
    depth = parameters["area_fraction"] / span  # <= 0.35 / 0.4: never deeper than the image
    vertical_edge = parameters["edge"] < 2  # left or right: spans the height, goes in along the width
    box_height = torch.where(vertical_edge, span * height, depth * height).round().clamp(1, height).long()
    box_width = torch.where(vertical_edge, depth * width, span * width).round().clamp(1, width).long()
    # Along the edge: uniform where the box fits. Across it: flush with the edge.
    slide_h = (parameters["position"] * (height - box_height + 1)).floor().long()
    slide_w = (parameters["position"] * (width - box_width + 1)).floor().long()
    edge = parameters["edge"]
    top = torch.where(vertical_edge, slide_h, torch.where(edge == 2, 0, height - box_height))
    left = torch.where(vertical_edge, torch.where(edge == 0, 0, width - box_width), slide_w)
    return torch.stack([top, left, box_height, box_width], dim=1)


def occlude(images: torch.Tensor, boxes: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) with boxes[i] (top, left, height, width) of image i filled with colours[i] (RGB)."""
    n, _, height, width = images.shape
    top, left, box_height, box_width = boxes.to(images.device).view(n, 4, 1, 1).unbind(dim=1)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width)
    fill = colours.to(device=images.device, dtype=torch.uint8).view(n, 3, 1, 1).expand_as(images)
    return torch.where(inside.unsqueeze(1), fill, images)


# --- both paths ---------------------------------------------------------------------------------------


def degrade_batch(
    images: torch.Tensor,
    *,
    motion_blur: float,
    low_resolution: float,
    jpeg: float,
    occlusion: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> uint8 (B, 3, H, W) on that device, each image degraded on its
    own draws: motion blur, low resolution, JPEG, occlusion, each with its probability, in that order.

    The random numbers come from `generator` on the CPU (None: torch's global RNG, as VideoDegrade uses),
    15 per image whatever the probabilities; only the few chosen parameters travel to the device. A batch
    of one with generator seed s equals VideoDegrade under torch.manual_seed(s)."""
    probabilities = dict(
        motion_blur=motion_blur, low_resolution=low_resolution, jpeg=jpeg, occlusion=occlusion
    )
    check_probabilities(**probabilities)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 (B, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    n, _, height, width = images.shape
    parameters = draw_parameters(n, generator)
    applied = parameters["uniform"] < torch.tensor(list(probabilities.values()), dtype=torch.float64)
    side_px = min(height, width)
    out = images
    # Each step works on the images that drew it (index, then index_copy back): the others skip the work
    # and stay exactly as they were. `chosen` indexes the CPU parameters, `on_device` the images. When all
    # drew it (always so for VideoDegrade's single image) the gather and scatter are skipped.
    for step, name in enumerate(FLAGS):
        chosen = applied[:, step].nonzero().squeeze(1)
        if len(chosen) == 0:
            continue
        everyone = len(chosen) == n
        on_device = chosen.to(out.device)
        originals = out if everyone else out[on_device]
        if name == "motion_blur":
            lengths_px = parameters["blur_fraction"][chosen] * side_px
            degraded = blur_along_lines(originals, line_kernels(lengths_px, parameters["blur_angle"][chosen]))
        elif name == "low_resolution":
            factors = (parameters["low_side_px"][chosen] / side_px).clamp(max=1).tolist()
            down_sizes = [(max(1, round(height * f)), max(1, round(width * f))) for f in factors]
            degraded = downscale_upscale(originals, down_sizes)
        elif name == "jpeg":
            degraded = recompress_jpeg(originals, parameters["quality"][chosen].tolist())
        else:
            boxes = occlusion_boxes(height, width, {key: parameters[key][chosen] for key in OCCLUSION_KEYS})
            degraded = occlude(originals, boxes, parameters["colour"][chosen])
        out = degraded if everyone else out.index_copy(0, on_device, degraded)
    return out


class VideoDegrade(torch.nn.Module):
    """uint8 (3, H, W) -> uint8 (3, H, W): degrade_batch for one image of any size, for the regular path's
    v2 pipeline. Draws from torch's global RNG, as v2 transforms do, so DataLoader worker seeding applies.
    Append it only when any_enabled(...): an all-zero one would still draw random numbers."""

    def __init__(self, *, motion_blur: float, low_resolution: float, jpeg: float, occlusion: float):
        super().__init__()
        check_probabilities(
            motion_blur=motion_blur, low_resolution=low_resolution, jpeg=jpeg, occlusion=occlusion
        )
        self.probabilities = dict(
            motion_blur=motion_blur, low_resolution=low_resolution, jpeg=jpeg, occlusion=occlusion
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
        return degrade_batch(image.unsqueeze(0), **self.probabilities, generator=None)[0]

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={p}" for name, p in self.probabilities.items())
