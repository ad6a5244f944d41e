"""Fashion-MNIST as an ImageFolder: `out/train/<class>/<index>.png` and `out/test/<class>/<index>.png`.

Reads the four IDX files (FASHION_MNIST_DIR, Debian's dataset-fashion-mnist, a torchvision download, or
failing those Debian's package installed with apt-get: see find_source) and writes 28x28 grayscale PNGs.
Splitting train into train/val is data.py's job, not this module's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

# Label order of the IDX files (https://github.com/zalandoresearch/fashion-mnist#labels); "/" and " "
# replaced so the names are folder names. Alphabetical class_to_idx will differ: data.py persists its own.
CLASSES = tuple("T-shirt_top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag Ankle_boot".split())
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "run `apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder "
    "with the four IDX files (train-images-idx3-ubyte, ..., t10k-labels-idx1-ubyte; .gz or not)"
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or plain) of uint8 values as an array of the shape its header gives."""
    raw = Path(path).read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":  # gzip magic: Debian ships .gz, torchvision keeps both
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: corrupt gzip data ({err})") from None
    # Header: two zero bytes, type code 0x08 (uint8), the number of dimensions, then each size as
    # big-endian int32.
    ndim = raw[3] if len(raw) >= 4 else 0
    if raw[:3] != b"\x00\x00\x08" or ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: not a uint8 IDX file (header {raw[:4].hex() or 'empty'})")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">i4", ndim, offset=4))
    if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {len(raw) - 4 - 4 * ndim} values")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_path(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def has_idx_files(folder: Path) -> bool:
    """Whether `folder` holds all four IDX files, gzipped or plain."""
    return all(_idx_path(folder, name) for names in FILES.values() for name in names)


def local_source(source: Path | None = None) -> Path | None:
    """The folder with the IDX files: `source`, else $FASHION_MNIST_DIR, else Debian's; None if none has."""
    # A folder the user named must hold the files: silently using another copy would hide their mistake.
    for named in (source, os.environ.get("FASHION_MNIST_DIR")):
        if named:
            if not has_idx_files(Path(named)):
                raise SystemExit(f"{named} lacks the Fashion-MNIST IDX files; {HOW_TO_GET}")
            return Path(named)
    return DEBIAN_DIR if has_idx_files(DEBIAN_DIR) else None


