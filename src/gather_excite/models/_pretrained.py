"""Pretrained weights for ``create_model(name, pretrained=...)``: files, export folders, URLs, the Hub, torchvision.

Every source becomes a :class:`Weights`: a flat state dict plus what is known about how the
weights were made (a ``config.json`` as ``gex export`` writes it: the architecture, its
constructor arguments, the data configuration and the evaluation figures). Files are read
with ``safetensors`` or ``torch.load(weights_only=True)`` only; nothing in them is executed.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, one_line
from ..serialization import load_json_file, load_torch_file

__all__ = [
    "CLASSIFIER",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "PretrainedArg",
    "Weights",
    "load_weights_into",
    "read_weights",
]

PretrainedArg = str | os.PathLike[str] | None

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Every backbone's classifier is ``fc`` (torchvision's name too).
CLASSIFIER = "fc"
HF_PREFIX = "hf-hub:"
TORCHVISION = "torchvision"
# torch.hub's convention: ``name-<first hex digits of the file's SHA-256>.ext`` (torchvision's own URLs).
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
# Lines of a mismatch message per kind before "... and N more".
_MAX_LISTED = 40


@dataclass
class Weights:
    """A state dict and what is known about it.

    ``config`` follows ``config.json`` of ``gex export``: ``architecture`` (registry name),
    ``model_args`` (constructor keyword arguments), ``pretrained_cfg`` (input size, mean/std,
    resize, interpolation, dataset), ``label_names`` and ``eval`` (figures), each optional.
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- reading


def _strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _unwrapped(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys without the prefix that DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) add."""
    return _strip_prefix(_strip_prefix(dict(state_dict), "module."), "_orig_mod.")


def _checkpoint_config(saved: dict[str, Any]) -> dict[str, Any]:
    """``config.json``-style metadata from a ``gex train`` checkpoint's saved hyperparameters."""
    from ..data_config import data_config_from_datamodule

    hparams = saved["hyper_parameters"]
    input_size = hparams.get("input_size")
    model_args = {
        "num_classes": hparams.get("num_classes"),
        "in_chans": hparams.get("in_chans"),
        "input_size": list(input_size) if isinstance(input_size, (list, tuple)) else input_size,
        **dict(hparams.get("arch_kwargs") or {}),
    }
    config: dict[str, Any] = {"architecture": hparams["arch"], "model_args": model_args}
    data = saved.get("datamodule_hyper_parameters")
    if data:
        data_config = data_config_from_datamodule(dict(data))
        config["pretrained_cfg"] = data_config.to_dict()
        if data_config.label_names:
            config["label_names"] = list(data_config.label_names)
    return config


def _read_torch_file(path: Path, source: str) -> Weights:
    saved = load_torch_file(path, f"pretrained={source!r}")
    config: dict[str, Any] = {}
    if (
        isinstance(saved, dict)
        and isinstance(saved.get("hyper_parameters"), dict)
        and "arch" in saved.get("hyper_parameters", {})
    ):
        config = _checkpoint_config(saved)
        state_dict = _strip_prefix(dict(saved.get("state_dict") or {}), "net.")
    else:
        state_dict = saved
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"pretrained={source!r}: the file holds no state dict (a dict of tensors)")
    state_dict = _unwrapped(state_dict)
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"pretrained={source!r}: entries that are not tensors: {', '.join(not_tensors[:5])}")
    return Weights(state_dict, source, config)


def _read_file(path: Path, source: str) -> Weights:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return Weights(_unwrapped(load_file(str(path))), source)
        except SafetensorError as err:
            raise CheckpointError(f"pretrained={source!r}: not a readable safetensors file ({err})") from None
    return _read_torch_file(path, source)


