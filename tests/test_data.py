"""Data: class mapping, splits, transforms, the sampler, weights and the fingerprint."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from classifier.data import (
    ImageDataset,
    build_splits,
    class_counts,
    class_sort_key,
    fingerprint,
    make_loader,
    peek_batch,
)
from classifier.images import load_image
from classifier.imbalance import inverse_frequency_weights
from classifier.sampling import EpochSampler
from classifier.transforms import eval_transform, preprocessing_spec, train_transform


def make_folder(root: Path, layout: dict[str, dict[str, int]], size=(20, 16), mode="RGB") -> Path:
    """root/<split>/<class>/<i>.png with `n` small images per class; pixel values encode (class, i)."""
    for split, classes in layout.items():
        for c, (name, n) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new(
                    mode, size, color=(c * 20 % 256, i % 256, 7)[: len(mode)] if mode != "L" else c * 20
                ).save(folder / f"{i}.png")
    return root


def test_numeric_class_names_sort_as_numbers():
    names = ["10", "2", "b", "1", "A", "02"]
    assert sorted(names, key=class_sort_key) == ["1", "02", "2", "10", "A", "b"]


def test_val_folder_is_used_and_mapping_shared(tmp_path):
    root = make_folder(tmp_path, {"train": {"10": 3, "2": 4, "7": 2}, "val": {"2": 1, "10": 2, "7": 1}})
    splits = build_splits(root, 0.5, seed=0)
    assert splits.classes == ["2", "7", "10"]
    assert class_counts(splits.train, 3).tolist() == [4, 2, 3]
    assert class_counts(splits.val, 3).tolist() == [1, 1, 2]
    # labels follow the shared mapping, not each split's own folder order
    assert all(Path(p).parent.name == splits.classes[label] for p, label in splits.train + splits.val)


def test_stratified_split_without_val_folder(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 20, "b": 10, "c": 2}})
    splits = build_splits(root, 0.2, seed=3)
    assert class_counts(splits.val, 3).tolist() == [4, 2, 1]
    assert class_counts(splits.train, 3).tolist() == [16, 8, 1]
    assert not set(splits.train) & set(splits.val)
    assert build_splits(root, 0.2, seed=3).val == splits.val  # seeded
    assert build_splits(root, 0.2, seed=4).val != splits.val


def test_unknown_class_in_val_names_the_folder(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(ValueError, match="zebra") as err:
        build_splits(root, 0.1, seed=0)
    assert str(root / "val") in str(err.value)


def test_class_without_val_images_warns(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1}})
    with pytest.warns(UserWarning, match="b"):
        build_splits(root, 0.1, seed=0)


def test_bad_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_splits(tmp_path / "nowhere", 0.1, seed=0)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        build_splits(tmp_path / "empty", 0.1, seed=0)
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "a" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no image files"):
        build_splits(tmp_path / "noimg", 0.1, seed=0)


def test_expected_classes_are_enforced(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    with pytest.raises(ValueError, match="missing from the data: \\['c'\\]"):
        build_splits(root, 0.5, seed=0, classes=["a", "b", "c"])


@pytest.mark.parametrize(
    "mode, left, right, rgb_left, rgb_right",
    [
        ("L", 30, 200, (30, 30, 30), (200, 200, 200)),
        ("RGBA", (255, 0, 0, 255), (0, 0, 255, 60), (255, 0, 0), (0, 0, 255)),  # alpha dropped, not blended
        ("P", 0, 1, (250, 40, 10), (10, 120, 250)),  # indices into the palette below
        ("CMYK", (0, 255, 255, 0), (255, 255, 0, 0), (255, 0, 0), (0, 0, 255)),
    ],
)
def test_any_color_mode_becomes_rgb(tmp_path, mode, left, right, rgb_left, rgb_right):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    picture = Image.new(mode, (9, 5), left)
    picture.paste(right, (5, 0, 9, 5))  # columns 5-8
    if mode == "P":
        picture.putpalette([250, 40, 10, 10, 120, 250])
    picture.save(path)
    image = load_image(str(path))
    assert image.shape == (3, 5, 9) and image.dtype == torch.uint8
    tolerance = 8 if mode == "CMYK" else 0  # JPEG is lossy; PNG is exact
    for columns, rgb in ((image[:, :, :5], rgb_left), (image[:, :, 5:], rgb_right)):
        assert (columns.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max() <= tolerance, (mode, rgb)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(RuntimeError, match="broken.png"):
        load_image(str(bad))


def test_transforms_give_normalized_crops(tmp_path):
    Image.new("RGB", (40, 30), color=(255, 0, 128)).save(tmp_path / "x.png")
    image = load_image(str(tmp_path / "x.png"))
    spec = preprocessing_spec(
        image_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
    )
    out = eval_transform(spec)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert torch.allclose(out[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-3)
    aug = train_transform(
        image_size=16,
        crop_scale=(0.5, 1.0),
        crop_ratio=(0.75, 1.33),
        hflip=True,
        color_jitter=0.2,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        interpolation="bilinear",
    )
    assert aug(image).shape == (3, 16, 16)


def test_augmentation_depends_on_the_sample_seed_only(tmp_path):
    make_folder(tmp_path, {"train": {"a": 1}}, size=(32, 32))
    aug = train_transform(
        image_size=16,
        crop_scale=(0.1, 1.0),
        crop_ratio=(0.5, 2.0),
        hflip=True,
        color_jitter=0.4,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        interpolation="bilinear",
    )
    dataset = ImageDataset([(str(tmp_path / "train" / "a" / "0.png"), 0)], aug)
    torch.manual_seed(1)
    first, _ = dataset[(0, 1234)]
    torch.manual_seed(99)  # a different global RNG must not change the result...
    again, _ = dataset[(0, 1234)]
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(99).get_state())  # ...nor be consumed
    assert not torch.equal(first, dataset[(0, 1235)][0])


def test_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(50, shuffle=True, seed=5)
    sampler.set_epoch(0)
    a = list(sampler)
    b = list(sampler)
    sampler.set_epoch(1)
    c = list(sampler)
    assert a == b and a != c
    assert sorted(i for i, _ in a) == list(range(50))  # a permutation
    assert len({s for _, s in a}) == 50  # distinct per-sample seeds
    sampler.set_epoch(0, start=20)
    assert list(sampler) == a[20:] and len(sampler) == 30


def test_distributed_shards_are_disjoint_and_cover_the_draw():
    shards = []
    for rank in range(3):
        s = EpochSampler(10, shuffle=True, seed=1, rank=rank, world_size=3)
        s.set_epoch(2)
        shards.append(list(s))
    assert [len(s) for s in shards] == [4, 4, 4]  # padded so every rank steps equally often
    single = EpochSampler(10, shuffle=True, seed=1)
    single.set_epoch(2)
    indices, seeds = single.draw()
    merged = [None] * 12
    for rank, shard in enumerate(shards):
        merged[rank::3] = shard
    assert [i for i, _ in merged][:10] == indices[:10].tolist()
    assert len({s for _, s in merged}) == 12  # no two ranks share a key
    # evaluation never pads: every index exactly once over all ranks
    evals = [list(EpochSampler(10, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(evals, [])) == list(range(10))


def test_weighted_draw_balances_classes_and_shards_are_disjoint():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    counts = torch.bincount(labels)
    weights = (1.0 / counts.double())[labels]
    per_rank = []
    for rank in range(2):
        s = EpochSampler(len(labels), shuffle=True, seed=0, weights=weights, rank=rank, world_size=2)
        s.set_epoch(0)
        per_rank.append([(i, seed) for i, seed in s])
    keys = per_rank[0] + per_rank[1]
    assert len({seed for _, seed in keys}) == len(keys)  # disjoint positions of one global draw
    drawn = torch.bincount(labels[[i for i, _ in keys]], minlength=3).float() / len(keys)
    assert torch.allclose(drawn, torch.full((3,), 1 / 3), atol=0.05)  # vs natural 0.90/0.09/0.01


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(torch.tensor([30, 10, 0]))
    assert torch.allclose(w, torch.tensor([40 / 90, 40 / 30, 0.0]))
    assert torch.allclose(inverse_frequency_weights(torch.tensor([5, 5])), torch.ones(2))


def test_fingerprint_sees_a_changed_file_list(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    before = fingerprint(build_splits(root, 0.1, seed=0))
    assert before["counts"]["train"] == [3, 3]
    (root / "train" / "a" / "0.png").rename(root / "train" / "a" / "9.png")
    after = fingerprint(build_splits(root, 0.1, seed=0))
    assert after["files_sha256"] != before["files_sha256"] and after["counts"] == before["counts"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_splits(root, 0.1, seed=0)  # a complete dataset raises no warning


@pytest.mark.parametrize("auto_augment", ["none", "randaugment", "trivialaugment"])
def test_cpu_only_seeding_gives_the_pixels_of_torch_manual_seed(auto_augment, tmp_path):
    """ImageDataset seeds only torch's CPU generator (torch.manual_seed also queues a seed for every CUDA
    device, 0.2 ms a call). Every augmentation must come out bit-identical to seeding with
    torch.manual_seed, over many seeds."""
    # A textured image, so every crop, flip and colour op changes pixels.
    pixels = torch.randint(0, 256, (40, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "textured.png"
    Image.fromarray(pixels.numpy()).save(path)
    aug = train_transform(
        image_size=16,
        crop_scale=(0.1, 1.0),
        crop_ratio=(0.5, 2.0),
        hflip=True,
        color_jitter=0.4,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        interpolation="bilinear",
        auto_augment=auto_augment,
        random_erasing=0.5,
    )
    dataset = ImageDataset([(str(path), 0)], aug)
    image = load_image(str(path))
    for seed in random.Random(0).sample(range(2**31), 60):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = aug(image)
        assert torch.equal(dataset[(0, seed)][0], expected), seed


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_is_bit_for_bit_its_images_through_the_whole_transform(num_workers, tmp_path):
    """ImageDataset yields a Pipeline's uint8 per-image output and its collate runs ToDtype and Normalize on
    the stacked batch. Every batch, in workers or not, must equal its images passed one by one through
    the whole transform (training: under the same per-image seeds), exactly; peek_batch too."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i, (width, height) in enumerate([(30, 20), (17, 41), (24, 24), (40, 31), (21, 22), (33, 18)]):
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"{i}.png")
        samples.append((str(tmp_path / f"{i}.png"), i % 2))
    images = [load_image(path) for path, _ in samples]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = preprocessing_spec(image_size=16, resize_size=19, mean=mean, std=std, interpolation="bilinear")
    augment = train_transform(
        image_size=16,
        crop_scale=(0.2, 1.0),
        crop_ratio=(0.5, 2.0),
        hflip=True,
        color_jitter=0.3,
        mean=mean,
        std=std,
        interpolation="bilinear",
    )
    for transform, shuffle in ((eval_transform(spec), False), (augment, True)):
        dataset = ImageDataset(samples, transform)
        assert dataset[(0, 5) if shuffle else 0][0].dtype == torch.uint8  # the per-image stage alone
        sampler = EpochSampler(len(samples), shuffle=shuffle, seed=3)
        loader = make_loader(
            dataset, sampler, batch_size=4, num_workers=num_workers, drop_last=False, pin_memory=False
        )
        expected = []
        for key in sampler:
            index, seed = key if shuffle else (key, None)
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.default_generator.manual_seed(seed)
                expected.append(transform(images[index]))
        batches = list(loader)
        assert [len(labels) for _, labels in batches] == [4, 2]
        got = torch.cat([batch for batch, _ in batches])
        assert got.dtype == torch.float32 and got.shape == (6, 3, 16, 16)
        assert torch.equal(got, torch.stack(expected))
        assert torch.equal(peek_batch(loader, 3)[0], got[:3])
        assert got.mean().abs() < 1.0  # normalized: the uint8 range would put it near 127
