"""The LightningModule that trains and evaluates any registered network with SGD and the paper's schedules."""

from __future__ import annotations

import difflib
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..complexity import complexity
from ..errors import CheckpointError, ConfigError, GexError, one_line
from ..layers._validate import check_int, pair
from ..models import create_model, list_models

__all__ = [
    "MODEL_KEYS",
    "NORM_LAYERS",
    "ClassificationModule",
    "JSONValue",
    "SGDModule",
    "Schedule",
    "describe_model_mismatch",
    "weight_decay_groups",
]

Schedule = Literal["plateau", "step", "multistep", "cosine", "constant"]

# The type of keyword-argument mappings a config gives (arch_kwargs, detector_kwargs, ...): plain JSON data.
# jsonargparse builds the class named by a ``class_path`` it finds in an argument typed ``Any``, and leaves
# a ``class_path`` in this type as the string it is (cli/_config_guard.py refuses it besides).
JSONValue = str | int | float | bool | None | list["JSONValue"] | dict[str, "JSONValue"]

# Hyperparameters that decide the network's architecture; a checkpoint must agree on all of them.
MODEL_KEYS: tuple[str, ...] = ("arch", "num_classes", "in_chans", "input_size", "arch_kwargs")


def describe_model_mismatch(
    saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = MODEL_KEYS
) -> list[str]:
    """``["arch: checkpoint 'se_resnet50', this run 'resnet50'", ...]`` for every key of ``keys`` that differs."""
    differences = []
    for key in keys:
        old, new = saved.get(key), current.get(key)
        if key == "arch_kwargs":
            old, new = dict(old or {}), dict(new or {})
        if key == "input_size":
            old, new = _size_pair(old), _size_pair(new)
        if old != new:
            differences.append(f"{key}: checkpoint {old!r}, this run {new!r}")
    return differences


def _check_model_arguments(arch: str, *, num_classes: int, in_chans: int, input_size: Any) -> None:
    """Raise :class:`ConfigError` for an unregistered ``arch`` or a count or size below 1."""
    names = list_models()
    if arch not in names:
        close = difflib.get_close_matches(str(arch), names, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"arch={arch!r} is not a registered model{hint}; gather_excite.list_models() names all")
    try:
        check_int(num_classes, "num_classes")
        check_int(in_chans, "in_chans")
        pair(input_size, "input_size")
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _size_pair(size: Any) -> Any:
    """``(h, w)`` of a valid image size; anything else (an old checkpoint's ``None``) as it is, to be reported."""
    try:
        return pair(size, "input_size")
    except ValueError:
        return size


# The normalisation layers whose scale and shift ``norm_weight_decay`` applies to (torchvision's
# reference scripts split the same classes).
NORM_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
)  # fmt: skip


def weight_decay_groups(
    model: nn.Module, params: Any, weight_decay: float, *, norm: float | None = None, bias: float | None = None
) -> list[Any]:
    """``params`` as optimiser parameter groups, as torchvision's ``--norm-weight-decay`` and
    ``--bias-weight-decay`` split them: every bias (a parameter named ``bias``) gets ``bias``, the other
    parameters of a normalisation layer ``norm``, the rest ``weight_decay``; ``None`` means
    ``weight_decay``. The authors' Caffe models set both to 0 (``decay_mult: 0`` on every BatchNorm and
    bias). Without a split the parameters stay one group, in their order, as before the option existed
    (so checkpoints of either kind resume)."""
    params = list(params)
    if (norm is None or norm == weight_decay) and (bias is None or bias == weight_decay):
        return params
    kind: dict[int, str] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name == "bias" and bias is not None:
                kind.setdefault(id(parameter), "bias")
            elif isinstance(module, NORM_LAYERS) and norm is not None:
                kind.setdefault(id(parameter), "norm")
    decay = {"other": weight_decay, "norm": norm, "bias": bias}
    grouped: dict[str, list[nn.Parameter]] = {"other": [], "norm": [], "bias": []}
    for parameter in params:
        grouped[kind.get(id(parameter), "other")].append(parameter)
    return [{"params": group, "weight_decay": decay[name]} for name, group in grouped.items() if group]


