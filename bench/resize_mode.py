"""Which --data.resize-mode suits tall crops: crop, pad and stretch compared on "tall" Fashion-MNIST.

    python bench/resize_mode.py                      # stretched layout, 3 modes x 3 seeds, 40-50 minutes
    python bench/resize_mode.py --layout placed      # each garment unscaled at a random height
    python bench/resize_mode.py --modes pad --seeds 0

Jersey-number crops are tall (a torso, about 1:2 width:height), and square Fashion-MNIST cannot tell the
modes apart. So the bench makes every 28x28 image 28 wide x 56 high, in one of two layouts (--layout):
- 'stretched': stretched to the full height (PIL bilinear), the garment spanning the image.
- 'placed': pasted unscaled into a black canvas (Fashion-MNIST's own background), its top row at a height
  drawn uniformly from 0..28 with a seed per image: anywhere from the top half to the bottom half, as a
  number keeps its proportions but sits higher or lower in a tracker's box.
The model sees 32x32. 'crop' (the shorter side to 32, a centered 32x32 crop) keeps the middle 28 of the 56
rows: it loses a stretched garment's top and bottom, where sandal, sneaker and ankle boot, or shirt and
dress, differ; it keeps a placed garment at full resolution but cuts the |top - 14| rows (7 of 28 on
average) that stick out of the middle. 'pad' keeps everything on a square of the mean colour, at half
the resolution (a placed garment: 16x16 pixels). 'stretch' squeezes the whole image to 32x32 (a placed
garment: 32 wide x 16 high, squashed 2x). The data, picked once with DATA_SEED from Debian's Fashion-MNIST
files (classifier/fashion_mnist.py): train/ 600 per class, val/ 100 per class (other train images), test/
500 per class of the test set; the same images in both layouts, in OUT/tall-fashion-mnist-<counts>/
(stretched) or OUT/placed-fashion-mnist-<counts>/.

Each mode trains once per seed: the fashion-mnist preset (small_resnet, AdamW 2e-3, mild crops, flips) at
32 px (--data.image-size 32 --data.resize-size 32) for 3 epochs, on the regular data path (the jersey
preset's; see below), and evaluate.py scores its best.pt (picked by val top-1) on test/. Printed, and
written to OUT/runs/<data>_<size>px_<epochs>ep/results.md and .json (one folder per layout): test top-1 and
macro-F1, mean ± sample std over the seeds, the mean F1 of the classes that differ at the top and bottom
(CLASS_GROUPS), the per-seed top-1 and train.py's wall time per run. A run whose bench_result.json records
the same command is reused, not retrained; a failed run stops the bench and names its log.

Measured on one machine: lscpu model name "AMD EPYC" (family 25), 2 cores, AVX2, no AVX-512, no
avx512_bf16/AMX; fp32, 1 thread, 1 DataLoader worker, beside other benchmarks and tests (load average
2-5). Test set, seeds 0-2, mean ± sample std. Stretched: train.py 3.3-6.0 minutes per run, evaluate.py
34-75 s, the bench 51 minutes:

| mode | top-1 | macro-F1 | footwear F1 | tops and dress F1 | top-1 per seed |
|---|---|---|---|---|---|
| crop | 0.8049 ± 0.0039 | 0.8019 ± 0.0058 | 0.9118 ± 0.0010 | 0.6738 ± 0.0115 | 0.808, 0.800, 0.807 |
| pad | 0.8126 ± 0.0047 | 0.8080 ± 0.0073 | 0.9349 ± 0.0067 | 0.6725 ± 0.0140 | 0.817, 0.808, 0.813 |
| stretch | 0.8383 ± 0.0008 | 0.8333 ± 0.0023 | 0.9380 ± 0.0012 | 0.7178 ± 0.0046 | 0.839, 0.837, 0.838 |

Placed: train.py 3.2-4.2 minutes per run, evaluate.py 31-55 s, the bench 38 minutes:

| mode | top-1 | macro-F1 | footwear F1 | tops and dress F1 | top-1 per seed |
|---|---|---|---|---|---|
| crop | 0.7961 ± 0.0036 | 0.7956 ± 0.0028 | 0.9001 ± 0.0022 | 0.6733 ± 0.0041 | 0.799, 0.792, 0.798 |
| pad | 0.7926 ± 0.0158 | 0.7856 ± 0.0169 | 0.9140 ± 0.0104 | 0.6426 ± 0.0251 | 0.777, 0.809, 0.792 |
| stretch | 0.8188 ± 0.0068 | 0.8126 ± 0.0072 | 0.9118 ± 0.0039 | 0.6925 ± 0.0150 | 0.823, 0.811, 0.822 |

Stretched: 'stretch' leads by 2.6-3.3 points of top-1, well outside the seeds' spread; 'pad' beats 'crop' on
footwear (+2.3 F1: the ankle boot's shaft and the sandal's straps are in the cut rows) but not on the
upper-body classes. Placed: 'stretch' still leads, by 2.3-2.6 points (its worst seed, 0.811, beats
every seed of the others), but ties 'pad' on footwear; 'crop' and 'pad' tie on top-1, 'pad' with a seed
spread of 1.6 points and the worst shirt F1 (0.35 against 0.43-0.45). Split by how far the garment sits
from the middle (its top row against the test evaluations' predictions.csv; the bench does not print
this), 'crop' falls from 0.829 top-1 within 4 rows of the middle to 0.758 at 10-14 rows off, while 'pad'
(0.79-0.80) and 'stretch' (0.82) stay flat: centred, the full-resolution crop edges out the squashed
stretch; off centre, it loses what it cuts.

What each layout can and cannot say:
- Stretched shows what each mode does to an object that fills a tall box. It favours 'stretch' by
  construction: stretch mode exactly undoes the stretch that made the data, so the model sees garments in
  their own proportions. It cannot rank the modes for objects that keep their proportions.
- Placed is closer to a number on a torso: natural proportions, varying height, and part of the box empty.
  It shows the price of each mode's loss (rows cut, resolution halved, a 2x squash) when all three bite.
  It cannot speak for a real background (a textured shirt, not black), for a number much smaller than its
  box, nor for digits rather than garments.
- Neither speaks for a pretrained network: these runs train from scratch and see the same squash in
  training and evaluation; the jersey preset's pretrained ResNet18 learned its features on unsquashed
  images.

Caveats:
- Regular data path, not the preset's --data.fast-path: the jersey preset uses the regular one, and the two
  train 'crop' differently on tall images. The fast path caches the center square and cuts its random crop
  inside it; the regular path cuts RandomResizedCrop from the whole image, and on a 1:2 image no box of
  70-100% of the area fits the ratio range (0.85-1.15 here, 0.8-1.25 in the jersey preset), so torchvision
  falls back to one fixed center box, 28x33 of the 28x56 (28x35 with the jersey ratios): 'crop' trains
  without random crops (flips only), on a box a little taller than the 28x28 that evaluation keeps. 'pad'
  and 'stretch' make the image square first, so their random crops work. That is what a user of the jersey
  preset gets in 'crop' mode, so the bench measures it as it is.
- 'pad' fills with the mean colour (73 of 255, grey) while Fashion-MNIST's background is black, so the model
  sees a grey border it must learn to ignore; jersey crops have no such uniform background.
- Small budget (6,000 images x 3 epochs) at 32 px (the jersey preset trains at 64): the gaps between modes
  matter, not the absolute accuracy.
- 3 seeds tell a few points apart, not fractions of one.
- Runs skip the image audit, the image scan and the label-issue pass: they change no weights.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import tyro
from fine_tune import mean_std, run_logged  # the same subprocess runner and table cells as that bench
from PIL import Image

from classifier import fashion_mnist, hardware

MODES = ("crop", "pad", "stretch")
TALL_SIZE = (28, 56)  # (width, height) of every image, 1:2 like a torso
SQUARE = 28  # side of a Fashion-MNIST image
DATA_SEED = 0  # picks the images; the runs' --seed is separate
# Classes told apart by their top and bottom, which 'crop' cuts off: a boot's shaft, a sandal's straps; a
# collar, sleeves reaching the hem, a dress's length. The table gives their mean test F1 beside macro-F1.
CLASS_GROUPS = {
    "footwear": ("Sandal", "Sneaker", "Ankle_boot"),
    "tops and dress": ("T-shirt_top", "Pullover", "Dress", "Coat", "Shirt"),
}


@dataclass
class Args:
    out: Path = Path("/tmp/resize_bench")
    """Everything goes here: the tall data folder of each layout, and runs/<data>_<size>px_<epochs>ep/ with
    the runs, logs/ and results.*."""
    layout: Literal["stretched", "placed"] = "stretched"
    """How a 28x28 image becomes 28x56: 'stretched' to the full height; 'placed' unscaled on a black canvas
    at a random height. Each layout has its own data and runs folders."""
    modes: tuple[str, ...] = MODES
    """Which --data.resize-mode values to run, in the table's order."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """train.py --seed of each run of a mode."""
    epochs: int = 3
    """Training epochs, the same for every mode."""
    image_size: int = 32
    """--data.image-size and --data.resize-size of every run: the model's square input."""
    train_per_class: int = 600
    """Training images per class."""
    val_per_class: int = 100
    """Validation images per class (other training images of Fashion-MNIST)."""
    test_per_class: int = 500
    """Test images per class, from Fashion-MNIST's test set."""
    num_workers: int = 1
    """DataLoader workers of train.py and evaluate.py (results do not depend on it)."""
    threads: int | None = 1
    """PyTorch threads of each train.py and evaluate.py (OMP_NUM_THREADS); None: PyTorch's default."""


