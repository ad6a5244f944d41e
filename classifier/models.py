"""Build a classification model by name (torchvision's, or SmallResNet for small images), with its head
sized for the dataset.

Pretrained weights never come from the network at run time: 'DEFAULT' reads torchvision's cache under
TORCH_HOME, and a path reads a local .pth/.safetensors file (from one of this trainer's checkpoints, the
weights its validation chose, EMA or raw). Training, evaluation and export all build their model here, so
the three can never disagree about the architecture; model_from_checkpoint rebuilds a trained one from
its checkpoint. Reading and writing checkpoint files is checkpoint.py's job.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from classifier.card import ModelCard
from classifier.checkpoint import FORMAT, inference_weights


class SmallResNet(nn.Module):
    """A compact residual network for 28-64 px images, trained from scratch: three stages of a 3x3
    conv-BN-ReLU to the stage width, one residual block (two more convs) and a 2x2 max-pool, then global
    average pooling and a Linear head `fc`. Widths 32-64-128 (0.48M parameters): at 28 px it costs ~1/6
    of a ResNet18 with the stride-2 small stem and trains ~4x as many images per second on a CPU
    (bench figures in configs/fashion_mnist.py), which buys epochs that a short budget needs more than
    depth. The shape follows the ResNet-9 of fast CIFAR-10 training (Page, 2018), narrowed."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()

        def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
            )

        layers, c_in = [], 3
        for width in widths:
            layers += [
                conv_bn_relu(c_in, width),
                _Residual(conv_bn_relu(width, width), conv_bn_relu(width, width)),
                nn.MaxPool2d(2),
            ]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _Residual(nn.Sequential):
    """x + layers(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


# Architectures of this project's own, for small images; every other name is torchvision's.
LOCAL_MODELS = {"small_resnet": SmallResNet}


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str | None = None,
    small_input_stem: bool = False,
    stem_stride: int = 1,
    log=print,
) -> nn.Module:
    """A torchvision model with `num_classes` outputs. With `pretrained`, the weights are loaded into the
    architecture they were trained in (ImageNet's 1000-class head, or another run's head and stem) and
    the head is replaced afterwards. `log` gets one line saying which weights were loaded."""
    if name in LOCAL_MODELS:
        if pretrained is not None or small_input_stem:
            raise ValueError(
                f"--model {name} is trained from scratch and is built for small images: "
                "no --pretrained, no --small-input-stem"
            )
        return LOCAL_MODELS[name](num_classes)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown --model {name!r}; torchvision classification models include resnet18, resnet50, ..."
        )
    small_stem_loaded = False  # a small stem that came with the pretrained weights
    if pretrained is None:
        model = torchvision.models.get_model(name, num_classes=num_classes)
    else:
        state, source, trained_stem = read_pretrained(name, pretrained)
        model = torchvision.models.get_model(name, num_classes=1000)
        head_weight = state.get(f"{head_name(model)}.weight")
        if head_weight is not None and head_weight.shape[0] != 1000:  # another run's head: its class count
            model = torchvision.models.get_model(name, num_classes=head_weight.shape[0])
        small_stem_loaded = trained_stem is not None and trained_stem["small_input_stem"]
        if small_stem_loaded:  # the weights need the stem they were trained in
            if (small_input_stem, stem_stride) != (True, trained_stem["stem_stride"]):
                raise ValueError(
                    f"--pretrained {pretrained} was trained with --small-input-stem --stem-stride "
                    f"{trained_stem['stem_stride']}; pass the same"
                )
            use_small_input_stem(model, name, stem_stride)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # missing/unexpected keys or shape mismatches
            raise ValueError(f"--pretrained {pretrained} does not fit {name}: {err}") from err
        log(f"pretrained: {source}")
        replace_head(model, num_classes)
    if small_input_stem and not small_stem_loaded:  # a fresh small stem (over ImageNet weights, if any)
        use_small_input_stem(model, name, stem_stride)
    elif not small_input_stem and stem_stride != 1:
        raise ValueError(f"--stem-stride {stem_stride} needs --small-input-stem")
    return model


# ImageNet's training size, which every torchvision classifier takes: the probe that tells "too small"
# from any other failure.
REFERENCE_IMAGE_SIZE = 224


def check_input_size(model: nn.Module, image_size: int, name: str) -> None:
    """One forward pass on a blank batch, so an image size the architecture cannot take fails here, with
    the flag named, rather than as a shape error deep inside the first training step. A failure is put
    down to the size only when the same model runs at REFERENCE_IMAGE_SIZE; any other is reported as it is
    (PyTorch's own size messages vary by layer and by version, so they are not matched)."""
    was_training = model.training
    model.eval()
    try:
        error = forward_error(model, image_size)
        if error is None:
            return
        if image_size < REFERENCE_IMAGE_SIZE and forward_error(model, REFERENCE_IMAGE_SIZE) is None:
            raise ValueError(f"--data.image-size {image_size} is too small for {name}: {error}") from error
        raise RuntimeError(
            f"--model {name} fails on a blank batch of --data.image-size {image_size} images: {error}"
        ) from error
    finally:
        model.train(was_training)


def forward_error(model: nn.Module, image_size: int) -> RuntimeError | None:
    """The error a forward pass of two blank image_size x image_size RGB images raises, or None."""
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size))
    except RuntimeError as err:
        return err
    return None


