"""Predict the classes of new, unlabelled images with a trained model, and flag the ones not to trust.

    python predict.py runs/NAME/checkpoints/best.pt crops/ --out predictions.csv
    python predict.py runs/NAME/best.safetensors 'crops/**/*.jpg' --out predictions.jsonl --top-k 3
    python predict.py runs/NAME/checkpoints/best-export/model.onnx paths.txt --out p.csv --min-confidence 0.9
    python predict.py runs/NAME/checkpoints/best.pt crops/ --out p.csv --target-accuracy 0.99

MODEL is a checkpoint (.pt), a run directory (its checkpoints/last.pt), a .safetensors with the model card
in its metadata (train.py's best.safetensors, export.py's model.safetensors) or an exported model.onnx
(read with only its labels_mapping.json sidecar). The same images give the same numbers from each (ONNX to
float rounding). INPUT is an image file, a folder (every file with an image extension below it, sorted),
a glob (quoted, so this script expands it; ** for any depth; image extensions only) or a .txt file with
one image path per line (relative ones are relative to the list's folder; blank and # lines skipped).
An input that does not exist stops the command before the model is loaded.

Writes one row per file, in input order, as CSV or JSON Lines by --out's suffix: the path, the top-k class
names from the model's own mapping with their calibrated probabilities softmax(logits / T) (T: the
temperature fitted on the run's val split; 1.0 and uncalibrated when none was, which is said), and
`abstained`: true when the top-1 probability is below --min-confidence, or below the threshold the model
carries for --target-accuracy (train.py computes them on the val split; see classifier/selective.py and
the caveat on small val splits in the README). A file that cannot be read gets its error, no classes and
`abstained` true (so whoever keeps the rows with `abstained` false never takes it for a prediction); it
never stops the run.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from tqdm import tqdm

from classifier import files
from classifier.calibration import NO_TEMPERATURE
from classifier.card import ModelCard
from classifier.images import IMAGE_EXTENSIONS, load_image
from classifier.inference import Classifier, load_classifier
from classifier.selective import stored_threshold


@dataclass(frozen=True)
class PredictArgs:
    model: tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="MODEL")]]
    """A checkpoint (.pt), a run directory (its checkpoints/last.pt), a .safetensors with our metadata or an
    exported model.onnx with its labels_mapping.json."""
    inputs: tyro.conf.Positional[Annotated[tuple[str, ...], tyro.conf.arg(metavar="INPUT")]]
    """Image files, folders (searched recursively), quoted globs, or .txt files listing image paths."""
    out: Path
    """The predictions: a .csv or a .jsonl file, replaced whole (written atomically)."""
    top_k: int = 5
    """Classes (with probabilities) per image, most probable first; at most the model's class count."""
    min_confidence: float | None = None
    """Abstain (abstained = true) when the top-1 calibrated probability is below this. Default: never."""
    target_accuracy: float | None = None
    """Abstain below the threshold stored with the model for this accuracy (train.py stores 0.95, 0.99 and
    0.995 where its val split reaches them). Not with --min-confidence."""
    batch_size: int = 64
    """Images per forward pass."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """PyTorch models only: 'auto' (CUDA when available), 'cpu', 'cuda'. ONNX runs on the CPU."""
    progress: bool = True
    """Show a tqdm progress bar (on stderr)."""


# --- which files --------------------------------------------------------------------------------------


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: tuple[str, ...]) -> tuple[list[Path], int]:
    """(the files to predict, in input order and each once; how many files the folders held without an
    image extension, skipped). Any input that does not exist, a glob matching no image, a folder without
    images or a list naming a missing file stops the command with every such input named."""
    if not inputs:
        raise SystemExit("error: no INPUT given: name image files, folders, globs or .txt lists")
    found, problems, skipped = [], [], 0
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            below = sorted(p for p in path.rglob("*") if p.is_file())
            images = [p for p in below if is_image_name(p)]
            skipped += len(below) - len(images)
            if not images:
                problems.append(f"folder {text} holds no file with an image extension {IMAGE_EXTENSIONS}")
            found += images
        elif path.is_file() and path.suffix.lower() == ".txt":
            listed, missing = read_list(path)
            problems += missing
            found += listed
        elif path.is_file():
            found.append(path)  # named on its own: taken as an image whatever its suffix
        elif any(char in text for char in "*?["):  # glob's own wildcards
            matches = [Path(p) for p in glob.glob(text, recursive=True)]
            images = sorted(p for p in matches if p.is_file() and is_image_name(p))
            if not images:
                problems.append(f"glob {text!r} matches no file with an image extension")
            found += images
        else:
            problems.append(f"input {text} does not exist")
    if problems:
        raise SystemExit("error: " + "\nerror: ".join(problems) + "\nnothing was predicted")
    # The same file reached twice (a folder and a glob over it) is predicted once, where first reached.
    first = {}
    for path in found:
        first.setdefault(path.resolve(), path)
    return list(first.values()), skipped


def read_list(path: Path) -> tuple[list[Path], list[str]]:
    """(the image paths a .txt list names, relative ones taken from the list's folder; a line per path
    that is not a file, naming the list and line number). Blank lines and lines starting with # are
    skipped."""
    listed, missing = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        image = path.parent / line  # an absolute `line` stays itself
        if image.is_file():
            listed.append(image)
        else:
            missing.append(f"{path}:{number}: {image} is not a file")
    return listed, missing


# --- predicting ---------------------------------------------------------------------------------------


def predict_files(
    model: Classifier, paths: list[Path], *, batch_size: int, progress: bool
) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """(float32 logits of the readable files; their indices into `paths`; {index: why the file could not
    be read} for the others). Decoding runs in this process, `batch_size` files at a time."""
    logits, readable, errors = [], [], {}
    with tqdm(total=len(paths), unit="img", desc="predicting", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            images = []
            for i in range(start, min(start + batch_size, len(paths))):
                # A file that cannot be decoded is left out of the batch and remembered with the reason
                # (PIL's own message; load_image turns every decoding failure into a RuntimeError).
                try:
                    image = load_image(str(paths[i]))
                except RuntimeError as err:
                    errors[i] = str(err.__cause__ or err)
                    continue
                images.append(model.transform(image))
                readable.append(i)
            if images:
                logits.append(model.predict(torch.stack(images)))
            bar.update(min(batch_size, len(paths) - start))
    num_classes = len(model.card.classes)
    return torch.cat(logits) if logits else torch.empty(0, num_classes), readable, errors


def prediction_rows(
    paths: list[Path],
    logits: torch.Tensor,
    readable: list[int],
    errors: dict[int, str],
    *,
    classes: list[str],
    temperature: float,
    top_k: int,
    min_confidence: float | None,
) -> list[dict]:
    """One dict per file, in `paths`' order: path, classes and probabilities (top-k, most probable
    first), abstained, error (None when the file was read)."""
    # T > 0 keeps the order of the logits, so the top-k classes are the same before and after dividing.
    probabilities, indices = (logits / temperature).softmax(dim=1).topk(top_k, dim=1)
    predicted = {
        i: ([classes[c] for c in top], p)
        for i, top, p in zip(readable, indices.tolist(), probabilities.tolist(), strict=True)
    }
    rows = []
    for i, path in enumerate(paths):
        if i in errors:
            rows.append(dict(path=str(path), classes=[], probabilities=[], abstained=True, error=errors[i]))
            continue
        names, p = predicted[i]
        abstained = min_confidence is not None and p[0] < min_confidence
        rows.append(dict(path=str(path), classes=names, probabilities=p, abstained=abstained, error=None))
    return rows


# --- writing ------------------------------------------------------------------------------------------


def to_csv(rows: list[dict], top_k: int) -> str:
    """path, abstained, top1_class, top1_probability, ..., top<k>_*, error. Booleans as true/false, as in
    the JSON Lines; an unreadable file's class and probability cells are empty."""
    ranks = [f"top{r}" for r in range(1, top_k + 1)]
    header = [
        "path",
        "abstained",
        *[f"{r}_{what}" for r in ranks for what in ("class", "probability")],
        "error",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        if row["error"]:
            cells = [""] * (2 * top_k)  # no classes for a file that could not be read
        else:
            ranked = zip(row["classes"], row["probabilities"], strict=True)
            cells = [cell for name, p in ranked for cell in (name, f"{p:.6f}")]
        writer.writerow([row["path"], str(row["abstained"]).lower(), *cells, row["error"] or ""])
    return buffer.getvalue()


def to_jsonl(rows: list[dict]) -> str:
    """One JSON object a line: {"path", "abstained", "top_k": [{"class", "probability"}, ...], "error"}."""
    lines = []
    for row in rows:
        top = [
            {"class": name, "probability": round(p, 6)}
            for name, p in zip(row["classes"], row["probabilities"], strict=True)
        ]
        record = {"path": row["path"], "abstained": row["abstained"], "top_k": top, "error": row["error"]}
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


# --- main ---------------------------------------------------------------------------------------------


def check_args(args: PredictArgs) -> None:
    """Refuse flag values that cannot work, before anything is read."""
    if args.out.suffix not in (".csv", ".jsonl"):
        raise SystemExit(f"error: --out {args.out}: the suffix must be .csv or .jsonl")
    if args.top_k < 1:
        raise SystemExit(f"error: --top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, got {args.batch_size}")
    if args.min_confidence is not None and args.target_accuracy is not None:
        raise SystemExit("error: give --min-confidence or --target-accuracy, not both")
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise SystemExit(f"error: --min-confidence must be in [0, 1], got {args.min_confidence}")
    if not args.model.exists():
        raise SystemExit(f"error: model {args.model} does not exist")
    if args.model.suffix == ".onnx" and args.device == "cuda":
        raise SystemExit("error: --device cuda: ONNX models run on the CPU here; leave --device out")


def abstain_below(args: PredictArgs, card: ModelCard, source: Path) -> float | None:
    """The confidence to abstain below: --min-confidence, or the model's stored threshold for
    --target-accuracy (said with the split and count it came from), or None (never abstain)."""
    if args.target_accuracy is None:
        return args.min_confidence
    try:
        row = stored_threshold(card.abstain_thresholds, args.target_accuracy)
    except ValueError as err:
        raise SystemExit(f"error: --target-accuracy {args.target_accuracy}: {source}: {err}") from None
    stored = card.abstain_thresholds
    if stored["temperature"] != card.temperature:  # the confidences would not be the ones it was cut on
        raise SystemExit(
            f"error: --target-accuracy: {source}'s thresholds were computed with temperature "
            f"{stored['temperature']}, but its temperature is {card.temperature}"
        )
    print(
        f"abstain: below {row['threshold']:.6f}, the threshold for accuracy {args.target_accuracy} "
        f"stored with {source.name}: on its {stored['split']} split it kept {row['kept']} of "
        f"{stored['images']} images ({row['coverage']:.1%}) at accuracy {row['accuracy']:.4f}"
    )
    return row["threshold"]


def main(args: PredictArgs) -> list[dict]:
    # Flags and inputs are checked before the model is loaded: a typo costs a second, not a model load.
    check_args(args)
    paths, skipped = find_images(args.inputs)
    if skipped:
        print(f"skipped {skipped} file(s) without an image extension in the folders given")
    model = load_classifier(args.model, args.device)
    card, classes = model.card, list(model.card.classes)
    top_k = min(args.top_k, len(classes))
    if top_k < args.top_k:
        print(f"--top-k {args.top_k} is more than the model's {len(classes)} classes: writing {top_k}")
    temperature = card.temperature or NO_TEMPERATURE
    if card.temperature is None:
        print(f"calibration: no temperature stored with {model.source.name}: T = 1.0, uncalibrated")
    else:
        print(f"calibration: softmax(logits / {temperature:.3f}), T fitted on the run's val split")
    min_confidence = abstain_below(args, card, model.source)

    logits, readable, errors = predict_files(model, paths, batch_size=args.batch_size, progress=args.progress)
    rows = prediction_rows(
        paths,
        logits,
        readable,
        errors,
        classes=classes,
        temperature=temperature,
        top_k=top_k,
        min_confidence=min_confidence,
    )
    # Atomic: a pipeline polling for the file never reads half of it.
    files.write_text(args.out, to_csv(rows, top_k) if args.out.suffix == ".csv" else to_jsonl(rows))

    unreadable = [row for row in rows if row["error"]]
    for row in unreadable[:5]:  # the rest are in the output file, as these are
        print(f"unreadable: {row['path']}: {row['error']}", file=sys.stderr)
    if len(unreadable) > 5:
        print(f"unreadable: {len(unreadable) - 5} more, listed in {args.out}", file=sys.stderr)
    abstained = sum(row["abstained"] for row in rows if not row["error"])
    threshold = "never: no threshold given" if min_confidence is None else f"below {min_confidence:.6g}"
    print(
        f"{model.backend} {model.source}: predicted {len(readable)} of {len(paths)} files | "
        f"{abstained} abstained ({threshold}) | {len(unreadable)} unreadable (listed with their error) | "
        f"wrote {args.out}"
    )
    if not readable:
        raise SystemExit(f"error: none of the {len(paths)} files could be read (see {args.out})")
    return rows


if __name__ == "__main__":
    main(tyro.cli(PredictArgs, description=__doc__))
