"""classifier/fashion_mnist.py: the IDX reader, prepare() on fake and real files, the search order with its
apt-get fallback (faked: apt and sudo never really run here), and the CLI."""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_script
from PIL import Image

from classifier import fashion_mnist
from classifier.fashion_mnist import CLASSES, FILES, prepare, read_idx

needs_debian = pytest.mark.skipif(
    not (fashion_mnist.DEBIAN_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason=f"Debian's Fashion-MNIST is absent; {fashion_mnist.HOW_TO_GET}",
)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """The IDX format by hand (not via the module under test): magic 0x0008|ndim, big-endian sizes, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fake_idx_files(folder: Path) -> Path:
    """Four small IDX files shaped like Fashion-MNIST: 4 train and 2 test images per class, random pixels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, per_class in (("train", 4), ("test", 2)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images_name, labels_name = FILES[split]
        write_idx(folder / f"{images_name}.gz", images)  # one gzipped, one plain: both must be read
        write_idx(folder / labels_name, labels)
    return folder


@pytest.fixture
def fake_source(tmp_path: Path) -> Path:
    return write_fake_idx_files(tmp_path / "idx")


def fake_arrays(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    return read_idx(folder / f"{images_name}.gz"), read_idx(folder / labels_name)


def check_split(split_dir: Path, images: np.ndarray, labels: np.ndarray, per_class: int) -> None:
    """Each class folder holds the first `per_class` images of that class, pixel for pixel."""
    assert sorted(p.name for p in split_dir.iterdir()) == sorted(CLASSES)
    for label, name in enumerate(CLASSES):
        files = sorted((split_dir / name).iterdir())
        expected = np.flatnonzero(labels == label)[:per_class]
        assert [int(f.stem) for f in files] == expected.tolist()
        for f in files:
            with Image.open(f) as image:
                assert image.mode == "L" and image.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(image), images[int(f.stem)])


# --- the IDX reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    shape = (5,) if "idx1" in name else (3, 4, 2)
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) * 7
    result = read_idx(write_idx(tmp_path / name, array))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize(
    "content",
    [
        b"",  # empty
        b"\x00\x00\x0d\x01\x00\x00\x00\x04\x00\x00\x00\x00",  # float32 type code, not uint8
        b"\x50\x4b\x08\x01\x00\x00\x00\x01\x07",  # not starting with two zero bytes (a zip, say)
        b"\x00\x00\x08\x03\x00\x00\x00\x02",  # header cut short
        b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02",  # says 5 values, holds 2
        b"\x1f\x8b\x08\x00garbage",  # gzip magic, broken stream
    ],
)
def test_read_idx_rejects_malformed_file_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken-idx1-ubyte"):
        read_idx(path)


# --- prepare on fake files ------------------------------------------------------------------------------


def test_prepare_from_source_writes_first_images_per_class(tmp_path: Path, fake_source: Path) -> None:
    out = prepare(tmp_path / "out", source=fake_source, per_class=3)
    check_split(out / "train", *fake_arrays(fake_source, "train"), per_class=3)
    check_split(out / "test", *fake_arrays(fake_source, "test"), per_class=2)  # None: all of them
    record = json.loads((out / ".prepared.json").read_text())
    assert record["counts"] == {"train": 30, "test": 20}
    assert record["per_class"] == 3 and record["test_per_class"] is None
    assert sorted(p.name for p in out.iterdir()) == [".prepared.json", "test", "train"]  # no .partial-* left


def test_prepare_skips_when_done_and_refuses_other_sizes(tmp_path: Path, fake_source: Path, capsys) -> None:
    out = prepare(tmp_path / "out", source=fake_source, per_class=2, test_per_class=1)
    first_png = next((out / "train" / "Bag").iterdir())
    stamp = first_png.stat().st_mtime_ns
    capsys.readouterr()
    prepare(out, source=fake_source, per_class=2, test_per_class=1)
    assert "skipping" in capsys.readouterr().out
    assert first_png.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="was prepared with"):
        prepare(out, source=fake_source, per_class=3, test_per_class=1)


def test_prepare_refuses_folder_without_marker(tmp_path: Path, fake_source: Path) -> None:
    (tmp_path / "out" / "train" / "cat").mkdir(parents=True)  # someone else's ImageFolder
    with pytest.raises(SystemExit, match="prepared.json"):
        prepare(tmp_path / "out", source=fake_source)
    assert (tmp_path / "out" / "train" / "cat").is_dir()


def test_named_source_without_files_is_an_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))  # empty folder
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        prepare(tmp_path / "out")