# --- data ----------------------------------------------------------------------------------------------


def save_stretched(image: np.ndarray, path: Path) -> None:
    """A 28x28 uint8 image stretched to TALL_SIZE (PIL bilinear) and saved as a grayscale PNG."""
    Image.fromarray(image).resize(TALL_SIZE, Image.Resampling.BILINEAR).save(path)


def save_placed(image: np.ndarray, top: int, path: Path) -> None:
    """A 28x28 uint8 image pasted unscaled into a black TALL_SIZE canvas, its first row at row `top`, and
    saved as a grayscale PNG. Black is Fashion-MNIST's own background, so no edge shows."""
    canvas = np.zeros((TALL_SIZE[1], TALL_SIZE[0]), dtype=np.uint8)
    canvas[top : top + SQUARE] = image
    Image.fromarray(canvas).save(path)


def placed_top(idx_split: str, index: int) -> int:
    """The canvas row where image `index` of IDX split `idx_split` starts in the 'placed' layout: uniform
    over 0..28 (top half to bottom half), seeded by the image alone so it never depends on the counts."""
    split_number = list(fashion_mnist.FILES).index(idx_split)  # train and test share indices
    rng = np.random.default_rng([DATA_SEED, split_number, index])
    return int(rng.integers(0, TALL_SIZE[1] - SQUARE + 1))