def head_name(model: nn.Module) -> str:
    """The qualified name of the final Linear layer (e.g. 'fc', 'classifier.3'): the one replace_head
    swaps."""
    for parent_name in ("fc", "classifier", "heads"):
        parent = getattr(model, parent_name, None)
        if isinstance(parent, nn.Linear):
            return parent_name
        if isinstance(parent, nn.Sequential) and isinstance(parent[-1], nn.Linear):
            return f"{parent_name}.{len(parent) - 1}"
    raise ValueError(f"do not know where the classification head of {type(model).__name__} is")


def fold_logit_bias(model: nn.Module, logit_bias: torch.Tensor | list | None) -> dict[str, torch.Tensor]:
    """`model`'s state dict with `logit_bias` added to the head's bias: a model whose logits are the
    adjusted ones (classifier/imbalance.py), so consumers of the weights need no extra step."""
    state = dict(model.state_dict())
    if logit_bias is not None:
        key = f"{head_name(model)}.bias"
        state[key] = state[key] + torch.as_tensor(
            logit_bias, dtype=state[key].dtype, device=state[key].device
        )
    return state


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for a fresh one with `num_classes` outputs (ResNet `fc`, MobileNet,
    EfficientNet and ConvNeXt `classifier[-1]`, RegNet `fc`)."""
    parent_name, _, index = head_name(model).partition(".")
    if index:
        parent = getattr(model, parent_name)
        parent[int(index)] = nn.Linear(parent[int(index)].in_features, num_classes)
    else:
        setattr(model, parent_name, nn.Linear(getattr(model, parent_name).in_features, num_classes))


def use_small_input_stem(model: nn.Module, name: str, stride: int = 1) -> None:
    """CIFAR-style ResNet stem: a 3x3 conv (stride 1 or 2) and no max-pool, so 28-64 px images keep their
    resolution (the ImageNet stem divides by 4 before the first block: a 32 px image becomes 8x8)."""
    if not name.startswith("resnet"):
        raise ValueError(f"--small-input-stem is for ResNets, not {name}")
    if stride not in (1, 2):
        raise ValueError(f"--stem-stride must be 1 or 2, not {stride}")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
    model.maxpool = nn.Identity()


def read_pretrained(name: str, pretrained: str) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """The state dict for `name`, from TORCH_HOME's cache ('DEFAULT') or from a file; which weights those
    are, in words; and for one of this project's checkpoints, the stem it was trained with
    ({"small_input_stem", "stem_stride"}, else None). From such a checkpoint, the weights its validation
    preferred (the EMA's or the raw model's, as the checkpoint records), as evaluate and export take them."""
    if pretrained == "DEFAULT":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        filename = os.path.basename(weights.url)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            raise SystemExit(
                f"error: --pretrained DEFAULT: the weights for {name} are not at {path}.\n"
                f"This trainer never downloads at run time. Download {weights.url}\n"
                f"and put it there (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), "
                f"or pass --pretrained /path/to/{filename}."
            )
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise SystemExit(f"error: --pretrained {pretrained}: no such file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # refuses a file that runs code
    except Exception as err:
        raise ValueError(f"cannot read pretrained weights {path}: {err}") from err
    if isinstance(state, dict) and state.get("format") == FORMAT:
        config = state.get("config") or {}
        if config.get("model", name) != name:
            raise ValueError(f"--pretrained {path} is a {config['model']} checkpoint, not {name}")
        stem = {
            "small_input_stem": config.get("small_input_stem", False),
            "stem_stride": config.get("stem_stride", 1),
        }
        state, which = inference_weights(state)
        return state, f"{'EMA' if which == 'ema' else 'raw'} weights of {path} (the ones validated)", stem
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a common {"model": state_dict} wrapper
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {path} do not hold a state dict")
    return state, f"weights of {path}", None


def build_from_card(card: ModelCard) -> nn.Module:
    """The architecture a card describes, with its head sized for the card's classes; untrained."""
    return build_model(
        card.model,
        len(card.classes),
        small_input_stem=card.small_input_stem,
        stem_stride=card.stem_stride,
    )


def model_from_checkpoint(checkpoint: dict) -> tuple[nn.Module, str]:
    """Rebuild the architecture the checkpoint's card describes and load the weights its validation chose
    (EMA or raw: the second value says which), the logit adjustment folded in when there is one; eval
    mode."""
    weights, which = inference_weights(checkpoint)
    model = build_from_card(ModelCard.from_checkpoint(checkpoint, which))
    model.load_state_dict(weights)
    if checkpoint.get("logit_bias") is not None:  # --logit-adjustment: fold it in, as best.safetensors has it
        model.load_state_dict(fold_logit_bias(model, checkpoint["logit_bias"]))
    return model.eval(), which
