"""Rebalancing options compared on an imbalanced Fashion-MNIST: macro F1 and the rare classes' recall.

    python -m classifier.fashion_mnist data/fashion-mnist      # once: Fashion-MNIST as an ImageFolder
    python bench/imbalance.py                                    # ~15 min on 2 CPU cores

The data: every class keeps PER_CLASS training images, except the RARE ones, which keep PER_CLASS / RATIO
(20x rarer by default). val/ is balanced (VAL_PER_CLASS each, taken before the training images, so the
two never share a file) and test/ is Fashion-MNIST's own balanced 10k test split. Files are symlinks into
DATA_ROOT. Each variant trains the same model from the same seed with only its rebalancing flags changed,
selects its best epoch by val macro F1, and is scored by evaluate.py on test.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {
    "no balancing": [],
    "class-weighted loss": ["--data.class-weighted-loss"],
    "weighted sampler (alpha 1)": ["--data.weighted-sampler"],
    "weighted sampler (alpha 0.5)": ["--data.weighted-sampler", "--data.sampler-alpha", "0.5"],
    "logit adjustment (balanced)": ["--logit-adjustment", "balanced"],
}


@dataclass
class Args:
    data_root: Path = Path("data/fashion-mnist")
    """Fashion-MNIST as an ImageFolder with train/ and test/ (python -m classifier.fashion_mnist DIR)."""
    out: Path = Path("runs/imbalance")
    """Where the imbalanced data (OUT/data) and the runs (OUT/<variant>) go."""
    rare: tuple[str, ...] = ("Shirt", "Pullover", "Sandal")
    """The classes made rarer."""
    ratio: int = 20
    """How much rarer."""
    per_class: int = 1000
    """Training images of each common class."""
    val_per_class: int = 300
    """Validation images per class (balanced)."""
    epochs: int = 8
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Which rows to run (names as in the table)."""
    train_args: str = ""
    """Extra train.py flags for every variant, as one string (split like a shell would)."""


def build_data(args: Args) -> Path:
    """OUT/data with train/, val/, test/ of symlinks; rebuilt only when missing."""
    root = args.out / "data"
    if (root / "done.json").is_file():
        return root
    source = args.data_root.resolve()
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    unknown = sorted(set(args.rare) - set(classes))
    if unknown:
        raise SystemExit(f"error: --rare {unknown} are not classes of {source / 'train'} ({classes})")
    counts = {}
    for name in classes:
        files = sorted((source / "train" / name).iterdir())
        keep = args.per_class // args.ratio if name in args.rare else args.per_class
        for split, chosen in (
            ("val", files[: args.val_per_class]),
            ("train", files[args.val_per_class : args.val_per_class + keep]),
        ):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (folder / f.name).symlink_to(f)
        counts[name] = keep
    (root / "test").symlink_to(source / "test")
    (root / "done.json").write_text(
        json.dumps({"train_counts": counts, "rare": list(args.rare)}, indent=2) + "\n"
    )
    return root


def run_variant(args: Args, data: Path, name: str) -> dict:
    """Train one variant and score its best checkpoint on test."""
    run_name = name.replace(" ", "-").replace("(", "").replace(")", "")
    command = [
        sys.executable,
        "train.py",
        "--preset",
        "fashion-mnist",
        "--data.root",
        str(data),
        "--out-dir",
        str(args.out),
        "--name",
        run_name,
        "--epochs",
        str(args.epochs),
        "--select-metric",
        "macro_f1",
        "--no-progress",
        "--log-every-steps",
        "100000",
        *VARIANTS[name],
        *shlex.split(args.train_args),
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    best = args.out / run_name / "checkpoints" / "best.pt"
    out = args.out / run_name / "test-eval"
    subprocess.run(
        [sys.executable, "evaluate.py", str(best), "--split", "test", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    report = json.loads((out / "metrics.json").read_text())
    recall = {row["class"]: row["recall"] for row in report["per_class"]}
    return {
        "variant": name,
        "top1": report["top1"],
        "macro_f1": report["macro_f1"],
        "balanced_accuracy": report["balanced_accuracy"],
        "rare_recall": {c: recall[c] for c in args.rare},
        "common_recall_mean": sum(v for c, v in recall.items() if c not in args.rare)
        / (len(recall) - len(args.rare)),
    }


def main(args: Args) -> list[dict]:
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown --variants {unknown}; choose from {list(VARIANTS)}")
    data = build_data(args)
    rows = [run_variant(args, data, name) for name in args.variants]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    rare = " | ".join(f"{c} recall" for c in args.rare)
    print(
        f"\n{', '.join(args.rare)} {args.ratio}x rarer in train; balanced val and test; "
        "best epoch by val macro F1\n"
    )
    print(f"| variant | test top-1 | macro F1 | {rare} | other classes' recall |")
    print("|---|---|---|" + "---|" * len(args.rare) + "---|")
    for r in rows:
        rare_values = " | ".join(f"{r['rare_recall'][c]:.3f}" for c in args.rare)
        print(
            f"| {r['variant']} | {r['top1']:.4f} | {r['macro_f1']:.4f} | {rare_values} "
            f"| {r['common_recall_mean']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
