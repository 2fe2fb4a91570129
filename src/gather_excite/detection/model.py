"""Faster R-CNN (with RoIAlign) on a Gather-Excite backbone, built from torchvision parts.

The paper (Section 3, "Beyond image classification") trains Faster R-CNN with RoIAlign on
COCO 2014 with the ResNet paper's settings, ResNet-50 vs a GE-θ (E8) backbone (27.3 vs 28.6
mAP). The ResNet paper's detector is the "C4" design: conv1..conv4_x compute the shared
feature map (stride 16), RoIAlign crops 14x14 regions from it and conv5_x (stride 2) with
global pooling is the per-region head. ``layout="fpn"`` gives torchvision's FPN detector
on the same backbone instead, on any registered backbone (its ``feature_info`` names the maps).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from ..errors import ConfigError
from ..models import create_model, split_model_name
from ..models._pretrained import Weights, load_weights_into

__all__ = ["C4_BACKBONES", "DETECTOR_KWARGS", "LAYOUTS", "fasterrcnn_ge_resnet", "freeze_batchnorm"]

LAYOUTS = ("c4", "fpn")

# Backbones whose children run in registration order and end in a residual stage that can be
# the per-RoI head (the ResNet paper's C4 design). ShuffleNet's grouped units have no such
# tradition and are offered with the FPN layout only.
C4_BACKBONES = (
    "resnet50",
    "resnet101",
    "resnet152",
    "cifar_resnet20",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet164",
    "wrn16_8",
)
_CLASSIFIER_TAIL = ("avgpool", "fc")

# FasterRCNN arguments that fasterrcnn_ge_resnet builds from its own settings (named here; the
# RPN head follows the anchor generator's anchor count): a detector_kwargs entry would collide.
_BUILT_HERE = {
    "backbone": "backbone",
    "num_classes": "categories (num_classes)",
    "rpn_anchor_generator": "anchor_sizes and aspect_ratios",
    "rpn_head": "anchor_sizes and aspect_ratios",
    "box_roi_pool": "layout",
    "box_head": "layout and representation_size",
    "box_predictor": "categories (num_classes)",
}
# FasterRCNN forwards its **kwargs to GeneralizedRCNNTransform, which takes these two and
# silently ignores any other key: a misspelt argument would run with torchvision's default.
_TRANSFORM_EXTRAS = ("size_divisible", "fixed_size")
# What detector_kwargs may hold: FasterRCNN's own arguments, less those built here, plus the
# transform's. None of them changes a parameter's shape (the checkpoint check relies on that).
DETECTOR_KWARGS = tuple(
    name
    for name in [*inspect.signature(FasterRCNN.__init__).parameters, *_TRANSFORM_EXTRAS]
    if name not in ("self", "kwargs", *_BUILT_HERE)
)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a ``FrozenBatchNorm2d`` holding the same statistics.

    Detection batches are a few images a GPU, too few for batch statistics; torchvision's
    detectors freeze BN the same way. The context modules' own BNs are frozen too.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.track_running_stats:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class _C4Trunk(nn.Sequential):
    """The backbone up to its last stage: the shared feature map of a C4 detector (conv1..conv4_x)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int) -> None:
        super().__init__(layers)
        self.out_channels = out_channels


def check_detector_kwargs(detector_kwargs: Mapping[str, Any], reserved: Mapping[str, str] | None = None) -> None:
    """Raise a one-line :class:`ConfigError` for a ``detector_kwargs`` key that FasterRCNN would drop or reject.

    Torchvision ignores an unknown key silently (the run would use its default) and a key that
    :func:`fasterrcnn_ge_resnet` builds itself collides with it in a ``TypeError``; ``reserved``
    maps the further keys a caller sets itself to the setting to use instead.
    """
    reserved = {**_BUILT_HERE, **dict(reserved or {})}
    for key in detector_kwargs:
        if key in reserved:
            raise ConfigError(f"detector_kwargs key {key!r} is set by the package; use {reserved[key]} instead")
        if key not in DETECTOR_KWARGS:
            close = difflib.get_close_matches(str(key), DETECTOR_KWARGS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(DETECTOR_KWARGS)}"
            raise ConfigError(f"detector_kwargs key {key!r} is not an argument of torchvision's FasterRCNN; {hint}")


