"""The video degradations (classifier/video_augment.py) on real Fashion-MNIST images: each does what it
should at probability 1 and nothing at 0, probabilities hold over many images, the batch and per-image
versions agree, strengths scale with the image, and bad probabilities are refused naming the flag."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf
from torchvision.io import decode_jpeg, encode_jpeg

from classifier import fashion_mnist
from classifier.video_augment import (
    FLAGS,
    JPEG_QUALITY,
    OCCLUSION_AREA_FRACTION,
    OCCLUSION_EDGE_FRACTION,
    VideoDegrade,
    any_enabled,
    degrade_batch,
    line_kernels,
)

OFF = dict(motion_blur=0.0, low_resolution=0.0, jpeg=0.0, occlusion=0.0)


def only(name: str, p: float = 1.0) -> dict[str, float]:
    return {**OFF, name: p}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on images this small, more threads only wait on each other (and on a busy
    2-core box make each op many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fmnist_images() -> torch.Tensor:
    """400 Fashion-MNIST test images as uint8 (400, 3, 28, 28) RGB."""
    source = fashion_mnist.local_source()
    if source is None:
        pytest.skip(f"Fashion-MNIST IDX files not found; {fashion_mnist.HOW_TO_GET}")
    path = source / "t10k-images-idx3-ubyte.gz"  # local_source's folder holds them gzipped or plain
    if not path.is_file():
        path = source / "t10k-images-idx3-ubyte"
    images = torch.from_numpy(fashion_mnist.read_idx(path)[:400].copy())
    return images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images resized (bicubic up, antialiased down), like a crop seen at another resolution."""
    up = size[0] > images.shape[-2]
    x = nnf.interpolate(images.float(), size=size, mode="bicubic" if up else "bilinear", antialias=not up)
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def crops(fmnist_images: torch.Tensor) -> torch.Tensor:
    """64 images at 56x56, the size of a jersey crop (the 28 px originals are below the low-res range)."""
    return resized(fmnist_images[:64], (56, 56))


