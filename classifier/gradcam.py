"""Grad-CAM (Selvaraju et al., 2017): where in an image a PyTorch classifier found the evidence for a class.

Owns picking the feature map to explain (the last convolutional stage before global pooling) and turning
its activations and the class logit's gradient into one [0, 1] heatmap per image. Drawing the heatmaps is
plots.py's job; choosing which images to explain is the caller's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Pooling over the whole map is where the spatial evidence ends: the feature map to explain is the one
# that goes into the last of these (torchvision's ResNet, MobileNet, EfficientNet, ConvNeXt, RegNet, VGG
# and this project's SmallResNet all pool with one as a module).
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@contextmanager
def hooks_removed(handles: list) -> Iterator[list]:
    """Yields `handles` (to be filled with hook handles) and removes every one of them afterwards, on an
    exception too: a hook left behind would run on every later forward pass."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (BatchNorm's running statistics, no dropout), its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def feature_layer(model: nn.Module, images: torch.Tensor) -> str:
    """The qualified name of the module whose output Grad-CAM explains: of the modules that finish before
    the last global pooling layer starts, the last whose output is a 4-D (N, C, H, W) map larger than
    1x1, after at least one convolution. That is the whole last stage (ResNet's `layer4`, MobileNet's
    `features`), or an earlier one where the last stage has pooled a small input down to 1x1, which has
    nothing left to localise. One forward pass of `images[:1]` finds it; ValueError when there is none."""
    events: list[tuple[str, object]] = []  # ("start", module) / ("end", (name, module, output)) in call order
    with hooks_removed([]) as handles, eval_mode(model), torch.no_grad():
        for name, module in model.named_modules():
            if module is model:
                continue
            handles.append(module.register_forward_pre_hook(lambda m, args: events.append(("start", m))))
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, name=name: events.append(("end", (name, m, out)))
                )
            )
        model(images[:1])
    pool_starts = [i for i, (kind, m) in enumerate(events) if kind == "start" and isinstance(m, GLOBAL_POOLS)]
    before_pool = events[: pool_starts[-1]] if pool_starts else events
    finished = [detail for kind, detail in before_pool if kind == "end"]
    first_conv = next((i for i, (_, m, _) in enumerate(finished) if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(
            f"Grad-CAM needs a convolutional feature map, and {type(model).__name__} runs no nn.Conv2d "
            "before its global pooling"
        )
    for name, _, output in reversed(finished[first_conv:]):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
            return name
    raise ValueError(
        f"Grad-CAM found no feature map larger than 1x1 in {type(model).__name__} for "
        f"{tuple(images.shape[-2:])} images: there is nothing to localise"
    )


def grad_cam(
    model: nn.Module, images: torch.Tensor, classes: torch.Tensor, layer: str | None = None
) -> tuple[torch.Tensor, str]:
    """Grad-CAM heatmaps of `images` (N, 3, H, W, normalized as the model takes them) for `classes` (N,
    one class index per image): (N, H, W) float32 maps in [0, 1] on the CPU, each divided by its own
    maximum (all zeros where nothing speaks for the class), and the name of the explained module
    (`layer`, else feature_layer's pick).

    With A the layer's activations (N, K, h, w) and y the class's logit: weights a_k = mean over (h, w) of
    dy/dA_k; map = relu(sum_k a_k A_k), upsampled bilinearly to H x W. The gradient is taken with
    torch.autograd.grad with respect to A alone: nothing is back-propagated into the layers before it (which
    run without a graph, as in inference) and no parameter's .grad changes. `images` go where the model's
    weights are; the maps come back on the CPU. Hooks are removed and the model's train/eval mode is
    restored after."""
    if classes.shape != (len(images),):
        raise ValueError(f"grad_cam wants one class per image: {len(images)} images, classes {classes.shape}")
    layer = layer or feature_layer(model, images)
    module = model.get_submodule(layer)
    stored: list[torch.Tensor] = []

    def keep_activations(_module, _args, output: torch.Tensor) -> torch.Tensor:
        # The layers under A ran without a graph (no_grad below: an inference pass's memory); from A on
        # the graph is recorded, for the head's few layers only. The clone is what flows on, so a later
        # in-place op (DenseNet's relu) cannot change the A we differentiate by.
        torch.set_grad_enabled(True)
        activations = output.detach().requires_grad_()
        stored.append(activations)
        return activations.clone()

    handles = [module.register_forward_hook(keep_activations)]
    # no_grad's exit restores the caller's grad mode, which the hook switched on mid-pass.
    with hooks_removed(handles), eval_mode(model), torch.no_grad():
        logits = model(images)
        chosen = logits.gather(1, classes.to(logits.device).view(-1, 1)).sum()
        # Summing over the batch is exact: in eval mode each image's logit depends on its own A only.
        # A module called twice in one pass (a shared ReLU) is explained at its last call, as picked.
        (gradients,) = torch.autograd.grad(chosen, stored[-1])
    activations = stored[-1].detach()
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    cams = F.relu((weights * activations.float()).sum(dim=1, keepdim=True))
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peaks = cams.flatten(1).amax(dim=1).view(-1, 1, 1)
    cams = torch.where(peaks > 0, cams / peaks.clamp_min(torch.finfo(cams.dtype).tiny), 0.0)
    return cams.clamp(0, 1).cpu(), layer
