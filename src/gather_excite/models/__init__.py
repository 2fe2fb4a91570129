"""The paper's networks, each with one pluggable context module, and the model registry."""

from ._features import FeatureInfo, residual_units
from ._registry import BACKBONES, CONTEXT_NAMES, MODELS, create_model, default_input_size, list_models, split_model_name
from .cifar_resnet import CifarResNet
from .preact_resnet import PreActResNet
from .resnet import ResNet
from .shufflenet import ShuffleNet
from .wide_resnet import WideResNet

__all__ = [
    "BACKBONES",
    "CONTEXT_NAMES",
    "MODELS",
    "CifarResNet",
    "FeatureInfo",
    "PreActResNet",
    "ResNet",
    "ShuffleNet",
    "WideResNet",
    "create_model",
    "default_input_size",
    "list_models",
    "residual_units",
    "split_model_name",
]
