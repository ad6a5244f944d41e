"""The run's configuration: tyro dataclasses, nested one level (`--data.root`, `--optim.lr`).

Every field's docstring is its `--help` text. This module holds the dataclasses and their JSON round
trip, and imports nothing from the project: parsing (presets, `--resume`) is in cli.py. It computes
nothing derived (steps per epoch, EMA decay): train.py does that once.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# torchvision's ImageNet statistics: the right normalization for its pretrained weights
# (https://pytorch.org/vision/stable/models.html).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ModelName = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "convnext_tiny",
    "regnet_y_400mf",
    "small_resnet",
]


@dataclass(frozen=True)
class DataConfig:
    root: Path = Path("data/fashion-mnist")
    """ImageFolder root holding `train/` and optionally `val/` and `test/`, one folder per class; or a
    manifest file (.csv with the columns path,label[,split][,group], or .jsonl with those keys), its paths
    relative to its folder."""
    image_size: int = 224
    """Side of the square image the model sees (train crop and eval crop)."""
    resize_size: int | None = None
    """Side that images are brought to before the crop: the eval resize of the shorter side before the
    center crop ('crop' mode), and the side of the square the training crop is cut from (every mode);
    default image_size * 256 / 224."""
    resize_mode: Literal["crop", "pad", "stretch"] = "crop"
    """How an image that is not square becomes the model's square. 'crop': resize the shorter side, then
    center-crop (cuts the top and bottom of a tall image); 'pad': resize the longer side and pad to a
    square with the mean colour (keeps the whole image; the fill is in the sidecar); 'stretch': resize to
    the square, changing the aspect ratio. Training and evaluation, both data paths and the export."""
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    """Resize interpolation, for training and evaluation alike (and recorded in the export sidecar)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (RGB, on the 0-1 scale) subtracted before the model."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation (RGB, 0-1 scale) divided out before the model."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range for training; (0.08, 1.0) is torchvision's default."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range for training."""
    hflip: bool = True
    """Random horizontal flip in training. Turn off for digits and text (a flipped 2 is not a 2)."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength in training (0 disables it)."""
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    """Per-image automatic augmentation policy in training, after crop/flip and before normalization:
    torchvision's RandAugment or TrivialAugmentWide (its rotations, shears and solarize can change what
    digits or text read as). Geometric ops use bilinear (nearest with --data.interpolation nearest)."""
    randaugment_num_ops: int = 2
    """RandAugment: ops applied to each image in a row (torchvision's default 2)."""
    randaugment_magnitude: int = 9
    """RandAugment: strength of every op, 0-30 on torchvision's 31-bin scale (its default 9)."""
    random_erasing: float = 0.0
    """Probability of erasing a random rectangle (2-33% of the area) of each training image after
    normalization (to 0, the mean colour), as torchvision's reference recipes do; 0 disables it."""
    motion_blur: float = 0.0
    """Video degradation in training: probability of a motion blur (a line kernel of 4-12% of the image's
    side at a random angle). The four degradations run on the decoded image before the crop, in the
    order motion blur, low resolution, JPEG, occlusion (classifier/video_augment.py); 0 disables each."""
    low_resolution: float = 0.0
    """Video degradation: probability of shrinking the image until its shorter side is 12-28 px, then
    stretching it back (a far, small player whose number spans a few pixels)."""
    jpeg: float = 0.0
    """Video degradation: probability of re-compressing as JPEG at a low quality (video compression)."""
    occlusion: float = 0.0
    """Video degradation: probability of a flat-coloured patch entering from an edge (another player)."""
    val_fraction: float = 0.1
    """When no val split is given (no `val/` folder, no val rows): the fraction of each class held out of
    the training images (seeded, stratified by class; whole groups when groups are known)."""
    group_pattern: str | None = None
    """Regex with one capture group naming each image's group (track, clip, game) in its path relative
    to the data root, e.g. '(game\\d+_track\\d+)_'. A manifest's group column does the same. Groups keep
    near-identical frames of one track on one side of the split; evaluate.py votes per group."""
    strict_groups: bool = False
    """Stop when a group has images in train and in val or test, instead of reporting it."""
    batch_size: int = 64
    """Images per device per forward pass. The global batch is batch_size * world size * grad_accum_steps."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per training process; 0 loads in the main process, as --debug does.
    'auto': this process's share of the usable cores, at most 4; on a CPU with two cores or fewer, none
    for the training loader, whose step already fills them (classifier/hardware.py)."""
    fast_path: bool = False
    """Small images: decode every image once into a uint8 tensor and augment whole batches on the device
    (classifier/fastdata.py): no per-image PIL work and no worker processes while training."""
    cache_dir: Path | None = None
    """With --data.fast-path: keep the decoded images in this folder (e.g. DATA_ROOT/.cache) so the next
    run skips decoding; None keeps them in memory only."""
    weighted_sampler: bool = False
    """Draw training images with replacement, weighted by their class's count^-sampler_alpha (with the
    default alpha 1, every class is drawn equally often)."""
    sampler_alpha: float = 1.0
    """With --data.weighted-sampler: 0 keeps natural class frequencies, 1 balances classes fully, 0.5 is
    in between (class c drawn with probability ∝ count_c^(1 - alpha))."""
    class_weighted_loss: bool = False
    """Weight the cross-entropy by inverse class frequency of the train split."""
    max_train_batches: int | None = None
    """Cap on training batches per epoch (smoke tests and --debug); None uses the whole split."""
    scan_images: bool = True
    """Decode every image once before training, so a bad file is named at start, not in epoch 3."""
    skip_bad_images: bool = False
    """Leave unreadable images out (listed in RUN/bad_images.txt) instead of stopping with their names."""
    audit: bool = True
    """Before training, hash every image (pHash) and count the val and test images with a near twin in
    train, and near-duplicates within train (RUN/audit/: twins.csv, twins.png, summary.json).
    `python -m classifier.audit DATA` runs the same audit alone."""
    audit_threshold: int = 6
    """Hamming distance (of 64 bits) within which two images' hashes make them near twins."""


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW, or SGD with Nesterov momentum."""
    lr: float | None = None
    """Peak learning rate. Default, from whether weights are loaded: AdamW 1e-4 fine-tuning pretrained
    weights, 1e-3 from scratch (--pretrained None); SGD 0.01 and 0.1."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to norm layers and biases."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_epochs: float = 1.0
    """Linear warmup from ~0 to the peak LR over this many epochs (fractions allowed)."""
    schedule: Literal["cosine", "step", "multistep"] = "cosine"
    """After warmup: cosine decay, or the LR times gamma every step_size_epochs ('step') or at each of
    milestones_epochs ('multistep')."""
    min_lr_ratio: float = 0.01
    """The cosine decays to lr * min_lr_ratio at the last step."""
    step_size_epochs: float = 30.0
    """'step' schedule: epochs between LR drops."""
    milestones_epochs: tuple[float, ...] = (30.0, 60.0, 80.0)
    """'multistep' schedule: the epochs at which the LR drops."""
    gamma: float = 0.1
    """'step'/'multistep': the factor of each LR drop."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    mixup_alpha: float = 0.0
    """MixUp: blend each training image with another, lambda ~ Beta(alpha, alpha), the targets likewise
    (soft targets, still smoothed and class-weighted); 0 disables it. 0.2 is the torchvision recipe's
    value."""
    cutmix_alpha: float = 0.0
    """CutMix: paste a box of another training image, the targets mixed by the box's area, lambda ~
    Beta(alpha, alpha); 0 disables it. With MixUp on too, each batch gets one of the two at random."""
    mix_prob: float = 1.0
    """Probability that a training batch is mixed at all, when MixUp or CutMix is on."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    clip_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (after unscaling under fp16); None disables."""
    backbone_lr_mult: float = 1.0
    """Discriminative LR: every parameter outside the classification head gets the LR times this (0.1:
    the pretrained backbone moves 10x slower than the new head). Composes with --optim.layer-decay."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: stage k below the head gets the LR times layer_decay**k (ResNet: layer4 k=1,
    ... layer1 k=4, stem k=5); 1 disables it. The grouping is printed at the start of a run."""


