"""The fast data path: decoding, the on-disk cache, batch augmentation, and the tensor loader; crops,
flips and jitter are checked on the regular path's per-image transform too."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from classifier import batch_augment, fastdata
from classifier.batch_augment import BatchAugment, BatchEval
from classifier.config import DataConfig
from classifier.data import Splits
from classifier.fastdata import TensorLoader, decode_split, load_or_build_cache
from classifier.images import load_image
from classifier.sampling import EpochSampler
from classifier.transforms import eval_resize_crop, eval_transform, preprocessing_spec, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise_images(folder, sizes, modes=("RGB",)) -> list[tuple[str, int]]:
    """One random-noise image file per (width, height), cycling through colour modes; label = position."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i, (width, height) in enumerate(sizes):
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
        image = Image.fromarray(pixels).convert(modes[i % len(modes)])
        path = folder / f"{i}.png"
        image.save(path)
        samples.append((str(path), i))
    return samples


AUGMENT = dict(
    crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, color_jitter=0.0, mean=MEAN, std=STD
)


def augment(size=16, **options) -> BatchAugment:
    return BatchAugment(size, **{**AUGMENT, **options})


def regular_augment(size=16, **options):
    """The regular path's train_transform with augment()'s settings, called like a BatchAugment: each
    image gets its own seed drawn from `generator`, and is transformed under it as ImageDataset does."""
    s = {**AUGMENT, **options}
    transform = train_transform(
        image_size=size,
        crop_scale=s["crop_scale"],
        crop_ratio=s["crop_ratio"],
        hflip=s["hflip"],
        color_jitter=s["color_jitter"],
        mean=s["mean"],
        std=s["std"],
        interpolation="bilinear",
    )

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = []
        seeds = torch.randint(2**31, (len(images),), generator=generator).tolist()
        for image, seed in zip(images, seeds, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                out.append(transform(image))
        return torch.stack(out)

    return apply


# Crops, flips and jitter follow the same ranges on both paths: the tests below run each.
PATHS = {"fast": augment, "regular": regular_augment}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- decoding and the cache -------------------------------------------------------------------------


def test_decode_equals_load_image_then_resize_and_center_crop(tmp_path):
    samples = noise_images(tmp_path, [(30, 20), (17, 41), (24, 24), (8, 9)], modes=("RGB", "L", "P"))
    images, labels = decode_split(samples, 20, "bicubic", num_workers=0)
    assert images.shape == (4, 3, 20, 20) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3]
    for (path, _), decoded in zip(samples, images, strict=True):
        expected = F.resize(load_image(path), 20, interpolation=InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(decoded, F.center_crop(expected, [20, 20]))
    # Worker processes decode the same bytes in the same order, and leave the global RNG alone.
    state = torch.get_rng_state()
    in_workers, _ = decode_split(samples, 20, "bicubic", num_workers=2)
    assert torch.equal(in_workers, images)
    assert torch.equal(torch.get_rng_state(), state)


def test_cache_hit_stale_and_corrupt_rebuild(tmp_path, monkeypatch):
    samples = noise_images(tmp_path, [(12, 10), (10, 12), (11, 11)])
    cache_dir = tmp_path / "cache"
    built, labels = load_or_build_cache(samples, 8, "bilinear", cache_dir, num_workers=0)
    (path,) = cache_dir.glob("*.pt")

    real_decode = fastdata.decode_split
    calls = []
    monkeypatch.setattr(fastdata, "decode_split", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hit warns about nothing
        hit, hit_labels = load_or_build_cache(samples, 8, "bilinear", cache_dir, num_workers=0)
    assert calls == [] and torch.equal(hit, built) and torch.equal(hit_labels, labels)

    # An image rewritten in place (same name, new pixels, new mtime): the cache is stale.
    Image.new("RGB", (12, 10), color=(255, 0, 0)).save(samples[0][0])
    os.utime(samples[0][0], ns=(1, 1))  # an mtime surely unlike the first one's
    with pytest.warns(UserWarning, match=f"{path.name}.*stale"):
        rebuilt, _ = load_or_build_cache(samples, 8, "bilinear", cache_dir, num_workers=0)
    assert calls == [1] and torch.equal(
        rebuilt[0], torch.tensor([255, 0, 0]).view(3, 1, 1).expand(3, 8, 8).byte()
    )
    assert torch.equal(rebuilt[1:], built[1:])

    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match=f"{path.name}.*unreadable"):
        again, _ = load_or_build_cache(samples, 8, "bilinear", cache_dir, num_workers=0)
    assert calls == [1, 1] and torch.equal(again, rebuilt)
    assert torch.equal(load_or_build_cache(samples, 8, "bilinear", cache_dir)[0], rebuilt) and calls == [1, 1]

    # Another geometry is another cache file, not a rebuild of this one.
    load_or_build_cache(samples, 8, "bilinear", cache_dir, crop=6, num_workers=0)
    assert len(list(cache_dir.glob("*.pt"))) == 2


# --- batch augmentation -----------------------------------------------------------------------------


def test_augmentation_is_a_function_of_the_generator_seed():
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8, generator=seeded(1))
    transform = augment(color_jitter=0.4)
    first = transform(images, seeded(7))
    assert first.shape == (8, 3, 16, 16) and first.dtype == torch.float32
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(transform(images, seeded(7)), first)
    assert not torch.allclose(transform(images, seeded(8)), first)
    as_channels_last = augment(color_jitter=0.4, channels_last=True)(images, seeded(7))
    assert as_channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(as_channels_last, first)


