"""Fine-tuning recipes for a pretrained ResNet18 on small, imbalanced crops, compared on Fashion-MNIST.

    python bench/fine_tune.py --configs scratch plain   # ~12 min: 2 configs x 3 seeds (+4.5 min pretraining)
    python bench/fine_tune.py                           # every row of CONFIGS x 3 seeds, 45-85 min

Pretrained weights cannot be downloaded here, so the bench makes its own: train.py trains a ResNet18
(ImageNet stem) from scratch on Fashion-MNIST classes 0-4 (T-shirt_top ... Coat) at 64 px, and that run's
best.safetensors is the `--pretrained` file of every fine-tune (cached in OUT/pretrained/, one file per
pretraining recipe). The task is the five held-out classes 5-9 (Sandal ... Ankle_boot): train/ 10x
imbalanced (300, 170, 95, 55, 30 images, in that class order), a balanced val/ of 60 per class (other
train images) and test/ = the 1000 Fashion-MNIST test images of each. The images are picked once with
DATA_SEED: every config and seed sees the same files (symlinks into OUT/fashion-mnist, which
classifier/fashion_mnist.py writes).

Each config is the jersey preset (configs/jersey.py) with this data root and --epochs, plus its row of
CONFIGS; it trains once per seed, and evaluate.py scores its best.pt (picked by val top-1, as the preset
does) on test/. Printed, and written to OUT/runs/<recipe>/results.md and .json: test top-1 and macro-F1,
mean ± sample std over the seeds, the per-seed values, and train.py's wall time per run (with the LR
range test for lr-finder; evaluate.py's ~40 s are in the JSON). A run whose bench_result.json records
the same command and the same configs/jersey.py is reused, not retrained; a failed run stops the bench
and names its log.

Measured on a 2-core AMD EPYC with AVX2 only (no avx512_bf16/AMX), fp32, 1 thread per run, the box
shared with other work (load 3-5): pretraining 1500/class x 2 epochs took 5.2 min, a 4-epoch fine-tune
1.2-5.4 min and evaluate.py 0.6-1.3 min. Test top-1, mean ± sample std over seeds 0-2, with the jersey
preset as it was then (LR 1e-4, crop; configs/jersey.py's sha256 89c350d3...):
    scratch 0.923 ± 0.007, plain 0.902 ± 0.001, head-first 0.877 ± 0.006,
    head-first-disc-lr 0.881 ± 0.008, layer-decay 0.920 ± 0.005,
    lr-finder 0.925 ± 0.004 (suggested 5.2e-4, 3.6e-4, 3.0e-4), video-augment 0.872 ± 0.009.
configs/jersey.py sets 4e-4 and `stretch` resizing (its docstring says why), which differs from the
preset these rows were measured with: a rerun retrains every config against the current file.

Caveats:
- The pretrained features are weak, unlike ImageNet's on real crops: a logistic regression on their
  pooled features of the 650 training images scores 0.929 on 300 test images per class, against 0.915
  with a random-init ResNet18's (these five classes are easy). And 1e-4 leaves the new head undertrained
  in 40 steps: plain reaches 0.923 with 6 epochs (seed 0). Both measured on an Intel Xeon @ 2.60GHz.
  Stronger pretraining (2000/class x 3 epochs, val 0.914) made plain worse (0.873, seed 0): the
  features grow more garment-specific. Read the table as a ranking of recipes on weak features.
- One CPU, shared with other work: the minutes move with the load (the table's header gives it).
- 3 seeds tell a few points apart, not fractions of one.
- Runs use one DataLoader worker and skip the image audit, the image scan and the label-issue pass:
  they change no weights, and keep the bench to one training process and one worker at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tyro

from classifier import fashion_mnist, hardware

REPO = Path(__file__).resolve().parent.parent

# Placeholders in CONFIGS, filled in when a config runs.
FOUND_LR = "<LR suggested by the range test>"  # train.py --find-lr with the config's other flags, per seed
BEST_HEAD_FIRST = "<flags of the better head-first config>"  # by mean test macro-F1 in this bench
HEAD_FIRST_CONFIGS = ("head-first", "head-first-disc-lr")

# The configs: extra train.py flags on top of the jersey preset and the pretrained weights.
CONFIGS: dict[str, list[str]] = {
    # The same budget without the pretrained weights (the trainer's LR default is then 1e-3, not 1e-4).
    "scratch": ["--pretrained", "None"],
    "plain": [],
    "head-first": ["--freeze-epochs", "1"],
    "head-first-disc-lr": ["--freeze-epochs", "1", "--optim.lr", "1e-3", "--optim.backbone-lr-mult", "0.1"],
    "layer-decay": ["--freeze-epochs", "1", "--optim.lr", "1e-3", "--optim.layer-decay", "0.6"],
    "lr-finder": ["--optim.lr", FOUND_LR],
    "video-augment": [
        BEST_HEAD_FIRST,
        *("--data.motion-blur", "0.3", "--data.low-resolution", "0.3"),
        *("--data.jpeg", "0.3", "--data.occlusion", "0.2"),
    ],
}

PRETRAIN_CLASSES = fashion_mnist.CLASSES[:5]
FINETUNE_CLASSES = fashion_mnist.CLASSES[5:]
DATA_SEED = 0  # picks the images; the runs' --seed is separate


@dataclass
class Args:
    out: Path = Path("/tmp/ft_bench")
    """Everything goes here: fashion-mnist/, the data folders, the pretraining run and its log (logs/),
    pretrained/, and runs/<pretraining>_<data>_<epochs>ep/ with the fine-tunes, logs/ and results.*."""
    configs: tuple[str, ...] = tuple(CONFIGS)
    """Which rows of CONFIGS to run, in the table's order."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """train.py --seed of each run of a config."""
    epochs: int = 4
    """Fine-tuning epochs, the same for every config."""
    train_counts: tuple[int, ...] = (300, 170, 95, 55, 30)
    """Fine-tune training images of Sandal, Shirt, Sneaker, Bag, Ankle_boot (10x imbalance)."""
    val_per_class: int = 60
    """Fine-tune validation images per class (balanced)."""
    pretrain_per_class: int = 1500
    """Pretraining images per class (classes 0-4); train.py holds 10% of them out for validation."""
    pretrain_epochs: int = 2
    """Pretraining epochs."""
    num_workers: int = 1
    """DataLoader workers of train.py and evaluate.py (results do not depend on it)."""
    threads: int | None = 1
    """PyTorch threads of each train.py and evaluate.py (OMP_NUM_THREADS); None: PyTorch's default, one
    per core. Training steps of ResNet18 at 64 px, batch 64, fp32 on the 2 cores: 103 img/s with 2
    threads and 60 with 1 when the machine is idle, but 13-20 with 2 and 49-59 with 1 while another
    process keeps one core busy (threads that wait for each other at every op lose when a core is taken)."""