def test_no_source_and_failed_download_explains_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "missing")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setattr(fashion_mnist.shutil, "which", lambda name: None)  # no apt-get: never really run it
    with pytest.raises(SystemExit, match="FASHION_MNIST_DIR") as info:
        prepare(tmp_path / "out")
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert not (tmp_path / "out" / "train").exists()
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_cli_prepares_then_skips(tmp_path: Path, fake_source: Path) -> None:
    args = ["-m", "classifier.fashion_mnist", "data", "--source", fake_source, "--per-class", "1"]
    first = run_script([*args, "--test-per-class", "1"], cwd=tmp_path, timeout=120)
    assert first.returncode == 0
    assert "wrote 10 train and 10 test images" in first.stdout
    assert len(list((tmp_path / "data" / "train").glob("*/*.png"))) == 10
    again = run_script([*args, "--test-per-class", "1"], cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "skipping" in again.stdout
    missing = run_script(["-m", "classifier.fashion_mnist", "x", "--source", tmp_path], cwd=tmp_path)
    assert missing.returncode != 0 and "FASHION_MNIST_DIR" in missing.stderr


# --- the search order and the apt-get fallback (faked) -----------------------------------------------

APT_GET = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
UPDATE = [*APT_GET, "update"]
INSTALL = [*APT_GET, "install", "-y", "--no-install-recommends", "dataset-fashion-mnist"]
SUDO = ["sudo", "-n"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    """No FASHION_MNIST_DIR, no Debian files (DEBIAN_DIR: a missing folder, returned), a failing download."""

    def failing_download(folder: Path) -> Path:
        raise RuntimeError("no network")

    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "download", failing_download)
    return tmp_path / "debian"


class FakeSystem:
    """Stands in for shutil.which, os.geteuid and run_command; records each command instead of running it.

    A successful fake `apt-get install` writes small IDX files into `debian_dir`, as the package would.
    """

    def __init__(self, debian_dir: Path, root: bool, programs=("apt-get", "sudo"), sudo_works=True):
        self.debian_dir, self.root, self.programs, self.sudo_works = debian_dir, root, programs, sudo_works
        self.failures: dict[str, tuple[int, str]] = {}  # "update" or "install" -> (exit status, output)
        self.commands: list[list[str]] = []

    def install(self, monkeypatch) -> FakeSystem:
        monkeypatch.setattr(fashion_mnist.shutil, "which", self.which)
        monkeypatch.setattr(fashion_mnist.os, "geteuid", lambda: 0 if self.root else 1000)
        monkeypatch.setattr(fashion_mnist, "run_command", self.run_command)
        return self

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.programs else None

    def run_command(self, command: list[str], echo: bool = True) -> tuple[int, str]:
        self.commands.append(command)
        if command == [*SUDO, "true"]:
            return (0, "") if self.sudo_works else (1, "sudo: a password is required\n")
        step = command[command.index("apt-get") + 1]
        if step in self.failures:
            return self.failures[step]
        if step == "install":
            write_fake_idx_files(self.debian_dir)
        return 0, f"ran apt-get {step}\n"


def test_order_named_folder_then_debian_then_download_then_apt(tmp_path: Path, fake_source, monkeypatch):
    other = write_fake_idx_files(tmp_path / "other")
    fake = FakeSystem(tmp_path / "debian", root=True).install(monkeypatch)
    downloads = []
    monkeypatch.setattr(fashion_mnist, "download", lambda folder: downloads.append(folder) or other)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", other)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_source))
    assert fashion_mnist.find_source(None, tmp_path / "dl") == fake_source  # FASHION_MNIST_DIR first
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert fashion_mnist.find_source(None, tmp_path / "dl") == other  # then Debian's files
    assert downloads == []
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "missing")
    assert fashion_mnist.find_source(None, tmp_path / "dl") == other  # then the download
    assert downloads == [tmp_path / "dl"]
    assert fake.commands == []  # apt only when all of those fail


def test_as_root_installs_with_apt_get_then_reads_its_files(tmp_path, offline: Path, monkeypatch, capsys):
    fake = FakeSystem(offline, root=True).install(monkeypatch)
    out = prepare(tmp_path / "out")
    assert fake.commands == [UPDATE, INSTALL]
    printed = capsys.readouterr().out
    assert "download failed (no network)" in printed
    assert "installing Debian's dataset-fashion-mnist with apt-get (root)" in printed
    assert json.loads((out / ".prepared.json").read_text())["source"] == str(offline)
    check_split(out / "train", *fake_arrays(offline, "train"), per_class=4)
    check_split(out / "test", *fake_arrays(offline, "test"), per_class=2)