def _read_folder(folder: Path, source: str) -> Weights:
    weights_path, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights_path.is_file():
        raise CheckpointNotFoundError(
            f"pretrained={source!r}: the folder has no {WEIGHTS_FILE} (expected a folder written by gex export)"
        )
    weights = _read_file(weights_path, source)
    if config_path.is_file():
        weights.config = load_json_file(config_path, f"pretrained={source!r}: {CONFIG_FILE}")
    return weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str) -> Path:
    """The file at ``url`` in torch.hub's cache (``<hub dir>/checkpoints``), downloaded if absent.

    The expected SHA-256 (or a prefix of it) comes from a ``#sha256=HEX`` fragment or, as in
    torch.hub, from the file name ``name-HEX.ext``; a cached copy is re-checked against it. A file
    whose name carries its hash is cached under that name, as torch.hub does; any other under a
    folder named after the URL, since two URLs may end in the same name (every Hub file URL ends
    in ``model.safetensors``) and a name alone would hand one URL the other's weights.
    """
    parsed = urllib.parse.urlsplit(url)
    expected = None
    fragment = urllib.parse.parse_qs(parsed.fragment)
    if "sha256" in fragment:
        expected = fragment["sha256"][0].lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", expected):
            raise ConfigError(f"pretrained={url!r}: #sha256= must be hexadecimal digits, got {expected!r}")
    filename = os.path.basename(parsed.path)
    if not filename:
        raise ConfigError(f"pretrained={url!r}: the URL names no file")
    address = urllib.parse.urlunsplit(parsed._replace(fragment=""))
    destination = Path(torch.hub.get_dir()) / "checkpoints"
    if expected is None and (match := _HASH_IN_NAME.search(filename)):
        expected = match.group(1)
    else:
        destination /= "url-" + hashlib.sha256(address.encode()).hexdigest()[:16]
    destination /= filename
    if destination.is_file() and (expected is None or _sha256(destination).startswith(expected)):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(address, str(destination), hash_prefix=expected, progress=False)
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise CheckpointError(f"pretrained={url!r}: the download's SHA-256 does not match: {err}") from None
        raise
    except (urllib.error.URLError, OSError) as err:
        raise OSError(f"pretrained={url!r}: download failed ({err})") from None
    return destination


def _read_hub(spec: str) -> Weights:
    """``hf-hub:ORG/REPO[@REVISION]`` through huggingface_hub (its cache, ``HF_HUB_OFFLINE`` and tokens apply)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    repo_id, _, revision = spec[len(HF_PREFIX) :].partition("@")
    try:
        weights_path = hf_hub_download(repo_id, WEIGHTS_FILE, revision=revision or None)
        config_path = hf_hub_download(repo_id, CONFIG_FILE, revision=revision or None)
    except EntryNotFoundError as err:  # also a file missing from the cache offline
        raise CheckpointNotFoundError(
            f"pretrained={spec!r}: {WEIGHTS_FILE} and {CONFIG_FILE} are not in the Hub cache or the repository "
            f"({one_line(err)})"
        ) from None
    except HFValidationError as err:
        raise ConfigError(f"pretrained={spec!r}: expected hf-hub:ORG/REPO[@REVISION] ({one_line(err)})") from None
    except HfHubHTTPError as err:  # no such repository or revision, or no access to it
        raise CheckpointNotFoundError(f"pretrained={spec!r}: {one_line(err)}") from None
    weights = _read_file(Path(weights_path), spec)
    weights.config = load_json_file(config_path, f"pretrained={spec!r}: {CONFIG_FILE}")
    return weights


def _read_torchvision(spec: str, backbone: str, pretrained_file: str | os.PathLike[str] | None) -> Weights:
    """torchvision's ImageNet weights of ``backbone`` (``torchvision`` = DEFAULT, or ``torchvision:IMAGENET1K_V1``)."""
    from torchvision.models import get_model_weights

    if backbone not in ("resnet50", "resnet101", "resnet152"):
        raise ConfigError(f"pretrained={spec!r} is for the ResNet-50/101/152 backbones, not {backbone!r}")
    _, _, tag = spec.partition(":")
    enum = get_model_weights(backbone)
    try:
        weights = enum[tag or "DEFAULT"]
    except KeyError:
        raise ConfigError(
            f"pretrained={spec!r}: torchvision has {', '.join(w.name for w in enum)} for {backbone}"
        ) from None
    if pretrained_file is not None:
        state_dict = _read_file(Path(pretrained_file), str(pretrained_file)).state_dict
    else:
        state_dict = weights.get_state_dict(progress=True, check_hash=True)
    preset = weights.transforms()
    config = {
        "architecture": backbone,
        "model_args": {"num_classes": len(weights.meta["categories"]), "stride_in_1x1": False},
        "pretrained_cfg": {
            "input_size": [3, preset.crop_size[0], preset.crop_size[-1]],
            "mean": list(preset.mean),
            "std": list(preset.std),
            "resize_size": preset.resize_size[0],
            "interpolation": preset.interpolation.value,
            "dataset": "imagenet",
            "source": f"torchvision {backbone} {weights.name} ({weights.url})",
        },
        "label_names": list(weights.meta["categories"]),
        "eval": {f"imagenet1k_{k.replace('@', '')}": v for k, v in weights.meta["_metrics"]["ImageNet-1K"].items()},
    }
    return Weights(dict(state_dict), f"{spec} ({weights.name})", config)


