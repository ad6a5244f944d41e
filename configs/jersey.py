"""Fine-tune a pretrained ResNet18 on small, heavily imbalanced jersey-number crops.

Digits are not mirror-symmetric (no horizontal flip), crops are small (64 px) and the class of a crop
lives in the whole number, so random crops stay mild. Rare numbers matter as much as common ones, so the
sampler draws classes equally. The low AdamW LR is the usual fine-tuning regime for a pretrained ResNet.
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
        weighted_sampler=True,
        batch_size=64,
    ),
    optim=OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=1.0, label_smoothing=0.1),
)