# --- data ----------------------------------------------------------------------------------------------


def link_images(files: list[Path], folder: Path) -> None:
    """Symlink each file into `folder` under its own name."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        (folder / path.name).symlink_to(path)


def build_once(root: Path, recipe: dict, build) -> Path:
    """`root` as built by `build(folder)`, reused when its recipe.json matches `recipe`. It is built in a
    scratch folder and renamed into place, so an interrupted build leaves no half-made `root`."""
    recorded = root / "recipe.json"
    recipe = json.loads(json.dumps(recipe))  # as JSON gives it back: tuples become lists
    if recorded.is_file():
        if json.loads(recorded.read_text()) != recipe:
            raise SystemExit(
                f"error: {root} was built from another recipe ({recorded}): delete it to rebuild"
            )
        return root
    if root.exists():
        raise SystemExit(f"error: {root} exists but has no recipe.json (not this bench's?): delete it")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    (partial / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    partial.rename(root)
    return root


def class_files(fmnist: Path, split: str, name: str) -> list[Path]:
    """A class's PNGs, shuffled with DATA_SEED and the class name (the same order on every machine)."""
    files = sorted((fmnist / split / name).glob("*.png"))
    rng = np.random.default_rng([DATA_SEED, fashion_mnist.CLASSES.index(name)])
    return [files[i] for i in rng.permutation(len(files))]


def build_pretrain_data(fmnist: Path, out: Path, per_class: int) -> Path:
    """OUT/pretrain-data-PER_CLASS/train/<class>/: `per_class` random training images of each class 0-4."""

    def build(folder: Path) -> None:
        for name in PRETRAIN_CLASSES:
            link_images(class_files(fmnist, "train", name)[:per_class], folder / "train" / name)

    recipe = {"source": str(fmnist), "classes": PRETRAIN_CLASSES, "per_class": per_class, "seed": DATA_SEED}
    return build_once(out / f"pretrain-data-{per_class}", recipe, build)