def read_weights(
    pretrained: str | os.PathLike[str],
    *,
    backbone: str | None = None,
    pretrained_file: str | os.PathLike[str] | None = None,
) -> Weights:
    """The :class:`Weights` that ``pretrained`` names.

    Args:
        pretrained: a ``.safetensors`` file, a ``torch.save``'d state dict (torchvision layout,
            optionally wrapped in ``{"state_dict": ...}``), a ``gex train`` checkpoint, a folder of
            ``gex export``, an ``http(s)://`` URL (torch.hub's cache; ``#sha256=HEX`` checks it),
            ``hf-hub:ORG/REPO[@REVISION]``, or ``torchvision[:TAG]`` (ResNet-50/101/152).
        backbone: the backbone the weights are for (needed by ``torchvision``).
        pretrained_file: a local copy of the weights that ``pretrained`` would download (torchvision,
            URLs), as timm's ``pretrained_cfg_overlay=dict(file=...)``.
    """
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(
            f"pretrained must be a path, URL, 'hf-hub:ORG/REPO' or 'torchvision', got {type(pretrained).__name__} "
            f"({pretrained!r})"
        )
    spec = os.fspath(pretrained)
    if not spec.strip():  # Path("") is the working directory: it would load ./model.safetensors unasked
        raise ConfigError(
            f"pretrained={spec!r} is empty: expected a path, URL, 'hf-hub:ORG/REPO' or 'torchvision' (None: no weights)"
        )
    if spec == TORCHVISION or spec.startswith(TORCHVISION + ":"):
        return _read_torchvision(spec, backbone or "", pretrained_file)
    if pretrained_file is not None:
        return _read_file(Path(pretrained_file), f"{spec} (from {os.fspath(pretrained_file)})")
    if spec.startswith(HF_PREFIX):
        return _read_hub(spec)
    if spec.startswith(("https://", "http://")):
        return _read_file(_download(spec), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path, spec)
    if path.is_file():
        return _read_file(path, spec)
    raise CheckpointNotFoundError(
        f"pretrained={spec!r}: no such file or folder (expected a weights file, a gex export folder, an "
        "http(s):// URL, 'hf-hub:ORG/REPO' or 'torchvision')"
    )