def check_anchors(anchor_sizes: Sequence[Sequence[Any]] | None, aspect_ratios: Sequence[Any]) -> None:
    """Anchor sizes and ratios must be finite and positive: a 0 ratio gave zero-size anchors and NaN losses."""

    def positive(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return math.isfinite(value) and value > 0

    if isinstance(aspect_ratios, (str, bytes)) or not aspect_ratios or not all(map(positive, aspect_ratios)):
        raise ConfigError(f"aspect_ratios must be a non-empty list of finite numbers > 0, got {aspect_ratios!r}")
    for sizes in anchor_sizes or ():
        if isinstance(sizes, (str, bytes)) or not sizes or not all(map(positive, sizes)):
            raise ConfigError(
                f"anchor_sizes must hold non-empty lists of finite sizes > 0 (pixels), got {anchor_sizes!r}"
            )


def _stage_units(net: nn.Module) -> list[list[nn.Module]]:
    """The backbone's children grouped as torchvision counts "trainable layers": the stem, then each stage.

    Each ``feature_info`` entry closes a unit with its module (the stem ends at its activation,
    as torchvision's conv1+bn1); children after the last stage (a pre-activation net's final
    BN-ReLU, the classifier) join the last unit.
    """
    ends = [info["module"] for info in net.feature_info]
    units: list[list[nn.Module]] = [[]]
    for name, child in net.named_children():
        units[-1].append(child)
        if name == ends[len(units) - 1] and len(units) < len(ends):
            units.append([])
    return units


def _freeze_stages(net: nn.Module, backbone: str, trainable_layers: int | None, pretrained: bool) -> int:
    """Freeze all but the last ``trainable_layers`` units of the backbone (torchvision's ``trainable_backbone_layers``).

    Default (``None``), torchvision's rule: 3 when the backbone starts from weights (ResNet-50:
    conv1 and conv2_x frozen, as in torchvision's ``fasterrcnn_resnet50_fpn`` and Detectron's
    C4), all otherwise (a random stem has nothing worth keeping fixed).
    """
    units = _stage_units(net)
    if trainable_layers is None:
        trainable_layers = min(3, len(units)) if pretrained else len(units)
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
        raise ConfigError(f"trainable_layers must be an int or null, got {trainable_layers!r}")
    if not 0 <= trainable_layers <= len(units):
        raise ConfigError(
            f"trainable_layers must be in 0..{len(units)} ({backbone}'s stem and {len(units) - 1} stages), "
            f"got {trainable_layers}"
        )
    for unit in units[: len(units) - trainable_layers]:
        for module in unit:
            module.requires_grad_(False)
    return trainable_layers


def _load_backbone_weights(net: nn.Module, backbone: str, weights: Mapping[str, torch.Tensor]) -> None:
    # The classifier (fc.*) of a classification checkpoint never fits a detector; the rest goes
    # through create_model(pretrained=...)'s loader, which names every key that does not fit and
    # lets a baseline's weights (no context entries) start a GE backbone.
    state = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    own_fc = {k: v for k, v in net.state_dict().items() if k.startswith("fc.")}
    load_weights_into(net, Weights({**state, **own_fc}, "backbone_weights"), model_name=backbone)


def _default_anchor_sizes(reductions: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    # torchvision's FPN detector: one size a level, 8x the level's stride (32 px at stride 4).
    return tuple((8 * r,) for r in reductions)


def fasterrcnn_ge_resnet(
    backbone: str = "ge_theta_e8_resnet50",
    *,
    num_classes: int = 91,
    layout: str = "c4",
    frozen_bn: bool = True,
    trainable_layers: int | None = None,
    backbone_weights: Mapping[str, torch.Tensor] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    feature_levels: Sequence[str] | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    **detector_kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with RoIAlign on a registered backbone (``resnet50``, ``ge_theta_e8_resnet50``, ...).

    Args:
        backbone: a registered model name (``gather_excite.list_models()``), with or without
            context module. ``c4`` takes the ResNets (:data:`C4_BACKBONES`, any context module);
            ``fpn`` any backbone.
        num_classes: detector classes including background (COCO: 91).
        layout: ``"c4"`` (the paper's setting: the last stage is the RoI head) or ``"fpn"``.
        frozen_bn: freeze every BatchNorm (see :func:`freeze_batchnorm`).
        trainable_layers: how many backbone units train, counted from the last, torchvision's
            ``trainable_backbone_layers``: the units are the stem (conv1) and the stages (ResNet-50:
            5 units; 3 freezes conv1 and conv2_x, 0 the whole backbone). Default: 3 with
            ``backbone_weights``, all without (torchvision's rule). The detector records the value
            used as ``backbone_trainable_layers`` (of ``backbone_units``).
        backbone_weights: a classification state dict of the same backbone to start from
            (``fc.*`` keys are ignored): a ``gex train`` network or a torchvision ResNet.
        backbone_kwargs: passed to :func:`~gather_excite.create_model` (``input_size`` sizes the
            global-extent gathers, ``width`` the CIFAR ResNets, ...).
        feature_levels: ``fpn`` only: the ``feature_info`` stage labels that feed the FPN
            (default: every map after the stem, e.g. conv2_x..conv5_x); an extra max-pooled
            level is added on top, as in torchvision.
        fpn_channels: channels of the FPN maps.
        representation_size: width of the FPN box head's two fully connected layers.
        anchor_sizes: one tuple of sizes (pixels) per feature map (``c4``: one map; ``fpn``: one
            per level plus the pooled one). Default: ``c4`` 32..512 as in the ResNet paper,
            ``fpn`` 8x each level's stride as in torchvision.
        aspect_ratios: anchor aspect ratios, the same on every map.
        detector_kwargs: passed to torchvision's ``FasterRCNN`` (``min_size``, ``max_size``, ...);
            any other key (:data:`DETECTOR_KWARGS` lists them) is refused, naming it.
    """
    check_detector_kwargs(detector_kwargs)
    check_anchors(anchor_sizes, aspect_ratios)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    base, _ = split_model_name(backbone)
    if layout == "c4" and base not in C4_BACKBONES:
        raise ConfigError(
            f"backbone {backbone!r} has no C4 feature maps (layout 'c4' needs a ResNet whose last stage "
            f"is the RoI head: {', '.join(C4_BACKBONES)}, with or without a context module); use layout 'fpn'"
        )
    net = create_model(backbone, num_classes=1000, **dict(backbone_kwargs or {}))
    if backbone_weights is not None:
        _load_backbone_weights(net, backbone, backbone_weights)
    if frozen_bn:
        freeze_batchnorm(net)
    trainable_layers = _freeze_stages(net, backbone, trainable_layers, pretrained=backbone_weights is not None)
    backbone_units = len(_stage_units(net))
    ratios = tuple(float(r) for r in aspect_ratios)
    infos = list(net.feature_info)

    if layout == "fpn":
        stages = [info["stage"] for info in infos]
        chosen = list(feature_levels) if feature_levels is not None else stages[1:]
        unknown = [s for s in chosen if s not in stages[1:]]
        if unknown or not chosen:
            raise ConfigError(
                f"feature_levels {chosen!r}: backbone {backbone!r} has no such feature maps for layout 'fpn'; "
                f"its maps after the stem are {stages[1:]}"
            )
        levels = [info for info in infos if info["stage"] in chosen]
        trunk = BackboneWithFPN(
            net,
            return_layers={info["module"]: str(i) for i, info in enumerate(levels)},
            in_channels_list=[info["num_chs"] for info in levels],
            out_channels=fpn_channels,
        )
        reductions = [info["reduction"] for info in levels]
        reductions.append(2 * reductions[-1])  # torchvision's LastLevelMaxPool
        sizes = tuple(tuple(s) for s in anchor_sizes) if anchor_sizes is not None else _default_anchor_sizes(reductions)
        if len(sizes) != len(reductions):
            raise ConfigError(
                f"anchor_sizes must hold one tuple per FPN map ({len(reductions)}: {len(levels)} levels + pooled), "
                f"got {len(sizes)}"
            )
        roi_align = MultiScaleRoIAlign(
            featmap_names=[str(i) for i in range(len(levels))], output_size=7, sampling_ratio=2
        )
        detector = FasterRCNN(
            trunk,
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes)),
            box_roi_pool=roi_align,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes),
            **detector_kwargs,
        )
        detector.backbone_trainable_layers, detector.backbone_units = trainable_layers, backbone_units
        return detector

    children = OrderedDict(net.named_children())
    last_stage = infos[-1]["module"]
    names = list(children)
    split = names.index(last_stage)
    trunk = _C4Trunk(OrderedDict((n, children[n]) for n in names[:split]), out_channels=infos[-2]["num_chs"])
    # The last stage plus what follows it in the classifier except pooling/fc (the
    # pre-activation nets' final BN-ReLU) is the per-RoI head, then global pooling.
    head_layers = [children[n] for n in names[split:] if n not in _CLASSIFIER_TAIL]
    head = nn.Sequential(*head_layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    sizes = tuple(tuple(s) for s in anchor_sizes) if anchor_sizes is not None else ((32, 64, 128, 256, 512),)
    if len(sizes) != 1:
        raise ConfigError(f"anchor_sizes must hold one tuple (c4 has one feature map), got {len(sizes)}")
    # 14x14 RoIAlign crops; the last stage's stride 2 makes them 7x7, the size the ResNet-50
    # global GE kernels of conv5_x were built for at a 224 px input.
    roi_align = MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2)
    detector = FasterRCNN(
        trunk,
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,)),
        box_roi_pool=roi_align,
        box_head=head,
        box_predictor=FastRCNNPredictor(infos[-1]["num_chs"], num_classes),
        **detector_kwargs,
    )
    detector.backbone_trainable_layers, detector.backbone_units = trainable_layers, backbone_units
    return detector