def build_finetune_data(fmnist: Path, out: Path, train_counts: tuple[int, ...], val_per_class: int) -> Path:
    """OUT/finetune-data-<counts>-val<n>/ with train/ (imbalanced), val/ (balanced, other train images)
    and test/ (all test images) of classes 5-9."""

    def build(folder: Path) -> None:
        for name, count in zip(FINETUNE_CLASSES, train_counts, strict=True):
            files = class_files(fmnist, "train", name)
            link_images(files[:val_per_class], folder / "val" / name)
            link_images(files[val_per_class : val_per_class + count], folder / "train" / name)
            link_images(sorted((fmnist / "test" / name).glob("*.png")), folder / "test" / name)

    recipe = {
        "source": str(fmnist),
        "train_counts": dict(zip(FINETUNE_CLASSES, train_counts, strict=True)),
        "val_per_class": val_per_class,
        "seed": DATA_SEED,
    }
    counts = "-".join(map(str, train_counts))
    return build_once(out / f"finetune-data-{counts}-val{val_per_class}", recipe, build)


# --- running train.py and evaluate.py ------------------------------------------------------------------


def run_logged(command: list[str], threads: int | None, log_path: Path, what: str) -> float:
    """Run `command` in the repo with `threads` PyTorch threads (None: its default) and its output in
    `log_path`; its wall time in seconds. A failure stops the bench, naming the log and showing its end."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {what}: log {log_path}", flush=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # read once by PyTorch at start-up
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '')} {' '.join(command)}\n")
        log.flush()
        status = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{tail}\nerror: {what} failed (exit {status}); its log: {log_path}")
    return seconds


def runtime_flags(num_workers: int) -> list[str]:
    """Flags that change how a run is carried out and logged, not what it learns."""
    return [
        *("--precision", "fp32"),  # what 'auto' picks without native bf16; pinned so machines agree
        *("--data.num-workers", str(num_workers)),
        *("--no-progress", "--log-every-steps", "1000"),
        *("--data.no-audit", "--data.no-scan-images", "--no-label-issues"),
    ]


def pretrain(fmnist: Path, out: Path, args: Args) -> Path:
    """The pretrained weights (OUT/pretrained/resnet18-classes0-4-<per class>x<epochs>ep.safetensors),
    trained unless that file exists: other pretraining flags make another file, never a stale reuse."""
    recipe = f"{args.pretrain_per_class}x{args.pretrain_epochs}ep"
    weights = out / "pretrained" / f"resnet18-classes0-4-{recipe}.safetensors"
    if weights.is_file():
        print(f"pretrained weights: {weights} (cached)")
        return weights
    data = build_pretrain_data(fmnist, out, args.pretrain_per_class)
    run_dir = out / f"pretrain-{recipe}"
    if run_dir.exists():  # no weights file: the run did not finish
        print(f"removing {run_dir}: an unfinished pretraining run")
        shutil.rmtree(run_dir)
    command = [
        *(sys.executable, "train.py", "--model", "resnet18", "--pretrained", "None"),
        *("--data.root", str(data), "--data.image-size", "64", "--data.resize-size", "64"),
        # Mild crops: 2 epochs are too few to gain from the default 8-100% crops (the fashion-mnist preset).
        *("--data.crop-scale", "0.7", "1.0", "--epochs", str(args.pretrain_epochs), "--seed", "0"),
        *("--out-dir", str(out), "--name", run_dir.name, *runtime_flags(args.num_workers)),
    ]
    print(f"pretraining on {', '.join(PRETRAIN_CLASSES)}:")
    seconds = run_logged(command, args.threads, out / "logs" / f"{run_dir.name}.log", "train.py")
    # best.safetensors: the plain state dict of the weights validation chose, as --pretrained FILE reads
    # it (models.read_pretrained); its 5-class head is replaced by each fine-tune's.
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "best.safetensors", weights.with_suffix(".partial"))
    weights.with_suffix(".partial").rename(weights)
    for resume_file in ("last.pt", "last.prev.pt"):  # 170 MB each, never read again
        (run_dir / "checkpoints" / resume_file).unlink(missing_ok=True)
    print(f"pretrained weights: {weights} ({seconds / 60:.1f} min)")
    return weights


def find_lr(
    command: list[str], threads: int | None, name: str, log_dir: Path, runs: Path
) -> tuple[float, float]:
    """The LR suggested by `train.py ... --find-lr` (from RUNS/NAME-lr-find/lr_find.json) and the test's
    wall time in seconds."""
    log_path = log_dir / f"{name}.find-lr.log"
    seconds = run_logged([*command, "--find-lr"], threads, log_path, "train.py --find-lr")
    found = runs / f"{name}-lr-find" / "lr_find.json"
    if not found.is_file():
        raise SystemExit(f"error: train.py --find-lr wrote no {found}; its log: {log_path}")
    return float(json.loads(found.read_text())["suggested_lr"]), seconds


def score_on_test(run_dir: Path, threads: int | None, num_workers: int, log_dir: Path) -> tuple[dict, float]:
    """evaluate.py's metrics.json for the run's best.pt on test/ (in RUN/test-eval/) and its wall time in
    seconds. The run's resume checkpoints are deleted afterwards (170 MB each; the bench keeps best.pt)."""
    report_dir = run_dir / "test-eval"
    command = [
        *(sys.executable, "evaluate.py", str(run_dir / "checkpoints" / "best.pt")),
        *("--split", "test", "--out", str(report_dir), "--data.num-workers", str(num_workers)),
    ]
    seconds = run_logged(command, threads, log_dir / f"{run_dir.name}.eval.log", "evaluate.py")
    for resume_file in ("last.pt", "last.prev.pt"):
        (run_dir / "checkpoints" / resume_file).unlink(missing_ok=True)
    return json.loads((report_dir / "metrics.json").read_text()), seconds


