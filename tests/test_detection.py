"""Faster R-CNN on a GE backbone: it builds from torchvision parts, trains and detects."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from gather_excite import GatherExcite, create_model
from gather_excite.detection import fasterrcnn_ge_resnet
from gather_excite.models import BACKBONES


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
    with pytest.raises(ValueError, match="'shufflenet_g3' has no C4 feature maps"):
        fasterrcnn_ge_resnet("shufflenet_g3", layout="c4")
    with pytest.raises(ValueError, match="backbone_weights do not fit ge_theta_resnet50"):
        fasterrcnn_ge_resnet("ge_theta_resnet50", backbone_weights=create_model("se_resnet50").state_dict())


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_feeds_an_fpn_detector(backbone, one_thread_private_cache):
    """Every registered backbone (feature_info) builds an FPN detector whose maps sit at the levels' strides."""
    # CIFAR-style nets keep full resolution in their first stage: start the FPN after it.
    levels = {"wrn16_8": ["stage2", "stage3"], "cifar_resnet164": ["stage2", "stage3"]}
    model = fasterrcnn_ge_resnet(
        backbone,
        num_classes=4,
        layout="fpn",
        feature_levels=levels.get(backbone),
        fpn_channels=16,
        representation_size=32,
        min_size=64,
        max_size=64,
        backbone_kwargs={"input_size": 64},
    ).eval()
    infos = create_model(backbone).feature_info
    expected = levels.get(backbone) or [info["stage"] for info in infos[1:]]
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        detections = model([torch.rand(3, 64, 64)])
    # one FPN map per chosen level, plus torchvision's pooled level at twice the last stride
    assert list(features) == [*map(str, range(len(expected))), "pool"]
    strides = [info["reduction"] for info in infos if info["stage"] in expected]
    assert [64 // f.shape[-1] for f in features.values()] == [*strides, 2 * strides[-1]]
    assert all(f.shape[1] == 16 for f in features.values())
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def test_backbone_starts_from_a_torchvision_resnet_state_dict(tmp_path, one_thread_private_cache):
    """A torchvision ResNet-50 state dict saved with torch.save is a valid backbone_init (same key names)."""
    import torchvision

    from gather_excite.detection import load_backbone_state

    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    state = load_backbone_state(path, "resnet50")
    model = fasterrcnn_ge_resnet("resnet50", num_classes=3, backbone_weights=state)
    # c4: the trunk ends with layer3, the RoI head starts with layer4; both hold torchvision's tensors
    torch.testing.assert_close(model.backbone.layer3[5].conv2.weight, reference.layer3[5].conv2.weight)
    torch.testing.assert_close(model.roi_heads.box_head[0][2].conv3.weight, reference.layer4[2].conv3.weight)
