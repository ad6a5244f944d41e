"""Fine-tuning a pretrained network: which parameters are the new head and which the backbone, the stages
layer-wise LR decay counts down from the head, freezing the backbone (--freeze-epochs) and keeping
BatchNorm statistics as loaded (--freeze-bn-stats). optim.py turns the stages' LR multipliers into
parameter groups; train.py decides when to freeze and unfreeze.
"""

from __future__ import annotations

from torch import nn

from classifier.models import head_name

# Top-level containers whose children are the network's stages, in forward order: torchvision's
# MobileNet, EfficientNet and ConvNeXt `features`, RegNet `trunk_output`, SmallResNet `features`.
STAGE_CONTAINERS = ("features", "trunk_output")
# Top-level parameters before the first stage: ResNet's conv1 + bn1, RegNet's `stem`.
STEM_NAMES = ("conv1", "bn1", "stem")


def stage_of(parameter_name: str, head: str) -> str:
    """The stage a parameter belongs to: 'head' (the classification Linear that replace_head swapped),
    'stem', 'layer3' (ResNet), 'features.4' (MobileNet, EfficientNet, ConvNeXt), 'classifier' (the
    pretrained layers of a head block before its final Linear)."""
    if parameter_name.startswith(head + "."):
        return "head"
    top, _, rest = parameter_name.partition(".")
    if top in STEM_NAMES:
        return "stem"
    if top in STAGE_CONTAINERS:
        return f"{top}.{rest.partition('.')[0]}"
    return top


def stages(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """[(stage, [(name, parameter), ...]), ...] from the input to the head, the head last. The order is
    the parameters' registration order, which for every supported network is the forward order."""
    head = head_name(model)
    by_stage: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in model.named_parameters():
        by_stage.setdefault(stage_of(name, head), []).append((name, parameter))
    head_parameters = by_stage.pop("head")
    return [*by_stage.items(), ("head", head_parameters)]


def lr_multipliers(stage_names: list[str], *, backbone_lr_mult: float, layer_decay: float) -> list[float]:
    """One LR multiplier per stage (stage_names from input to head, head last): the head 1; the stage k
    below it backbone_lr_mult * layer_decay**k (the last backbone stage k=1, the stem k=len-1)."""
    check_multipliers(backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay)
    depth = len(stage_names) - 1
    return [1.0 if k == 0 else backbone_lr_mult * layer_decay**k for k in range(depth, -1, -1)]


def check_multipliers(*, backbone_lr_mult: float, layer_decay: float) -> None:
    """ValueError naming the flag when a multiplier is outside (0, 1] (NaN included)."""
    for flag, value in (("--optim.backbone-lr-mult", backbone_lr_mult), ("--optim.layer-decay", layer_decay)):
        if not 0 < value <= 1:
            raise ValueError(f"{flag} {value}: must be in (0, 1] (1 turns it off)")


def describe_multipliers(stage_names: list[str], multipliers: list[float]) -> str:
    """One line for the log: which stage trains at which fraction of the scheduled LR."""
    return "LR multipliers: " + ", ".join(
        f"{name} x{mult:.3g}" for name, mult in zip(stage_names, multipliers, strict=True)
    )


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter outside the head. A frozen parameter gets no
    gradient, so the optimizer skips it entirely: no update, no weight decay, no momentum state."""
    head = head_name(model)
    for name, parameter in model.named_parameters():
        if not name.startswith(head + "."):
            parameter.requires_grad_(trainable)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalizes with its stored statistics and stops updating
    them. Call after model.train(), which turns them back on. Their scale and shift still train unless
    the backbone is frozen."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