@pytest.mark.parametrize("path", PATHS)
def test_flip_really_flips(path):
    make = PATHS[path]
    # Left half white, right half black; the full-image crop isolates the flip.
    image = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    image[..., :8] = 255
    images = image.expand(32, -1, -1, -1).contiguous()
    options = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    out = make(hflip=True, **options)(images, seeded(0))
    flipped = out[:, 0, 0, 0] == 0  # the top-left pixel turned black
    assert 5 < int(flipped.sum()) < 27
    assert torch.equal(out[~flipped], images[~flipped].float() / 255)
    assert torch.equal(out[flipped], images[flipped].flip(-1).float() / 255)
    assert torch.equal(make(hflip=False, **options)(images, seeded(0)), images.float() / 255)


@pytest.mark.parametrize("path", PATHS)
def test_color_jitter_factors_span_the_range(path):
    make = PATHS[path]
    # A uniform gray image: contrast and saturation leave it as it is, brightness scales it.
    images = torch.full((64, 3, 12, 12), 128, dtype=torch.uint8)
    out = make(8, color_jitter=0.5, mean=(0, 0, 0), std=(1, 1, 1))(images, seeded(0))
    factor = out[:, 0, 0, 0] / (128 / 255)
    # One factor per image.
    assert torch.allclose(out, factor.view(64, 1, 1, 1).expand_as(out) * 128 / 255, atol=1e-3)
    assert factor.min() >= 0.5 - 1e-3 and factor.max() <= 1.5 + 1e-3
    assert factor.max() - factor.min() > 0.7