def read_idx_file(folder: Path, name: str) -> np.ndarray:
    """The IDX file `name` of `folder`, gzipped (NAME.gz, as Debian ships it) or plain."""
    gzipped = folder / f"{name}.gz"
    return fashion_mnist.read_idx(gzipped if gzipped.is_file() else folder / name)


def build_tall_data(
    out: Path,
    layout: str,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
) -> Path:
    """OUT/<name>-fashion-mnist-<train>-<val>-<test>/ (name 'tall' for the stretched layout, 'placed' for
    the placed one) with train/, val/ and test/ ImageFolders of tall images in `layout`, reused when its
    recipe.json matches. Each file is named by its index in the IDX file."""
    recipe = {
        "layout": layout,
        "size": list(TALL_SIZE),
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "seed": DATA_SEED,
    }
    prefix = "tall" if layout == "stretched" else layout  # 'tall': the stretched folder's original name
    root = out / f"{prefix}-fashion-mnist-{train_per_class}-{val_per_class}-{test_per_class}"
    if (root / "recipe.json").is_file():
        recorded = json.loads((root / "recipe.json").read_text())  # the recipe and the IDX files' folder
        if {key: recorded.get(key) for key in recipe} != recipe:
            raise SystemExit(f"error: {root} was built from another recipe: delete it to rebuild")
        return root
    if root.exists():
        raise SystemExit(f"error: {root} exists but has no recipe.json (interrupted? not ours?): delete it")
    source = fashion_mnist.find_source(None, out / "download")
    # Built in a scratch folder and renamed into place, so an interrupted build leaves no half-made root.
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    idx = {
        split: [read_idx_file(source, name) for name in names] for split, names in fashion_mnist.FILES.items()
    }
    # (folder, IDX split, first, count): val/ and train/ take consecutive, disjoint slices of one shuffled
    # order of a class's training images; test/ the first of its test images in another.
    slices = (
        ("val", "train", 0, val_per_class),
        ("train", "train", val_per_class, train_per_class),
        ("test", "test", 0, test_per_class),
    )
    for folder, idx_split, first, count in slices:
        images, labels = idx[idx_split]
        for label, name in enumerate(fashion_mnist.CLASSES):
            # The order is fixed by DATA_SEED and the class: the same files on every machine.
            rng = np.random.default_rng([DATA_SEED, label])
            indices = rng.permutation(np.flatnonzero(labels == label))[first : first + count]
            (partial / folder / name).mkdir(parents=True)
            for index in indices:
                path = partial / folder / name / f"{index:05d}.png"
                if layout == "stretched":
                    save_stretched(images[index], path)
                else:
                    save_placed(images[index], placed_top(idx_split, index), path)
    (partial / "recipe.json").write_text(json.dumps({**recipe, "source": str(source)}, indent=2) + "\n")
    partial.rename(root)
    return root


