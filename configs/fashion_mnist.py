"""Fashion-MNIST from scratch on a 2-core CPU, against the clock: >= 0.93 test top-1 in under 10 minutes
of training on a CPU with native bf16 (6.3 minutes, AMX Xeon); with AVX2 only, where it trains in fp32,
the same epochs take 3.8x as long (0.93 after 29.8 minutes). `python bench/time_to_accuracy.py` runs it
and prints the curve (README, Benchmarks).

Where the numbers come from (a 2-core Intel Xeon with AMX bf16, no GPU, unless named otherwise; one
training step, batch 128, median of 6, bf16 autocast, channels_last):
- The budget is images per second. ResNet18 runs 420-470 img/s with the ImageNet stem at 32 px (a 32 px
  image enters its first block at 8x8), 225-280 with the stride-2 small stem (14x14 at 28 px) and 170
  with the stride-1 one. Measured with bench/time_to_accuracy.py: ResNet18 with the stride-2 stem does 2
  epochs in 9.8 minutes and reaches 0.899 test top-1; the ImageNet stem, 2 epochs: 0.884 (`make demo`).
- small_resnet (classifier/models.py, 0.48M parameters, full 28 px resolution in its first stage) runs
  ~1,000 img/s in training here: ~1 minute per epoch, so 8 epochs fit with room to spare, and more
  epochs at full resolution beat fewer epochs of a deeper network in this budget.
- Native 28 px (no resize): the network's three 2x2 pools need no power of two (28 -> 14 -> 7 -> 3).
- Precision, channels_last and DataLoader workers are left to 'auto' (classifier/hardware.py), as no
  one choice is right on every CPU: bf16 autocast is 2.1x fp32 for small_resnet where the CPU has native
  bf16 (959 vs 446 img/s, AMX), and slower than fp32 where it has not: 0.46x with AVX-512 (145 vs 314
  img/s), 0.085x with AVX2 only (20 vs 235; bench/precision.py), so 'auto' takes bf16 only on the former.
  channels_last is faster on both kinds where it was measured (1.14x in fp32 on AVX2 and AMX).
- Mild crops (70-100% of the area) and flips; no RandAugment, erasing or mixing: 8 epochs are too few
  for the model to overfit 57k images, and those slow down what it learns first.
- AdamW at 2e-3 with 0.3 epochs of warmup and cosine decay; label smoothing 0.1; EMA with a half-life
  of a quarter epoch (raw and EMA weights are both validated every epoch, the better one is kept).
- val_fraction 0.05: 57,000 images train, 3,000 (stratified) pick the best epoch and fit the temperature.
Prepare the data with `python -m classifier.fashion_mnist data/fashion-mnist`.
"""

from pathlib import Path

from classifier.config import DataConfig, OptimConfig, TrainConfig

CONFIG = TrainConfig(
    model="small_resnet",
    epochs=8,
    ema_half_life_epochs=0.25,
    preset="fashion-mnist",
    data=DataConfig(
        root=Path("data/fashion-mnist"),
        image_size=28,
        resize_size=28,
        # Fashion-MNIST pixel statistics (grayscale copied to three channels), not ImageNet's.
        mean=(0.286, 0.286, 0.286),
        std=(0.353, 0.353, 0.353),
        crop_scale=(0.7, 1.0),
        crop_ratio=(0.85, 1.15),
        hflip=True,  # clothes are left-right symmetric
        val_fraction=0.05,
        batch_size=128,
        fast_path=True,
    ),
    optim=OptimConfig(lr=2e-3, weight_decay=0.05, warmup_epochs=0.3, label_smoothing=0.1),
)