@pytest.mark.parametrize("path", PATHS)
def test_crops_respect_the_scale_range(path):
    make = PATHS[path]
    # A horizontal ramp in red and a vertical ramp in green: an output's ramp spans reveal its crop box.
    side, out = 64, 16
    ramp = torch.arange(side, dtype=torch.float32) * 4
    image = torch.zeros(3, side, side)
    image[0], image[1] = ramp.expand(side, side), ramp.view(side, 1).expand(side, side)
    images = image.byte().expand(400, -1, -1, -1).contiguous()
    transform = make(
        out, crop_scale=(0.25, 0.5), crop_ratio=(1.0, 1.0), hflip=False, mean=(0, 0, 0), std=(1, 1, 1)
    )
    x = transform(images, seeded(3)) * 255 / 4  # back to source pixel units
    # Output pixel j samples the box at x1 + (j + 0.5) * width / out: the first-to-last span is
    # width * (out - 1) / out. (The regular path's boxes have whole-pixel sides, so its spans round.)
    width = (x[:, 0, 0, -1] - x[:, 0, 0, 0]) * out / (out - 1)
    height = (x[:, 1, -1, 0] - x[:, 1, 0, 0]) * out / (out - 1)
    fraction = width * height / side**2
    # Pixel centres clamp at the border, so allow a little slack below the range.
    assert fraction.min() > 0.23 and fraction.max() < 0.51
    assert abs(fraction.mean().item() - 0.375) < 0.02  # uniform over [0.25, 0.5]
    assert torch.allclose(width, height, atol=0.5)  # ratio (1, 1): square boxes


def test_boxes_stay_inside_the_image_with_ratios_in_range():
    boxes = batch_augment.random_resized_boxes(2000, 30, 20, (0.08, 1.0), (3 / 4, 4 / 3), seeded(0))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 20 and boxes[:, 3].max() <= 30
    assert (width / height).min() >= 3 / 4 - 1e-5 and (width / height).max() <= 4 / 3 + 1e-5
    # No attempt can fit (every box would be wider than the image): torchvision's centred fallback.
    fallback = batch_augment.random_resized_boxes(4, 10, 40, (1.0, 1.0), (1.0, 1.0), seeded(0))
    assert torch.allclose(fallback, torch.tensor([15.0, 0.0, 25.0, 10.0]).expand(4, 4))


def test_eval_path_equals_eval_transform(tmp_path):
    """Bit for bit, not merely close: the cache holds the very uint8 pixels eval_resize_crop gives (the
    same torchvision resize and crop on the same image), and BatchEval then does ToDtype's x / 255 and
    Normalize's (x - mean) / std, the same float32 operations in the same order, element by element."""
    samples = noise_images(tmp_path, [(30, 22), (22, 35), (25, 25), (40, 31)], modes=("RGB", "L"))
    spec = preprocessing_spec(image_size=16, resize_size=19, mean=MEAN, std=STD, interpolation="bilinear")
    expected = torch.stack([eval_transform(spec)(load_image(path)) for path, _ in samples])
    # Cached with the eval geometry (resize 19, crop 16): equal for any aspect ratio.
    images, _ = decode_split(samples, 19, "bilinear", crop=16, num_workers=0)
    assert torch.equal(images, torch.stack([eval_resize_crop(spec)(load_image(path)) for path, _ in samples]))
    assert torch.equal(BatchEval(16, mean=MEAN, std=STD)(images), expected)
    # From the training square (resize 19, crop 19), the center crop happens in the batch: equal here for
    # the square image (index 2); the others may sit one pixel off, from rounding two centerings.
    square, _ = decode_split(samples, 19, "bilinear", num_workers=0)
    assert torch.equal(BatchEval(16, mean=MEAN, std=STD)(square)[2], expected[2])


# --- the loader -------------------------------------------------------------------------------------


def make_loader(num_samples=40, batch_size=8, rank=0, world_size=1, shuffle=True, drop_last=True):
    images = torch.randint(0, 256, (num_samples, 3, 12, 12), dtype=torch.uint8, generator=seeded(5))
    labels = torch.arange(num_samples)  # labels name the samples, so batches show which were drawn
    sampler = EpochSampler(num_samples, shuffle=shuffle, seed=3, rank=rank, world_size=world_size)
    transform = augment(10, color_jitter=0.3) if shuffle else BatchEval(10, mean=MEAN, std=STD)
    loader = TensorLoader(
        images,
        labels,
        sampler,
        batch_size=batch_size,
        drop_last=drop_last,
        transform=transform,
        device=torch.device("cpu"),
    )
    return loader, sampler