# --- running train.py and evaluate.py ------------------------------------------------------------------


def train_command(mode: str, seed: int, data: Path, runs: Path, name: str, args: Args) -> list[str]:
    """train.py with the fashion-mnist preset at args.image_size px, in `mode`, on the regular data path."""
    return [
        *(sys.executable, "train.py", "--preset", "fashion-mnist", "--data.root", str(data)),
        *("--data.image-size", str(args.image_size), "--data.resize-size", str(args.image_size)),
        *("--data.resize-mode", mode, "--data.no-fast-path", "--epochs", str(args.epochs)),
        *("--seed", str(seed), "--out-dir", str(runs), "--name", name),
        # How the run is carried out and logged, not what it learns:
        *("--precision", "fp32"),  # what 'auto' picks without native bf16; pinned so machines agree
        *("--data.num-workers", str(args.num_workers), "--no-progress", "--log-every-steps", "1000"),
        *("--data.no-audit", "--data.no-scan-images", "--no-label-issues"),
    ]


def run_seed(mode: str, seed: int, data: Path, runs: Path, args: Args) -> dict:
    """Train one mode with one seed into RUNS/<mode>-s<seed> and score its best.pt on test/; reused when
    its bench_result.json records the same command."""
    name, log_dir = f"{mode}-s{seed}", runs / "logs"
    command = train_command(mode, seed, data, runs, name, args)
    identity = {"command": command, "threads": args.threads}
    cached = runs / name / "bench_result.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        if {key: result.get(key) for key in identity} == identity:
            print(f"  {name}: cached ({cached})")
            return result
    if (runs / name).exists():
        raise SystemExit(
            f"error: {runs / name} holds an unfinished run or one made with other flags: delete it to rerun"
        )
    train_seconds = run_logged(command, args.threads, log_dir / f"{name}.train.log", "train.py")
    report_dir = runs / name / "test-eval"
    evaluate = [
        *(sys.executable, "evaluate.py", str(runs / name / "checkpoints" / "best.pt")),
        *("--split", "test", "--out", str(report_dir), "--data.num-workers", str(args.num_workers)),
    ]
    eval_seconds = run_logged(evaluate, args.threads, log_dir / f"{name}.eval.log", "evaluate.py")
    metrics = json.loads((report_dir / "metrics.json").read_text())
    for resume_file in ("last.pt", "last.prev.pt"):  # never read again; best.pt stays
        (runs / name / "checkpoints" / resume_file).unlink(missing_ok=True)
    result = {
        **identity,
        "mode": mode,
        "seed": seed,
        "top1": metrics["top1"],
        "macro_f1": metrics["macro_f1"],
        "class_f1": {row["class"]: row["f1"] for row in metrics["per_class"]},
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
    }
    cached.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  top-1 {result['top1']:.4f}, macro-F1 {result['macro_f1']:.4f}, {train_seconds / 60:.1f} min")
    return result


