"""Auto-augment and random erasing on both data paths, the training-batch picture, and that neither the
options (when off) nor the picture change training."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

import train
from classifier import plots
from classifier.batch_augment import BatchAugment, BatchAutoAugment, random_erase, random_resized_boxes
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli
from classifier.data import ImageDataset, make_loader, peek_batch
from classifier.fastdata import TensorLoader
from classifier.images import load_image
from classifier.sampling import EpochSampler
from classifier.transforms import auto_augment_transform, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# train_transform's required arguments.
REGULAR = dict(
    image_size=24,
    crop_scale=(0.5, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    hflip=True,
    color_jitter=0.2,
    mean=MEAN,
    std=STD,
    interpolation="bilinear",
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int = 0, side: int = 32) -> torch.Tensor:
    """A uint8 RGB image with structure (ramps and a square), so that every op changes it visibly."""
    ramp = torch.linspace(0, 255, side)
    image = torch.stack(
        [ramp.expand(side, side), ramp.view(side, 1).expand(side, side), torch.full((side, side), 60.0)]
    )
    image[:, side // 4 : side // 2, side // 3 : side - 4] = 230
    noise = torch.randint(0, 40, (3, side, side), generator=seeded(seed))
    return (image * 0.8 + noise).clamp(0, 255).byte()


def fast_augment(size=16, **options) -> BatchAugment:
    settings = dict(
        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, color_jitter=0.3, mean=MEAN, std=STD
    )
    return BatchAugment(size, **{**settings, **options})


# --- the regular path (v2 transforms per image) -----------------------------------------------------


def test_train_transform_off_is_the_transform_without_the_options_on_changes_it():
    image = picture()
    plain = train_transform(**REGULAR)
    off = train_transform(
        **REGULAR, auto_augment="none", randaugment_num_ops=5, randaugment_magnitude=20, random_erasing=0.0
    )
    assert [type(t) for t in off.per_image.transforms] == [type(t) for t in plain.per_image.transforms]
    for seed in range(5):
        torch.manual_seed(seed)
        expected = plain(image)
        torch.manual_seed(seed)
        assert torch.equal(off(image), expected)

    # On: the reference recipe's order, and a different image from the same seed.
    on = train_transform(**REGULAR, auto_augment="randaugment", random_erasing=0.5)
    assert [type(t) for t in on.per_image.transforms] == [
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.RandAugment,
        T.ColorJitter,
        T.ToDtype,
        T.Normalize,
        T.RandomErasing,
    ]
    trivial = train_transform(**REGULAR, auto_augment="trivialaugment")
    assert isinstance(trivial.per_image.transforms[2], T.TrivialAugmentWide)
    for transform in (on, trivial, train_transform(**REGULAR, random_erasing=1.0)):
        changed = 0
        for seed in range(5):
            torch.manual_seed(seed)
            expected = plain(image)
            torch.manual_seed(seed)
            changed += not torch.equal(transform(image), expected)
        assert changed >= 4  # TrivialAugment may draw Identity once in a while


def test_regular_random_erasing_erases_a_rectangle_to_zero():
    transform = train_transform(**REGULAR, random_erasing=1.0)
    torch.manual_seed(0)
    out = transform(picture())
    zero = (out == 0).all(dim=0)
    rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
    assert len(rows) > 0
    assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one solid rectangle


def test_bicubic_becomes_bilinear_for_auto_augment_and_bad_magnitude_is_named():
    transform = auto_augment_transform("randaugment", num_ops=2, magnitude=9, interpolation="bicubic")
    assert transform.interpolation == T.InterpolationMode.BILINEAR  # tensor rotate/shear have no bicubic
    torch.manual_seed(0)
    for _ in range(30):
        transform(picture())  # every op works on a uint8 tensor
    with pytest.raises(ValueError, match="randaugment-magnitude"):
        train_transform(**REGULAR, auto_augment="randaugment", randaugment_magnitude=31)


# --- the fast path: per-image auto-augment and erasing on batches -----------------------------------


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_batch_of_one_equals_torchvision_under_the_same_seed(policy):
    """Each image draws what v2 draws for one image, in its order: a batch of one with generator seed s is
    the v2 transform under torch.manual_seed(s). 200 seeds draw every op of the 14."""
    batched = BatchAutoAugment(policy, num_ops=1, magnitude=12, interpolation="bilinear")
    reference = auto_augment_transform(policy, num_ops=1, magnitude=12, interpolation="bilinear")
    image = picture(side=24)
    unchanged = 0
    for seed in range(200):
        torch.manual_seed(seed)
        expected = reference(image)
        got = batched(image.unsqueeze(0), seeded(seed))[0]
        assert torch.equal(got, expected), f"seed {seed}"
        unchanged += torch.equal(got, image)
    assert unchanged < 40  # Identity (and the odd no-op) is 1 in 14, not most draws


def test_batched_ops_land_on_their_own_images():
    """Grouping by op and putting the results back: row i of the batch is image i transformed by its own
    draws. Reproduces the documented draw order (op, sign per image) for RandAugment with one op."""
    images = torch.stack([picture(seed, side=20) for seed in range(48)])
    batched = BatchAutoAugment("randaugment", num_ops=1, magnitude=9, interpolation="bilinear")
    out = batched(images, seeded(3))
    generator = seeded(3)
    ops = torch.randint(14, (48,), generator=generator)
    negative = torch.rand(48, generator=generator) <= 0.5
    transform = batched.transform
    for i in range(48):
        name, (magnitudes_fn, signed) = batched.space[int(ops[i])]
        magnitudes = magnitudes_fn(31, 20, 20)
        magnitude = (
            0.0 if magnitudes is None else float(magnitudes[9]) * (-1.0 if signed and negative[i] else 1.0)
        )
        expected = transform._apply_image_or_video_transform(
            images[i], name, magnitude, interpolation=transform.interpolation, fill=transform._fill
        )
        assert torch.equal(out[i], expected), f"image {i} ({name})"


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_fast_auto_augment_is_per_image_and_a_function_of_the_seed(policy):
    # 64 copies of one image, full crops, no flip, no jitter: only auto-augment can tell them apart.
    images = picture(side=16).expand(64, -1, -1, -1).contiguous()
    options = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, color_jitter=0.0)
    plain = fast_augment(**options)(images, seeded(0))
    assert torch.equal(plain, plain[:1].expand_as(plain))
    transform = fast_augment(**options, auto_augment=policy)
    rng = torch.get_rng_state()
    out = transform(images, seeded(0))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither used nor consumed
    distinct = len({row.numpy().tobytes() for row in out})
    assert distinct >= 20, f"{distinct} different images out of 64 copies: the ops are not per image"
    torch.manual_seed(123)
    assert torch.equal(transform(images, seeded(0)), out)
    assert not torch.equal(transform(images, seeded(1)), out)


def test_fast_options_off_change_nothing_on_change_only_what_they_should():
    images = torch.randint(0, 256, (32, 3, 20, 20), dtype=torch.uint8, generator=seeded(1))
    plain, generator = fast_augment(), seeded(7)
    expected = plain(images, generator)
    off, off_generator = (
        fast_augment(auto_augment="none", randaugment_num_ops=4, random_erasing=0.0),
        seeded(7),
    )
    assert torch.equal(off(images, off_generator), expected)
    assert torch.equal(off_generator.get_state(), generator.get_state())
    # ...and both drew exactly the crop, flip and jitter draws (boxes, flips, jitter factors), nothing more.
    replay = seeded(7)
    random_resized_boxes(32, 20, 20, (0.08, 1.0), (3 / 4, 4 / 3), replay)
    torch.rand(32, generator=replay)
    torch.empty(32, 3).uniform_(0.7, 1.3, generator=replay)
    assert torch.equal(replay.get_state(), generator.get_state())  # not one extra draw

    # Erasing draws after everything else: the images it leaves alone are exactly the plain ones, the
    # others differ only inside one rectangle, set to 0.
    erased = fast_augment(random_erasing=0.5)(images, seeded(7))
    touched = (erased != expected).flatten(1).any(dim=1)
    assert 0 < int(touched.sum()) < 32
    assert torch.equal(erased[~touched], expected[~touched])
    assert (erased[touched][erased[touched] != expected[touched]] == 0).all()

    # Auto-augment draws after the crops, flips and jitter: the generator then stands where the plain
    # transform left it plus exactly the auto-augment's own draws on the crops.
    generator = seeded(7)
    on = fast_augment(auto_augment="randaugment")(images, generator)
    replay = seeded(7)
    plain(images, replay)
    BatchAutoAugment("randaugment", num_ops=2, magnitude=9, interpolation="bilinear")(
        torch.zeros(32, 3, 16, 16, dtype=torch.uint8), replay
    )
    assert torch.equal(generator.get_state(), replay.get_state())
    assert on.shape == expected.shape and (on != expected).flatten(1).any(dim=1).float().mean() > 0.8


def test_random_erase_erases_the_requested_fraction_of_images():
    x = torch.ones(4000, 3, 32, 32)
    out = random_erase(x, 0.3, seeded(0))
    zero = (out == 0).all(dim=1)  # (N, H, W): erased pixels
    erased = zero.flatten(1).any(dim=1)
    assert abs(erased.float().mean().item() - 0.3) < 0.03
    area = zero[erased].flatten(1).float().mean(dim=1)
    # v2.RandomErasing's scale (0.02, 0.33), rounded to whole pixels.
    assert area.min() >= 0.015 and area.max() <= 0.36
    assert 0.13 < area.mean().item() < 0.2
    assert torch.equal(random_erase(x, 0.3, seeded(0)), out) and torch.equal(
        random_erase(x, 0.0, seeded(0)), x
    )


# --- the training-batch picture ---------------------------------------------------------------------


def noise_folder(folder, n=24) -> list[tuple[str, int]]:
    samples = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(picture(i, side=20).permute(1, 2, 0).numpy()).save(path)
        samples.append((str(path), i % 3))
    return samples


def test_peek_batch_is_the_first_batch_and_draws_from_no_rng(tmp_path):
    samples = noise_folder(tmp_path)
    transform = train_transform(**REGULAR, auto_augment="randaugment", random_erasing=0.5)
    sampler = EpochSampler(len(samples), shuffle=True, seed=4)
    loader = make_loader(
        ImageDataset(samples, transform),
        sampler,
        batch_size=8,
        num_workers=0,
        drop_last=True,
        pin_memory=False,
    )
    images = torch.stack([load_image(path) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    fast = TensorLoader(
        images,
        labels,
        sampler,
        batch_size=8,
        drop_last=True,
        device=torch.device("cpu"),
        transform=fast_augment(24, auto_augment="trivialaugment", random_erasing=0.5),
    )
    for peeked_loader in (loader, fast):
        states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        loader_state = loader.generator.get_state()
        peeked = peek_batch(peeked_loader, 5)
        assert torch.equal(torch.get_rng_state(), states[0]) and (np.random.get_state()[1] == states[1]).all()
        assert random.getstate() == states[2] and torch.equal(loader.generator.get_state(), loader_state)
        first_images, first_labels = next(iter(peeked_loader))
        assert torch.equal(peeked[0], first_images[:5]) and torch.equal(peeked[1], first_labels[:5])


def test_train_batch_figure_titles_hard_and_soft_targets(tmp_path):
    classes = ["Coat", "Shirt", "a_very_long_class_name_indeed"]
    images = torch.zeros(70, 3, 12, 12)
    images[:, 0] = 2.0  # normalized red: (2 * 0.25 + 0.5) = 1.0 after undoing mean 0.5, std 0.25
    labels = torch.arange(70) % 3
    fig = plots.train_batch_figure(images, labels, classes, (0.5,) * 3, (0.25,) * 3)
    (ax,) = fig.axes
    assert len(ax.images) == 64  # at most 64 tiles
    assert np.allclose(ax.images[0].get_array()[..., 0], 1.0) and np.allclose(
        ax.images[0].get_array()[..., 1], 0.5
    )
    titles = [t.get_text() for t in ax.texts[:-1] if t.get_text()]
    assert titles[:3] == ["Coat", "Shirt", "a_very_long_cla…"]

    soft = torch.tensor([[0.6, 0.0, 0.4], [0.0, 1.0, 0.0], [0.05, 0.75, 0.2]])
    texts = [plots.target_text(t, classes) for t in soft]
    assert texts == ["0.6 Coat\n0.4 a_very_long_c…", "Shirt", "0.75 Shirt\n0.2 a_very_long_c…"]
    soft_figure = plots.train_batch_figure(images[:3], soft, classes, (0.5,) * 3, (0.25,) * 3)
    (soft_ax,) = soft_figure.axes
    heading = "One augmented training batch, as the model sees it (3 images, 12x12 px)"
    assert [t.get_text() for t in soft_ax.texts] == [*texts, heading]
    plots.save_figure(soft_figure, tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as png:  # three tiles in a row: wider than high
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100


def test_training_writes_the_batch_picture_and_it_changes_nothing(fmnist_small_root, tmp_path, monkeypatch):
    """Regular path, 2 workers, RandAugment and erasing, a model with dropout: weights with the picture
    equal weights without it (peek_batch replaced by a constant batch), bit for bit; resume draws none."""
    from PIL import Image as PILImage

    common = [
        "--model",
        "mobilenet_v3_small",
        "--data.root",
        str(fmnist_small_root),
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "2",
        "--data.max-train-batches",
        "3",
        "--data.image-size",
        "32",
        "--data.resize-size",
        "32",
        "--no-progress",
        "--data.auto-augment",
        "randaugment",
        "--data.random-erasing",
        "0.25",
        "--ema-half-life-epochs",
        "None",
        "--data.no-scan-images",
    ]
    train.main(parse_cli([*common, "--name", "with"]))
    with PILImage.open(tmp_path / "with" / "plots" / "train_batch.png") as png:
        assert png.format == "PNG" and png.size[0] > 600  # 8 columns of tiles
        assert np.asarray(png.convert("L")).std() > 20  # not blank

    monkeypatch.setattr(
        train.data,
        "peek_batch",
        lambda loader, count: (torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)),
    )
    train.main(parse_cli([*common, "--name", "without"]))
    a, b = load_checkpoint(tmp_path / "with"), load_checkpoint(tmp_path / "without")
    assert a["step"] == b["step"] == 3
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, different[:5]

    def never(loader, count):
        raise AssertionError("a resumed run drew the picture's batch again")

    monkeypatch.setattr(train.data, "peek_batch", never)
    train.main(parse_cli(["--resume", str(tmp_path / "with"), "--epochs", "2", "--accept-config-changes"]))


def test_fast_path_run_with_trivialaugment_writes_the_picture(fmnist_small_root, tmp_path, monkeypatch):
    """The picture shows the fast loader's augmented batch: random erasing (p 0.5) left exact zeros, the
    mean colour after Normalize, in some of its images and not in others. No plain image holds an exact 0:
    (x / 255 - mean) / std is 0 only for x = 255 * mean, which no uint8 value is for ImageNet's means."""
    drawn = []
    real_figure = plots.train_batch_figure

    def recording(images, targets, *args, **kwargs):
        drawn.append(images)
        return real_figure(images, targets, *args, **kwargs)

    monkeypatch.setattr(plots, "train_batch_figure", recording)
    result = train.main(
        parse_cli(
            [
                "--data.root",
                str(fmnist_small_root),
                "--out-dir",
                str(tmp_path),
                "--name",
                "fast",
                "--data.fast-path",
                "--data.auto-augment",
                "trivialaugment",
                "--data.random-erasing",
                "0.5",
                "--epochs",
                "1",
                "--data.batch-size",
                "16",
                "--data.max-train-batches",
                "2",
                "--data.num-workers",
                "0",
                "--data.image-size",
                "32",
                "--data.resize-size",
                "32",
                "--no-progress",
                "--ema-half-life-epochs",
                "None",
                "--data.no-scan-images",
            ]
        )
    )
    assert result["step"] == 2 and (tmp_path / "fast" / "plots" / "train_batch.png").stat().st_size > 10_000
    (images,) = drawn
    assert images.shape == (16, 3, 32, 32)
    erased = (images == 0).all(dim=1).flatten(1).any(dim=1)
    assert 0 < int(erased.sum()) < 16


@pytest.mark.gpu
def test_cuda_auto_augment_matches_cpu():
    """The draws come from the CPU generator on both devices; the ops then run on the GPU. Resampling
    (rotate/shear/translate) may round a pixel differently there, so compare all but a few pixels."""
    images = torch.stack([picture(seed, side=20) for seed in range(64)])
    transform = fast_augment(auto_augment="randaugment", random_erasing=0.5)
    on_cpu = transform(images, seeded(2))
    on_gpu = transform.to("cuda")(images.cuda(), seeded(2))
    assert on_gpu.device.type == "cuda"
    close = (on_gpu.cpu() - on_cpu).abs() < 0.05
    assert close.float().mean() > 0.99
