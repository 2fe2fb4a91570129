"""Faster R-CNN on a GE backbone: it builds from torchvision parts, trains and detects."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from gather_excite import GatherExcite, create_model
from gather_excite.detection import fasterrcnn_ge_resnet


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])} for _ in range(n)]


@pytest.mark.parametrize("layout", ["c4", "fpn"])
def test_ge_e8_faster_rcnn_trains_and_detects(layout):
    torch.manual_seed(0)
    # few proposals and RoIs: the C4 head runs conv5_x on every RoI
    small = dict(
        min_size=64,
        max_size=64,
        box_batch_size_per_image=8,
        rpn_pre_nms_top_n_train=64,
        rpn_post_nms_top_n_train=16,
        rpn_pre_nms_top_n_test=64,
        rpn_post_nms_top_n_test=16,
    )
    model = fasterrcnn_ge_resnet("ge_theta_e8_resnet50", num_classes=5, layout=layout, **small)
    contexts = [m for m in model.backbone.modules() if isinstance(m, GatherExcite)]
    # C4: conv2_x..conv4_x (3+4+6 units) in the trunk; conv5_x's 3 units sit in the RoI head.
    assert len(contexts) == (13 if layout == "c4" else 16)
    assert all(c.extent == 8 and c.gather_mode == "conv" for c in contexts)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())

    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    losses = model(images, _targets(2))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert contexts[0].gather.layers[0].weight.grad is not None

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_backbone_weights_load_and_bad_arguments():
    classifier = create_model("resnet50", num_classes=10)
    model = fasterrcnn_ge_resnet("resnet50", num_classes=3, backbone_weights=classifier.state_dict(), frozen_bn=False)
    torch.testing.assert_close(model.backbone.conv1.weight, classifier.conv1.weight)
    with pytest.raises(ValueError, match="layout"):
        fasterrcnn_ge_resnet("resnet50", layout="c5")
    with pytest.raises(ValueError, match="ImageNet ResNet"):
        fasterrcnn_ge_resnet("cifar_resnet20")
    with pytest.raises(ValueError, match="do not fit"):
        fasterrcnn_ge_resnet("ge_theta_resnet50", backbone_weights=create_model("se_resnet50").state_dict())