def run_seed(
    config_flags: list[str], name: str, seed: int, data: Path, weights: Path, runs: Path, args: Args
) -> dict:
    """Fine-tune one config with one seed into RUNS/NAME and score its best checkpoint on test/; reused
    when RUNS/NAME/bench_result.json records the same command and the same configs/jersey.py."""
    log_dir = runs / "logs"
    base = [
        *(sys.executable, "train.py", "--preset", "jersey", "--pretrained", str(weights)),
        *("--data.root", str(data), "--epochs", str(args.epochs), "--seed", str(seed)),
        *("--out-dir", str(runs), "--name", name, *runtime_flags(args.num_workers)),
    ]
    # The preset file is part of what a run means: a changed configs/jersey.py makes every run stale.
    preset_sha256 = hashlib.sha256((REPO / "configs" / "jersey.py").read_bytes()).hexdigest()
    identity = {
        "config_flags": config_flags,
        "base_command": base,
        "threads": args.threads,
        "preset_sha256": preset_sha256,
    }
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
    found_lr, find_seconds = None, 0.0
    flags = list(config_flags)
    if FOUND_LR in flags:
        # The range test sees the config's other flags: `--optim.lr FOUND_LR` is the pair it replaces.
        at = flags.index(FOUND_LR)
        other_flags = [*flags[: at - 1], *flags[at + 1 :]]
        found_lr, find_seconds = find_lr([*base, *other_flags], args.threads, name, log_dir, runs)
        flags[at] = f"{found_lr:.3g}"
        print(f"  suggested LR {flags[at]}")
    train_seconds = run_logged([*base, *flags], args.threads, log_dir / f"{name}.train.log", "train.py")
    metrics, eval_seconds = score_on_test(runs / name, args.threads, args.num_workers, log_dir)
    result = {
        **identity,
        "seed": seed,
        "flags": flags,
        "found_lr": found_lr,
        "top1": metrics["top1"],
        "macro_f1": metrics["macro_f1"],
        "train_seconds": train_seconds + find_seconds,
        "find_lr_seconds": find_seconds,
        "eval_seconds": eval_seconds,
    }
    cached.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  top-1 {result['top1']:.4f}, macro-F1 {result['macro_f1']:.4f}, {train_seconds / 60:.1f} min")
    return result


# --- the table -----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' (std over runs, n - 1), or the mean alone for one run."""
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def resolve_flags(flags: list[str], results: dict[str, list[dict]]) -> list[str]:
    """The config's flags with BEST_HEAD_FIRST replaced by the flags of whichever of HEAD_FIRST_CONFIGS
    has the better mean test macro-F1 in `results` (both must have run)."""
    if BEST_HEAD_FIRST not in flags:
        return flags
    missing = [name for name in HEAD_FIRST_CONFIGS if name not in results]
    if missing:
        raise SystemExit(
            f"error: video-augment builds on the better of {' and '.join(HEAD_FIRST_CONFIGS)}: "
            f"add {' '.join(missing)} to --configs (finished runs are reused)"
        )
    best = max(HEAD_FIRST_CONFIGS, key=lambda name: statistics.mean(r["macro_f1"] for r in results[name]))
    print(f"  builds on {best} (the better mean test macro-F1)")
    at = flags.index(BEST_HEAD_FIRST)
    return [*flags[:at], *CONFIGS[best], *flags[at + 1 :]]


