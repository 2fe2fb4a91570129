"""Public helpers to rebuild a trained model and its data for evaluation and analysis.

Typical use (``gex eval`` and ``gex analyze`` do exactly this)::

    from gather_excite.engine import load_for_evaluation
    module, data = load_for_evaluation("runs/ge/checkpoints/best.ckpt", data={"root": "/data/imagenet"})
    network = module.net            # the plain nn.Module, in eval mode
    data.setup("validate")
    loader = data.val_dataloader()  # single centre crop, the recipe's normalisation
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data import ImageClassificationData
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..models import MODELS, default_input_size
from .checkpoint import read_checkpoint
from .module import ClassificationModule

__all__ = ["build_datamodule", "load_for_evaluation", "load_model", "module_from_checkpoint"]


def load_model(
    checkpoint_or_name: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> ClassificationModule:
    """A :class:`ClassificationModule` in eval mode from a checkpoint file or a registered model name.

    A checkpoint (``*.ckpt`` from ``gex train``/``gex compare``) is loaded with
    ``weights_only=True`` and rebuilds the network from its saved hyperparameters; the keyword
    arguments, if given, must agree with them (a mismatch raises naming the differing keys).
    A model name (``gather_excite.list_models()``) gives freshly initialised weights built with
    ``num_classes`` (default 1000), ``in_chans`` (3), ``input_size`` (the backbone's: 224 for the
    ImageNet networks, 32 for the CIFAR ones, as ``create_model``) and ``arch_kwargs``.
    The plain network is ``.net``; ``.image_size`` is its ``(C, H, W)`` input.
    """
    requested = {
        key: value
        for key, value in (
            ("num_classes", num_classes),
            ("in_chans", in_chans),
            ("input_size", input_size),
            ("arch_kwargs", arch_kwargs),
        )
        if value is not None
    }
    path = Path(checkpoint_or_name).expanduser()
    if path.is_file():
        module = module_from_checkpoint(read_checkpoint(path, map_location=map_location), path)
        differences = [
            f"{key}: checkpoint {module.hparams[key]!r}, requested {value!r}"
            for key, value in requested.items()
            if (tuple(value) if isinstance(value, list) else value)
            != (tuple(module.hparams[key]) if isinstance(module.hparams[key], list) else module.hparams[key])
        ]
        if differences:
            raise CheckpointError(f"checkpoint {str(path)!r} holds a different model: " + "; ".join(differences))
        return module.to(map_location).eval()
    name = str(checkpoint_or_name)
    if name not in MODELS:
        looks_like_path = os.sep in name or name.endswith((".ckpt", ".pt", ".pth"))
        what = "checkpoint file does not exist" if looks_like_path else "is neither a checkpoint file nor a model name"
        raise CheckpointNotFoundError(f"checkpoint_or_name={name!r}: {what} (model names: gather_excite.list_models())")
    # The backbone's own input size (224 ImageNet, 32 CIFAR), as create_model(name) builds it.
    defaults: dict[str, Any] = {"num_classes": 1000, "in_chans": 3, "input_size": default_input_size(name)}
    module = ClassificationModule(name, **{**defaults, **requested})
    return module.to(map_location).eval()


def module_from_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> ClassificationModule:
    """A :class:`ClassificationModule` built from a checkpoint dict's plain hyperparameters, weights loaded.

    Only the module's own arguments are read; a class path or instantiator saved beside them is
    never imported (so a checkpoint cannot name code to run).
    """
    # The checkpoint holds the trained weights: never fetch again the ones that training started from.
    accepted = set(inspect.signature(ClassificationModule.__init__).parameters) - {"self", "pretrained", "context_init"}
    hparams = {key: value for key, value in checkpoint["hyper_parameters"].items() if key in accepted}
    module = ClassificationModule(**hparams)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:  # missing/unexpected keys or shapes: the weights are not of this model
        raise CheckpointError(f"checkpoint {str(path)!r}: its weights do not fit its model {hparams.get('arch')!r}: "
                              f"{' '.join(str(err).split())[:300]}") from None  # fmt: skip
    return module


def build_datamodule(config: dict[str, Any] | str | os.PathLike[str], **overrides: Any) -> ImageClassificationData:
    """An :class:`ImageClassificationData` from a dict of its arguments or a ``gex train`` YAML config's ``data:``.

    ``overrides`` replace single arguments (e.g. ``root="/data/imagenet"``, ``num_workers=0``).
    """
    if isinstance(config, (str, os.PathLike)):
        with open(config) as handle:
            loaded = yaml.safe_load(handle) or {}
        config = loaded.get("data", loaded)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a YAML path, got {type(config).__name__}")
    # A class_path (as LightningCLI writes it) is never imported: the data are always this class.
    arguments = dict(config.get("init_args", config)) if "class_path" in config else dict(config)
    # LightningCLI adds private entries such as ``_instantiator`` to saved hyperparameters.
    arguments = {key: value for key, value in arguments.items() if not key.startswith("_")}
    arguments.update(overrides)
    accepted = set(inspect.signature(ImageClassificationData.__init__).parameters) - {"self"}
    unknown = sorted(set(arguments) - accepted)
    if unknown:
        raise ConfigError(
            f"unknown data argument(s) {', '.join(unknown)}; "
            f"ImageClassificationData takes {', '.join(sorted(accepted))}"
        )
    return ImageClassificationData(**arguments)


def load_for_evaluation(
    checkpoint: str | os.PathLike[str],
    *,
    data: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[ClassificationModule, ImageClassificationData]:
    """The model of ``checkpoint`` (eval mode) and the datamodule it was trained with.

    ``data`` overrides the saved datamodule arguments (e.g. ``{"root": ..., "num_workers": 0}``).
    """
    path = Path(checkpoint).expanduser()
    saved = read_checkpoint(path)
    module = module_from_checkpoint(saved, path).to(map_location).eval()
    arguments = saved.get(ImageClassificationData.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    if not isinstance(arguments, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: its saved data arguments are a {type(arguments).__name__}")
    datamodule = build_datamodule(arguments, **(data or {}))
    if datamodule.num_classes != module.hparams["num_classes"]:
        raise ConfigError(
            f"data has {datamodule.num_classes} classes but the checkpoint's model has {module.hparams['num_classes']}"
        )
    return module, datamodule
