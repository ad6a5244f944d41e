"""Fine-tune a pretrained ResNet18 on small, heavily imbalanced jersey-number crops.

Digits are not mirror-symmetric (no horizontal flip), crops are small (64 px) and the class of a crop
lives in the whole number, so random crops stay mild. Rare numbers matter as much as common ones, so the
sampler draws classes equally (alpha 1: the best macro F1 of the rebalancing options on a 20x-imbalanced
Fashion-MNIST, README "Rebalancing"). The LR is left to the trainer: AdamW's 1e-4, the usual fine-tuning
regime, with the pretrained weights; 1e-3 with `--pretrained None` (from scratch), where 1e-4 would crawl.
Needs torchvision's ResNet18 weights in $TORCH_HOME/hub/checkpoints/ (or `--pretrained FILE`).
"""

from pathlib import Path

from classifier.config import DataConfig, OptimConfig, TrainConfig

CONFIG = TrainConfig(
    model="resnet18",
    pretrained="DEFAULT",
    epochs=15,
    ema_half_life_epochs=1.0,
    preset="jersey",
    data=DataConfig(
        root=Path("data/jersey"),
        image_size=64,
        resize_size=64,
        crop_scale=(0.7, 1.0),
        crop_ratio=(0.8, 1.25),
        hflip=False,
        color_jitter=0.2,
        # No RandAugment/TrivialAugment and no random erasing: their rotations, shears and solarize can
        # change what a digit reads as (a 6 turned far enough is a 9), and an erased stroke turns 8 into 3
        # or 0. On small, rare classes that is label noise, not robustness.
        auto_augment="none",
        random_erasing=0.0,
        weighted_sampler=True,
        batch_size=64,
    ),
    # MixUp and CutMix stay off: a CutMix box over part of "23" pasted from "7" reads as another number
    # entirely, not 0.6 of one and 0.4 of the other, and a MixUp blend of two numbers ghosts the digits the
    # same way; the rare numbers, few and drawn often, would also spend half their draws as someone's mix.
    optim=OptimConfig(
        weight_decay=0.05,
        warmup_epochs=1.0,
        label_smoothing=0.1,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
    ),
)