def describe_setup(args: Args) -> str:
    """The header of the table: CPU, load, data and budget."""
    native = sorted(hardware.cpu_flags() & set(hardware.NATIVE_BF16_FLAGS))
    load_1min = os.getloadavg()[0]
    counts = ", ".join(f"{n} {c}" for c, n in zip(FINETUNE_CLASSES, args.train_counts, strict=True))
    return (
        f"CPU: {hardware.cpu_model()}, {hardware.usable_cores()} usable cores, "
        f"native bf16 (avx512_bf16/amx): {', '.join(native) or 'no'}; fp32, "
        f"{args.threads or 'default'} thread(s) per run; "
        f"1-minute load average at the start {load_1min:.1f}\n"
        f"Fine-tune train: {counts}; val {args.val_per_class}/class; test 1000/class. Jersey preset, "
        f"{args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}; ± is the sample std over seeds. "
        f"Pretrained: ResNet18 on {args.pretrain_per_class}/class of {', '.join(PRETRAIN_CLASSES)}, "
        f"{args.pretrain_epochs} epochs."
    )


def format_table(results: dict[str, list[dict]]) -> str:
    """The markdown table, one row per config."""
    lines = [
        "| config | top-1 mean ± std | macro-F1 mean ± std | per seed (top-1 / macro-F1) | minutes per run |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        per_seed = ", ".join(
            f"s{r['seed']} {r['top1']:.3f} / {r['macro_f1']:.3f}"
            + (f" (lr {r['found_lr']:.2g})" if r["found_lr"] is not None else "")
            for r in runs
        )
        minutes = statistics.mean(r["train_seconds"] for r in runs) / 60
        lines.append(
            f"| {name} | {mean_std([r['top1'] for r in runs])} | {mean_std([r['macro_f1'] for r in runs])} "
            f"| {per_seed} | {minutes:.2f} |"
        )
    return "\n".join(lines)


def check_args(args: Args) -> None:
    """Refuse flags the bench cannot honour before any work starts."""
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown --configs {unknown}; choose from {list(CONFIGS)}")
    if not args.seeds:
        raise SystemExit("error: --seeds is empty")
    if len(args.train_counts) != len(FINETUNE_CLASSES) or min(args.train_counts) < 1:
        raise SystemExit(f"error: --train-counts {args.train_counts}: need 5 positive counts, one per class")
    # Fashion-MNIST has 6000 training images per class; asking for more would quietly give fewer.
    if args.val_per_class < 1 or args.val_per_class + max(args.train_counts) > 6000:
        raise SystemExit(
            f"error: --val-per-class {args.val_per_class} must be positive, and plus the largest "
            f"--train-counts {max(args.train_counts)} at most 6000"
        )
    if not 1 <= args.pretrain_per_class <= 6000:
        raise SystemExit(f"error: --pretrain-per-class {args.pretrain_per_class}: must be 1..6000")
    if args.pretrain_epochs < 1 or args.epochs < 1:
        raise SystemExit(
            f"error: --epochs {args.epochs}, --pretrain-epochs {args.pretrain_epochs}: need >= 1"
        )
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads {args.threads}: must be at least 1 (or None)")


def main(args: Args) -> dict[str, list[dict]]:
    check_args(args)
    args = replace(args, out=args.out.resolve())
    header = describe_setup(args)
    fmnist = fashion_mnist.prepare(args.out / "fashion-mnist")
    weights = pretrain(fmnist, args.out, args)
    data = build_finetune_data(fmnist, args.out, args.train_counts, args.val_per_class)
    # One folder per pretraining, data and fine-tuning budget, so that changing one never meets old runs.
    runs = args.out / "runs" / f"{weights.stem}_{data.name}_{args.epochs}ep"
    results: dict[str, list[dict]] = {}
    for name in (name for name in CONFIGS if name in args.configs):  # the table's order
        print(f"{name}:", flush=True)
        flags = resolve_flags(CONFIGS[name], results)
        results[name] = [
            run_seed(flags, f"{name}-s{seed}", seed, data, weights, runs, args) for seed in args.seeds
        ]
    table = format_table(results)
    print(f"\n{header}\n\n{table}\n\nwritten to {runs}/results.md and results.json")
    (runs / "results.md").write_text(f"{header}\n\n{table}\n")
    (runs / "results.json").write_text(json.dumps({"setup": header, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