# --- the table -----------------------------------------------------------------------------------------


def describe_setup(args: Args) -> str:
    """The header of the table: CPU, load, data and budget."""
    native = sorted(hardware.cpu_flags() & set(hardware.NATIVE_BF16_FLAGS))
    return (
        f"CPU: {hardware.cpu_model()}, {hardware.usable_cores()} usable cores, "
        f"native bf16 (avx512_bf16/amx): {', '.join(native) or 'no'}; fp32, "
        f"{args.threads or 'default'} thread(s) per run; "
        f"1-minute load average at the start {os.getloadavg()[0]:.1f}\n"
        f"Tall Fashion-MNIST ({TALL_SIZE[0]}x{TALL_SIZE[1]}, {args.layout}): "
        f"train {args.train_per_class}/class, "
        f"val {args.val_per_class}/class, test {args.test_per_class}/class. fashion-mnist preset at "
        f"{args.image_size} px, regular data path, {args.epochs} epochs, seeds "
        f"{', '.join(map(str, args.seeds))}; ± is the sample std over seeds."
    )


def group_f1(run: dict, classes: tuple[str, ...]) -> float:
    """The mean test F1 of `classes` in one run."""
    return statistics.mean(run["class_f1"][name] for name in classes)


def format_table(results: dict[str, list[dict]]) -> str:
    """The markdown table, one row per mode."""
    groups = " | ".join(f"{group} F1" for group in CLASS_GROUPS)
    lines = [
        f"| mode | top-1 | macro-F1 | {groups} | top-1 per seed | min per run |",
        "|---|---|---|" + "---|" * len(CLASS_GROUPS) + "---|---|",
    ]
    for mode, runs in results.items():
        cells = [mean_std([r["top1"] for r in runs]), mean_std([r["macro_f1"] for r in runs])]
        cells += [mean_std([group_f1(r, classes) for r in runs]) for classes in CLASS_GROUPS.values()]
        cells.append(", ".join(f"s{r['seed']} {r['top1']:.3f}" for r in runs))
        cells.append(f"{statistics.mean(r['train_seconds'] for r in runs) / 60:.1f}")
        lines.append(f"| {mode} | {' | '.join(cells)} |")
    return "\n".join(lines)


def check_args(args: Args) -> None:
    """Refuse flags the bench cannot honour before any work starts."""
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"error: unknown --modes {unknown}; choose from {list(MODES)}")
    if not args.seeds:
        raise SystemExit("error: --seeds is empty")
    # Fashion-MNIST has 6000 training and 1000 test images per class; asking for more would give fewer.
    if min(args.train_per_class, args.val_per_class) < 1 or args.train_per_class + args.val_per_class > 6000:
        raise SystemExit(
            f"error: --train-per-class {args.train_per_class} and --val-per-class {args.val_per_class} "
            "must be positive and add up to at most 6000"
        )
    if not 1 <= args.test_per_class <= 1000:
        raise SystemExit(f"error: --test-per-class {args.test_per_class}: must be 1..1000")
    if args.epochs < 1 or args.image_size < 8:
        raise SystemExit(f"error: --epochs {args.epochs} must be >= 1, --image-size {args.image_size} >= 8")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads {args.threads}: must be at least 1 (or None)")


def main(args: Args) -> dict[str, list[dict]]:
    check_args(args)
    args = replace(args, out=args.out.resolve())
    header = describe_setup(args)
    data = build_tall_data(
        args.out,
        args.layout,
        args.train_per_class,
        args.val_per_class,
        args.test_per_class,
    )
    # One folder per data and budget, so that changing one never meets old runs.
    runs = args.out / "runs" / f"{data.name}_{args.image_size}px_{args.epochs}ep"
    results: dict[str, list[dict]] = {}
    for mode in (mode for mode in MODES if mode in args.modes):  # the table's order
        print(f"{mode}:", flush=True)
        results[mode] = [run_seed(mode, seed, data, runs, args) for seed in args.seeds]
    table = format_table(results)
    print(f"\n{header}\n\n{table}\n\nwritten to {runs}/results.md and results.json")
    (runs / "results.md").write_text(f"{header}\n\n{table}\n")
    (runs / "results.json").write_text(json.dumps({"setup": header, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