@dataclass(frozen=True)
class TrackingConfig:
    wandb_project: str = "classifier-training"
    """W&B project of --log wandb. Online or offline, entity and API key are W&B's own settings
    (WANDB_MODE=offline, WANDB_ENTITY, WANDB_API_KEY or `wandb login`)."""
    mlflow_uri: str | None = None
    """MLflow tracking store of --log mlflow: a server URL or sqlite:///FILE. Default: MLFLOW_TRACKING_URI,
    else sqlite:///OUT_DIR/mlflow.db. A resumed run keeps the store it started in."""
    mlflow_experiment: str = "classifier-training"
    """MLflow experiment of --log mlflow; created when it does not exist."""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelName = "resnet18"
    """torchvision classification model (its head replaced for the dataset's class count), or
    small_resnet: the project's compact network for 28-64 px images from scratch (classifier/models.py)."""
    pretrained: str | None = None
    """'DEFAULT' for torchvision's weights from the TORCH_HOME cache, or a path to a .pth/.safetensors
    file (from one of this trainer's checkpoints: the weights its validation chose, EMA or raw)."""
    small_input_stem: bool = False
    """ResNets only: 3x3 stride-1 first conv and no max-pool, for 28-64 px images (CIFAR-style stem)."""
    stem_stride: int = 1
    """With --small-input-stem: the stride of its 3x3 conv. 2 halves the resolution once (32 px enters the
    first block at 16x16, not 32x32 or the ImageNet stem's 8x8): ~1.6x cheaper per image than stride 1."""
    epochs: int = 10
    """Training epochs."""
    freeze_epochs: float = 0.0
    """Head first: for this many epochs (fractions allowed) only the classification head trains; the
    backbone's parameters are frozen and its BatchNorm layers stay in eval mode. Then everything trains,
    and the LR schedule (warmup, then cosine or steps) starts again over the epochs that remain."""
    freeze_bn_stats: bool = False
    """Keep every BatchNorm layer's running statistics as loaded (eval mode) for the whole run; their
    scale and shift still train. For fine-tuning on small batches, whose statistics are noisy."""
    find_lr: bool = False
    """Run the LR range test instead of training: 100 steps with the LR growing exponentially from 1e-7 to
    10 on this run's data, model, loss and optimizer (it stops early once the loss diverges); writes
    lr_find.png and the suggested LR to RUN-lr-find/ (no checkpoint, and the run's own directory stays
    free for the real run)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype. 'auto': bf16 on CUDA from Ampere on (fp16 before it) and on CPUs with native bf16
    (avx512_bf16/AMX), else fp32: emulated bf16 is 2-12x slower than fp32 (classifier/hardware.py).
    fp16 uses a GradScaler; bf16 needs none. config.json records what 'auto' chose and why."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """The channels_last memory format for the model and the images. 'auto': on for CPUs (faster in fp32
    and bf16 alike, measured: classifier/hardware.py) and for CUDA fp16/bf16 (tensor cores); off for CUDA
    fp32."""
    compile: bool = False
    """torch.compile the model (long cold start; checkpoints still hold the plain module)."""
    sync_batchnorm: bool = False
    """Under DDP on GPUs: BatchNorm statistics over the global batch instead of each GPU's share."""
    ema_half_life_epochs: float | None = 0.5
    """EMA half-life in epochs, turned into a per-step decay; None disables EMA. The EMA and the raw
    weights are both validated every epoch; the better by --select-metric is the epoch's result."""
    logit_adjustment: Literal["none", "frequency", "balanced"] = "none"
    """Add log(target prior) - log(training prior) to the logits in validation, best.pt and export
    (classifier/imbalance.py). 'frequency': probabilities follow the train split's class frequencies,
    undoing the weighted sampler/class-weighted loss; 'balanced': every class equally likely a priori."""
    select_metric: Literal["top1", "macro_f1", "balanced_accuracy"] = "top1"
    """Validation metric that picks each epoch's weights (EMA or raw), the best epoch (best.pt) and drives
    early stopping. macro_f1 or balanced_accuracy weigh rare classes like common ones."""
    early_stop_patience: int | None = None
    """Stop after this many epochs without a better select_metric; None trains all epochs."""
    keep_best: int = 1
    """Besides best.pt and last.pt, keep checkpoints/epoch-NNN.pt of the best k epochs (k > 1), pruning
    the rest."""
    label_issues: bool = True
    """After training, rank the training images by how much best.pt doubts their given label
    (RUN/label_issues/: label_issues.csv, the whole queue, and label_issues.png, its top), so a person
    reviews the likeliest labelling mistakes first. One inference pass over the train split."""
    seed: int = 0
    """Seeds model init, data order and augmentation; the same seed reproduces a run on CPU bit for bit."""
    name: str | None = None
    """Run name: the run lives in OUT_DIR/NAME. Default: <model>-<data root folder name>."""
    out_dir: Path = Path("runs")
    """Parent folder of run directories."""
    resume: Path | None = None
    """Run directory (or checkpoint file) to continue, its saved config being the base for other flags; or
    'auto': continue OUT_DIR/NAME if it has a checkpoint, else start it (for torchrun --max-restarts)."""
    accept_config_changes: bool = False
    """On --resume, accept flags that change the saved config (e.g. more --epochs) instead of refusing."""
    checkpoint_every_steps: int | None = None
    """Also write checkpoints/last.pt every N optimizer steps (mid-epoch), besides every epoch."""
    log_every_steps: int = 50
    """Steps between log lines and tracker points."""
    log: str = "tensorboard"
    """Trackers, comma separated: any of tensorboard, wandb, mlflow (`--log tensorboard,wandb`). W&B and
    MLflow are optional extras: pip install -e '.[wandb]' or '.[mlflow]'. metrics.jsonl is always written."""
    progress: bool = True
    """Show tqdm progress bars (rank 0 only)."""
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss (fp32/bf16): 'stop' names the step and its files and stops before anything bad is
    saved; 'skip' leaves that batch out of the update and counts it (one sync point per step)."""
    debug: bool = False
    """Main-process data loading, a few batches, anomaly detection, and an overfit-one-batch check."""
    debug_overfit_failure: Literal["stop", "continue"] = "stop"
    """--debug: when a copy of the model cannot fit one batch, 'stop' the run (a bug upstream of the
    optimizer is likely: labels shuffled against images, a frozen layer, a wrong loss) or 'continue'."""
    preset: str | None = None
    """Named preset from configs/ used as the base (`--preset fashion-mnist`); flags after it override it."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --- JSON round trip --------------------------------------------------------------------------------


def to_dict(cfg: TrainConfig) -> dict:
    """Plain JSON-able data (Paths as str, tuples as lists): what config.json and checkpoints hold."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def from_dict(raw: dict) -> TrainConfig:
    """Inverse of to_dict: restores Paths, tuples and nested dataclasses; unknown keys are an error."""

    def build(cls, values: dict):
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"unknown config keys for {cls.__name__}: {unknown}")
        kwargs = {}
        for name, value in values.items():
            hint = hints[name]
            if dataclasses.is_dataclass(hint):
                value = build(hint, value)
            elif value is not None and Path in (hint, *typing.get_args(hint)):
                value = Path(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    return build(TrainConfig, raw)


def save_json(cfg: TrainConfig, path: Path, **extra) -> dict:
    """Write the config and `extra` to `path` as JSON; returns what was written."""
    record = {**to_dict(cfg), **extra}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