# --------------------------------------------------------------------------------------- loading


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def _listed(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    more = [f"    ... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else []
    return [f"  {title} ({len(lines)}):", *(f"    {line}" for line in lines[:_MAX_LISTED]), *more]


def _without_head(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state_dict.items() if key.split(".")[0] != CLASSIFIER}


def _in_context(key: str) -> bool:
    return "context" in key.split(".")[:-1]


def load_weights_into(model: nn.Module, weights: Weights, *, model_name: str) -> set[str]:
    """Copy ``weights`` into ``model``; returns the names of the units whose context module was not in them.

    The classifier (``fc``) is replaced, with a warning, when its class count differs or the
    weights have none (saved with ``num_classes=0``), as timm does. Context-module entries may be
    absent when the weights have none at all (a baseline's weights retrofitted into a GE
    network). Anything else that does not fit raises a
    ``ValueError`` that names every differing key.
    """
    state_dict = dict(weights.state_dict)
    own = model.state_dict()
    head = f"{CLASSIFIER}.weight"
    if head not in own and getattr(model, "num_classes", None) == 0:  # features only, as timm's num_classes=0
        state_dict = _without_head(state_dict)
    classes = None
    if head in own and not any(key.split(".")[0] == CLASSIFIER for key in state_dict):
        classes = 0  # weights saved without a classifier (num_classes=0): the model's is new
    elif head in state_dict and head in own and state_dict[head].shape[0] != own[head].shape[0]:
        classes = state_dict[head].shape[0]
    if classes is not None:
        warnings.warn(
            f"pretrained {weights.source}: the weights classify {classes} classes, the model "
            f"{own[head].shape[0]}; the classifier {CLASSIFIER!r} is newly initialised",
            UserWarning,
            stacklevel=3,
        )
        state_dict, own = _without_head(state_dict), _without_head(own)
    retrofit = not any(_in_context(key) for key in state_dict)
    # A BatchNorm's step count may be absent (weights saved before PyTorch 0.4.1, converted ones); BatchNorm's
    # own loader fills it in, as in torchvision and timm.
    missing = [
        key
        for key in own
        if key not in state_dict and not (retrofit and _in_context(key)) and not key.endswith(".num_batches_tracked")
    ]
    unexpected = [key for key in state_dict if key not in own]
    reshaped = [key for key in state_dict if key in own and state_dict[key].shape != own[key].shape]
    if missing or unexpected or reshaped:
        lines = [
            f"pretrained weights {weights.source} do not fit {model_name}:",
            *_listed("missing from the weights", [f"{key} (model {_shape(own[key])})" for key in missing]),
            *_listed("not in the model", [f"{key} (weights {_shape(state_dict[key])})" for key in unexpected]),
            *_listed(
                "shapes differ",
                [f"{key}: weights {_shape(state_dict[key])}, model {_shape(own[key])}" for key in reshaped],
            ),
        ]
        if any(".gather.conv.weight" in key for key in reshaped):
            lines.append(
                "  (a global GE-θ kernel has the feature map's size: pass the input_size the weights were made for)"
            )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)
    if not retrofit:
        return set()
    from ._retrofit import context_units

    return {name for name, _ in context_units(model)}


def _model_arguments(weights: Weights, *, backbone: str, context: str | None) -> dict[str, Any]:
    """Constructor arguments recorded with the weights, where they were made for the same backbone."""
    from ._registry import MODELS

    architecture = weights.config.get("architecture")
    arguments: dict[str, Any] = {}
    if architecture in MODELS and MODELS[architecture][0] == backbone:
        arguments = dict(weights.config.get("model_args") or {})
        if isinstance(arguments.get("input_size"), list):
            arguments["input_size"] = tuple(arguments["input_size"])
        if context is not None:
            arguments.pop("context_layer", None)
    head = weights.state_dict.get(f"{CLASSIFIER}.weight")
    if arguments.get("num_classes") is None and head is not None and head.ndim == 2:
        arguments["num_classes"] = int(head.shape[0])
    return {key: value for key, value in arguments.items() if value is not None}


def _check_architecture(weights: Weights, *, name: str, backbone: str, context_layer: Any) -> None:
    """Refuse weights recorded as another network than ``name``; a baseline's weights may go into a network
    with context modules (the retrofit, see ``context_init``). Weights that name no registered model (a bare
    state dict, another library's) are checked key by key only."""
    from ._registry import MODELS

    architecture = weights.config.get("architecture")
    if architecture not in MODELS:
        return
    recorded_backbone, recorded_context = MODELS[architecture]
    # A baseline name trained with a context_layer argument (gex train --model.arch_kwargs) has that context.
    recorded_context = recorded_context or (weights.config.get("model_args") or {}).get("context_layer")
    if recorded_backbone == backbone and recorded_context in (None, context_layer):
        return
    recorded = architecture
    if recorded_context != MODELS[architecture][1]:
        recorded += f" with context_layer={recorded_context!r}"
    raise CheckpointError(
        f"pretrained weights {weights.source} were made for {recorded}, not {name}: load them with "
        f"create_model({architecture!r}, ...) (only a baseline's weights go into a network with context modules)"
    )


def create_pretrained(
    name: str,
    factory: Any,
    *,
    backbone: str,
    context: str | None,
    num_classes: int | None,
    pretrained: str | os.PathLike[str],
    pretrained_file: str | os.PathLike[str] | None,
    context_init: str | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """``create_model``'s path with weights: build with the weights' recorded arguments, load, init the rest."""
    from ._retrofit import init_context

    weights = read_weights(pretrained, backbone=backbone, pretrained_file=pretrained_file)
    arguments = _model_arguments(weights, backbone=backbone, context=context)
    if os.fspath(pretrained).startswith(TORCHVISION) and kwargs.get("stride_in_1x1", False):
        raise ConfigError(
            f"pretrained={os.fspath(pretrained)!r} holds torchvision's v1.5 ResNet (stride on the 3x3 conv); "
            "pass stride_in_1x1=False, not True"
        )
    arguments.update(kwargs)
    _check_architecture(weights, name=name, backbone=backbone, context_layer=arguments.get("context_layer"))
    if num_classes is not None:
        arguments["num_classes"] = num_classes
    arguments.setdefault("num_classes", 1000)
    model = factory(**arguments)
    uninitialised = load_weights_into(model, weights, model_name=name)
    if context_init is not None:
        init_context(model, context_init, only=uninitialised)
    elif uninitialised and any(
        parameter.numel() for unit in uninitialised for parameter in model.get_submodule(unit).context.parameters()
    ):
        warnings.warn(
            f"pretrained {weights.source} has no context modules: the {len(uninitialised)} context modules of "
            f"{name} keep their random initialisation; context_init='identity' starts the network as the weights' "
            "baseline",
            UserWarning,
            stacklevel=3,
        )
    cfg = dict(weights.config.get("pretrained_cfg") or {})
    if cfg and "crop_pct" not in cfg:  # torchvision's presets, folders exported before timm's keys were written
        from ..data_config import DataConfig

        cfg.update(DataConfig.from_dict(cfg).timm_keys())
    if cfg and weights.config.get("label_names") and not cfg.get("label_names"):
        cfg["label_names"] = list(weights.config["label_names"])
    if cfg.get("label_names") and len(cfg["label_names"]) != arguments["num_classes"]:
        cfg["label_names"] = None  # a replaced classifier: the names belong to the old classes
    if "num_classes" in cfg:  # timm's pretrained_cfg states it
        cfg["num_classes"] = arguments["num_classes"]
    if not cfg:  # weights without a configuration: the recipe's, as create_model gives without weights
        from ..data_config import recipe_config

        cfg = recipe_config(model).to_dict()
    model.pretrained_cfg = cfg
    return model
