"""The bad-dataset battery: every odd file either works correctly or is named before training starts."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_script
from PIL import Image, ImageOps

from classifier import distributed
from classifier.data import build_splits
from classifier.images import load_image, scan_images
from classifier.unreadable import drop_unreadable


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def with_garbage_pixels(data: bytes, rng: np.random.Generator) -> bytes:
    """PNG `data` with its first IDAT chunk's compressed pixels replaced by random bytes and the chunk's CRC
    made right again: a file intact in structure whose pixel data does not inflate."""
    start = data.index(b"IDAT") - 4  # the chunk's length field
    (length,) = struct.unpack_from(">I", data, start)
    garbage = rng.bytes(length)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    return data[:start] + struct.pack(">I", length) + b"IDAT" + garbage + crc + data[start + 12 + length :]


def halves(left: tuple[int, ...], right: tuple[int, ...]) -> np.ndarray:
    """A 10x10 image array, one colour (of any number of channels) in the left half, another in the right."""
    left_half, right_half = np.full((10, 5, len(left)), left), np.full((10, 5, len(right)), right)
    return np.concatenate([left_half, right_half], axis=1).astype(np.uint8)


# The EXIF-rotated file's stored pixels: 40 wide, 20 high, red left half, blue right half, a green top-left
# corner. Rotated 90 degrees clockwise it shows red on top and green top-right: another rotation or a flip
# would put them elsewhere.
ROTATED_SOURCE = np.zeros((20, 40, 3), np.uint8)
ROTATED_SOURCE[:, :20] = (255, 0, 0)
ROTATED_SOURCE[:, 20:] = (0, 0, 255)
ROTATED_SOURCE[:8, :8] = (0, 255, 0)


def make_battery(root: Path) -> dict[str, Path]:
    """train/ with good-but-odd files in every class, plus the bad files; returns the bad ones by case."""
    rng = np.random.default_rng(0)
    classes = ["2", "10", "zip code", "Ünïcödé 名前"]
    for name in classes:
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"plain {i}.png")
        (root / "val" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "val" / name / "v.png")
    odd = root / "train" / "2"
    Image.fromarray(np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)).save(
        odd / "sixteen-bit.png"
    )
    cmyk = halves((0, 255, 255, 0), (255, 255, 0, 0))  # red | blue
    Image.fromarray(cmyk, mode="CMYK").save(odd / "cmyk.jpg")
    Image.new("RGBA", (10, 10), (255, 0, 0, 128)).save(odd / "rgba.png")
    palette = Image.fromarray(halves((2,), (5,))[:, :, 0], mode="P")
    palette.putpalette([0, 0, 0] * 2 + [250, 40, 10] + [0, 0, 0] * 2 + [10, 120, 250])  # 2: orange, 5: blue
    palette.save(odd / "palette.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(odd / "one-pixel.png")
    Image.new("L", (3000, 2000), 128).save(odd / "huge.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    # Near-lossless, so that pixels can be compared (chroma subsampling would blur the edges).
    Image.fromarray(ROTATED_SOURCE).save(odd / "rotated.jpg", exif=exif, quality=100, subsampling=0)
    (odd / "notes.txt").write_text("not an image, ignored by extension")
    (odd / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    os.symlink(odd, odd / "loop")  # a directory symlink to itself
    (root / "train" / "empty class").mkdir()  # no images at all: must be refused by name

    bad_dir = root / "train" / "10"
    bad = {
        "truncated": bad_dir / "truncated.png",
        # Every chunk and CRC in place, the pixel data garbage. libpng through torchvision.io.decode_png
        # (0.29) kills the process on this file; Pillow, which load_image uses, raises an error.
        "garbage pixels": bad_dir / "garbage pixels.png",
        "zero-byte": bad_dir / "zero.jpg",
        "html": bad_dir / "page.jpg",
    }
    full = png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    bad["truncated"].write_bytes(full[: len(full) // 2])
    bad["garbage pixels"].write_bytes(with_garbage_pixels(full, rng))
    bad["zero-byte"].write_bytes(b"")
    bad["html"].write_text("<html>404 not found</html>")
    return bad


def test_odd_but_valid_images_load_correctly(tmp_path):
    make_battery(tmp_path)
    odd = tmp_path / "train" / "2"
    sixteen = load_image(str(odd / "sixteen-bit.png"))
    assert (
        sixteen.shape == (3, 16, 64) and 0 <= sixteen.min() <= 5 and sixteen.max() >= 250
    )  # rescaled, not clipped to white
    cmyk = load_image(str(odd / "cmyk.jpg"))
    assert cmyk.shape == (3, 10, 10)
    assert np.abs(cmyk.permute(1, 2, 0).int().numpy() - halves((255, 0, 0), (0, 0, 255))).max() <= 8  # JPEG
    assert load_image(str(odd / "rgba.png"))[:, 0, 0].tolist() == [255, 0, 0]
    palette = load_image(str(odd / "palette.png"))
    assert palette.shape == (3, 10, 10)
    assert np.array_equal(palette.permute(1, 2, 0).numpy(), halves((250, 40, 10), (10, 120, 250)))  # PNG
    assert load_image(str(odd / "one-pixel.png")).tolist() == [[[9]], [[9]], [[9]]]
    assert load_image(str(odd / "huge.png")).shape == (3, 2000, 3000)
    rotated = load_image(str(odd / "rotated.jpg"))
    assert rotated.shape == (3, 40, 20)  # EXIF rotation applied: 40x20 -> 20x40
    rotated = rotated.permute(1, 2, 0).numpy()
    with Image.open(odd / "rotated.jpg") as stored:
        assert np.array_equal(rotated, np.asarray(ImageOps.exif_transpose(stored).convert("RGB")))
    assert np.abs(rotated.astype(int) - np.rot90(ROTATED_SOURCE, k=-1)).max() <= 3  # clockwise, by hand
    assert np.abs(rotated[8:16].astype(int) - (255, 0, 0)).max() <= 3  # the left half went on top...
    assert np.abs(rotated[:8, -8:].astype(int) - (0, 255, 0)).max() <= 3  # ...and its corner to the right


def test_layout_problems_are_named(tmp_path):
    make_battery(tmp_path)
    with pytest.raises(ValueError, match="empty class"):
        build_splits(tmp_path, 0.1, seed=0)
    (tmp_path / "train" / "empty class").rmdir()
    splits = build_splits(tmp_path, 0.1, seed=0)
    assert splits.classes == ["2", "10", "zip code", "Ünïcödé 名前"]  # numbers first, numerically
    names = {Path(p).name for p, _ in splits.train}
    assert "notes.txt" not in names and ".DS_Store" not in names
    assert sum(1 for p, _ in splits.train if "loop" in Path(p).parts) == 0  # the symlink loop is not followed


def test_scan_finds_exactly_the_bad_files(tmp_path):
    bad = make_battery(tmp_path)
    (tmp_path / "train" / "empty class").rmdir()
    splits = build_splits(tmp_path, 0.1, seed=0)
    found = scan_images([p for p, _ in splits.train + splits.val], workers=2)
    assert set(found) == {str(p) for p in bad.values()}
    assert "0 bytes" in found[str(bad["zero-byte"])]


def test_training_stops_early_naming_bad_files_or_skips_them(tmp_path, repo_root):
    bad = make_battery(tmp_path / "data")
    (tmp_path / "data" / "train" / "empty class").rmdir()
    args = [
        "train.py",
        "--data.root",
        tmp_path / "data",
        "--out-dir",
        tmp_path / "runs",
        "--epochs",
        "1",
        "--data.image-size",
        "16",
        "--data.resize-size",
        "16",
        "--data.batch-size",
        "4",
        "--data.num-workers",
        "0",
        "--no-progress",
    ]
    proc = run_script([*args, "--name", "strict"], cwd=repo_root)
    assert proc.returncode != 0
    assert f"{len(bad)} unreadable image files" in proc.stderr
    assert all(str(p) in proc.stderr for p in bad.values())
    assert "--data.skip-bad-images" in proc.stderr
    assert not (tmp_path / "runs" / "strict" / "checkpoints" / "last.pt").exists()

    proc = run_script([*args, "--name", "lenient", "--data.skip-bad-images"], cwd=repo_root)
    assert proc.returncode == 0
    report = (tmp_path / "runs" / "lenient" / "bad_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in report) == sorted(str(p) for p in bad.values())
    assert torch.load(tmp_path / "runs" / "lenient" / "checkpoints" / "last.pt", weights_only=True)[
        "classes"
    ][:2] == ["2", "10"]


def make_tiny_split(root: Path, files: dict[str, bytes | None]) -> None:
    """root/<split>/<class>/<n>.png for each "split/class/n" key: a small readable PNG for None, else the
    given (unreadable) bytes."""
    for key, data in files.items():
        path = root / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if data is not None else png_bytes(Image.new("RGB", (4, 4), (200, 10, 10))))


@pytest.mark.parametrize("world_size", [1, 2])
def test_skipping_bad_images_may_not_empty_a_class(tmp_path, monkeypatch, world_size):
    """Every training file of class "zebra" is unreadable: leaving them out would train a class with no
    images, so it is an error naming the class and its files. With two ranks each scans half the files (one
    of zebra's each) and the gather gives every rank both halves' findings."""
    ant = {"train/ant/0": None, "train/ant/1": None, "train/ant/2": None, "val/ant/0": None}
    zebra_files = {"train/zebra/0": b"<html>404</html>", "train/zebra/1": b"", "val/zebra/0": None}
    make_tiny_split(tmp_path, {**ant, **zebra_files})
    zebra = {str(tmp_path / "train" / "zebra" / f"{i}.png") for i in range(2)}
    splits = build_splits(tmp_path, 0.1, seed=0)
    paths = sorted(p for p, _ in splits.train + splits.val)
    if world_size == 2:  # rank 0's view: its share scanned here, rank 1's arriving through the gather
        assert len(zebra & set(paths[0::2])) == 1

        def gathered(part: dict) -> dict:
            return {**part, **scan_images(paths[1::2], workers=1)}

        monkeypatch.setattr(distributed, "merge_dicts", gathered)
    report = tmp_path / "run" / "bad_images.txt"
    with pytest.raises(SystemExit, match="zebra") as err:
        drop_unreadable(
            splits,
            tmp_path,
            skip=True,
            workers=1,
            rank=0,
            world_size=world_size,
            report=report,
            log=print,
        )
    assert all(path in str(err.value) for path in zebra) and str(report) in str(err.value)
    assert {line.split("\t")[0] for line in report.read_text().splitlines()} == zebra  # the report is written


def test_a_class_left_without_val_images_warns(tmp_path):
    """The rule of build_splits: a class without validation images warns (it drops out of balanced
    accuracy and AUROC) and training goes on."""
    readable = {"train/ant/0": None, "train/zebra/0": None, "val/ant/0": None}
    make_tiny_split(tmp_path, {**readable, "val/zebra/0": b"<html>404</html>"})
    splits = build_splits(tmp_path, 0.1, seed=0)
    with pytest.warns(UserWarning, match="no validation images.*zebra"):
        kept = drop_unreadable(
            splits,
            tmp_path,
            skip=True,
            workers=1,
            rank=0,
            world_size=1,
            report=None,
            log=print,
        )
    assert [Path(p).parent.name for p, _ in kept.val] == ["ant"] and len(kept.train) == 2