class SGDModule(L.LightningModule):
    """What the classifier and the detector share: validation and test by stage name, SGD, the checkpoint check.

    A subclass computes a batch's share of the evaluation in ``_evaluation_step(batch, stage)``
    and the stage's figures in ``_evaluation_epoch_end(stage)`` (``stage``: ``"val"`` or
    ``"test"``); its hyperparameters hold ``lr``, ``momentum`` and ``weight_decay``. A
    checkpoint whose ``architecture_keys`` differ from this module's is refused on loading.
    """

    architecture_keys: tuple[str, ...] = ()
    architecture_noun = "model"  # "checkpoint was saved for a different <noun>"
    mismatch_advice = ""  # appended to that message

    def _evaluation_step(self, batch: Any, stage: str) -> None:
        raise NotImplementedError

    def _evaluation_epoch_end(self, stage: str) -> None:
        raise NotImplementedError

    def evaluation_report(self, datamodule: Any, metrics: dict[str, Any], *, checkpoint: str | None) -> dict[str, Any]:
        """The evaluation JSON of a finished test run (:func:`~gather_excite.engine.evaluate`).

        ``metrics`` are what the run logged; ``checkpoint`` names the weights, for the record.
        """
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    def _sgd(self, params: Any, **options: Any) -> torch.optim.SGD:
        """SGD over ``params`` with the ``lr``, ``momentum`` and ``weight_decay`` hyperparameters, and
        ``norm_weight_decay``/``bias_weight_decay`` where set (see :func:`weight_decay_groups`)."""
        hp = self.hparams
        groups = weight_decay_groups(
            self, params, hp["weight_decay"], norm=hp.get("norm_weight_decay"), bias=hp.get("bias_weight_decay")
        )
        return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"], **options)

    @property
    def _planned_epochs(self) -> int:
        """The run's ``max_epochs``; 1 when it is bounded by steps instead (``max_epochs`` -1 or unset)."""
        max_epochs = self.trainer.max_epochs
        return max_epochs if max_epochs and max_epochs > 0 else 1

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless the loaded ``checkpoint`` was saved for this architecture."""
        saved = checkpoint.get("hyper_parameters") or {}
        differences = describe_model_mismatch(saved, dict(self.hparams), self.architecture_keys)
        if differences:
            raise CheckpointError(
                f"checkpoint was saved for a different {self.architecture_noun}; it differs in "
                + "; ".join(differences)
                + self.mismatch_advice
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)


class ClassificationModule(SGDModule):
    """Cross-entropy training of ``create_model(arch, ...)`` with SGD; logs top-1/top-5 *error* in percent.

    Every argument is a plain value (saved as a hyperparameter, so checkpoints load with
    ``torch.load(weights_only=True)`` and :meth:`load_from_checkpoint` rebuilds the network).

    Args:
        arch: a registered model name (``gather_excite.list_models()``), e.g. ``ge_theta_resnet50``.
        num_classes: classifier outputs, passed to :func:`~gather_excite.create_model`; must equal the
            data's class count (ImageNet 1000, CIFAR-10 10, CIFAR-100 100, Fashion-MNIST 10).
        in_chans: input image channels (3: RGB; 1: Fashion-MNIST); must equal the data's.
        input_size: the image size in pixels the network is built for, ``N`` or ``[H, W]``: it sizes
            the global-extent GE-θ gathers (224 for ImageNet, 32 for CIFAR, 28 for Fashion-MNIST).
        arch_kwargs: further keyword arguments of the backbone (e.g. ``{"width": 8}``).
        pretrained: weights to start from, as ``create_model``'s argument: a ``.safetensors`` file, a
            ``torch.save``'d state dict, a ``gex train`` checkpoint, a ``gex export`` folder, an
            ``http(s)://`` URL, ``hf-hub:ORG/REPO[@REVISION]`` or ``torchvision[:TAG]`` (ResNet-50/101/152).
            ``None``: random initialisation. Only read when the module is built for training: loading
            a checkpoint of this module passes ``None``.
        context_init: how to start the context modules that ``pretrained`` lacks (all of them without
            weights): ``"identity"`` (the only value) makes the network compute the baseline's function;
            ``None`` keeps their random initialisation.
        lr: SGD learning rate (> 0) for the global batch, not rescaled with the number of devices
            (the paper: 0.1).
        momentum: SGD momentum, >= 0 (the paper: 0.9).
        weight_decay: SGD's L2 weight decay, >= 0 (the authors' release: 1e-4).
        norm_weight_decay: the weight decay of normalisation layers' scales and shifts (torchvision's
            option of this name; ``None``: ``weight_decay``). The ImageNet recipes set 0, as the
            authors' Caffe models do.
        bias_weight_decay: the weight decay of every bias (torchvision's option of this name; ``None``:
            ``weight_decay``). The ImageNet recipes set 0, as the authors' Caffe models do.
        bn_momentum: the running-statistics momentum of every BatchNorm (``None``: each module's own,
            PyTorch's 0.1 in the backbones, 0.05 in the gathers). The ImageNet recipes set 0.05: the
            authors' Caffe BN averages with decay 0.95 everywhere.
        nesterov: Nesterov momentum in SGD (needs ``momentum`` > 0).
        schedule: ``"plateau"`` divides the rate by ``1/gamma`` when ``plateau_monitor`` has not
            improved for ``plateau_patience`` epochs, at most ``plateau_drops`` times (the paper's
            ImageNet recipe); ``"step"`` every ``step_size`` epochs (Figure 4: 30); ``"multistep"``
            at ``milestones``; ``"cosine"`` to zero over ``max_epochs``; ``"constant"``.
        gamma: the factor, in (0, 1], that multiplies the learning rate at each drop of the
            ``plateau``, ``step`` and ``multistep`` schedules (0.1: divide by 10).
        step_size: epochs between two drops of the ``step`` schedule.
        milestones: the epochs at which the ``multistep`` schedule drops the rate (required by it;
            ignored by the others).
        plateau_monitor: the logged metric that the ``plateau`` schedule watches, lower is better
            (e.g. ``val/loss``, ``val/top1_err``).
        plateau_patience: epochs without improvement of ``plateau_monitor`` before a ``plateau`` drop.
        plateau_drops: the most drops of the ``plateau`` schedule; the rate then stays at
            ``lr * gamma ** plateau_drops`` (the paper: 3).
        label_smoothing: of the cross-entropy (0 in the paper).
        channels_last: NHWC memory layout for the network and its inputs (faster convs on GPUs).
        compile: ``torch.compile`` the network in place (state-dict keys unchanged).
    """

    architecture_keys = MODEL_KEYS
    mismatch_advice = ". Resume with the checkpoint's model settings or start a new run (another --out)"

    def __init__(
        self,
        arch: str = "cifar_resnet20",
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        input_size: int | tuple[int, int] = 32,
        arch_kwargs: dict[str, JSONValue] | None = None,
        pretrained: str | None = None,
        context_init: str | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
        bn_momentum: float | None = None,
        nesterov: bool = False,
        schedule: Schedule = "plateau",
        gamma: float = 0.1,
        step_size: int = 30,
        milestones: list[int] | None = None,
        plateau_monitor: str = "val/loss",
        plateau_patience: int = 5,
        plateau_drops: int = 3,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_model_arguments(arch, num_classes=num_classes, in_chans=in_chans, input_size=input_size)
        if schedule not in ("plateau", "step", "multistep", "cosine", "constant"):
            raise ConfigError(f"schedule must be plateau, step, multistep, cosine or constant, got {schedule!r}")
        if schedule == "multistep" and not milestones:
            raise ConfigError(f"schedule='multistep' needs milestones (a list of epochs), got {milestones!r}")
        if not lr > 0:
            raise ConfigError(f"lr must be > 0, got {lr!r}")
        if not 0 < gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {gamma!r}")
        if not (momentum >= 0 and weight_decay >= 0):  # torch.optim.SGD's own check, before any work
            raise ConfigError(f"momentum and weight_decay must be >= 0, got {momentum!r} and {weight_decay!r}")
        for value, flag in ((norm_weight_decay, "norm_weight_decay"), (bias_weight_decay, "bias_weight_decay")):
            if value is not None and not value >= 0:
                raise ConfigError(f"{flag} must be >= 0 or None, got {value!r}")
        if not 0 <= label_smoothing <= 1:
            raise ConfigError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        if bn_momentum is not None and not 0 < bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1] or None, got {bn_momentum!r}")
        if isinstance(input_size, list):
            input_size = tuple(input_size)  # type: ignore[assignment]
        self.save_hyperparameters()
        try:
            self.net: nn.Module = create_model(
                arch,
                num_classes=num_classes,
                in_chans=in_chans,
                input_size=input_size,
                pretrained=pretrained,
                context_init=context_init,
                **dict(arch_kwargs or {}),
            )
        except (TypeError, ValueError) as err:  # the other arguments are checked above: arch_kwargs is at fault
            if isinstance(err, GexError):
                raise
            raise ConfigError(f"arch_kwargs {dict(arch_kwargs or {})} for {arch}: {one_line(err)}") from None
        if bn_momentum is not None:
            for module in self.net.modules():
                if isinstance(module, nn.BatchNorm2d):  # SyncBatchNorm, converted later, copies it
                    module.momentum = bn_momentum
        top_k = min(5, num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_top1", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_top5", MulticlassAccuracy(num_classes, top_k=top_k, average="micro"))
        # The evaluation loss as a sum over images and a count, synced over all processes like the errors
        # (Lightning's own mean of a logged value truncates the synced image count to an integer mean).
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._compiled = False
        self._epoch_lr: float | None = None

    @property
    def image_size(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the inputs the network was built for."""
        height, width = pair(self.hparams["input_size"], "input_size")
        return (int(self.hparams["in_chans"]), int(height), int(width))

    def configure_model(self) -> None:
        if self.hparams["channels_last"]:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams["compile"] and not self._compiled:
            self.net.compile()
            self._compiled = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams["label_smoothing"])
        getattr(self, f"{stage}_top1").update(logits, targets)
        getattr(self, f"{stage}_top5").update(logits, targets)
        if stage == "train":
            # The training loss is this process's mean: syncing it would add a collective that the
            # rank-0 progress bar triggers before the other ranks reach it (a DDP deadlock).
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        else:
            # Errors and loss are exact over all processes (torchmetrics sums, synced in compute()); the
            # evaluation sampler gives each image to exactly one process (ImageClassificationData).
            getattr(self, f"{stage}_loss").update(loss.detach(), weight=targets.shape[0])
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def _evaluation_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        self._step(batch, stage)

    def _evaluation_epoch_end(self, stage: str) -> None:
        self._log_errors(stage)

    def evaluation_report(self, datamodule: Any, metrics: dict[str, Any], *, checkpoint: str | None) -> dict[str, Any]:
        """Top-1/top-5 error (%) and loss of the test run, the data it read, params and MACs at the input size."""
        counts = complexity(self.net, input_size=self.image_size)
        hp = self.hparams
        return {
            "model": hp["arch"],
            "arch_kwargs": dict(hp.get("arch_kwargs") or {}),
            "checkpoint": checkpoint,
            "dataset": datamodule.dataset,
            "data_root": datamodule.root,
            "split": "test" if datamodule.dataset != "imagefolder" else datamodule.val_split,
            "num_images": len(datamodule.val_set) if datamodule.val_set is not None else None,
            "crop": list(self.image_size),
            "top1_err": float(metrics["test/top1_err"]),
            "top5_err": float(metrics["test/top5_err"]),
            "top5_k": min(5, int(hp["num_classes"])),
            "loss": float(metrics["test/loss"]),
            "params": int(counts["params"]),
            "macs": int(counts["macs"]),
        }

    def _log_errors(self, stage: str) -> None:
        # compute() syncs the counts (and loss sums) over all processes: the figures of the whole split.
        for k in ("top1", "top5"):
            metric = getattr(self, f"{stage}_{k}")
            self.log(f"{stage}/{k}_err", 100.0 * (1.0 - metric.compute()), prog_bar=k == "top1", sync_dist=True)
            metric.reset()
        if stage != "train":
            metric = getattr(self, f"{stage}_loss")
            self.log(f"{stage}/loss", metric.compute(), prog_bar=True, sync_dist=True)
            metric.reset()

    def on_train_epoch_start(self) -> None:
        # The rate this epoch trains at: Lightning steps epoch-interval schedulers after the epoch's
        # last batch, before on_train_epoch_end, which would log the next epoch's rate.
        self._epoch_lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self) -> None:
        self._log_errors("train")
        lr = self._epoch_lr if self._epoch_lr is not None else self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("lr", lr, sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = self._sgd(self.parameters(), nesterov=hp["nesterov"])
        schedule = hp["schedule"]
        if schedule == "constant":
            return optimizer
        if schedule == "plateau":
            # min_lr stops the drops after `plateau_drops` of them (the paper: three).
            scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=hp["gamma"],
                patience=hp["plateau_patience"],
                min_lr=hp["lr"] * hp["gamma"] ** hp["plateau_drops"] * (1 - 1e-6),
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": hp["plateau_monitor"], "interval": "epoch"},
            }
        if schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp["step_size"], gamma=hp["gamma"])
        elif schedule == "multistep":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(hp["milestones"]), gamma=hp["gamma"]
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self._planned_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