def gradient_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per image: the high-frequency content."""
    x = images.float()
    return (x.diff(dim=-1) ** 2).mean(dim=(1, 2, 3)) + (x.diff(dim=-2) ** 2).mean(dim=(1, 2, 3))


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (before != after).flatten(1).any(dim=1)


# --- each degradation does what it says --------------------------------------------------------------


def test_all_off_changes_nothing_and_is_not_enabled(crops):
    assert not any_enabled(**OFF)
    assert torch.equal(degrade_batch(crops, **OFF, generator=seeded(0)), crops)
    assert torch.equal(VideoDegrade(**OFF)(crops[0]), crops[0])
    for name in FLAGS:
        assert any_enabled(**only(name, 0.01))


def test_line_kernels_are_normalized_lines_of_the_asked_length_and_angle():
    kernels = line_kernels(torch.tensor([4.0, 3.0, 7.0]), torch.tensor([0.0, math.pi / 2, math.pi / 4]))
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.ones(3))
    centre = kernels.shape[-1] // 2
    # Horizontal, 4 px: the box [0.5, 1, 1, 1, 0.5] / 4 on the centre row only.
    expected_row = torch.tensor([0.5, 1, 1, 1, 0.5]) / 4
    assert torch.allclose(kernels[0, centre, centre - 2 : centre + 3], expected_row)
    assert kernels[0].sum(dim=1)[centre] == pytest.approx(1.0)
    # Vertical, 3 px: three equal taps on the centre column.
    assert torch.allclose(kernels[1, centre - 1 : centre + 2, centre], torch.full((3,), 1 / 3), atol=1e-5)
    # Diagonal: the weight lies along the main diagonal, none on the anti-diagonal's far corners.
    diagonal = kernels[2].diagonal().sum()
    assert diagonal > 0.6 and kernels[2, 0, -1] == 0 and kernels[2, -1, 0] == 0


def test_motion_blur_lowers_high_frequencies_and_keeps_brightness(crops):
    out = degrade_batch(crops, **only("motion_blur"), generator=seeded(0))
    assert out.dtype == torch.uint8 and out.shape == crops.shape
    ratio = gradient_energy(out) / gradient_energy(crops)
    assert changed(crops, out).all()
    assert (ratio < 0.95).all() and ratio.median() < 0.7
    # A normalized kernel with replicated edges moves no light around much.
    brightness_shift = (out.float().mean(dim=(1, 2, 3)) - crops.float().mean(dim=(1, 2, 3))).abs()
    assert brightness_shift.max() < 2.0


def test_low_resolution_lowers_high_frequencies_and_keeps_the_coarse_picture(crops):
    out = degrade_batch(crops, **only("low_resolution"), generator=seeded(0))
    assert out.dtype == torch.uint8 and out.shape == crops.shape
    assert (gradient_energy(out) < 0.8 * gradient_energy(crops)).all()
    coarse_before, coarse_after = nnf.avg_pool2d(crops.float(), 8), nnf.avg_pool2d(out.float(), 8)
    assert (coarse_after - coarse_before).abs().mean() < 6  # grey levels, of 255
    # An image already at or under the low side stays exactly as it is.
    tiny = crops[:8, :, :10, :10].contiguous()
    assert torch.equal(degrade_batch(tiny, **only("low_resolution"), generator=seeded(0)), tiny)


def test_jpeg_is_an_encode_decode_at_a_quality_in_range(crops):
    images = crops[:20]
    out = degrade_batch(images, **only("jpeg"), generator=seeded(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    low, high = JPEG_QUALITY
    qualities = set()
    for image, result in zip(images, out, strict=True):
        assert not torch.equal(result, image)
        matches = [
            q for q in range(low, high + 1) if torch.equal(decode_jpeg(encode_jpeg(image, quality=q)), result)
        ]
        assert matches, "the output is no JPEG round trip at a quality in range"
        qualities.update(matches)
    assert len(qualities) > 5  # drawn, not fixed


@pytest.mark.parametrize("size", [(28, 28), (90, 40)])
def test_occlusion_is_a_flat_rectangle_flush_with_an_edge(fmnist_images, size):
    images = resized(fmnist_images[:100], size)
    height, width = size
    out = degrade_batch(images, **only("occlusion"), generator=seeded(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    edges_seen = set()
    for image, result in zip(images, out, strict=True):
        rows, cols = (result != image).any(dim=0).nonzero(as_tuple=True)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = result[:, top:bottom, left:right]
        assert (box == box[:, :1, :1]).all(), "the patch is not one flat colour"
        touches = {"top": top == 0, "bottom": bottom == height, "left": left == 0, "right": right == width}
        assert any(touches.values())
        edges_seen.update(edge for edge, flush in touches.items() if flush)
        box_height, box_width = int(bottom - top), int(right - left)
        area = box_height * box_width / (height * width)
        # Rounding to whole pixels moves the area by up to about a pixel's row and column.
        slack = 1 / height + 1 / width
        assert OCCLUSION_AREA_FRACTION[0] - slack <= area <= OCCLUSION_AREA_FRACTION[1] + slack
        span = max(box_height / height, box_width / width)
        assert span >= OCCLUSION_EDGE_FRACTION[0] - slack
    assert edges_seen == {"top", "bottom", "left", "right"}


# --- probabilities, the two paths, and scale ----------------------------------------------------------


@pytest.mark.parametrize("name", list(FLAGS))
def test_probability_half_changes_about_half_the_images(fmnist_images, name):
    # 400 images: the fraction's standard deviation is 0.025, so +-0.075 is 3 of them.
    images = fmnist_images if name != "low_resolution" else resized(fmnist_images, (40, 40))
    out = degrade_batch(images, **only(name, 0.5), generator=seeded(2))
    assert abs(changed(images, out).float().mean().item() - 0.5) < 0.075
    torch.manual_seed(2)
    transform = VideoDegrade(**only(name, 0.5))
    per_image = torch.stack([transform(image) for image in images[:100]])
    assert abs(changed(images[:100], per_image).float().mean().item() - 0.5) < 0.15  # 100: sd 0.05


def test_all_at_half_leave_about_one_image_in_sixteen_untouched(fmnist_images):
    images = resized(fmnist_images, (40, 40))
    out = degrade_batch(images, **dict.fromkeys(FLAGS, 0.5), generator=seeded(3))
    untouched = 1 - changed(images, out).float().mean().item()
    assert abs(untouched - 1 / 16) < 0.04  # 400 images: sd 0.012


def test_a_batch_of_one_equals_video_degrade_under_the_same_seed(fmnist_images):
    image = resized(fmnist_images[:1], (90, 40))[0]  # a player-shaped crop
    for probabilities in (dict.fromkeys(FLAGS, 1.0), dict.fromkeys(FLAGS, 0.5)):
        transform = VideoDegrade(**probabilities)
        for seed in range(4):
            torch.manual_seed(seed)
            expected = transform(image)
            assert expected.shape == image.shape and expected.dtype == torch.uint8
            assert torch.equal(
                degrade_batch(image[None], **probabilities, generator=seeded(seed))[0], expected
            )


@pytest.mark.parametrize("name", ["motion_blur", "low_resolution"])
def test_batch_and_per_image_versions_agree_in_distribution(crops, name):
    images = resized(crops, (40, 40)).repeat(2, 1, 1, 1)[:100]
    batch_ratio = gradient_energy(degrade_batch(images, **only(name), generator=seeded(4))) / gradient_energy(
        images
    )
    torch.manual_seed(5)
    transform = VideoDegrade(**only(name))
    per_image = torch.stack([transform(image) for image in images])
    per_image_ratio = gradient_energy(per_image) / gradient_energy(images)
    # Same images, independent draws: the mean strength differs by sampling noise only (sd about 0.025).
    assert abs(batch_ratio.mean() - per_image_ratio.mean()) < 0.08
    assert batch_ratio.std() > 0.03  # strengths are drawn per image, not one per batch


@pytest.mark.parametrize("name", ["motion_blur", "low_resolution", "occlusion"])
def test_one_setting_does_the_same_to_a_crop_at_two_resolutions(fmnist_images, name):
    # The same player crop at 40x90 (raw) and 80x180; degraded with the same draws, then compared at 40x90.
    large = resized(fmnist_images[:32], (180, 80))
    small = resized(large, (90, 40))
    degraded_small = degrade_batch(small, **only(name), generator=seeded(6)).float()
    degraded_large = resized(degrade_batch(large, **only(name), generator=seeded(6)), (90, 40)).float()
    change = (degraded_small - small.float()).abs().mean()
    assert (degraded_large - degraded_small).abs().mean() < 0.25 * change


def test_turning_one_degradation_off_leaves_the_others_draws_unchanged(crops):
    alone = degrade_batch(crops, **only("occlusion"), generator=seeded(7))
    with_blur = degrade_batch(crops, **{**only("occlusion"), "motion_blur": 1.0}, generator=seeded(7))
    patch = (alone != crops).any(dim=1, keepdim=True).expand_as(crops)
    assert torch.equal(with_blur[patch], alone[patch])


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", list(FLAGS))
def test_a_probability_outside_0_1_is_refused_naming_the_flag(crops, name, value):
    flag = FLAGS[name].replace(".", r"\.")
    with pytest.raises(ValueError, match=flag):
        VideoDegrade(**only(name, value))
    with pytest.raises(ValueError, match=flag):
        degrade_batch(crops[:2], **only(name, value), generator=seeded(0))
    with pytest.raises(ValueError, match=flag):
        any_enabled(**only(name, value))


def test_images_other_than_uint8_rgb_are_refused(crops):
    with pytest.raises(ValueError, match="uint8"):
        degrade_batch(crops.float(), **only("jpeg"), generator=seeded(0))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        VideoDegrade(**only("jpeg"))(crops[0, :1])


# --- wired into training -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["regular", "fast"])
def test_both_data_paths_put_occlusion_in_the_training_batch(fmnist_small_root, tmp_path, monkeypatch, path):
    """train.py's first batch (the one train_batch.png draws) with --data.occlusion 1 against the same
    run without it: with the random crop pinned to the whole image and no flip, every image differs, and
    only in a patch that touches the image's border (an occluder enters from an edge)."""
    from helpers import NO_DATA_REPORTS, TINY_RUN

    import train
    from classifier import plots
    from classifier.cli import parse_cli

    drawn = []  # the batch each run's train_batch.png shows
    real_figure = plots.train_batch_figure

    def recording(images, *args, **kwargs):
        drawn.append(images)
        return real_figure(images, *args, **kwargs)

    monkeypatch.setattr(plots, "train_batch_figure", recording)
    common = [
        *TINY_RUN,
        *NO_DATA_REPORTS,
        *("--data.root", str(fmnist_small_root), "--out-dir", str(tmp_path)),
        *("--data.crop-scale", "1", "1", "--data.crop-ratio", "1", "1", "--data.no-hflip"),
        *("--data.max-train-batches", "1", "--data.batch-size", "16", "--data.no-scan-images"),
        *(["--data.fast-path"] if path == "fast" else []),
    ]
    for name, occlusion in (("plain", "0"), ("occluded", "1")):
        train.main(parse_cli([*common, "--name", name, "--data.occlusion", occlusion]))
        assert (tmp_path / name / "plots" / "train_batch.png").is_file()
    plain, occluded = drawn
    differs = (plain != occluded).any(dim=1)  # (N, H, W): pixels the patch changed
    assert differs.flatten(1).any(dim=1).all(), "an image came through without its occlusion"
    border = torch.zeros_like(differs[0])
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    assert (differs & border).flatten(1).any(dim=1).all(), "a changed patch does not reach the border"
