"""EMA: half-life conversion and BatchNorm statistics following the model."""

from __future__ import annotations

import pytest
import torch

from classifier.ema import build_ema, decay_per_step
from classifier.models import build_model


def test_half_life_in_epochs_is_independent_of_dataset_size():
    for steps_per_epoch in (10, 1000, 100_000):
        decay = decay_per_step(2.0, steps_per_epoch)
        assert decay ** (2.0 * steps_per_epoch) == pytest.approx(0.5)


def test_ema_averages_weights_and_batchnorm_buffers():
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    ema = build_ema(model, half_life_epochs=1.0, steps_per_epoch=1, epochs=10)  # decay 0.5 per step
    before = model.bn1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32) + 3.0)  # moves BN running stats
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    ema.update_parameters(model)  # first update copies
    ema.update_parameters(model)
    assert torch.allclose(ema.module.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        model.conv1.weight.add_(2.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.conv1.weight, model.conv1.weight - 1.0)  # halfway
    assert not torch.equal(ema.module.bn1.running_mean, before)  # buffers follow (use_buffers=True)


def test_ema_off_and_long_half_life_warning():
    model = torch.nn.Linear(2, 2)
    assert build_ema(model, None, 10, 5) is None
    with pytest.warns(UserWarning, match="long"):
        build_ema(model, 4.0, 10, 5)