def test_loader_follows_the_sampler_and_resume_skips_finished_batches():
    loader, sampler = make_loader()
    sampler.set_epoch(2)
    rng = torch.get_rng_state()
    full = list(loader)
    assert torch.equal(torch.get_rng_state(), rng)  # the model's random stream is not consumed
    assert len(loader) == len(full) == 5
    assert torch.cat([labels for _, labels in full]).tolist() == [index for index, _ in sampler]
    assert all(images.shape == (8, 3, 10, 10) for images, _ in full)
    sampler.set_epoch(2, start=3 * 8)  # resume after 3 finished batches
    tail = list(loader)
    assert len(loader) == len(tail) == 2
    for (images, labels), (full_images, full_labels) in zip(tail, full[3:], strict=True):
        assert torch.equal(labels, full_labels) and torch.equal(images, full_images)
    sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))[1], full[0][1])  # a new epoch, a new order


def test_ranks_get_disjoint_shards_and_evaluation_covers_every_image_once():
    shards = []
    for rank in range(2):
        loader, sampler = make_loader(num_samples=32, rank=rank, world_size=2)
        sampler.set_epoch(0)
        shards.append(torch.cat([labels for _, labels in loader]))
    assert len(shards[0]) == len(shards[1]) == 16
    assert sorted(torch.cat(shards).tolist()) == list(range(32))

    seen = []
    for rank in range(2):
        loader, _ = make_loader(num_samples=13, rank=rank, world_size=2, shuffle=False, drop_last=False)
        seen += torch.cat([labels for _, labels in loader]).tolist()
    assert sorted(seen) == list(range(13))


def child_pids() -> set[int]:
    """This process's live child processes (DataLoader workers are multiprocessing children)."""
    return {child.pid for child in multiprocessing.active_children()}


def test_fast_path_epochs_run_without_worker_processes(tmp_path):
    """--data.num-workers 2 decodes the cache in worker processes; the epochs after it use none: both
    loaders are TensorLoaders, and no child process is alive while their batches are drawn."""
    samples = noise_images(tmp_path, [(20, 24)] * 12)
    splits = Splits(classes=[str(i) for i in range(12)], train=samples[:8], val=samples[8:], test=[])
    data = DataConfig(root=tmp_path, image_size=16, resize_size=19, batch_size=4, num_workers=2)
    preprocessing = preprocessing_spec(
        image_size=16, resize_size=19, mean=MEAN, std=STD, interpolation="bilinear"
    )
    train_sampler, val_sampler = EpochSampler(8, shuffle=True, seed=0), EpochSampler(4, shuffle=False)
    before = child_pids()  # whatever an earlier test left running is not this loader's
    loaders = fastdata.make_tensor_loaders(
        splits,
        train_sampler,
        val_sampler,
        data,
        preprocessing,
        device=torch.device("cpu"),
        channels_last=False,
        workers=2,
        progress=False,
    )
    train_sampler.set_epoch(0)
    for loader in loaders:
        assert type(loader) is TensorLoader
        batches = 0
        for _ in loader:
            assert child_pids() <= before
            batches += 1
        assert batches == len(loader) > 0


@pytest.mark.gpu
def test_cuda_batches_match_cpu_batches():
    cpu, sampler = make_loader()
    sampler.set_epoch(1)
    on_cpu = list(cpu)
    gpu = TensorLoader(
        cpu.images,
        cpu.labels,
        sampler,
        batch_size=8,
        drop_last=True,
        transform=augment(10, color_jitter=0.3),
        device=torch.device("cuda"),
    )
    for (images, labels), (cpu_images, cpu_labels) in zip(gpu, on_cpu, strict=True):
        assert images.device.type == "cuda" and labels.device.type == "cpu"
        assert torch.equal(labels, cpu_labels)  # the random draws come from CPU generators on both
        assert torch.allclose(images.cpu(), cpu_images, atol=1e-4)
