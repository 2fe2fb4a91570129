"""The LightningModule that trains a Faster R-CNN on a GE backbone and evaluates it with COCO's protocol."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..complexity import complexity
from ..engine.module import JSONValue, SGDModule
from ..errors import CheckpointError, ConfigError, DataError, GexError
from ..models import split_model_name
from ..models._pretrained import read_weights
from ..serialization import load_torch_file
from .coco_eval import coco_evaluate
from .evaluation import evaluation_size
from .model import check_anchors, check_detector_kwargs, fasterrcnn_ge_resnet

__all__ = ["DETECTOR_KEYS", "DetectionModule", "is_detector_checkpoint", "load_backbone_state"]

DetectionSchedule = Literal["multistep", "cosine", "constant"]

# Hyperparameters that only a detector checkpoint has; a classifier's (gex train) has ``arch``.
DETECTOR_KEYS = ("backbone", "layout", "categories")

# The hyperparameters that fasterrcnn_ge_resnet takes unchanged, under the same names.
_DETECTOR_ARGUMENTS = (
    "layout",
    "frozen_bn",
    "trainable_layers",
    "backbone_kwargs",
    "feature_levels",
    "fpn_channels",
    "representation_size",
    "anchor_sizes",
    "min_size",
    "max_size",
)
# detector_kwargs keys that the module sets from its own arguments, and the setting to use instead.
_RESERVED_KWARGS = {
    **{key: f"model.{key}" for key in _DETECTOR_ARGUMENTS if key not in ("min_size", "max_size")},
    "min_size": "model.min_size (gex detect train links it to data.min_size)",
    "max_size": "model.max_size (gex detect train links it to data.max_size)",
    "aspect_ratios": "model.aspect_ratios",
    "backbone_weights": "model.backbone_init",
}


def is_detector_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Whether a loaded Lightning checkpoint was written by ``gex detect train``."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return all(key in hparams for key in DETECTOR_KEYS)


def load_backbone_state(
    source: str | Path, backbone: str, backbone_kwargs: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The backbone weights that ``source`` names, through :func:`gather_excite.models._pretrained.read_weights`.

    Any source that ``create_model(pretrained=...)`` takes: a ``gex train`` checkpoint of
    ``backbone``, a state dict file (e.g. ``torch.save(torchvision.models.resnet50(weights=...)
    .state_dict(), path)``: the names match), a ``gex export`` folder, a URL, ``hf-hub:...`` or
    ``torchvision``. Files are read with ``weights_only=True``; a detector checkpoint is refused.
    The ResNet layout (``stride_in_1x1``, v1 or torchvision's v1.5) cannot be read from a state
    dict's shapes: weights that record theirs must match ``backbone_kwargs``'; a bare state dict
    loaded into the v1 layout gets a warning, as torchvision's ResNets are v1.5.
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix != ".safetensors":
        try:
            peek = load_torch_file(path, f"backbone_init {str(path)!r}", mmap=True)
        except GexError:
            peek = None  # read_weights below reports what is wrong with the file
        if isinstance(peek, dict) and is_detector_checkpoint(peek):
            raise CheckpointError(
                f"backbone_init {str(path)!r} is a detector checkpoint (gex detect train); it expects a "
                "classifier checkpoint (gex train) or a torchvision ResNet state dict"
            )
    base = split_model_name(backbone)[0]
    weights = read_weights(source, backbone=base)
    arch = weights.config.get("architecture")
    if arch is not None and arch != backbone:
        raise CheckpointError(
            f"backbone_init {str(source)!r} was trained as {arch!r}, but the backbone is {backbone!r}"
        )
    if base in ("resnet50", "resnet101", "resnet152"):
        ours = bool(dict(backbone_kwargs or {}).get("stride_in_1x1", True))
        theirs = (weights.config.get("model_args") or {}).get("stride_in_1x1")
        if theirs is not None and bool(theirs) != ours:
            raise CheckpointError(
                f"backbone_init {str(source)!r} was trained with stride_in_1x1={bool(theirs)}, the backbone is built "
                f"with stride_in_1x1={ours}: set backbone_kwargs: {{stride_in_1x1: {str(bool(theirs)).lower()}}}"
            )
        if theirs is None and arch is None and ours:
            warnings.warn(
                f"backbone_init {str(source)!r} is a bare state dict loaded into the v1 layout (stride on the first "
                "1x1 conv); torchvision's ResNets are v1.5: for their weights set backbone_kwargs: "
                "{stride_in_1x1: false}",
                UserWarning,
                stacklevel=2,
            )
    return dict(weights.state_dict)


class DetectionModule(SGDModule):
    """Faster R-CNN (:func:`~gather_excite.detection.fasterrcnn_ge_resnet`) trained with SGD, evaluated by COCOeval.

    Every argument is a plain value saved as a hyperparameter, so a checkpoint rebuilds the
    detector and keeps the category map (``categories``: label i+1 is entry i's COCO id).

    Args:
        backbone: a registered model name, e.g. ``ge_theta_e8_resnet50``.
        layout: ``"c4"`` (the paper's) or ``"fpn"``.
        categories: ``[{"id": coco_id, "name": ...}]``, set from the training data by ``gex detect train``.
        backbone_init: a ``gex train`` checkpoint or a ResNet state dict to start the backbone
            from (read once when the module is built; ``None``: random initialisation).
        frozen_bn: freeze every BatchNorm of the backbone (``False`` trains them).
        trainable_layers: backbone units (stem, stages) that train, counted from the last, as
            torchvision's ``trainable_backbone_layers`` (ResNet-50: 0..5); default 3 with
            ``backbone_init`` (conv1 and conv2_x frozen), all without. The checkpoint records the
            value used.
        backbone_kwargs: further keyword arguments of the backbone, passed to
            :func:`~gather_excite.create_model` (e.g. ``{"input_size": 224}``, which sizes the
            global-extent gathers; ``{"stride_in_1x1": false}`` for torchvision's ResNet weights).
        feature_levels: ``fpn`` only: the backbone's stage labels that feed the FPN, e.g.
            ``[conv3_x, conv4_x, conv5_x]`` of a ResNet (default: every stage after the stem); a max-pooled level
            is added on top, as in torchvision.
        fpn_channels: ``fpn`` only: channels of the FPN's feature maps.
        representation_size: ``fpn`` only: width of the box head's two fully connected layers.
        anchor_sizes: anchor sizes in pixels, one list per feature map (``c4``: one list;
            ``fpn``: one per level plus the pooled one). Default: ``c4`` ``[[32, 64, 128, 256, 512]]``,
            ``fpn`` 8x each level's stride, as in torchvision.
        aspect_ratios: anchor height/width ratios, the same on every feature map (default
            ``[0.5, 1.0, 2.0]``).
        min_size: the detector resizes every image so that its shorter side is this many pixels,
            unless its longer side would exceed ``max_size`` (``gex detect train`` sets it from
            ``data.min_size``).
        max_size: the largest longer side in pixels after the detector's resize (``gex detect train``
            sets it from ``data.max_size``).
        detector_kwargs: further ``FasterRCNN`` arguments (RPN/RoI sampling, ``image_mean``, ...);
            an unknown key, or one that another argument sets, is refused naming it.
        lr: SGD's peak learning rate (> 0) for the global batch, not rescaled with the number of
            devices (torchvision's references: 0.02 for 16 images a step).
        momentum: SGD momentum, >= 0.
        weight_decay: SGD's L2 weight decay, >= 0.
        warmup_steps: linear warm-up from ``lr * warmup_factor`` over this many steps.
        warmup_factor: the fraction of ``lr``, in (0, 1], that the warm-up starts from.
        schedule: ``"multistep"`` divides by ``1/gamma`` at the ``milestones`` (epochs),
            ``"cosine"`` decays to zero over the run, ``"constant"``.
        milestones: the epochs at which the ``multistep`` schedule multiplies the rate by ``gamma``
            (default: none, a constant rate after the warm-up).
        gamma: the factor, in (0, 1], of each ``multistep`` drop (0.1: divide by 10).
    """

    # The hyperparameters that decide the detector's parameters, their shapes (aspect_ratios: the
    # RPN head's anchor count), their kind (frozen_bn: FrozenBatchNorm2d has no num_batches_tracked)
    # or the optimizer's parameter list (trainable_layers): a checkpoint must agree on them.
    # detector_kwargs holds none such (model.DETECTOR_KWARGS: thresholds, sampling, sizes).
    architecture_keys = (
        *DETECTOR_KEYS,
        *(key for key in _DETECTOR_ARGUMENTS if key not in (*DETECTOR_KEYS, "min_size", "max_size")),
        "aspect_ratios",
    )
    architecture_noun = "detector"

    def __init__(
        self,
        backbone: str = "ge_theta_e8_resnet50",
        *,
        layout: str = "c4",
        categories: list[dict[str, JSONValue]] | None = None,
        backbone_init: str | None = None,
        frozen_bn: bool = True,
        trainable_layers: int | None = None,
        backbone_kwargs: dict[str, JSONValue] | None = None,
        feature_levels: list[str] | None = None,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        anchor_sizes: list[list[int]] | None = None,
        aspect_ratios: list[float] | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        detector_kwargs: dict[str, JSONValue] | None = None,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_steps: int = 500,
        warmup_factor: float = 0.001,
        schedule: DetectionSchedule = "multistep",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if schedule not in ("multistep", "cosine", "constant"):
            raise ConfigError(f"schedule must be multistep, cosine or constant, got {schedule!r}")
        if not lr > 0:
            raise ConfigError(f"lr must be > 0, got {lr!r}")
        split_model_name(backbone)  # an unknown name, with the close ones, before anything is built
        sizes = {"fpn_channels": fpn_channels, "representation_size": representation_size}
        for name, value in {**sizes, "warmup_steps": warmup_steps}.items():
            minimum = 0 if name == "warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name, value in (("warmup_factor", warmup_factor), ("gamma", gamma)):
            if not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
        if not (momentum >= 0 and weight_decay >= 0):
            raise ConfigError(f"momentum and weight_decay must be >= 0, got {momentum!r} and {weight_decay!r}")
        if categories is None or not categories:
            raise ConfigError("categories must list the data's categories ([{'id': ..., 'name': ...}]), got none")
        check_detector_kwargs(detector_kwargs or {}, reserved=_RESERVED_KWARGS)
        ratios = (0.5, 1.0, 2.0) if aspect_ratios is None else aspect_ratios
        check_anchors(anchor_sizes, ratios)  # before backbone_init is read
        self.save_hyperparameters()
        weights = load_backbone_state(backbone_init, backbone, backbone_kwargs) if backbone_init else None
        self.model = fasterrcnn_ge_resnet(
            backbone,
            num_classes=len(categories) + 1,
            backbone_weights=weights,
            aspect_ratios=tuple(ratios),
            **{key: self.hparams[key] for key in _DETECTOR_ARGUMENTS},
            **dict(detector_kwargs or {}),
        )
        # The values used, not null, for --resume to compare: the trainable_layers default depends
        # on backbone_init, which a resumed run or gex detect eval (backbone_init: null) may not repeat.
        self.hparams["trainable_layers"] = self.model.backbone_trainable_layers
        self.hparams["aspect_ratios"] = [float(r) for r in ratios]
        self._predictions: list[tuple[int, list[dict[str, Any]]]] = []
        self.coco_result: dict[str, Any] | None = None

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label 1..K (index 0 is label 1)."""
        return [int(c["id"]) for c in self.hparams["categories"]]

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = sum(losses.values())
        # Per-process losses, unsynced: a collective in the rank-0 progress bar would deadlock DDP.
        count = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=count)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=count)
        return loss

    def _evaluation_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], stage: str) -> None:
        images, targets = batch
        ids = self.category_ids
        for output, target in zip(self.model(images), targets, strict=True):
            boxes = output["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # COCO results are [x, y, width, height]
            detections = [
                {"category_id": ids[label - 1], "bbox": box, "score": score}
                for box, score, label in zip(
                    boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), strict=True
                )
            ]
            self._predictions.append((int(target["image_id"]), detections))

    def _evaluation_epoch_end(self, stage: str) -> None:
        predictions, self._predictions = self._predictions, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
        if self.trainer.sanity_checking:
            return
        datamodule = self.trainer.datamodule
        result = coco_evaluate(datamodule.val_coco, predictions, categories=self.hparams["categories"])
        self.coco_result = result
        # Every process computed the same result from the same gathered list: no sync needed.
        self.log(f"{stage}/AP", result["AP"] if result["AP"] is not None else 0.0, prog_bar=True)
        self.log(f"{stage}/AP50", result["AP50"] if result["AP50"] is not None else 0.0, prog_bar=True)

    def evaluation_report(self, datamodule: Any, metrics: dict[str, Any], *, checkpoint: str | None) -> dict[str, Any]:
        """COCO bbox AP/AR (fractions), per-class AP, the category map, params and MACs of the detector.

        MACs are counted (:func:`gather_excite.complexity`) for one forward pass on the first
        validation image's size: ``macs`` for the whole detector on a blank image of that size
        (it resizes the image itself; its RoI head runs on the proposals that the RPN keeps there,
        at most ``rpn_post_nms_top_n_test``), ``backbone_macs`` for the backbone (and FPN) on the
        batch the detector gives it, ``eval_size``: resized and padded to a multiple of 32
        (:func:`~gather_excite.detection.evaluation_size`).
        """
        result = self.coco_result
        if result is None:
            raise DataError("the evaluation produced no COCO result (empty validation split?)")
        first = datamodule.val_coco.imgs[min(datamodule.val_coco.imgs)]
        width, height = int(first["width"]), int(first["height"])
        size = evaluation_size(self, width, height)
        counts = complexity(self.model, input_size=(3, height, width))
        backbone = complexity(self.model.backbone, input_size=size)
        hp = self.hparams
        return {
            "model": hp["backbone"],
            "layout": hp["layout"],
            "backbone_kwargs": dict(hp.get("backbone_kwargs") or {}),
            "checkpoint": checkpoint,
            "data_root": str(datamodule.root),
            "val_annotations": str(datamodule.hparams["val_annotations"]),
            "categories": [dict(c, label=i + 1) for i, c in enumerate(hp["categories"])],
            **result,
            "eval_size": list(size),
            "params": int(counts["params"]),
            "macs": int(counts["macs"]),
            "backbone_params": int(backbone["params"]),
            "backbone_macs": int(backbone["macs"]),
        }

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = self._sgd([p for p in self.parameters() if p.requires_grad])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // self._planned_epochs)
        warmup, factor = int(hp["warmup_steps"]), float(hp["warmup_factor"])
        milestones = [int(m) * per_epoch for m in (hp["milestones"] or [])]

        def scale(step: int) -> float:
            # torchvision's references: linear warm-up, then the schedule, both per step.
            warm = factor + (1 - factor) * step / warmup if step < warmup else 1.0
            if hp["schedule"] == "multistep":
                return warm * hp["gamma"] ** sum(step >= m for m in milestones)
            if hp["schedule"] == "cosine":
                return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            return warm

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """As :meth:`SGDModule.check_checkpoint`, for a detector checkpoint. One saved before ``trainable_layers``
        and the default ``aspect_ratios`` were recorded is read as what that version used: every backbone unit
        trained, ratios (0.5, 1, 2)."""
        if not is_detector_checkpoint(checkpoint):
            raise CheckpointError(
                "checkpoint is not a detector checkpoint (gex detect train): it lacks "
                f"{[k for k in DETECTOR_KEYS if k not in (checkpoint.get('hyper_parameters') or {})]}"
            )
        saved = dict(checkpoint["hyper_parameters"])
        saved.setdefault("trainable_layers", self.model.backbone_units)
        if saved.get("aspect_ratios") is None:
            saved["aspect_ratios"] = [0.5, 1.0, 2.0]
        super().check_checkpoint({**checkpoint, "hyper_parameters": saved})
