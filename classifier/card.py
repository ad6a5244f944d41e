"""The facts that travel with a trained model, in one typed shape: the ModelCard.

A consumer of the weights needs the class order as trained, the preprocessing, the architecture, which
weights were kept (EMA or raw), the logit adjustment already folded into the head, the data split the
numbers were measured on, the fitted temperature and the abstain thresholds per target accuracy
(selective.py). train.py builds the card once; the same object writes labels_mapping.json and
best.safetensors' metadata (`to_mapping`), and export.py and evaluate.py read it back (`from_checkpoint`,
`from_mapping`). How the weights themselves are stored is checkpoint.py's business; what the ONNX graph
takes and returns is added by export.py. schemas/labels_mapping.schema.json describes every key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from classifier.config import TrainConfig

# The version of labels_mapping.json's format (and of the same mapping in safetensors and ONNX metadata).
# Raised only when a reader of the previous version would misread a file: a key removed, renamed or
# given another meaning. New keys do not raise it (readers ignore keys they do not know). A file without
# it is version 1 (written before the key existed, same meaning).
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DataSplit:
    """Where the validation numbers come from: the run's data root (a folder or a manifest), split by
    `val_fraction` with `seed` and the groups `group_pattern` finds (data.build_splits), so evaluate.py
    can rebuild the very same val split. `root` is None in what an export ships (no path of the training
    machine leaves it): a reader then needs the data root from its user."""

    root: str | None
    val_fraction: float
    seed: int
    group_pattern: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What every mapping of a card holds; weights, epoch, temperature and abstain thresholds only once known.
MAPPING_KEYS = (
    "num_classes",
    "idx_to_class",
    "preprocessing",
    "model",
    "small_input_stem",
    "stem_stride",
    "logit_adjustment",
    "data",
)


@dataclass(frozen=True)
class ModelCard:
    """The facts of one set of trained weights. Frozen: a changed fact is a new card (`chosen`)."""

    classes: tuple[str, ...]  # in training order: logit i is classes[i]
    preprocessing: dict  # transforms.preprocessing_spec: resize, crop, mean, std, interpolation
    model: str  # the --model name; with the two stem fields, enough for models.build_model
    small_input_stem: bool
    stem_stride: int
    logit_adjustment: str  # the --logit-adjustment mode; the bias itself is already in the head
    data: DataSplit
    weights: str | None = None  # 'ema' or 'raw': the weights validation preferred; None before training
    epoch: int | None = None  # the epoch these weights finished; None before training
    temperature: float | None = None  # fitted on the val split; None: not fitted
    # selective.abstain_thresholds on the val split with that temperature; None: none computed (a model
    # trained before they were, or not best.pt)
    abstain_thresholds: dict | None = None

    @classmethod
    def for_run(cls, cfg: TrainConfig, classes: list[str], preprocessing: dict) -> ModelCard:
        """The card of a run about to train: no weights chosen yet, no temperature."""
        return cls(
            classes=tuple(classes),
            preprocessing=preprocessing,
            model=cfg.model,
            small_input_stem=cfg.small_input_stem,
            stem_stride=cfg.stem_stride,
            logit_adjustment=cfg.logit_adjustment,
            data=DataSplit(
                root=str(cfg.data.root),
                val_fraction=cfg.data.val_fraction,
                seed=cfg.seed,
                group_pattern=cfg.data.group_pattern,
            ),
        )

    @classmethod
    def from_checkpoint(cls, state: dict, weights: str) -> ModelCard:
        """The card of a checkpoint's `weights` ('ema' or 'raw', as checkpoint.inference_weights chose).
        Its temperature and abstain thresholds are None unless training wrote them into this very file;
        its epoch is not recorded (a checkpoint's "epoch" is the one a resume would start)."""
        config = state["config"]
        return cls(
            classes=tuple(state["classes"]),
            preprocessing=state["preprocessing"],
            model=config["model"],
            small_input_stem=config["small_input_stem"],
            stem_stride=config["stem_stride"],
            logit_adjustment=config["logit_adjustment"],
            data=DataSplit(
                root=config["data"]["root"],
                val_fraction=config["data"]["val_fraction"],
                seed=config["seed"],
                group_pattern=config["data"].get("group_pattern"),  # None: a config without the field
            ),
            weights=weights,
            temperature=state.get("temperature"),
            abstain_thresholds=state.get("abstain_thresholds"),
        )

    @classmethod
    def from_mapping(cls, mapping: dict) -> ModelCard:
        """Inverse of to_mapping: read back a sidecar or safetensors metadata (already JSON-decoded). A
        mapping without one of MAPPING_KEYS is refused (ValueError naming them): there is no other place
        to read the architecture or the data split from. A mapping that does not say its temperature was
        fitted is read as not fitted; one without abstain thresholds (or with null) as having none."""
        missing = [key for key in MAPPING_KEYS if key not in mapping]
        if missing:
            raise ValueError(f"a model card needs the keys {missing}")
        fitted = mapping.get("temperature_fitted", False)
        return cls(
            classes=tuple(classes_from_mapping(mapping)),
            preprocessing=mapping["preprocessing"],
            model=mapping["model"],
            small_input_stem=mapping["small_input_stem"],
            stem_stride=mapping["stem_stride"],
            logit_adjustment=mapping["logit_adjustment"],
            data=DataSplit(**mapping["data"]),
            weights=mapping.get("weights"),
            epoch=mapping.get("epoch"),
            temperature=mapping.get("temperature") if fitted else None,
            abstain_thresholds=mapping.get("abstain_thresholds"),
        )

    def chosen(self, *, weights: str, epoch: int) -> ModelCard:
        """This card for the weights an epoch's validation kept."""
        return dataclasses.replace(self, weights=weights, epoch=epoch)

    def to_mapping(self) -> dict:
        """labels_mapping.json's shape: format version, class order both ways, preprocessing, architecture,
        data split; weights, epoch, temperature and abstain thresholds only once they are known. Plain
        JSON-able data."""
        mapping = {
            "format_version": FORMAT_VERSION,
            "num_classes": len(self.classes),
            "idx_to_class": {str(i): name for i, name in enumerate(self.classes)},
            "class_to_idx": {name: i for i, name in enumerate(self.classes)},
            "preprocessing": self.preprocessing,
            "model": self.model,
            "small_input_stem": self.small_input_stem,
            "stem_stride": self.stem_stride,
            "logit_adjustment": self.logit_adjustment,
            "data": self.data.to_dict(),
        }
        if self.weights is not None:
            mapping["weights"] = self.weights
        if self.epoch is not None:
            mapping["epoch"] = self.epoch
        if self.temperature is not None:
            mapping.update(temperature=self.temperature, temperature_fitted=True)
        if self.abstain_thresholds is not None:
            mapping["abstain_thresholds"] = self.abstain_thresholds
        return mapping


def check_format_version(mapping: dict, where: object) -> None:
    """Refuse a mapping written by a newer format than this code reads (ValueError naming `where`, the file
    it came from). No format_version: version 1, written before the key existed."""
    version = mapping.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version} is newer than this code reads ({FORMAT_VERSION}); "
            "update classifier-training to read it"
        )


def classes_from_mapping(mapping: dict) -> list[str]:
    """Class names in index order from a sidecar's idx_to_class. Keys are strings: sorting them as text
    would put "10" before "2", so they are sorted as integers."""
    idx_to_class = mapping["idx_to_class"]
    order = sorted(idx_to_class, key=int)
    if [int(k) for k in order] != list(range(len(order))) or len(order) != mapping["num_classes"]:
        raise ValueError(f"idx_to_class must map 0..{mapping['num_classes'] - 1}, got keys {order}")
    return [idx_to_class[k] for k in order]
