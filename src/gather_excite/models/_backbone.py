"""What every backbone shares: its argument checks, its stages of residual units and its head.

A backbone builds its stem, then describes its stages as :class:`Stage` records and a function
that builds one unit; :meth:`Backbone.add_stages` builds them in order, deriving each unit's
spatial size (which the global-extent gathers need) and recording ``stage_names`` and
``feature_info``. :meth:`Backbone.add_head` adds global average pooling and the classifier, and
:meth:`Backbone.finish` initialises the weights and places the network. The keyword options
that every backbone takes besides its own (:class:`BackboneOptions`) are read here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn

from ..layers._registry import ContextArg
from ..layers.gather import Device
from ._builder import check_int, conv_out_size, init_backbone, pair
from ._features import FeatureInfo, feature, residual_units

__all__ = ["Backbone", "BackboneOptions", "Stage", "UnitFactory"]


class BackboneOptions(TypedDict, total=False):
    """The keyword options every backbone takes besides its own arguments.

    Attributes:
        num_classes: classifier outputs (default: the backbone's ``default_num_classes``, 10 for
            the CIFAR networks, 1000 for the ImageNet ones).
        input_size: the image size (int or ``(h, w)``) the global-extent gathers are sized for
            (default: the backbone's ``default_input_size``, 32 or 224).
        in_chans: input image channels (default 3).
        context_layer: the context module of every unit: a spec string (``"se"``,
            ``"ge_theta_e8"``, ...), a class, a ``functools.partial``, or ``None`` (default: the
            baseline).
        zero_init_residual: start every branch's last BatchNorm scale at zero (default ``False``);
            only backbones whose branches end with a BatchNorm take it (not the pre-activation ones).
        device, dtype: where and in which dtype the parameters and buffers live (PyTorch's
            factory arguments; default: torch's).
    """

    num_classes: int
    input_size: int | tuple[int, int]
    in_chans: int
    context_layer: ContextArg
    zero_init_residual: bool
    device: Device
    dtype: torch.dtype | None


@dataclass(frozen=True)
class Stage:
    """One stage of residual units.

    Args:
        label: the paper's name of the stage (``"conv4_x"``, ``"stage3"``), a key of ``stage_names``.
        module: the attribute holding its ``nn.Sequential`` of units (``"layer3"`` keeps
            torchvision's state-dict keys).
        units: how many units.
        out_chs: the output channels of every unit.
        stride: the stride of the first unit (the others have stride 1).
    """

    label: str
    module: str
    units: int
    out_chs: int
    stride: int


# (stage, index of the unit in its stage, input channels, stride, the unit's output size) -> unit
UnitFactory = Callable[[Stage, int, int, int, tuple[int, int]], nn.Module]


class Backbone(nn.Module):
    """Base of the classification backbones: stages of residual units and a pooled linear head.

    Subclasses build their stem (with ``in_chans`` input channels), call :meth:`add_stages` (their
    units take ``context_layer``), :meth:`add_head` and :meth:`finish`, and define
    :meth:`forward_features`.

    Args:
        options: the :class:`BackboneOptions` the subclass was given.
    """

    # The data a backbone is designed for (CIFAR or ImageNet) decides its defaults of
    # ``num_classes`` and ``input_size``.
    default_num_classes: int = 1000
    default_input_size: int | tuple[int, int] = 224
    # The attribute of every unit that holds its branch's last BatchNorm (``zero_init_residual``
    # zeroes its scale); ``None`` where the branches end with a conv.
    residual_norm: str | None = None

    def __init__(self, options: BackboneOptions) -> None:
        super().__init__()
        for name in options:
            if name not in BackboneOptions.__annotations__ or (
                name == "zero_init_residual" and self.residual_norm is None
            ):
                # The error Python raises for an explicit keyword-only signature.
                raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {name!r}")
        # 0: no classifier, the pooled features are the output (timm's convention for feature extraction)
        self.num_classes = check_int(options.get("num_classes", self.default_num_classes), "num_classes", minimum=0)
        self.in_chans = check_int(options.get("in_chans", 3), "in_chans")
        self.input_size = pair(options.get("input_size", self.default_input_size), "input_size")
        self.feature_info: list[FeatureInfo] = []
        self.stage_names: dict[str, str] = {}

    def add_stages(
        self,
        stages: Sequence[Stage],
        make_unit: UnitFactory,
        *,
        in_chs: int,
        size: tuple[int, int],
        reduction: int,
    ) -> int:
        """Add each stage as an ``nn.Sequential`` of ``make_unit``'s units; the channels they end with.

        ``in_chs``, ``size`` and ``reduction`` describe the stem's output.
        """
        for stage in stages:
            # A stride-s 1x1 conv and a stride-s 3x3 conv with padding 1 give the same size, so
            # one formula serves every unit layout.
            size = conv_out_size(size, kernel=3, stride=stage.stride, padding=1)
            reduction *= stage.stride
            units = []
            for index in range(stage.units):
                units.append(make_unit(stage, index, in_chs, stage.stride if index == 0 else 1, size))
                in_chs = stage.out_chs
            self.add_module(stage.module, nn.Sequential(*units))
            self.stage_names[stage.label] = stage.module
            self.feature_info.append(feature(stage.module, num_chs=in_chs, reduction=reduction, stage=stage.label))
        return in_chs

    def add_head(self, num_features: int) -> None:
        """Global average pooling and a linear classifier over ``num_features`` channels (none for 0 classes)."""
        self.num_features = num_features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_features, self.num_classes) if self.num_classes else nn.Identity()

    # timm's classifier API (``get_classifier``/``reset_classifier``, ``default_cfg``), so that code written
    # for timm models fine-tunes, probes and transforms these the same way.
    _pretrained_cfg: dict[str, Any] | None = None

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The weights' data configuration, or the recipe's (also for a backbone built directly, so that
        ``timm.data.resolve_data_config(model=model)`` works on every model; see create_model)."""
        if self._pretrained_cfg is None:  # kept, so that edits to the dict stay, as on timm's models
            from ..data_config import recipe_config

            self._pretrained_cfg = recipe_config(self).to_dict()
        return self._pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any] | None) -> None:
        self._pretrained_cfg = cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``; an ``nn.Identity`` with 0 classes)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: the pooled features are the output)."""
        self.num_classes = check_int(num_classes, "num_classes", minimum=0)
        placed = next(self.parameters())  # where and in which dtype the network lives (also with no classifier)
        factory = {"device": placed.device, "dtype": placed.dtype}
        # PyTorch's default Linear init, as add_head gives (init_backbone initialises convs and norms only)
        self.fc = nn.Linear(self.num_features, num_classes, **factory) if num_classes else nn.Identity()
        if self._pretrained_cfg is not None:
            cfg = dict(self._pretrained_cfg)
            if cfg.get("label_names") and len(cfg["label_names"]) != num_classes:
                cfg["label_names"] = None  # the old classes' names, as create_model(num_classes=...) drops them
            if "num_classes" in cfg:  # timm's pretrained_cfg states it
                cfg["num_classes"] = num_classes
            self.pretrained_cfg = cfg

    def finish(self, options: BackboneOptions) -> None:
        """Initialise the weights (see :func:`init_backbone`), then place the network as ``options`` ask."""
        zero_init = ()
        if options.get("zero_init_residual", False):
            zero_init = [getattr(unit, self.residual_norm) for _, unit in residual_units(self)]
        init_backbone(self, zero_init=zero_init)
        # The layers are built with torch's defaults, then placed (the units also take device/dtype).
        self.to(device=options.get("device"), dtype=options.get("dtype"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling and the classifier (or the pooled features if ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
