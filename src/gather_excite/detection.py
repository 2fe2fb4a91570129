"""Faster R-CNN (with RoIAlign) on a Gather-Excite ResNet backbone, built from torchvision parts.

The paper (Section 3, "Beyond image classification") trains Faster R-CNN with RoIAlign on
COCO 2014 with the ResNet paper's settings, ResNet-50 vs a GE-θ (E8) backbone (27.3 vs 28.6
mAP). The ResNet paper's detector is the "C4" design: conv1..conv4_x compute the shared
feature map (stride 16), RoIAlign crops 14x14 regions from it and conv5_x (stride 2) with
global pooling is the per-region head. ``layout="fpn"`` gives torchvision's FPN detector
on the same backbone instead.

Training, data (``torchvision.datasets.CocoDetection``) and evaluation follow torchvision's
detection references; this module only builds the model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from .models import create_model
from .models.resnet import ResNet

__all__ = ["fasterrcnn_ge_resnet", "freeze_batchnorm"]

LAYOUTS = ("c4", "fpn")


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
    """conv1..conv4_x of a ResNet: the shared stride-16 feature map of a C4 detector."""

    out_channels = 1024


def fasterrcnn_ge_resnet(
    backbone: str = "ge_theta_e8_resnet50",
    *,
    num_classes: int = 91,
    layout: str = "c4",
    frozen_bn: bool = True,
    backbone_weights: dict[str, torch.Tensor] | None = None,
    **detector_kwargs: object,
) -> FasterRCNN:
    """Faster R-CNN with RoIAlign on a registered ResNet (``resnet50``, ``ge_theta_e8_resnet50``, ...).

    Args:
        backbone: a registered ResNet-50/101/152 model name, with or without context module.
        num_classes: detector classes including background (COCO: 91).
        layout: ``"c4"`` (the paper's setting: conv5_x as the RoI head) or ``"fpn"``.
        frozen_bn: freeze every BatchNorm (see :func:`freeze_batchnorm`).
        backbone_weights: an ImageNet classification state dict of the same backbone to start
            from (``fc.*`` keys are ignored).
        detector_kwargs: passed to torchvision's ``FasterRCNN`` (``min_size``, ``max_size``, ...).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    net = create_model(backbone, num_classes=1000)
    if not isinstance(net, ResNet):
        raise ValueError(f"backbone must name an ImageNet ResNet (e.g. 'ge_theta_e8_resnet50'), got {backbone!r}")
    if backbone_weights is not None:
        state = {k: v for k, v in backbone_weights.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"backbone_weights do not fit {backbone!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    if frozen_bn:
        freeze_batchnorm(net)

    if layout == "fpn":
        trunk = BackboneWithFPN(
            net,
            return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
            in_channels_list=[info["num_chs"] for info in net.feature_info[1:]],
            out_channels=256,
        )
        return FasterRCNN(trunk, num_classes=num_classes, **detector_kwargs)

    trunk = _C4Trunk(
        OrderedDict(
            conv1=net.conv1,
            bn1=net.bn1,
            relu=net.relu,
            maxpool=net.maxpool,
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
        )
    )
    head = nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    # 14x14 RoIAlign crops; conv5_x's stride 2 makes them 7x7, the size its global GE kernels
    # were built for at a 224 px input.
    roi_align = MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2)
    return FasterRCNN(
        trunk,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_align,
        box_head=head,
        box_predictor=FastRCNNPredictor(net.num_features, num_classes),
        **detector_kwargs,
    )