def download(folder: Path) -> Path:
    """Download the IDX files with torchvision into `folder` (needs a network); return where they are."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(folder, train=train, download=True)
    return folder / "FashionMNIST" / "raw"


def run_command(command: list[str], echo: bool = True) -> tuple[int, str]:
    """Run `command`, stderr merged into stdout, echoing it line by line if `echo`; return (status, output).

    The only place this module starts a process, so tests can fake apt-get and sudo here.
    """
    lines = []
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # apt's translated messages must not crash us under a non-UTF-8 locale
    ) as process:
        for line in process.stdout:
            if echo:
                print(line, end="", flush=True)
            lines.append(line)
    return process.returncode, "".join(lines)


def apt_prefix() -> tuple[list[str] | None, str]:
    """How to run apt-get with root rights: ([], "root"), (["sudo", "-n"], "sudo -n"), or (None, why not)."""
    if shutil.which("apt-get") is None:
        return None, "apt-get is not on PATH"
    if os.geteuid() == 0:
        return [], "root"
    if shutil.which("sudo") is None:
        return None, "not root and sudo is not installed"
    # -n: fail instead of prompting, so an unattended `make demo` never hangs waiting for a password.
    status, output = run_command(["sudo", "-n", "true"], echo=False)
    if status != 0:
        return None, f"not root and `sudo -n true` failed: {output.strip() or f'exit {status}'}"
    return ["sudo", "-n"], "sudo -n"


def apt_install(prefix: list[str]) -> str | None:
    """Install Debian's dataset-fashion-mnist, apt-get update first; None, or what failed and its last lines.

    Stops at the first failing command: a failed update would leave install with stale or no package lists.
    """
    # `env` sets the variable in the command itself: sudo resets the environment, so it would be lost there.
    apt_get = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    for args in (["update"], ["install", "-y", "--no-install-recommends", "dataset-fashion-mnist"]):
        status, output = run_command([*prefix, *apt_get, *args])
        if status != 0:
            last_lines = "\n".join(output.strip().splitlines()[-10:])
            return f"`apt-get {' '.join(args)}` exited with {status}, its last lines:\n{last_lines}\n"
    return None


def find_source(source: Path | None, download_dir: Path) -> Path:
    """The folder with the IDX files, trying in this order (the first that has them wins):

    1. `source`, else $FASHION_MNIST_DIR (an error if the folder named lacks the files);
    2. Debian's files in DEBIAN_DIR;
    3. a torchvision download into `download_dir`;
    4. installing Debian's dataset-fashion-mnist with apt-get, as root or through passwordless `sudo -n`,
       then reading its files in DEBIAN_DIR.
    """
    found = local_source(source)
    if found:
        return found
    try:
        return download(download_dir)
    except Exception as err:  # offline: URLError, RuntimeError, ... whichever the mirror loop raised last
        tried = (
            f"Fashion-MNIST not found in FASHION_MNIST_DIR or {DEBIAN_DIR}, and the download failed ({err})"
        )
    prefix, how = apt_prefix()
    if prefix is None:
        raise SystemExit(f"{tried}; installing it with apt-get is not possible ({how}); {HOW_TO_GET}")
    print(f"{tried}; installing Debian's dataset-fashion-mnist with apt-get ({how})", flush=True)
    failure = apt_install(prefix)
    if failure:
        raise SystemExit(
            f"{tried}; installing it with apt-get ({how}) failed: {failure}Otherwise {HOW_TO_GET}"
        )
    if not has_idx_files(DEBIAN_DIR):  # installed, yet not where this module looks (a changed package?)
        raise SystemExit(
            f"{tried}; dataset-fashion-mnist is installed but {DEBIAN_DIR} lacks the files; {HOW_TO_GET}"
        )
    return DEBIAN_DIR


def write_split(folder: Path, split: str, dest: Path, per_class: int | None) -> int:
    """Write the first `per_class` images of each class (all when None) as PNGs; return how many."""
    images, labels = (read_idx(_idx_path(folder, name)) for name in FILES[split])
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(CLASSES):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    count = 0
    for label, name in enumerate(CLASSES):
        (dest / name).mkdir(parents=True)
        # The file name is the index in the IDX file, so any PNG can be traced back to its source.
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index]).save(dest / name / f"{index:05d}.png")
            count += 1
    return count


def prepare(
    out: Path, source: Path | None = None, per_class: int | None = None, test_per_class: int | None = None
) -> Path:
    """Write Fashion-MNIST under `out` as `train/` and `test/` ImageFolders (unless done); return `out`."""
    out, wanted = Path(out), {"per_class": per_class, "test_per_class": test_per_class}
    if any(n is not None and n < 1 for n in wanted.values()):
        raise ValueError(f"per-class counts must be positive, got {wanted}")
    marker = out / ".prepared.json"
    if (out / "train").exists() or (out / "test").exists():
        if not marker.is_file():
            raise SystemExit(f"{out} holds data but no {marker.name} (interrupted? not ours?): delete it")
        done = json.loads(marker.read_text())
        if (had := {key: done.get(key) for key in wanted}) != wanted:
            raise SystemExit(f"{out} was prepared with {had}, not {wanted}: delete it or pick another")
        print(f"{out} already prepared ({done['counts']}), skipping")
        return out
    # Everything is written under a private folder and renamed into place, so an interrupted or concurrent
    # run never leaves a half-written train/ behind; the marker goes last and means "complete".
    partial = out / f".partial-{os.getpid()}"
    try:
        folder = find_source(source, partial / "download")
        counts = {
            "train": write_split(folder, "train", partial / "train", per_class),
            "test": write_split(folder, "test", partial / "test", test_per_class),
        }
        for split in counts:
            (partial / split).rename(out / split)
        record = {**wanted, "counts": counts, "classes": list(CLASSES), "source": str(folder)}
        (partial / marker.name).write_text(json.dumps(record, indent=2) + "\n")
        (partial / marker.name).replace(marker)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {counts['train']} train and {counts['test']} test images from {folder} to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write train/ and test/ into")
    parser.add_argument("--source", type=Path, help="folder with the four IDX files (default: search)")
    parser.add_argument("--per-class", type=int, help="train images per class (default: all 6000)")
    parser.add_argument("--test-per-class", type=int, help="test images per class (default: all 1000)")
    args = parser.parse_args(argv)
    prepare(args.out, args.source, args.per_class, args.test_per_class)


if __name__ == "__main__":
    main()