def test_not_root_with_passwordless_sudo_prefixes_sudo_n(tmp_path: Path, offline: Path, monkeypatch, capsys):
    fake = FakeSystem(offline, root=False).install(monkeypatch)
    out = prepare(tmp_path / "out", per_class=1, test_per_class=1)
    assert fake.commands == [[*SUDO, "true"], [*SUDO, *UPDATE], [*SUDO, *INSTALL]]
    assert "with apt-get (sudo -n)" in capsys.readouterr().out
    assert json.loads((out / ".prepared.json").read_text())["counts"] == {"train": 10, "test": 10}


@pytest.mark.parametrize(
    "programs, sudo_works, why, commands",
    [
        (("sudo",), True, "apt-get is not on PATH", []),
        (("apt-get",), True, "not root and sudo is not installed", []),
        (("apt-get", "sudo"), False, "sudo: a password is required", [[*SUDO, "true"]]),
    ],
    ids=["no-apt-get", "no-sudo", "sudo-needs-password"],
)
def test_without_root_rights_stops_naming_what_was_tried(
    tmp_path: Path, offline: Path, monkeypatch, programs, sudo_works, why, commands
):
    fake = FakeSystem(offline, root=False, programs=programs, sudo_works=sudo_works).install(monkeypatch)
    with pytest.raises(SystemExit) as info:
        prepare(tmp_path / "out")
    message = str(info.value)
    for tried in ("FASHION_MNIST_DIR", str(offline), "download failed (no network)", why, "apt-get install"):
        assert tried in message
    assert fake.commands == commands  # apt-get itself never ran
    assert not (tmp_path / "out" / "train").exists()


@pytest.mark.parametrize("failing", [UPDATE, INSTALL], ids=["update", "install"])
def test_failing_apt_get_stops_with_its_last_lines(tmp_path: Path, offline: Path, monkeypatch, failing):
    step = failing[3]
    fake = FakeSystem(offline, root=True).install(monkeypatch)
    output = "".join(f"line {n}\n" for n in range(20)) + "E: Unable to locate package dataset-fashion-mnist\n"
    fake.failures[step] = (100, output)
    with pytest.raises(SystemExit) as info:
        prepare(tmp_path / "out")
    message = str(info.value)
    assert f"`{' '.join(failing[2:])}` exited with 100" in message  # `apt-get update` or the whole install
    assert "line 19\nE: Unable to locate package dataset-fashion-mnist" in message
    assert "line 11\n" in message and "line 10\n" not in message  # the last 10 lines, not all of them
    assert "download failed (no network)" in message
    # No install after a failed update.
    assert fake.commands == ([UPDATE] if step == "update" else [UPDATE, INSTALL])
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_installed_package_without_files_is_an_error(tmp_path: Path, offline: Path, monkeypatch):
    fake = FakeSystem(offline, root=True).install(monkeypatch)
    fake.failures["install"] = (0, "dataset-fashion-mnist is already the newest version\n")  # yet no files
    with pytest.raises(SystemExit, match="installed but .* lacks the files"):
        prepare(tmp_path / "out")


def test_run_command_returns_status_and_output_echoing_it_if_asked(capsys) -> None:
    script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)"
    status, output = fashion_mnist.run_command([sys.executable, "-c", script])
    assert status == 3 and "to stdout" in output and "to stderr" in output
    assert "to stdout" in capsys.readouterr().out
    assert fashion_mnist.run_command([sys.executable, "-c", "print('quiet')"], echo=False) == (0, "quiet\n")
    assert capsys.readouterr().out == ""


# --- the real data ----------------------------------------------------------------------------------


@needs_debian
def test_prepare_real_fashion_mnist(tmp_path: Path) -> None:
    out = prepare(tmp_path / "fm", per_class=5, test_per_class=3)
    source = fashion_mnist.DEBIAN_DIR
    train = [read_idx(source / f"{name}.gz") for name in FILES["train"]]
    assert train[0].shape == (60000, 28, 28) and train[1].shape == (60000,)
    check_split(out / "train", *train, per_class=5)
    check_split(out / "test", *[read_idx(source / f"{name}.gz") for name in FILES["test"]], per_class=3)
    # The first training image is an ankle boot (label 9), as in every Fashion-MNIST loader.
    assert (out / "train" / "Ankle_boot" / "00000.png").is_file()


def test_fixtures_have_the_promised_sizes(fmnist_small_root: Path, fmnist_root: Path) -> None:
    for root, train_n, test_n in ((fmnist_small_root, 12, 4), (fmnist_root, 60, 20)):
        for name in CLASSES:
            assert len(list((root / "train" / name).glob("*.png"))) == train_n
            assert len(list((root / "test" / name).glob("*.png"))) == test_n
