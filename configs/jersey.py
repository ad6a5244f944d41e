"""Fine-tune a pretrained ResNet18 on small, heavily imbalanced jersey-number crops.

Digits are not mirror-symmetric (no horizontal flip), crops are small (64 px) and the class of a crop
lives in the whole number, so random crops stay mild. Rare numbers matter as much as common ones, so the
sampler draws classes equally (alpha 1: the best macro F1 of the rebalancing options on a 20x-imbalanced
Fashion-MNIST, README "Rebalancing").

The fine-tuning choices follow bench/fine_tune.py (README "Fine-tuning"; 3 seeds each, AMD EPYC, fp32):
- LR 4e-4: the LR range test (--find-lr) suggested 3.0e-4 to 5.2e-4 on the bench's task, and training
  at its suggestion scored 0.925 ± 0.004 test top-1 against 0.902 ± 0.001 at the trainer's fine-tuning
  default of 1e-4, which leaves a new head undertrained in a short run. Run --find-lr on your own data.
  From scratch (`--pretrained None`) give `--optim.lr 1e-3` as well.
- No head-first phase and no discriminative LRs: head-first lost 2.4 points to plain fine-tuning,
  head-first + backbone LR x0.1 2.0; head-first + layer decay 0.6 at 1e-3 (0.920) did not beat the LR
  from the finder (--freeze-epochs, --optim.backbone-lr-mult, --optim.layer-decay stay available).
- resize_mode "stretch": tall crops keep all their pixels. On tall Fashion-MNIST (bench/resize_mode.py,
  32 px) stretch beat crop and pad both when the images were stretched to 1:2 and when an unscaled
  object sat at a random height in a 1:2 canvas (README "Tall crops").
- The video degradations stay off: on the bench's clean test images they cost 0.9 points (0.872 vs
  0.881 over the same head-first recipe). Turn them on (--data.motion-blur 0.3 --data.jpeg 0.3 ...) when
  the crops you predict on are blurred, compressed or occluded and your val split shows that.
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
        resize_mode="stretch",
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
        lr=4e-4,
        weight_decay=0.05,
        warmup_epochs=1.0,
        label_smoothing=0.1,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
    ),
)
