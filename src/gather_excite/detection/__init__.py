"""Faster R-CNN with a Gather-Excite backbone, end to end: model, COCO-format data, training, COCO evaluation.

The parts are torchvision's (``FasterRCNN``, ``CocoDetection``, ``transforms.v2``) and
pycocotools' (``COCOeval``); this package joins them to the library's backbones and to the
Lightning engine of ``gex train`` (``gex detect train``/``eval``/``data``).
"""

from .canvases import CanvasSpec, make_fashion_mnist_detection
from .coco_eval import STAT_NAMES, coco_evaluate
from .data import CocoDetectionData, check_coco_instances, collate_detection
from .evaluation import evaluate_detector, evaluation_size
from .model import C4_BACKBONES, LAYOUTS, fasterrcnn_ge_resnet, freeze_batchnorm
from .module import DetectionModule, is_detector_checkpoint, load_backbone_state

__all__ = [
    "C4_BACKBONES",
    "LAYOUTS",
    "STAT_NAMES",
    "CanvasSpec",
    "CocoDetectionData",
    "DetectionModule",
    "check_coco_instances",
    "coco_evaluate",
    "collate_detection",
    "evaluate_detector",
    "evaluation_size",
    "fasterrcnn_ge_resnet",
    "freeze_batchnorm",
    "is_detector_checkpoint",
    "load_backbone_state",
    "make_fashion_mnist_detection",
]
